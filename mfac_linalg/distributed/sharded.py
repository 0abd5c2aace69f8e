"""Column-sharded inverse-Fisher operators (docs/math.md §6).

Rank p of P holds the columns J_p of the gradient matrix G (m x d): G_p = G[:, J_p]
(m x d_p) and the matching slices x_p of every vector.  The d-sized work stays local;
only m-sized float64 data moves:

=================  ==========================================  =========================
set-up             G Gᵀ = Σ_p G_p G_pᵀ                         one all-reduce of m x m
pass 1             u = G x = Σ_p G_p x_p                       one all-reduce of m k
m x m work         C⁻¹ u, factor updates                       replicated, no traffic
pass 2             y_p = (x_p − G_pᵀ c) / λ                    local
diagonal           local                                       none
quad               Σ_p (local partial sums)                    one all-reduce of (m+1) k
entry (i, j)       the columns of V at i and j, from owners     one all-reduce of 2 m
=================  ==========================================  =========================

Every all-reduce also carries one failure flag per rank (see ``_base``).
"""
from __future__ import annotations

import math

import numpy as np

from .. import _backend as B
from .. import _validate as V
from .. import _capacitance as cap
from .._capacitance import NotPositiveDefinite
from ..static import _LowRankInverseFisher
from .comm import agree, state_digest
from .layout import ColumnLayout
from ._base import ShardedFisherOperator, ShardedOperator

__all__ = ["ShardedStaticInverseFisher", "NotPositiveDefinite"]

_DTYPE_CODE = {np.dtype(np.float32): 1.0, np.dtype(np.float64): 2.0}




# -- local primitives (d-sized work on this rank's columns) ----------------------------------

def local_gradients(grads, name, *, backend=None, columns=None):
    """A local gradient block: 2-D (m, d_p), m >= 1, d_p >= 0 (a rank may hold no
    columns), finite.  Returns (G, backend)."""
    G, be = B.asarray(grads, name, backend=backend)
    if G.ndim != 2:
        raise ValueError(f"{name} must be 2-D (m, d_p); got shape {tuple(G.shape)}")
    if G.shape[0] < 1:
        raise ValueError(f"{name} must hold at least one gradient (row); got shape "
                         f"{tuple(G.shape)}")
    if columns is not None and G.shape[1] != columns:
        raise ValueError(f"{name} must have {columns} columns (this rank's local_dim); got "
                         f"shape {tuple(G.shape)}")
    V.finite(G, name, be)
    return G, be


def solve_left(L, G, backend):
    """V = L⁻¹ G for lower-triangular float64 L (m x m) and G (m x d_p), in G's dtype:
    ``_backend.trsm_rows`` (one BLAS trsm on the CPU, one GEMM on the GPU), O(m² d_p);
    a rank holding no columns gets an empty V."""
    if G.shape[1] == 0:
        return G.copy()
    return B.trsm_rows(L, G, backend)


def layout_digest(layout):
    """4 float64 numbers identifying a layout (zeros for None)."""
    if layout is None:
        return np.zeros(4)
    return state_digest(np.frombuffer(layout.fingerprint().encode(), dtype=np.uint8))


def agree_setup(comm, table, *, layout, what, name, labels=None, dtype_codes=None):
    """Checks of a set-up header, identical on every rank (so every rank raises alike).

    ``table`` is P x (5 + 4 + ...): m, d_p, dtype code, damping, has_layout, layout
    digest (columns beyond are the caller's to check).
    Returns the layout (built contiguous from the d_p when none was given).
    ``dtype_codes`` (name -> code, default ``_DTYPE_CODE``) names the dtypes in errors.
    """
    names = {float(v): str(k) for k, v in (dtype_codes or _DTYPE_CODE).items()}
    P = comm.size
    col = {k: [v for v in table[:, c]] for c, k in enumerate(
        ("m", "d", "dtype", "damping", "has_layout"))}
    labels = labels or {"m": f"the number of rows m of {name}", "dtype": f"the dtype of {name}"}
    for key, label in (("m", labels["m"]), ("dtype", labels["dtype"]),
                       ("damping", "damping"), ("has_layout", "layout (given or None)")):
        vals = col[key]
        if len(set(vals)) != 1:
            shown = [int(v) if key in ("m", "has_layout")
                     else names.get(float(v), v) if key == "dtype" else float(v) for v in vals]
            raise ValueError(f"{what}: {label} must be the same on every rank; got {shown} "
                             "(rank order)")
    if any(not np.array_equal(table[p, 5:9], table[0, 5:9]) for p in range(P)):
        raise ValueError(f"{what}: layout must be the same ColumnLayout on every rank")
    dims = [int(v) for v in col["d"]]
    if layout is not None:
        want = [layout.local_dim(p) for p in range(P)]
        if dims != want:
            raise ValueError(f"{what}: {name} must have layout.local_dim(p) columns on rank p, "
                             f"{want}; got {dims} (rank order)")
        return layout
    if sum(dims) < 1:
        raise ValueError(f"{what}: {name} must hold at least one column over all ranks; got "
                         "none")
    return ColumnLayout.contiguous(sum(dims), P, local_dims=dims)


