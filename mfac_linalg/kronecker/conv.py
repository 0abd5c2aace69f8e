r"""One layer's per-sample data: dense layers (T = 1) and weight-sharing layers (docs/math.md §8).

A layer W (d_out x d_in) sees, for sample n, T positions (the T unfolded patches of a
convolution, the T tokens of a sequence; T = 1 for a plain dense layer): inputs A_n (T x d_in)
and output gradients G_n (T x d_out).  The per-sample gradient is DW_n = G_n^T A_n
= sum_t g_nt a_nt^T, flattened row-major (vec(DW) = sum_t kron(g_nt, a_nt)), and

    F = (1/n) sum_n vec(DW_n) vec(DW_n)^T.

**Scaling.**  ``output_grads`` must be the gradients of each sample's *own* loss l_n with
respect to the layer's outputs, so that DW_n = dl_n/dW.  For a batch loss
L = (1/N) sum_n l_n (PyTorch's ``reduction="mean"``), multiply the gradients PyTorch gives
by N; for ``reduction="sum"`` take them as they are.  F is then the empirical Fisher
(1/n) sum_n grad l_n grad l_n^T of curvlinops' ``EFLinearOperator`` with mean reduction.

**K-FAC "expand"** (Eschenhagen et al. 2023, curvlinops' default for weight sharing): the
positions count as extra samples of the input factor only,

    Gamma = (1/n) sum_{n,t} g_nt g_nt^T,        A = (1/(n T)) sum_{n,t} a_nt a_nt^T.

**EKFAC**: S*_ij = (1/n) sum_n (U_Gamma^T DW_n U_A)_ij^2 with the exact per-sample DW_n.
"""
from __future__ import annotations

import numpy as np

from .. import _backend as B
from .. import _validate as V

__all__ = ["LayerData", "layer_data"]


def _band_mask(T, band, positions, be):
    """(T, T) 0/1 mask of position pairs at Chebyshev distance <= band."""
    if band is None:
        if positions is not None:
            raise ValueError("positions is only used with band=; got band=None")
        return None
    band = V.integer(band, "band", minimum=0)
    if positions is None:
        pos = np.arange(T)[:, None]
    else:
        try:
            pos = np.asarray(B.to_host(positions))
        except (ValueError, TypeError) as exc:        # ragged nested lists, and the like
            raise ValueError(f"positions must be an integer array of shape ({T},) or "
                             f"({T}, p); got {type(positions).__name__} that is not an "
                             f"array ({exc})") from None
        if pos.ndim not in (1, 2) or pos.shape[0] != T or (pos.ndim == 2 and pos.shape[1] < 1):
            raise ValueError(f"positions must have shape ({T},) or ({T}, p) (one coordinate row "
                             f"per position); got shape {tuple(pos.shape)}")
        if pos.ndim == 1:
            pos = pos[:, None]
        if pos.dtype.kind not in "iu":
            raise TypeError(f"positions must hold integers; got dtype {pos.dtype}")
        pos = pos.astype(object)     # Python ints: int64 differences can overflow, uint wrap
    dist = np.abs(pos[:, None, :] - pos[None, :, :]).max(axis=2)
    return be.xp.asarray((dist <= band).astype(np.float64))


def layer_data(activations, output_grads, bias, *, band=None, positions=None):
    """Validate one layer's inputs: 2-D (n, d) or 3-D (n, T, d), float64 on their backend."""
    bias = V.boolean(bias, "bias")
    A, be = B.asarray(activations, "activations")
    G, _ = B.asarray(output_grads, "output_grads", backend=be)
    for name, X in (("activations", A), ("output_grads", G)):
        if X.ndim not in (2, 3) or min(X.shape) < 1:
            raise ValueError(f"{name} must be 2-D (n, features) or 3-D (n, positions, features) "
                             f"with every size >= 1; got shape {tuple(X.shape)}")
    if A.ndim != G.ndim:
        raise ValueError(f"activations and output_grads must both be 2-D or both 3-D; got "
                         f"shapes {tuple(A.shape)} and {tuple(G.shape)}")
    if A.shape[0] != G.shape[0]:
        raise ValueError(f"activations and output_grads must have the same number of samples; "
                         f"got {A.shape[0]} and {G.shape[0]}")
    if A.ndim == 3 and A.shape[1] != G.shape[1]:
        raise ValueError(f"activations and output_grads must have the same number of positions "
                         f"T; got {A.shape[1]} and {G.shape[1]}")
    A = A.astype(np.float64)
    G = G.astype(np.float64)
    V.finite(A, "activations", be)
    V.finite(G, "output_grads", be)
    if A.ndim == 2:
        A, G = A[:, None, :], G[:, None, :]
    if bias:
        A = be.xp.concatenate([A, be.xp.ones(A.shape[:2] + (1,))], axis=2)
    mask = _band_mask(A.shape[1], band, positions, be)
    return LayerData(A, G, be, mask)


