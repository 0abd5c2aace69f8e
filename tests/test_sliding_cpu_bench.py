"""benchmarks/sliding_cpu.py's accumulate table at a toy size: it builds, and the
float64-accumulating window it times is faithful (error within 10x the float32 rounding
of the float64 window's result)."""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
import sliding_cpu as sc  # noqa: E402


def test_accumulate_table(capsys):
    sc.accumulate_rows([(4000, 8)], np.random.default_rng(0))
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("4,000")]
    assert [r[2] for r in rows] == ["matvec", "step"]
    matvec = rows[0]
    assert all(float(v) > 0 for v in matvec[3:6])
    assert float(matvec[-1]) <= 10.0          # err64 / rounding
