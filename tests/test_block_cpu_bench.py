"""benchmarks/block_cpu.py at toy sizes: its baseline computes our block F^-1 (torch or
NumPy), and each table builds."""
import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
import block_cpu as bc  # noqa: E402

import mfac_linalg as ml  # noqa: E402


@pytest.mark.parametrize("use_torch", [False, True])
def test_baseline_is_the_block_inverse(monkeypatch, use_torch):
    if use_torch:
        pytest.importorskip("torch")
    else:
        monkeypatch.setattr(bc, "torch", None)
    G = np.random.default_rng(0).standard_normal((6, 40))
    base = bc.Baseline(G.copy(), 0.1, 16)           # blocks 16, 16 and a tail of 8
    op = ml.BlockInverseFisher(G, 0.1, block_size=16)
    x = np.random.default_rng(1).standard_normal(40)
    assert np.allclose(np.asarray(base.mul(x)), op @ x, rtol=1e-12, atol=0)
    assert np.allclose(np.asarray(base.diag()), op.diagonal(), rtol=1e-12, atol=0)
    U, s = bc.static_baseline(G.copy(), 0.1)
    U = np.asarray(U)
    Fi = np.eye(40) / 0.1 - sum(np.outer(U[i], U[i]) / s[i] for i in range(6))
    assert np.allclose(Fi, ml.StaticInverseFisher(G, 0.1).todense(), rtol=0, atol=1e-12)


def test_tables_build():
    rows = bc.diag_rows([("static", 3000, 4, None), ("block", 3000, 4, 64)], rounds=1)
    assert [r[:4] for r in rows] == [["static", "3,000", "4", "-"], ["block", "3,000", "4", "64"]]
    # the timings and ratios as printed (two decimals: a toy timing on a loaded machine
    # may print 0.00, so only their form is checked)
    assert all(math.isfinite(float(c)) and float(c) >= 0 for r in rows for c in r[4:])
    rows = bc.block_rows(1024, 4, [64], rounds=3)
    assert [r[1] for r in rows] == ["set-up", "IHVP", "diagonal", "(ours vs baseline)"]