#: the half-flop forms of the dense products pay from these widths (single-threaded
#: OpenBLAS, n = 4096, CPU time against the GEMM form: trmm 0.82x at d = 513, about 1.0x at
#: 257, 1.5x at 129; two syrks 0.70-0.75x at 257-513, slower below about 200)
TRMM_MIN, SYRK_MIN = 256, 256


def _quad_rows(X, Q):
    """c_n = x_n^T Q x_n for the rows of X (n, d) and any square Q (float64, host), in
    half a GEMM's flops: x^T Q x = x^T U x with U upper triangular, U_ij = Q_ij + Q_ji
    above the diagonal and U_ii = Q_ii, where X U is a triangular product (BLAS trmm,
    n d^2 flops against a GEMM's 2 n d^2)."""
    from scipy.linalg import blas
    U = np.triu(Q + Q.T)
    U[np.diag_indices_from(U)] *= 0.5
    # X U = (U^T X^T)^T: X^T is X's memory in Fortran order (d, n), as trmm wants
    XU = blas.dtrmm(1.0, U, X.T, side=0, lower=0, trans_a=1)
    return np.einsum("ji,ij->i", XU, X)


def _weighted_gram(Y, c):
    """sum_n c_n y_n y_n^T for the rows of Y (n, e) (float64, host) as the difference of two
    symmetric rank-k products (BLAS syrk through NumPy's A^T A, half a GEMM's flops): the
    rows with c_n > 0 scaled by sqrt(c_n), those with c_n < 0 by sqrt(-c_n)."""
    pos = ~(c <= 0)                  # NaN rows join these, so a NaN propagates
    neg = c < 0
    Zp = Y[pos] * np.sqrt(c[pos])[:, None]
    out = Zp.T @ Zp
    if neg.any():
        Zm = Y[neg] * np.sqrt(-c[neg])[:, None]
        out -= Zm.T @ Zm
    return out


