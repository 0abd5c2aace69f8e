"""Sliding-window inverse Fisher on the CPU: update/step cost against window size and floor.

Table 1 (dim = 1e4, float32): median update and step times for
m in {128, 256, 512, 1024, 2048}, once the window is full, and the ratio of
successive update times: the O(dim m) part doubles with m, the O(m^2) part
quadruples, an O(m^3) refactorization would grow 8x per doubling.  The
acceptance ratio is update(2048) / update(512) (quadratic: 16, cubic: 64).

Table 2 (large dim): step time over two raw GEMVs on the same (m, dim)
buffer (the memory floor: any method reads the buffer twice), measured in
interleaved rounds in the same run.

Times are medians over incremental updates; the exact refresh (every
``window`` updates by default, O(m^3)) is reported separately, amortised.

Usage: python benchmarks/sliding_cpu.py [--quick]
"""
import sys
import time

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _timing import compare, table  # noqa: E402

import mfac_linalg as ml  # noqa: E402


def filled(dim, m, rng, refresh_every=None):
    """A full window in one set-up (from_gradients: one Gram product, one factorisation)."""
    return ml.SlidingWindowInverseFisher.from_gradients(
        rng.standard_normal((m, dim), dtype=np.float32), 1e-3,
        refresh_every=refresh_every or 10**9)


def scaling(dim, windows, rng):
    rows, upd = [], {}
    for m in windows:
        w = filled(dim, m, rng)
        gs = rng.standard_normal((64, dim), dtype=np.float32)
        k = [0]

        def nxt():
            k[0] += 1
            return gs[k[0] % 64]
        reps = 31 if m <= 1024 else 15
        t = compare({"update": lambda: w.update(nxt()), "step": lambda: w.step(nxt())},
                    rounds=reps)
        t0 = time.perf_counter()
        w.refresh()
        t_ref = time.perf_counter() - t0
        upd[m] = t["update"]
        prev = upd.get(m // 2)
        rows.append([f"{m:,}", f"{t['update'] * 1e3:.2f}", f"{t['step'] * 1e3:.2f}",
                     f"{t['update'] / prev:.2f}" if prev else "-",
                     f"{t_ref * 1e3:.1f}", f"{t_ref / m * 1e3:.3f}"])
        print(f"  done m={m}", file=sys.stderr, flush=True)
    print(f"dim = {dim:,}, float32, medians of incremental updates")
    print(table(["m", "update ms", "step ms", "update(m)/update(m/2)", "refresh ms",
                 "refresh/m ms"], rows))
    if 512 in upd and 2048 in upd:
        print(f"update(2048) / update(512) = {upd[2048] / upd[512]:.1f}  "
              "(quadratic 16, cubic 64; target <= 24)")
    print()


def floor(sizes, rng):
    rows = []
    for dim, m in sizes:
        w = filled(dim, m, rng)
        G = w.gradients()               # a copy of the buffer: the same bytes, same layout
        x = rng.standard_normal(dim, dtype=np.float32)
        gs = rng.standard_normal((8, dim), dtype=np.float32)
        k = [0]

        def nxt():
            k[0] += 1
            return gs[k[0] % 8]
        t = compare({"gemv": lambda: G.T @ (G @ x), "step": lambda: w.step(nxt()),
                     "matvec": lambda: w.matvec(x)}, rounds=15)
        rows.append([f"{dim:,}", f"{m:,}", f"{dim * m:.1e}", f"{t['step'] * 1e3:.2f}",
                     f"{t['matvec'] * 1e3:.2f}", f"{t['gemv'] * 1e3:.2f}",
                     f"{t['step'] / t['gemv']:.2f}", f"{t['matvec'] / t['gemv']:.2f}"])
        print(f"  done dim={dim} m={m}", file=sys.stderr, flush=True)
    print("large dim, float32: step and matvec over two raw GEMVs on the buffer")
    print(table(["dim", "m", "dim*m", "step ms", "matvec ms", "2 GEMV ms", "step/floor",
                 "matvec/floor"], rows))


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    if "--quick" in sys.argv:
        scaling(10_000, [128, 256, 512], rng)
        floor([(1_000_000, 32)], rng)
    else:
        scaling(10_000, [128, 256, 512, 1024, 2048], rng)
        floor([(1_000_000, 128), (400_000, 512), (200_000, 1024)], rng)
