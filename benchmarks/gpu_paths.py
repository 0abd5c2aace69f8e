"""The two m x m engines of the GPU kernel path against each other, same data.

For d = 1e5, m = 1024 (float32 and bfloat16): median and max step/matvec/update time
with ``engine="explicit"`` (C^{-1} updated in place) and ``engine="cholesky"``
(the factor by rank-one deletion and append), in interleaved rounds, whether either
fell back to an exact rebuild (``since_refresh`` counts incremental updates), and
how far the two agree after the same updates.  Usage: python benchmarks/gpu_paths.py
"""
import sys

import numpy as np

import cupy as cp

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from gpu import filled_window  # noqa: E402


def main(d=100_000, m=1024, rounds=60):
    for dtype in ("float32", "bfloat16"):
        wins = {name: filled_window(d, m, dtype, 1e-3 * d, engine=eng)
                for name, eng in (("explicit C^-1", "explicit"), ("Cholesky", "cholesky"))}
        rs = cp.random.RandomState(1)
        gs = [rs.standard_normal(d, dtype=cp.float32) for _ in range(8)]
        times = {(n, op): [] for n in wins for op in ("step", "matvec", "update")}
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        for r in range(rounds):
            for n, w in wins.items():
                for op in ("step", "matvec", "update"):
                    g = gs[r % 8]
                    cp.cuda.Device().synchronize()
                    start.record()
                    getattr(w, op)(g)
                    stop.record()
                    stop.synchronize()
                    if r >= 5:
                        times[(n, op)].append(cp.cuda.get_elapsed_time(start, stop))
        for n, w in wins.items():
            cells = "  ".join(f"{op} {np.median(times[(n, op)]):.3f} (max "
                              f"{np.max(times[(n, op)]):.3f})" for op in ("step", "matvec", "update"))
            inc = w.state_dict()["since_refresh"]
            print(f"{dtype:9s} {n:14s} {cells} ms; incremental {inc} of {2 * rounds} updates")
        x = gs[0]
        ya, yb = (w.matvec(x) for w in wins.values())
        print(f"{dtype:9s} explicit vs Cholesky relative difference "
              f"{float(cp.linalg.norm(ya - yb) / cp.linalg.norm(yb)):.2e}")
        del wins
        cp.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
