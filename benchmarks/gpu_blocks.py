"""The block product's kernels: the register kernel for small blocks against the general one.

For stacks V (nb, r, b) of the sizes a block operator at d ~ 1e6 holds, times
``kernels.blocks.apply`` (the checked product Y = X - 0.5 V^T V X per block) with the
register kernel (``_reg_plan``) and with the general kernel (the register kernel
switched off, ``REG_MAX_THREADS = 0``): CUDA events around each call (its few
microseconds of host work included, as in ``gpu.py``), medians of 60 calls after 5,
each as a ratio to one read of V (V's bytes over the copy bandwidth measured in the same run,
as in ``gpu.py``), and their results' largest relative difference.  Stacks the
register kernel does not take show "-".  Usage: python benchmarks/gpu_blocks.py
"""
import sys

import cupy as cp

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from gpu import copy_bandwidth, gpu_time  # noqa: E402
from _timing import table  # noqa: E402

from mfac_linalg.kernels import blocks as KB  # noqa: E402

STACKS = [(31250, 32, 32, "float32"), (15625, 64, 64, "float32"), (15625, 32, 64, "float64"),
          (7812, 32, 128, "float32"), (7812, 64, 128, "float32"), (7812, 128, 128, "float32")]


def main():
    bw = copy_bandwidth()
    print(f"device: {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}, "
          f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    rows = []
    for nb, r, b, dt in STACKS:
        rs = cp.random.RandomState(nb + r + b)
        V = rs.standard_normal((nb, r, b)).astype(dt)
        X = rs.standard_normal((nb, b)).astype(dt)
        Y = cp.empty_like(X)
        flag = cp.zeros(1, dtype=cp.float64)
        read = V.nbytes / bw * 1e3
        saved = KB.REG_MAX_THREADS
        try:
            KB.REG_MAX_THREADS = 0
            general = gpu_time(lambda: KB.apply(V, X, 1.0, -0.5, True, flag, out=Y),
                               repeat=60, warmup=5)
            ref = Y.copy()
        finally:
            KB.REG_MAX_THREADS = saved
        plan = KB._reg_plan(V)
        if plan is None:
            reg = diff = None
        else:
            reg = gpu_time(lambda: KB.apply(V, X, 1.0, -0.5, True, flag, out=Y),
                           repeat=60, warmup=5)
            diff = float(cp.abs(Y - ref).max() / cp.abs(ref).max())
        rows.append([f"{nb} x {r} x {b}", dt, f"{V.nbytes / nb / 1024:.0f}", f"{read:.3f}",
                     f"{general:.3f}", f"{general / read:.2f}",
                     "-" if reg is None else f"{reg:.3f} {plan[:2]}",
                     "-" if reg is None else f"{reg / read:.2f}",
                     "-" if reg is None else f"{reg / general:.2f}",
                     "-" if diff is None else f"{diff:.1e}"])
    print(table(["stack nb x r x b", "dtype", "block KiB", "one read ms", "general ms", "ratio",
                 "register ms (groups, threads)", "ratio", "register/general", "rel. diff"],
                rows))


if __name__ == "__main__":
    main()
