"""M-FAC static: the inverse of the damped empirical Fisher of m gradients."""
from __future__ import annotations

from . import _backend as B
from . import _lowrank as LR
from . import _validate as _v
from ._operator import NonFiniteInput, Operator

__all__ = ["StaticInverseFisher", "FisherOperator"]


class _LowRankInverseFisher(Operator):
    """What the static and block inverse-Fisher operators share: lambda, m, the forward
    operator F = lambda I + G^T G / m (``fisher()``) and its O(d) diagonal from the
    column norms kept at set-up (``self._colsq``)."""

    @property
    def damping(self):
        """lambda."""
        return self._damping

    def _gradients_like(self, grads):
        """``grads`` for ``with_gradients``: validated, with this operator's d columns
        (ValueError naming ``grads`` otherwise, before any set-up work)."""
        G, _ = _v.gradients(grads, "grads")
        if G.shape[1] != self._d:
            raise ValueError(f"grads must have shape (m, {self._d}) (the operator's d); got "
                             f"shape {tuple(G.shape)}")
        return G

    @property
    def num_grads(self):
        """m, the number of gradients."""
        return self._m

    def fisher(self):
        """The forward operator F = lambda I + G^T G / m (same protocol); its
        ``inverse()`` is this operator, and this operator's ``inverse()`` is F."""
        return FisherOperator(self)

    def _fisher_diagonal(self):
        """diag F = lambda + diag(G^T G)/m, O(d) (column norms kept from set-up)."""
        return (self._damping + self._colsq / self._m).astype(self._dtype)


