"""M-FAC static: the inverse of the damped empirical Fisher of m gradients."""
from __future__ import annotations

import math

import numpy as np

from . import _backend as B
from . import _capacitance as cap
from ._operator import Operator, check_damping

__all__ = ["StaticInverseFisher", "FisherOperator", "as_gradients", "right_trsm"]


def as_gradients(grads, name="grads", *, backend=None, allow_half=False):
    """Validate a gradient matrix: 2-D (m, d), m >= 1, d >= 1, finite.  Returns (G, backend)."""
    G, be = B.asarray(grads, name, backend=backend, allow_half=allow_half)
    if G.ndim != 2:
        raise ValueError(f"{name} must be 2-D (m, d); got shape {tuple(G.shape)}")
    if G.shape[0] < 1 or G.shape[1] < 1:
        raise ValueError(f"{name} must hold at least one gradient of dimension >= 1; "
                         f"got shape {tuple(G.shape)}")
    B.check_finite(G, name, be)
    return G, be


def right_trsm(L, G, backend):
    """V = L^{-1} G for lower-triangular float64 L (m x m) and G (m x d), in G's dtype.

    On the CPU this is one BLAS ``trsm`` solving X L^T = G^T from the right on
    the C-ordered G (seen by BLAS as the Fortran-ordered G^T), so no transposed
    copy of G is made; the factor is rounded to G's dtype for the solve.  On the
    GPU it is one GEMM with the explicit inverse of L (float64, rounded to G's
    dtype).
    """
    if backend.name == "cpu":
        from scipy.linalg import blas
        trsm = blas.strsm if G.dtype == np.float32 else blas.dtrsm
        X = trsm(1.0, L.astype(G.dtype, copy=False), G.T, side=1, lower=1, trans_a=1)
        return X.T
    # GPU: cuBLAS trsm with a d-column right-hand side is far slower than a GEMM
    # (and cupyx would first copy G to Fortran order): V = (L^{-1}) G, the m x m
    # inverse formed in float64 (O(m^3)), then one GEMM over G.
    xp = backend.xp
    Linv = backend.solve_triangular(L, xp.eye(L.shape[0], dtype=np.float64), lower=True)
    return Linv.astype(G.dtype) @ G