class LayerData:
    """Per-sample inputs A (n, T, d_in) and output gradients G (n, T, d_out), float64.

    Every quantity the builders need, each in one pass: the K-FAC factors
    (O(n T (d_in^2 + d_out^2))), the EKFAC scaling, the matrix-free products with R(F)
    (optionally restricted to a band of positions) and the terms of ``fisher_error``.
    """

    def __init__(self, A, G, be, mask=None):
        self.A, self.G, self.be, self.xp = A, G, be, be.xp
        self.n, self.T, self.d_in = A.shape
        self.d_out = G.shape[2]
        self.mask = mask

    @property
    def dense(self):
        return self.T == 1

    def _flat(self):
        return self.A.reshape(-1, self.d_in), self.G.reshape(-1, self.d_out)

    def kfac_factors(self):
        """(Gamma, A) in the expand convention (module docstring); O(n T (d_in^2 + d_out^2))."""
        G2 = self._flat()[1]
        with np.errstate(over="ignore", invalid="ignore"):   # refused by name just below
            Gam = G2.T @ G2 / self.n
            Aa = self.input_factor()
        V.gram_finite(Gam, "output_grads", self.be)
        V.gram_finite(Aa, "activations", self.be)
        return (Gam + Gam.T) / 2, Aa

    def input_factor(self):
        """K-FAC's A alone (the iterative builders' default start), symmetrised; not
        checked (:meth:`kfac_factors` refuses an overflow by name)."""
        A2 = self._flat()[0]
        Aa = A2.T @ A2 / (self.n * self.T)
        return (Aa + Aa.T) / 2

    def per_sample(self):
        """DW_n = G_n^T A_n, (n, d_out, d_in)."""
        return self.G.transpose(0, 2, 1) @ self.A

    def ekfac_scaling(self, UG, UA):
        """S*_ij = (1/n) sum_n (U_G^T DW_n U_A)_ij^2."""
        if self.dense:
            A2, G2 = self._flat()
            return ((G2 @ UG) ** 2).T @ ((A2 @ UA) ** 2) / self.n
        D = (self.G @ UG).transpose(0, 2, 1) @ (self.A @ UA)
        return (D ** 2).sum(axis=0) / self.n

    # -- R(F), matrix-free -------------------------------------------------------------
    def r_product(self, Q):
        """R vec(Q) for a stack Q (k, d_in, d_in) -> (k, d_out, d_out)."""
        return self._product(self.A, self.G, Q)

    def rt_product(self, P):
        """R^T vec(P) for a stack P (k, d_out, d_out) -> (k, d_in, d_in)."""
        return self._product(self.G, self.A, P)

    def _product(self, X, Y, Q):
        # (1/n) sum_n Y_n^T (mask .* (X_n Q X_n^T)) Y_n
        if self.dense:                 # two GEMMs for the whole stack, or half-flop forms
            X2, Y2 = X[:, 0, :], Y[:, 0, :]
            k, d, e = Q.shape[0], X2.shape[1], Y2.shape[1]
            host64 = self.be.is_host and X2.dtype == np.float64
            if host64 and d >= TRMM_MIN:
                c = np.stack([_quad_rows(X2, Qi) for Qi in Q], axis=1)
            else:
                XQ = (X2 @ Q.transpose(1, 0, 2).reshape(d, k * d)).reshape(-1, k, d)
                c = (XQ * X2[:, None, :]).sum(axis=2)                  # (n, k): x_n^T Q x_n
            if host64 and e >= SYRK_MIN:
                return np.stack([_weighted_gram(Y2, c[:, i]) for i in range(k)]) / self.n
            W = (Y2[:, None, :] * c[:, :, None]).reshape(-1, k * e)    # (n, k e)
            return (W.T @ Y2).reshape(k, e, e) / self.n
        M = (X[None] @ Q[:, None]) @ X.transpose(0, 2, 1)[None]    # (k, n, T, T)
        if self.mask is not None:
            M = M * self.mask
        Yt = Y.transpose(0, 2, 1)[None]
        return ((Yt @ M) @ Y[None]).sum(axis=1) / self.n

    # -- fisher_error's terms -------------------------------------------------------------
    def gram(self):
        """The n x n Gram <DW_n, DW_k> = sum_{t,s} (g_nt . g_ks)(a_nt . a_ks)."""
        if self.dense:
            A2, G2 = self._flat()
            return (G2 @ G2.T) * (A2 @ A2.T)
        D = self.per_sample().reshape(self.n, -1)
        return D @ D.T

    def quad_terms(self, Bm, Cm):
        """(n,) vector of vec(DW_n)^T (B kron C) vec(DW_n) = <DW_n, B DW_n C^T>."""
        if self.dense:
            A2, G2 = self._flat()
            return ((G2 @ Bm) * G2).sum(1) * ((A2 @ Cm) * A2).sum(1)
        D = self.per_sample()
        return ((Bm @ D @ Cm.T) * D).sum(axis=(1, 2))

    def ekfac_cross(self, UG, UA, Sstar):
        """sum_n <S*, (U_G^T DW_n U_A)^2> (the numerator of <F, F~> for EKFAC, times n)."""
        if self.dense:
            A2, G2 = self._flat()
            return B.scalar((((G2 @ UG) ** 2) @ Sstar * ((A2 @ UA) ** 2)).sum())
        D = (self.G @ UG).transpose(0, 2, 1) @ (self.A @ UA)
        return B.scalar(((D ** 2) * Sstar[None]).sum())
