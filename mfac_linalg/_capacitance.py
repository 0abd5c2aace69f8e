"""The m x m machinery shared by the static and sliding-window operators.

Everything here is float64 and O(m^2) or O(m^3); nothing touches d-sized data
except :func:`gram`, the one O(d m^2) product.  Notation of docs/math.md section 1:
C = s I + K with K = G G^T the Gram matrix of the gradients and s = N * damping,
factored as C = L L^T (L lower triangular, rows and columns in the order the
gradients arrived).

Rank-one update without a Python loop over rows
-----------------------------------------------
Deleting the oldest gradient is deleting the first row and column of C.  With
L = [[l11, 0], [l21, L22]], the factor of the remaining block C22 is
chol(L22 L22^T + v v^T), v = l21.  Following Gill, Golub, Murray and Saunders
(1974, method C1), write L22 L22^T + v v^T = L22 (I + p p^T) L22^T with
p = L22^{-1} v.  The Cholesky factor of I + p p^T is D + tril(p beta^T, -1) with

    1/alpha_j = 1 + sum_{k<j} p_k^2,  d_j = sqrt(1 + alpha_j p_j^2),  beta_j = alpha_j p_j / d_j,

so the new factor is, entry by entry (i >= j),

    Lnew_ij = L22_ij d_j + beta_j (v_i - sum_{k<=j} L22_ik p_k).

The prefix sums run along rows; we sweep column blocks of ``block`` columns so
the working set stays in cache, which makes the update about two passes over
the factor (read, write) plus one triangular solve.  The result is written
into a second buffer, shifted one row and column up-left, so a failure later
in an update leaves the previous factor intact (atomic updates).
"""
from __future__ import annotations

import numpy as np

from . import _backend as B

__all__ = ["gram", "gram64", "cholesky_shifted", "delete_first", "append", "forward",
           "backward", "logdet_factor", "padded_identity", "NotPositiveDefinite"]

_BLOCK = 128


class NotPositiveDefinite(ValueError):
    """The capacitance matrix is not numerically positive definite."""


def gram(G, backend, out=None):
    """K = G G^T in float64, exactly symmetric.  O(d m^2), one matrix product.

    The product runs in the storage dtype of ``G`` (float32 accumulation for
    float32 data); only the m x m result is promoted to float64.
    """
    K = (G @ G.T).astype(np.float64, copy=False)
    K = (K + K.T) * 0.5
    if out is not None:
        out[...] = K
        return out
    return K


def gram64(G, backend, chunk=1 << 16):
    """K = G G^T accumulated in float64 (column chunks of G, bounded extra memory)."""
    xp = backend.xp
    m, d = G.shape
    K = xp.zeros((m, m), dtype=np.float64)
    for start in range(0, d, chunk):
        Gc = G[:, start:start + chunk].astype(np.float64)
        K += Gc @ Gc.T
    return (K + K.T) * 0.5


def cholesky_shifted(K, shift, backend):
    """Lower factor of K + shift * I (float64).  Raises NotPositiveDefinite."""
    xp = backend.xp
    n = K.shape[0]
    C = K + shift * xp.eye(n, dtype=np.float64)
    try:
        return backend.cholesky_lower(C)
    except np.linalg.LinAlgError:
        raise NotPositiveDefinite(
            "the capacitance matrix N*damping*I + G G^T is not numerically positive "
            "definite: the damping is too small relative to the gradients' scale "
            f"(N*damping = {shift:.3e}, largest Gram entry "
            f"{B.scalar(xp.abs(K).max()) if n else 0.0:.3e})") from None


def forward(L, b, backend):
    """Solve L x = b (L lower; on the GPU a 1-D b goes to cuBLAS trsv, no copy of L)."""
    if backend.name == "gpu" and b.ndim == 1:
        from .kernels import sliding as K
        return K.trsv(L, b.astype(np.float64, copy=True), L.shape[0], transpose=False)
    return backend.solve_triangular(L, b, lower=True, trans=False)


def backward(L, b, backend):
    """Solve L^T x = b (L lower)."""
    if backend.name == "gpu" and b.ndim == 1:
        from .kernels import sliding as K
        return K.trsv(L, b.astype(np.float64, copy=True), L.shape[0], transpose=True)
    return backend.solve_triangular(L, b, lower=True, trans=True)


def logdet_factor(L, backend):
    """log det(L L^T) = 2 sum log diag(L)."""
    xp = backend.xp
    return 2.0 * B.scalar(xp.log(xp.diagonal(L)).sum()) if L.shape[0] else 0.0


def padded_identity(m, backend):
    """An m x m factor buffer holding the empty factor: the identity padding."""
    return backend.xp.eye(m, dtype=np.float64)


