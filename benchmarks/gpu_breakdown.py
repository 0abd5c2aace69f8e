"""Where the time of one sliding-window step goes on the GPU (d = 1e5, m = 1024).

Times each stage alone (CUDA events, medians) so that the fixed costs
(launches, synchronisations, small kernels, the m x m work of the explicit-inverse
path and, for comparison, of the Cholesky path) can be read next to the two
passes over the buffer.  Usage: python benchmarks/gpu_breakdown.py
"""
import sys

import numpy as np

import cupy as cp

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from gpu import filled_window, gpu_time  # noqa: E402

from mfac_linalg import _capacitance as cap  # noqa: E402
from mfac_linalg.kernels import sliding as K  # noqa: E402


def main(d=100_000, m=1024, dtype="float32"):
    w = filled_window(d, m, dtype, 1e-3 * d)
    rs = cp.random.RandomState(1)
    x = rs.standard_normal(d, dtype=cp.float32)
    u = cp.zeros(m, dtype=cp.float64)
    z = cp.ones(m, dtype=cp.float64)
    c32 = cp.ones(m, dtype=cp.float32)
    y = cp.zeros(w._ld, dtype=cp.float32)
    be = w._backend
    a = cp.ones(m, dtype=cp.float64)
    ax2 = cp.ones((), dtype=cp.float64)
    det = cp.empty(1, dtype=cp.float64)
    Ci = w._L
    parts = {
        "step (whole)": lambda: w.step(x),
        "matvec (whole)": lambda: w.matvec(x),
        "matvec, check_finite off": None,
        "rows_dot (pass 1)": lambda: K.rows_dot(w._G, w._kind, x, u, rows=m),
        "combine (pass 2)": lambda: K.combine(w._G, w._kind, c32, y, -1.0, rows=m),
        "GEMV C^-1 a (explicit path)": lambda: Ci @ a,
        "rank2_update kernel (explicit path)":
            lambda: K.rank2_update(Ci, w._Lspare, Ci[0], a, ax2, det, 0),
        "trsv (cuBLAS trsm, 1 rhs; factor path)": lambda: K.trsv(w._L, z, m, transpose=False),
        "delete_first (factor path)": lambda: cap.delete_first(w._L, m, w._Lspare, be),
        "isfinite(x).all() + bool": lambda: bool(cp.isfinite(x).all()),
        "cp.zeros(m)": lambda: cp.zeros(m, dtype=cp.float64),
        "one tiny kernel (gather)": lambda: K.gather_f64(u, z, 0, m),
        "empty launch (elementwise on m)": lambda: u * 1.0,
    }
    w2 = filled_window(d, m, dtype, 1e-3 * d)
    w2._check_finite = False
    parts["matvec, check_finite off"] = lambda: w2.matvec(x)
    for name, fn in parts.items():
        print(f"{name:36s} {gpu_time(fn, repeat=30):8.3f} ms")


if __name__ == "__main__":
    main()
    main(dtype="bfloat16")
