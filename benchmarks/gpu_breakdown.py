"""Where the time of one sliding-window step goes on the GPU (d = 1e5, m = 1024).

Times each stage alone (CUDA events, medians) so that the fixed costs
(launches, synchronisations, small kernels, the m x m work of the explicit-inverse
path and, for comparison, of the Cholesky path) can be read next to the two
passes over the buffer.  Usage: python benchmarks/gpu_breakdown.py
"""
import sys

import cupy as cp

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from gpu import filled_window, gpu_time  # noqa: E402

from mfac_linalg import _capacitance as cap  # noqa: E402
from mfac_linalg.kernels import sliding as K  # noqa: E402


def main(d=100_000, m=1024, dtype="float32"):
    w = filled_window(d, m, dtype, 1e-3 * d)
    rs = cp.random.RandomState(1)
    gs = [rs.standard_normal(d, dtype=cp.float32) for _ in range(4)]
    x = gs[0]
    k = [0]

    def nxt():
        k[0] += 1
        return gs[k[0] % 4]
    u = cp.zeros(m, dtype=cp.float64)
    z = cp.ones(m, dtype=cp.float64)
    c32 = cp.ones(m, dtype=cp.float32)
    y = cp.zeros(w._ld, dtype=cp.float32)
    be = w._backend
    ws = w._ws
    Ci = w._L
    # the explicit path's m x m work on copies (the window itself is left alone)
    Kc, Kold, x2 = w._K.copy(), cp.empty(m), cp.empty(m)
    det, ax2 = cp.empty(1), cp.zeros(1)
    parts = {
        "step (whole)": lambda: w.step(nxt()),
        "update (whole)": lambda: w.update(nxt()),
        "matvec (whole)": lambda: w.matvec(x),
        "matvec, check_finite off": None,
        "rows_dot (pass 1)": lambda: K.rows_dot(w._G, w._kind, x, u, rows=m),
        "rows_dot + slot write, flag, y": lambda: K.rows_dot(
            w._G, w._kind, x, u, slot=0, rows=m, backup=w._Gold, flag=ws[m:m + 1], y=y),
        "combine (pass 2)": lambda: K.combine(w._G, w._kind, c32, y, -1.0, rows=m),
        "window_replace (explicit m x m work)": lambda: K.window_replace(
            Ci, w._Lspare, u, Kc, Kold, x2, ax2, z, c32, det, 0),
        "trsv (cuBLAS trsm, 1 rhs; factor path)": lambda: K.trsv(w._L, z, m, transpose=False),
        "delete_first (factor path)": lambda: cap.delete_first(w._L, m, w._Lspare, be),
        "memset of the workspace": lambda: ws.data.memset_async(0, ws.nbytes),
        "2-element device-to-host read": lambda: ws[:2].get(),
        "empty launch (elementwise on m)": lambda: u * 1.0,
    }
    w2 = filled_window(d, m, dtype, 1e-3 * d)
    w2._check_finite = False
    parts["matvec, check_finite off"] = lambda: w2.matvec(x)
    print(f"d = {d}, m = {m}, {dtype}")
    for name, fn in parts.items():
        print(f"  {name:40s} {gpu_time(fn, repeat=30):8.3f} ms")


if __name__ == "__main__":
    main()
    main(dtype="bfloat16")