def delete_first(src, n, dst, backend, block=_BLOCK):
    """Factor of C[1:, 1:] from the factor of C, shifted one row and column up-left.

    Factor buffers are m x m and *padded*: ``[[L_n, 0], [0, I]]`` with the
    active n x n factor top-left, so that every triangular solve runs on the
    whole contiguous buffer (a solve with a strided sub-block would copy it)
    and gives the active solution in its first n entries for a right-hand side
    that is zero beyond n.  Reads ``src`` (active size n), writes ``dst``
    (active size n - 1, padded).  O(n^2): one triangular solve and one
    blocked sweep (see the module docstring).  ``src`` is not modified.
    """
    xp = backend.xp
    m = src.shape[0]
    m1 = n - 1
    if backend.name == "gpu":
        return _delete_first_gpu(src, n, dst, backend)
    if m1 > 0:
        # p = L22^{-1} l21 = -l11 * (L^{-1} e_0)[1:n]  (a solve with the whole buffer)
        e0 = xp.zeros(m, dtype=np.float64)
        e0[0] = 1.0
        x = forward(src, e0, backend)
        l11 = src[0, 0]
        p = x[1:n] * (-l11)
        v = src[1:n, 0]
        L22 = src[1:n, 1:n]
        p2 = p * p
        inv_alpha = xp.empty_like(p2)
        inv_alpha[0] = 1.0
        xp.cumsum(p2[:-1], out=inv_alpha[1:])
        inv_alpha[1:] += 1.0
        alpha = 1.0 / inv_alpha
        dj = xp.sqrt(1.0 + alpha * p2)
        beta = alpha * p / dj
        run = xp.zeros(m1, dtype=np.float64)  # running sum_{k<j0} L22_ik p_k
        upper = xp.triu(xp.ones((block, block), dtype=bool), 1)
        for j0 in range(0, m1, block):
            j1 = min(m1, j0 + block)
            w = j1 - j0
            Lb = L22[j0:, j0:j1]
            M = Lb * p[j0:j1]
            xp.cumsum(M, axis=1, out=M)
            M += run[j0:, None]
            run[j0:] = M[:, -1]
            # Lnew = Lb * d + (v - M) * beta
            xp.subtract(v[j0:, None], M, out=M)
            M *= beta[j0:j1]
            M += Lb * dj[j0:j1]
            M[:w][upper[:w, :w]] = 0.0  # zero in exact arithmetic above the diagonal
            dst[j0:m1, j0:j1] = M
    # padding: rows/columns m1.. of dst become the identity
    dst[max(m1, 0):n, :] = 0.0
    dst[:n, max(m1, 0):n] = 0.0
    idx = xp.arange(max(m1, 0), n)
    dst[idx, idx] = 1.0
    return dst


def _delete_first_gpu(src, n, dst, backend):
    """GPU: p by one cuBLAS trsv on the L22 block in place, the O(m) coefficients in one
    block-scan kernel, the O(m^2) update in one kernel (a block per row).

    Writes rows 0..n-2 of ``dst`` on and below the diagonal; the caller's next
    ``append`` writes row n-1.  Entries above the diagonal stay zero (every
    factor buffer is lower triangular), so no padding is written here.
    """
    from .kernels import sliding as K
    xp = backend.xp
    n1 = n - 1
    if n1 <= 0:
        return dst
    p = src[1:n, 0].copy()
    K.trsv(src, p, n1, transpose=False, offset=1)
    dj = xp.empty(n1, dtype=np.float64)
    beta = xp.empty(n1, dtype=np.float64)
    K.ggms_coeffs(p, dj, beta, n1)
    K.chol_delete(src, dst, p, dj, beta, n)
    return dst


def append(L, n, c, cnn, backend):
    """Extend the padded factor ``L`` (active size n) by one row for a new column of C.

    ``c`` (n,) holds the new gradient's entries of C with the older ones (in
    factor order), ``cnn`` the new diagonal entry of C (the shift included).
    Writes row n of ``L`` and returns ``(ell, lnn)`` with ell = L_n^{-1} c.
    Raises NotPositiveDefinite, leaving ``L`` unchanged, when cnn - |ell|^2 <= 0.
    """
    xp = backend.xp
    m = L.shape[0]
    if backend.name == "gpu":
        return _append_gpu(L, n, c, cnn, backend)
    if n:
        rhs = xp.zeros(m, dtype=np.float64)
        rhs[:n] = c
        ell = forward(L, rhs, backend)[:n]
        r = cnn - B.scalar(ell @ ell)
    else:
        ell = xp.zeros(0, dtype=np.float64)
        r = cnn
    if not r > 0.0:
        raise NotPositiveDefinite("appending a gradient made the capacitance matrix "
                                  "numerically singular: the damping is too small "
                                  "relative to the gradients' scale")
    lnn = float(np.sqrt(r))
    L[n, :n] = ell
    L[n, n] = lnn
    return ell, lnn


def _append_gpu(L, n, c, cnn, backend):
    """GPU: one trsv with the n x n block (leading dimension m), one kernel for the row."""
    from .kernels import sliding as K
    xp = backend.xp
    ell = c[:n].astype(np.float64, copy=True)
    K.trsv(L, ell, n, transpose=False)
    z = xp.empty(n + 1, dtype=np.float64)
    r_out = xp.empty(1, dtype=np.float64)
    un = xp.full(1, float(cnn), dtype=np.float64)
    K.append_row(L, ell, z, r_out, un, n, 0.0)
    r = float(r_out.get()[0])
    if not r > 0.0:
        # the kernel wrote row n; put back the padding row it replaced
        L[n, :n + 1] = 0.0
        L[n, n] = 1.0
        raise NotPositiveDefinite("appending a gradient made the capacitance matrix "
                                  "numerically singular: the damping is too small "
                                  "relative to the gradients' scale")
    return ell, float(np.sqrt(r))