class StaticInverseFisher(_LowRankInverseFisher):
    r"""Inverse of the damped empirical Fisher of m gradients (M-FAC static).

    Represents :math:`F^{-1}` for

    .. math::  F = \lambda I_d + \frac{1}{m} G^T G, \qquad G = [g_1; \dots; g_m] \in \mathbb{R}^{m\times d},

    in one of two forms, both written :math:`F^{-1} = \alpha I + \beta V^T V`
    (docs/math.md §1):

    * **dual** (Woodbury): with :math:`W` = G (m < d) or the triangular factor R
      of G = QR (m >= d, d x d), the capacitance :math:`C = m\lambda I + W W^T = L L^T`
      (float64) and :math:`V = L^{-1} W`: :math:`F^{-1} = (I - V^T V)/\lambda`;
    * **primal** (m >= d only): :math:`F = L_F L_F^T` (float64, d x d) and
      :math:`V = L_F^{-1}`: :math:`F^{-1} = V^T V`.

    The form is chosen by accuracy (``form="auto"``): dual when m < d; when
    m >= d, dual if :math:`\lambda_{min}(F) \le 4\lambda` (G rank-deficient or
    nearly so: the dual form then represents the gradients' null space exactly
    and is accurate to a few eps, where the primal form loses
    :math:`\epsilon\,\kappa(F)`), primal otherwise (full rank: the dual form's
    subtraction would lose :math:`\lambda_{max}(F)/\lambda`, far more than
    :math:`\kappa(F)`).  ``op.form`` says which one was taken; docs/static.md
    has the error bounds.

    Parameters
    ----------
    grads : array_like, shape (m, d)
        The gradients as rows: NumPy (CPU), CuPy (GPU) or any DLPack tensor
        (zero-copy on its device).  float32 and float64 are kept, integers are
        promoted to float64.  Never modified; the operator keeps no reference
        to it (it stores V, its own array).
    damping : float
        lambda, inside ``[sqrt(tiny), sqrt(max)]`` of the gradients' dtype
        (float64: about [1.5e-154, 1.3e154]).
    check_finite : bool, default True
        Check vectors passed to ``matvec``/``matmat``/``quad`` for NaN/inf
        (a reduction over the input; on the GPU it synchronizes).
    form : {"auto", "dual", "primal"}, default "auto"
        Force a form ("primal" needs m >= d).
    overwrite_grads : bool, default False
        Reuse the caller's array for V instead of allocating a second (m, d)
        array (peak memory: one copy of the gradients, not two).  ``grads`` must
        then be a writable, C-contiguous float32 or float64 NumPy array (CPU);
        anything else is refused with a ValueError (TypeError for a non-array)
        before any work.  In the dual form with m < d the operator takes
        ``grads`` over: V is written into it and it is made read-only (the
        operator keeps it; do not write to it through another view).  A set-up
        that raises in the argument checks, the Gram product or the Cholesky
        leaves ``grads`` unchanged; one that raises after the solve (the factor
        overflows its dtype) leaves it holding undefined values.  When m >= d
        (V is d x d) ``grads`` is only read.

    Raises
    ------
    TypeError
        ``grads`` not an array of real numbers, ``damping`` not a real number,
        ``form`` not a string, ``check_finite`` not a bool.
    ValueError
        ``grads`` not 2-D, empty, or holding NaN/inf (after the cast to its
        storage dtype); its Gram products overflowing (float64 entries beyond
        about 1e154: rescale it); ``damping`` outside the range above; a factor
        that is not numerically positive definite.

    Notes
    -----
    Costs (r = min(m, d)).  Set-up O(d m r): one Gram product (G G^T when
    m < d; G^T G and its eigenvalues, O(d^3), to choose the form when m >= d,
    plus one QR of G where the dual form is taken), a float64 Cholesky O(r^3)
    and one triangular solve.  ``matvec`` O(d r) (two passes over V),
    ``matmat`` with k columns O(d r k) as two matrix products, ``entry`` O(r),
    ``diagonal`` O(d r) (one read of V, on all host threads), ``quad`` O(d r),
    ``logdet`` O(1).  Memory: V (r x d), in the caller's array with
    ``overwrite_grads=True``.

    m > d, m = 1, duplicate and zero gradients are all fine: C and F are
    positive definite for every lambda > 0.  For float32 gradients the Gram
    product runs in float32; if it overflows or the float64 Cholesky then
    fails (lambda tiny against the gradients' scale) it is recomputed with
    float64 accumulation.

    Examples
    --------
    >>> import numpy as np, mfac_linalg as ml
    >>> G = np.random.default_rng(0).standard_normal((8, 50))
    >>> op = ml.StaticInverseFisher(G, damping=1e-2)
    >>> op
    <StaticInverseFisher d=50 m=8 damping=1e-02 float64 cpu>
    >>> F = 1e-2 * np.eye(50) + G.T @ G / 8
    >>> x = np.ones(50)
    >>> bool(np.allclose(op @ x, np.linalg.solve(F, x), rtol=1e-10))
    True
    >>> op.form, ml.StaticInverseFisher(np.vstack([G, G]).T[:20], 1e-8).form
    ('dual', 'dual')

    With ``overwrite_grads=True`` the operator takes the gradients' buffer over
    (no second m x d array):

    >>> G2 = G.copy()
    >>> op2 = ml.StaticInverseFisher(G2, damping=1e-2, overwrite_grads=True)
    >>> bool(np.array_equal(op2 @ x, op @ x)), G2.flags.writeable
    (True, False)
    """

    def __init__(self, grads, damping, *, check_finite=True, form="auto",
                 overwrite_grads=False):
        G, be = _v.gradients(grads, "grads")
        lam = _v.damping(damping, "damping", dtype=G.dtype)
        form = _v.choice(form, "form", ("auto", "dual", "primal"))
        check_finite = _v.boolean(check_finite, "check_finite")
        overwrite = _v.boolean(overwrite_grads, "overwrite_grads")
        if overwrite:
            _v.reusable_buffer(grads, G, "grads", be)
        m, d = G.shape
        if form == "primal" and m < d:
            raise ValueError(f"form='primal' needs m >= d; got grads of shape {(m, d)}")
        with be.device_context():
            colsq = LR.column_sumsq(G, be)   # diag(G^T G), for fisher().diagonal()
            (lr,) = LR.build(G[None], [0], lam, m, be, name="grads", form=form,
                             inplace=overwrite)
        if overwrite and m < d:
            grads.flags.writeable = False    # it holds V now; the operator keeps it
        self._init_operator(d, G.dtype, be, check_finite=check_finite)
        self._m = m
        self._damping = lam
        self._lr = lr
        self._colsq = colsq

    # -- attributes ----------------------------------------------------------
    @property
    def form(self):
        """``"dual"`` (Woodbury) or ``"primal"`` (see the class docstring)."""
        return "primal" if self._lr.primal else "dual"

    @property
    def factor(self):
        """The float64 lower Cholesky factor (read-only): of C = m*lambda*I + W W^T
        (dual) or of F (primal)."""
        return B.readonly(self._lr.L[0])

    def _repr_fields(self):
        return [f"m={self._m}", f"damping={self._damping:.0e}"]

    # -- hooks: F^{-1} = alpha I + beta V^T V ----------------------------------
    def _checks_own_finite(self, X):
        """X's NaN/inf check is read from V X (r values) in the product itself
        (``LowRank.matmat``): no separate pass over X."""
        return True

    def _matmat(self, X):
        return self._lr.matmat(X, check=self._check_finite)

    def _fast_vector(self, x, name):
        """A CuPy vector (d,) of the operator's dtype on its device goes straight to the
        CUDA graph of ``LowRank.vector`` (where it takes V), sparing the general path's
        host time (docs/benchmarks.md); anything else, None."""
        be = self._backend
        if not (be.is_gpu and getattr(x, "ndim", 0) == 1 and B._is_cupy_array(x)
                and x.shape[0] == self._d and x.dtype == self._dtype
                and x.device.id == be.device_id):
            return None
        try:
            return self._lr.vector(x, self._check_finite)
        except NonFiniteInput:
            raise self._nonfinite(x, name) from None

    def _diagonal(self):
        return self._lr.diagonal()[0]

    def _entry(self, i, j):
        return self._lr.entry(0, i, j)

    def _quad(self, X):
        return self._lr.quad(X)

    def _todense(self):
        return self._lr.dense(0)

    # -- inverse-Fisher extras ---------------------------------------------------
    def logdet(self):
        r"""log det F.  O(1) (kept from set-up).

        Dual: d log(lambda) + log det C - r log(m lambda) (determinant lemma, r
        rows of W); primal: log det (L_F L_F^T).
        """
        return self._lr.logdet

    def lowrank_batches(self):
        """Yield the one block (columns (1, d), alpha, beta, V (1, r, d) read-only):
        F^{-1} = alpha I + beta V^T V."""
        lr = self._lr
        yield lr.cols(), lr.alpha, lr.beta, B.readonly(lr.V)

    def with_gradients(self, grads):
        """A new operator with the same damping for new gradients (m', d).

        Raises ValueError naming ``grads`` when it does not have the operator's d
        columns (an operator of another size was built and failed later, where it met
        vectors of this one's), and as the constructor otherwise."""
        return StaticInverseFisher(self._gradients_like(grads), self._damping,
                                   check_finite=self._check_finite)

    # -- forward products through the factors (used by FisherOperator) -------
    def _fisher_matmat(self, X):
        """F X.  Dual: lambda X + V^T (L^T L (V X)) / m; primal: L_F (L_F^T X)."""
        return self._lr.fisher_matmat(X)

    def _fisher_entry(self, i, j):
        """F[i, j]: O(d) (primal: rows of L_F) or O(r^2) (dual: columns of W = L V)."""
        return self._lr.fisher_entry(0, i, j)


