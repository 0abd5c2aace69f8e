"""Where the time of one sliding-window step goes on the GPU (d = 1e5, m = 1024).

Times the public calls (step, update, matvec) and, next to them, each kernel stage
alone on arrays of the same sizes (CUDA events, medians): the two passes over the
buffer, the explicit engine's m x m work, the Cholesky engine's triangular solve and
deletion sweep, the workspace memset and a small device-to-host read.  The stages
run on arrays of their own, never on the window's.  Usage: python benchmarks/gpu_breakdown.py
"""
import sys

import cupy as cp

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from gpu import filled_window, gpu_time  # noqa: E402

from mfac_linalg.kernels import sliding as K  # noqa: E402


def _raw_rows(m, d, dtype, rs):
    """A raw (m, padded d) buffer as the CUDA ring buffer stores it."""
    ld = K.padded(d)
    G32 = cp.zeros((m, ld), dtype=cp.float32)
    G32[:, :d] = rs.standard_normal((m, d), dtype=cp.float32)
    if dtype == "float32":
        return G32
    b = G32.view(cp.uint32)
    return ((b + cp.uint32(0x7FFF) + ((b >> 16) & cp.uint32(1))) >> 16).astype(cp.uint16)


def main(d=100_000, m=1024, dtype="float32"):
    w = filled_window(d, m, dtype, 1e-3 * d)
    w_nocheck = filled_window(d, m, dtype, 1e-3 * d, check_finite=False)
    rs = cp.random.RandomState(1)
    gs = [rs.standard_normal(d, dtype=cp.float32) for _ in range(4)]
    x = gs[0]
    k = [0]

    def nxt():
        k[0] += 1
        return gs[k[0] % 4]
    G = _raw_rows(m, d, dtype, rs)
    ld = G.shape[1]
    xq = cp.zeros(ld, dtype=cp.float32)
    xq[:d] = x
    ws = cp.zeros(m + 4)
    u = ws[:m]
    z = cp.ones(m)
    c32 = cp.ones(m, dtype=cp.float32)
    y = cp.zeros(ld, dtype=cp.float32)
    backup = cp.zeros(ld, dtype=G.dtype)
    A = rs.standard_normal((m, 2 * m))
    C = A @ A.T / m + cp.eye(m)
    L = cp.linalg.cholesky(C)
    Lspare = cp.eye(m)
    Ci = cp.linalg.inv(C)
    Kc, Kold, x2 = A @ A.T / m, cp.empty(m), cp.empty(m)
    det, ax, dg = cp.empty(2), cp.zeros(m), cp.zeros(m)
    p, dj, beta = cp.ones(m - 1) * 0.01, cp.empty(m - 1), cp.empty(m - 1)
    parts = {
        "step (whole)": lambda: w.step(nxt()),
        "update (whole)": lambda: w.update(nxt()),
        "matvec (whole)": lambda: w.matvec(x),
        "matvec, check_finite off": lambda: w_nocheck.matvec(x),
        "rows_dot (pass 1)": lambda: K.rows_dot(G, dtype, xq, u, rows=m),
        "rows_dot + slot write, flag, y": lambda: K.rows_dot(
            G, dtype, xq, u, slot=0, rows=m, backup=backup, flag=ws[m:m + 1], y=y),
        "combine (pass 2)": lambda: K.combine(G, dtype, c32, y, -1.0, rows=m),
        "window_replace (explicit m x m work)": lambda: K.window_replace(
            Ci, Lspare, u, Kc, Kold, x2, ax, dg, z, c32, det, 0, 0.7),
        "trsv (cuBLAS trsm, 1 rhs; Cholesky engine)": lambda: K.trsv(L, z, m, transpose=False),
        "deletion sweep (Cholesky engine)": lambda: (
            K.ggms_coeffs(p, dj, beta, m - 1), K.chol_delete(L, Lspare, p, dj, beta, m)),
        "memset of the workspace": lambda: ws.data.memset_async(0, ws.nbytes),
        "2-element device-to-host read": lambda: ws[:2].get(),
        "empty launch (elementwise on m)": lambda: u * 1.0,
    }
    print(f"d = {d}, m = {m}, {dtype}")
    for name, fn in parts.items():
        print(f"  {name:44s} {gpu_time(fn, repeat=30):8.3f} ms")


if __name__ == "__main__":
    main()
    main(dtype="bfloat16")