class StaticInverseFisher(Operator):
    r"""Inverse of the damped empirical Fisher of m gradients (M-FAC static).

    Represents :math:`F^{-1}` for

    .. math::  F = \lambda I_d + \frac{1}{m} G^T G, \qquad G = [g_1; \dots; g_m] \in \mathbb{R}^{m\times d},

    in one of two forms, both written :math:`F^{-1} = \alpha I + \beta V^T V`:

    * **dual** (m < d, Woodbury, docs/math.md section 1): with the capacitance
      :math:`C = m\lambda I_m + G G^T = L L^T` (float64) and
      :math:`V = L^{-1} G` (m x d), :math:`F^{-1} = (I - V^T V)/\lambda`;
    * **primal** (m >= d): :math:`F = L_F L_F^T` (float64, d x d) and
      :math:`V = L_F^{-1}`, :math:`F^{-1} = V^T V`.  Same costs with d in place
      of m (d <= m), and no cancellation: the dual form's ``x - V^T V x`` loses
      a factor lambda_max(F)/lambda of accuracy, which is far above cond(F)
      when m >= d and lambda is small.

    Parameters
    ----------
    grads : array_like, shape (m, d)
        The gradients as rows: NumPy (CPU), CuPy (GPU) or any DLPack tensor
        (zero-copy on its device).  float32 and float64 are kept, integers are
        promoted to float64.  Never modified; the operator keeps no reference
        to it (it stores V, its own array).
    damping : float
        lambda > 0.
    check_finite : bool, default True
        Check vectors passed to ``matvec``/``matmat``/``quad`` for NaN/inf
        (a reduction over the input; on the GPU it synchronizes).

    Costs (r = min(m, d))
    -----
    Set-up O(d m r): one Gram product (G G^T, or G^T G when m >= d), a float64
    Cholesky O(r^3) and one triangular solve.  ``matvec`` O(d r) (two passes
    over V), ``matmat`` with k columns O(d r k) as two matrix products,
    ``entry`` O(r), ``diagonal`` O(d r), ``quad`` O(d r), ``logdet`` O(1).
    Memory: V (r x d).

    Notes
    -----
    m > d, m = 1, duplicate and zero gradients are all fine: C and F are
    positive definite for every lambda > 0.  For float32 gradients the Gram
    product runs in float32; if the float64 Cholesky then fails (lambda tiny
    against the gradients' scale) the Gram matrix is recomputed with float64
    accumulation.  Accuracy: docs/static.md.
    """

    def __init__(self, grads, damping, *, check_finite=True):
        lam = check_damping(damping)
        G, be = as_gradients(grads)
        m, d = G.shape
        with be.device_context():
            colsq = be.xp.einsum("ij,ij->j", G, G)   # diag(G^T G), for fisher().diagonal()
            primal = m >= d
            A = G.T if primal else G                # factor A A^T + shift I
            shift = lam if primal else m * lam
            scale = 1.0 / m if primal else 1.0
            K = cap.gram(A, be) * scale
            try:
                L = cap.cholesky_shifted(K, shift, be)
            except cap.NotPositiveDefinite:
                if G.dtype == np.float64:
                    raise
                K = cap.gram64(A, be) * scale
                L = cap.cholesky_shifted(K, shift, be)
            if primal:
                V = be.solve_triangular(L, be.xp.eye(d), lower=True).astype(G.dtype)
                self._alpha, self._beta = 0.0, 1.0
            else:
                V = right_trsm(L, G, be)
                self._alpha, self._beta = 1.0 / lam, -1.0 / lam
        self._init_operator(d, G.dtype, be, check_finite=check_finite)
        self._m = m
        self._damping = lam
        self._primal = primal
        self._L = L
        self._V = V
        self._colsq = colsq
        self._logdet_L = cap.logdet_factor(L, be)

    # -- attributes ----------------------------------------------------------
    @property
    def damping(self):
        """lambda."""
        return self._damping

    @property
    def num_grads(self):
        """m, the number of gradients."""
        return self._m

    @property
    def form(self):
        """``"dual"`` (Woodbury, m < d) or ``"primal"`` (m >= d)."""
        return "primal" if self._primal else "dual"

    @property
    def factor(self):
        """The float64 lower Cholesky factor: of C = m*lambda*I + G G^T (dual) or of F (primal)."""
        return self._L

    def _repr_fields(self):
        return [f"m={self._m}", f"damping={self._damping:.0e}"]

    # -- hooks: F^{-1} = alpha I + beta V^T V ----------------------------------
    def _matmat(self, X):
        V = self._V
        U = V @ X                       # pass 1: (r, k)
        if not self._alpha:             # primal: V^T V X
            return V.T @ U
        U *= self._beta / self._alpha   # dual: alpha (X + (beta/alpha) V^T U); scale the small side
        Y = V.T @ U                     # pass 2
        Y += X                          # in place: no d-sized temporaries
        Y *= self._alpha
        return Y

    def _diagonal(self):
        s = self._backend.xp.einsum("ij,ij->j", self._V, self._V)
        return self._alpha + self._beta * s

    def _entry(self, i, j):
        vi = self._V[:, i].astype(np.float64)
        vj = self._V[:, j].astype(np.float64)
        return (self._alpha if i == j else 0.0) + self._beta * B.scalar(vi @ vj)

    def _quad(self, X):
        xp = self._backend.xp
        U = self._V @ X
        return self._alpha * xp.einsum("ij,ij->j", X, X) + self._beta * xp.einsum("ij,ij->j", U, U)

    def _todense(self):
        xp = self._backend.xp
        A = self._V.T @ self._V
        A *= self._beta
        A[xp.diag_indices(self._d)] += self._alpha
        return A

    # -- inverse-Fisher extras ---------------------------------------------------
    def logdet(self):
        r"""log det F.  O(1) (kept from set-up).

        Dual: d log(lambda) + log det C - m log(m lambda) (determinant lemma);
        primal: log det (L_F L_F^T).
        """
        if self._primal:
            return self._logdet_L
        lam, m, d = self._damping, self._m, self._d
        return d * math.log(lam) + self._logdet_L - m * math.log(m * lam)

    def fisher(self):
        """The forward operator F = lambda I + G^T G / m (same protocol); ``.inverse()`` gives self."""
        return FisherOperator(self)

    def inverse(self):
        """The operator itself (for symmetry with ``fisher().inverse()``)."""
        return self

    def lowrank_batches(self):
        """Yield the one block (columns (1, d), alpha, beta, V (1, r, d)): F^{-1} = alpha I + beta V^T V."""
        yield np.arange(self._d)[None, :], self._alpha, self._beta, self._V[None]

    def with_gradients(self, grads):
        """A new operator with the same damping for new gradients."""
        return StaticInverseFisher(grads, self._damping, check_finite=self._check_finite)

    # -- forward products through the factors (used by FisherOperator) -------
    def _fisher_matmat(self, X):
        """F X.  Dual: lambda X + V^T (L^T L (V X)) / m; primal: L_F (L_F^T X)."""
        L = self._L
        if self._primal:
            Y = L @ (L.T @ X.astype(np.float64))
            return Y.astype(X.dtype, copy=False)
        V = self._V
        W = L.T @ (L @ (V @ X).astype(np.float64))
        Y = V.T @ (W * (1.0 / self._m)).astype(V.dtype)
        Y += self._damping * X
        return Y

    def _fisher_diagonal(self):
        """diag F = lambda + diag(G^T G)/m, O(d) (column norms kept from set-up)."""
        return (self._damping + self._colsq / self._m).astype(self._dtype)

    def _fisher_entry(self, i, j):
        """F[i, j]: O(d) (primal: rows of L_F) or O(m^2) (dual: columns of G = L V)."""
        if self._primal:
            R = self._L[[i, j], :].T
            return B.scalar(R[:, 0] @ R[:, 1])
        R = self._L @ self._V[:, [i, j]].astype(np.float64)
        return B.scalar(R[:, 0] @ R[:, 1]) / self._m + (self._damping if i == j else 0.0)


class FisherOperator(Operator):
    r"""The damped empirical Fisher F of an inverse-Fisher operator (the forward map).

    Built by ``fisher()`` of an inverse-Fisher operator, from that operator's
    own data (G is never stored twice); it follows the inverse operator's
    state (for the sliding window: later updates).  The inverse operator
    provides the hooks ``_fisher_matmat(X)``, ``_fisher_diagonal()`` and
    ``_fisher_entry(i, j)``; their costs are in its docstring.
    ``inverse()`` returns that operator and ``logdet()`` is its ``logdet()``.
    """

    def __init__(self, inverse_op):
        self._inv = inverse_op
        self._init_operator(inverse_op.shape[0], inverse_op.dtype, inverse_op.backend,
                            check_finite=inverse_op._check_finite)

    def _repr_fields(self):
        return self._inv._repr_fields()

    def inverse(self):
        """The inverse operator this F came from."""
        return self._inv

    def _matmat(self, X):
        return self._inv._fisher_matmat(X)

    def _diagonal(self):
        return self._inv._fisher_diagonal()

    def _entry(self, i, j):
        return self._inv._fisher_entry(i, j)

    def logdet(self):
        """log det F (the inverse operator's, from the same factor)."""
        return self._inv.logdet()