class FisherOperator(Operator):
    r"""The damped empirical Fisher F of an inverse-Fisher operator (the forward map).

    Built by ``fisher()`` of an inverse-Fisher operator, from that operator's
    own data (G is never stored twice); it follows the inverse operator's
    state (for the sliding window: later updates).  The inverse operator
    provides the hooks ``_fisher_matmat(X)``, ``_fisher_diagonal()`` and
    ``_fisher_entry(i, j)``; their costs are in its docstring.
    ``inverse()`` returns that operator and ``logdet()`` is its ``logdet()``.

    Parameters
    ----------
    inverse_op : Operator
        The inverse-Fisher operator providing the hooks above (static, block or
        sliding window; ``op.fisher()`` of any other operator is not defined).

    Raises
    ------
    TypeError
        ``inverse_op`` is not an inverse-Fisher operator with those hooks.

    Examples
    --------
    >>> import numpy as np, mfac_linalg as ml
    >>> G = np.random.default_rng(0).standard_normal((5, 8))
    >>> op = ml.StaticInverseFisher(G, 0.1)
    >>> F = op.fisher()
    >>> bool(np.allclose(F.todense(), 0.1 * np.eye(8) + G.T @ G / 5))
    True
    >>> F.inverse() is op, bool(np.isclose(F.logdet(), np.linalg.slogdet(F.todense())[1]))
    (True, True)
    """

    def __init__(self, inverse_op):
        if not (isinstance(inverse_op, Operator) and all(
                hasattr(inverse_op, h) for h in ("_fisher_matmat", "_fisher_diagonal",
                                                 "_fisher_entry", "logdet"))):
            raise TypeError("inverse_op must be an inverse-Fisher operator (static, block or "
                            "sliding window: what op.fisher() is built from); got "
                            f"{type(inverse_op).__name__}")
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