class ShardedStaticInverseFisher(ShardedOperator):
    r"""Column-sharded inverse of the damped empirical Fisher of m gradients (docs/math.md §6).

    Represents the same matrix as :class:`~mfac_linalg.StaticInverseFisher` on the
    concatenated gradients,

    .. math::  F = \lambda I_d + \tfrac1m G^T G, \qquad
               F^{-1} = \tfrac1\lambda (I_d - V^T V), \quad V = L^{-1} G,\;
               L L^T = C = m\lambda I_m + G G^T,

    in the Woodbury (dual) form of docs/math.md §1, with rank p holding the columns
    J_p of G (its ``local_grads``, m x d_p) and of V.  C and its Cholesky factor L
    (m x m, float64) are replicated, bitwise identical on every rank: every rank
    factors the same all-reduced Gram matrix with the same code.

    Semantics on local slices: ``shape`` is the global (d, d); ``matvec``, ``matmat``,
    ``dot`` and ``@`` take this rank's slice x_p (``local_dim`` rows, coordinates
    ``layout.indices(rank)``) and return (F⁻¹x)_p; ``diagonal()`` returns this rank's
    slice; ``entry(i, j)`` (global indices), ``quad(x_p)`` and ``logdet()`` are
    global, the same on every rank; ``todense()`` is the global d x d matrix.  Every
    method except ``diagonal``, ``logdet`` and the attributes is *collective*: every
    rank calls it at the same point, with the same arguments apart from its slice.
    A rank whose arguments are bad raises its own error and every other rank raises
    :class:`~mfac_linalg.distributed.RemoteRankError`; nothing is left half-done.

    Parameters
    ----------
    local_grads : array_like, shape (m, d_p)
        This rank's columns of the gradients (rows are gradients): NumPy, CuPy or a
        DLPack tensor; float32 or float64 (the same m and dtype on every rank).  Never
        modified; not referenced after set-up.
    damping : float
        λ > 0, the same on every rank.
    comm : Communicator, torch ProcessGroup, mpi4py communicator or None
        Through :func:`~mfac_linalg.distributed.as_comm`; None is a single process.
    layout : ColumnLayout, optional
        Which global columns each rank holds (the same on every rank).  Default: the
        ranks' blocks in rank order (:meth:`ColumnLayout.contiguous` with the d_p).
    check_finite : bool, default True
        Check vector slices for NaN/inf (gradients are always checked).

    Costs (per rank, n = m)
    -----
    Set-up O(m² d_p + m³): the local Gram product, one all-reduce of m² float64
    numbers, a replicated float64 Cholesky, one local triangular solve.
    ``matvec`` O(m d_p) and one all-reduce of m numbers; ``matmat`` O(m d_p k) and
    one of m k (after a P-number all-reduce agreeing on k); ``quad`` likewise with
    (m + 1) k; ``entry`` O(m), one all-reduce of 2 m numbers; ``diagonal`` O(m d_p),
    local; ``logdet`` O(1); ``todense`` O(m d² ) and one all-reduce of m d numbers.
    Memory: V_p (m x d_p) and two m x m float64 matrices.

    Notes
    -----
    Always the dual form.  For m >= d the single-process operator switches to the
    primal form, which is more accurate when λ is tiny (docs/math.md §1); there the
    two agree to the dual form's accuracy.  The partial Gram products run in the
    storage dtype and are summed in float64; if the Cholesky of C fails for float32
    data, every rank recomputes its partial with float64 accumulation and the sum is
    factored again (the same decision on every rank: the factor is replicated).

    Raises
    ------
    TypeError, ValueError
        Bad arguments on this rank (the message names them), or arguments that
        disagree between ranks (m, dtype, damping, layout), on every rank.
    NotPositiveDefinite
        C is not numerically positive definite (on every rank).
    RemoteRankError
        Another rank failed.

    Examples
    --------
    One process holding both "ranks" of a two-way split equals the unsplit operator:

    >>> import numpy as np
    >>> import mfac_linalg as ml
    >>> from mfac_linalg.distributed import ColumnLayout, ShardedStaticInverseFisher
    >>> rng = np.random.default_rng(0)
    >>> G = rng.standard_normal((4, 10))
    >>> lay = ColumnLayout.contiguous(10, 1)
    >>> op = ShardedStaticInverseFisher(G, 0.1, None, layout=lay)
    >>> op
    <ShardedStaticInverseFisher d=10 local_dim=10 rank=0/1 m=4 damping=1e-01 float64 cpu>
    >>> ref = ml.StaticInverseFisher(G, 0.1)
    >>> x = rng.standard_normal(10)
    >>> bool(np.allclose(op.matvec(x), ref.matvec(x), rtol=1e-13, atol=0))
    True
    >>> round(op.logdet() - ref.logdet(), 10)
    0.0
    """

    def __init__(self, local_grads, damping, comm=None, *, layout=None, check_finite=True):
        comm, layout, err = self._setup_comm(comm, layout)
        self._comm = comm
        self._backend = B.CPU
        lam, G = 0.0, None
        try:
            if err is not None:
                raise err
            G, self._backend = local_gradients(local_grads, "local_grads")
            # the range of the result dtype: 1/damping must not overflow or underflow it
            lam = V.damping(damping, dtype=np.float64 if G.dtype == np.float64
                            else np.float32)
            check_finite = V.boolean(check_finite, "check_finite")
        except Exception as exc:
            err = exc
        vals = [0.0] * 5 + [0.0] * 4
        if err is None:
            vals = [G.shape[0], G.shape[1], _DTYPE_CODE[np.dtype(G.dtype)], lam,
                    float(layout is not None), *layout_digest(layout)]
        table = self._header(vals, err, "ShardedStaticInverseFisher set-up")
        layout = agree_setup(comm, table, layout=layout, what="ShardedStaticInverseFisher",
                             name="local_grads")
        be = self._backend
        m = G.shape[0]
        with be.device_context():
            # m >= d with float32 gradients: G Gᵀ has rank <= d < m, its null space carried
            # by m λ alone, which a float32 Gram (rounded at eps32 |K|) swamps, and x - Vᵀ V x
            # cancels to λ-sized results: the Gram and V in float64 (the data is small
            # then, O(m² d) with d <= m), the products in float64, rounded once
            tall = G.dtype != np.float64 and m >= layout.dim
            K = self._gram(G, tall)
            wide = G.dtype == np.float64 or tall          # K already accumulated in float64
            if not wide and not bool(be.xp.isfinite(K).all()):
                K = self._gram(G, True)         # float32 products overflowed: in float64
            V.gram_finite(K, "local_grads", be)  # replicated: raised on every rank alike
            try:
                L = cap.cholesky_shifted(K, m * lam, be)
            except NotPositiveDefinite:         # replicated: every rank takes this branch
                if wide:
                    raise
                K = self._gram(G, True)
                L = cap.cholesky_shifted(K, m * lam, be)
            Vp = None
            try:
                Vp = solve_left(L, G.astype(np.float64) if tall else G, be)
                colsq = be.xp.einsum("ij,ij->j", G, G)     # diag(GᵀG) on the local columns
                logdet_L = 2.0 * B.scalar(be.xp.log(be.xp.diagonal(L)).sum())
            except Exception as exc:
                err = exc
            agree(comm, err, "ShardedStaticInverseFisher set-up")
        self._init_sharded(comm, layout, G.dtype, be, check_finite=check_finite)
        self._m = m
        self._damping = lam
        self._K = K
        self._L = L
        self._V = Vp
        self._logdet_L = logdet_L
        self._colsq = colsq

    def _gram(self, G, float64):
        """The all-reduced Gram matrix G Gᵀ (one all-reduce of m² numbers)."""
        m = G.shape[0]
        err, Kp = None, None
        try:
            Kp = (cap.gram64 if float64 else cap.gram)(G, self._backend)
        except Exception as exc:
            err = exc
        return self._flagged_sum(Kp, m * m, err, "ShardedStaticInverseFisher Gram").reshape(m, m)

    # -- attributes (damping, num_grads: the single-device static operator's) -------------
    damping, num_grads = _LowRankInverseFisher.damping, _LowRankInverseFisher.num_grads

    @property
    def form(self):
        """``"dual"`` (always: Woodbury over the m gradients)."""
        return "dual"

    @property
    def factor(self):
        """The replicated float64 Cholesky factor L of C (a read-only view)."""
        return B.readonly(self._L)

    def local_factor(self):
        """V_p = L⁻¹ G_p (m x d_p), this rank's columns of V, as a copy (float64 for float32
        gradients with m >= d, else in their dtype)."""
        return self._V.copy()

    def _repr_fields(self):
        return super()._repr_fields() + [f"m={self._m}", f"damping={self._damping:.0e}"]

    def _replicated(self):
        return [self._K, self._L]

    # -- collective hooks ------------------------------------------------------------------
    def _pass1(self, X, k, err, extra=None):
        """u = V x summed over ranks (m x k float64), optionally with extra rows."""
        m = self._m
        payload = None
        if err is None:
            try:
                U = (self._V @ X).astype(np.float64, copy=False)
                payload = U if extra is None else self._backend.xp.concatenate([U, extra(X)])
            except Exception as exc:
                err = exc
        rows = m + (0 if extra is None else 1)
        return self._flagged_sum(payload, rows * k, err, "ShardedStaticInverseFisher")\
            .reshape(rows, k)

    def _collective_matmat(self, X, k, err, what):
        U = self._pass1(X, k, err)
        Y = self._V.T @ (-U).astype(self._V.dtype)           # pass 2, local
        Y = Y.astype(np.result_type(X.dtype, self._V.dtype), copy=False)   # float64 V: one
        Y += X                                                # rounding at the caller's cast
        Y *= 1.0 / self._damping
        return Y

    def _collective_quad(self, X, k, err):
        xp = self._backend.xp
        wide = np.result_type(X.dtype, self._V.dtype)     # float64 V (m >= d): xᵀx too,
        S = self._pass1(X, k, err, extra=lambda X_: xp.einsum(  # it cancels against uᵀu
            "ij,ij->j", X_.astype(wide, copy=False),
            X_.astype(wide, copy=False)).astype(np.float64)[None, :])
        U, xx = S[:-1], S[-1]
        return (xx - xp.einsum("ij,ij->j", U, U)) / self._damping

    def _collective_entry(self, i, j, err):
        vi, vj = self._pair_columns(lambda c: self._V[:, c].astype(np.float64), i, j, err,
                                    self._m)
        return ((1.0 if i == j else 0.0) - B.scalar(vi @ vj)) / self._damping

    def _collective_todense(self):
        xp = self._backend.xp
        Vf = self._gather_rows(self._V, self._m, "todense")
        A = -(Vf.T @ Vf)
        A[xp.diag_indices(self._dglobal)] += 1.0
        A *= 1.0 / self._damping
        return A.astype(self._dtype, copy=False)

    # -- local ------------------------------------------------------------------------------
    def _diagonal(self):
        s = self._backend.xp.einsum("ij,ij->j", self._V, self._V)
        return ((1.0 - s) / self._damping).astype(self._dtype, copy=False)

    def logdet(self):
        r"""log det F = d log λ + log det C − m log(m λ) (determinant lemma).  O(1), local."""
        lam, m = self._damping, self._m
        return self._dglobal * math.log(lam) + self._logdet_L - m * math.log(m * lam)

    # -- the forward F ------------------------------------------------------------------------
    def fisher(self):
        """The forward F = λI + GᵀG/m on the same shards (a
        :class:`~mfac_linalg.distributed.ShardedFisherOperator`, from V and L: G is
        not stored twice).  Its products cost this operator's: one all-reduce of m k."""
        return ShardedFisherOperator(self)

    def inverse(self):
        """F, the inverse of this F⁻¹ (``fisher()``)."""
        return self.fisher()

    def _fisher_matmat(self, X, k, err):
        """F X = λX + V_pᵀ Lᵀ L (V X) / m  (G = L V)."""
        U = self._pass1(X, k, err)
        W = self._L.T @ (self._L @ U) * (1.0 / self._m)
        Y = (self._V.T @ W.astype(self._V.dtype)).astype(X.dtype, copy=False)
        Y += self._damping * X
        return Y

    def _fisher_quad(self, X, k, err):
        xp = self._backend.xp
        S = self._pass1(X, k, err, extra=lambda X_: xp.einsum(
            "ij,ij->j", X_, X_).astype(np.float64)[None, :])
        GX = self._L @ S[:-1]
        return self._damping * S[-1] + xp.einsum("ij,ij->j", GX, GX) / self._m

    def _fisher_entry(self, i, j, err):
        vi, vj = self._pair_columns(lambda c: self._V[:, c].astype(np.float64), i, j, err,
                                    self._m)
        val = B.scalar((self._L @ vi) @ (self._L @ vj)) / self._m
        return val + (self._damping if i == j else 0.0)

    def _fisher_diagonal(self):
        """λ + diag(GᵀG)/m on the local columns: O(d_p), local."""
        return (self._damping + self._colsq / self._m).astype(self._dtype, copy=False)

    def _fisher_todense(self):
        xp = self._backend.xp
        Gf = self._L @ self._gather_rows(self._V, self._m, "todense")
        A = Gf.T @ Gf * (1.0 / self._m)
        A[xp.diag_indices(self._dglobal)] += self._damping
        return A.astype(self._dtype, copy=False)
