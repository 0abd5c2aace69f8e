"""Explicit-inverse path against the Cholesky path of the GPU kernel path, same instance.

For d = 1e5, m = 1024 (float32 and bfloat16): median and max step/matvec/update time
of each m x m scheme, in interleaved rounds, and how often a step fell back to an exact
refactorisation.  Usage: python benchmarks/gpu_paths.py
"""
import sys

import numpy as np

import cupy as cp

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from gpu import filled_window  # noqa: E402


def main(d=100_000, m=1024):
    for dtype in ("float32", "bfloat16"):
        wins = {}
        for name, explicit in (("explicit C^-1", True), ("Cholesky", False)):
            w = filled_window(d, m, dtype, 1e-3 * d)
            if not explicit:
                w._explicit = False
                w._stale = True
                w._ensure_factor()
            count = [0]
            orig = w._refactor

            def spy(orig=orig, count=count):
                count[0] += 1
                return orig()
            w._refactor = spy
            wins[name] = (w, count)
        rs = cp.random.RandomState(1)
        gs = [rs.standard_normal(d, dtype=cp.float32) for _ in range(8)]
        times = {(n, op): [] for n in wins for op in ("step", "matvec", "update")}
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        for r in range(60):
            for n, (w, _) in wins.items():
                for op in ("step", "matvec", "update"):
                    g = gs[r % 8]
                    cp.cuda.Device().synchronize()
                    start.record()
                    getattr(w, op)(g)
                    stop.record()
                    stop.synchronize()
                    if r >= 5:
                        times[(n, op)].append(cp.cuda.get_elapsed_time(start, stop))
        for n, (w, count) in wins.items():
            cells = "  ".join(f"{op} {np.median(times[(n, op)]):.3f} (max {np.max(times[(n, op)]):.3f})"
                              for op in ("step", "matvec", "update"))
            print(f"{dtype:9s} {n:14s} {cells} ms; refactors {count[0]}")
        # agreement of the two paths after 180 identical updates each
        x = gs[0]
        ya, yb = (wins[n][0].matvec(x) for n in wins)
        print(f"{dtype:9s} explicit vs Cholesky relative difference "
              f"{float(cp.linalg.norm(ya - yb) / cp.linalg.norm(yb)):.2e}")


if __name__ == "__main__":
    main()
