r"""Testing tools for curvature operators: exact oracles, hypothesis strategies and
the protocol check the library runs on its own operators.

Three parts (docs/testing.md shows them together):

* **Exact oracles** (:class:`Oracle`).  An oracle knows the exact matrix an operator
  represents and returns ``A @ X`` rounded once to float64.  For the damped
  empirical Fisher F = λI + GᵀG/N (docs/math.md §1) and its inverse,
  :func:`inverse_fisher_oracle` applies F in the factored form λX + Gᵀ(GX)/N in
  mpmath (F is never formed in mpmath) and solves with F by iterative refinement
  whose residuals are computed in that exact form (:func:`refined_solve`): the
  oracle stays exact to about one rounding where a dense float64 inverse is off by
  ε·cond(F).  :func:`kronecker_oracle` does the same for sums of Kronecker products
  (docs/math.md §4, built with ``np.kron``, never from the operator under test),
  :func:`block_diag_oracle` stacks oracles and :meth:`Oracle.from_dense` takes a
  float64 matrix as exact.
* **Strategies** (:func:`gradient_matrices`, :func:`fisher_problems`): gradient
  matrices with a chosen rank, duplicate rows, zero rows, row scales over decades,
  m > d and m = 1, and dampings over decades of λ/λ_max.  Hypothesis is imported
  only when a strategy is asked for.
* **The protocol check** (:func:`check_operator`): every method of the operator
  protocol against the oracle, each with its documented error bound
  c·(ε·κ + δ) (:data:`DEFAULT_TOLERANCES`), plus the structural rules (shapes,
  dtypes, one pass for k right-hand sides, the caller's arrays untouched,
  read-only internals, pickling).  It works on any object with ``shape`` and
  ``matvec``; methods an operator lacks are reported as skipped.

The exact oracles need mpmath (``pip install mpmath``; SymPy installs it too); the
strategies need hypothesis.  Oracles run on the host, in float64 and mpmath; the check
runs an operator on its own device (NumPy or CuPy) and compares on the host.
"""
from __future__ import annotations

import copy
import inspect
import math
import pickle

import numpy as np

__all__ = [
    "Oracle", "fisher_oracle", "inverse_fisher_oracle", "kronecker_oracle", "block_diag_oracle",
    "refined_solve", "gradient_matrices", "fisher_problems", "check_operator",
    "CheckReport", "OperatorCheckError", "DEFAULT_TOLERANCES",
]

#: Working precision (bits) of the exact residuals: products of two doubles need 106
#: bits; 320 bits leave every sum of the small sizes used in tests exact to far below
#: one float64 rounding.
MP_PREC = 320

#: Per-method constants c of the bound ``c * (eps * kappa + model_error)``
#: (relative, see :func:`check_operator` for how each error is measured).
DEFAULT_TOLERANCES = {
    "matvec": 16.0, "matmat": 16.0, "rmatvec": 16.0, "rmatmat": 16.0, "matmul": 16.0,
    "adjoint": 16.0, "to_scipy": 16.0, "todense": 16.0, "diagonal": 16.0,
    "entry": 16.0, "quad": 16.0, "logdet": 16.0,
}


# -- mpmath helpers --------------------------------------------------------------------

def _mpmath():
    try:
        import mpmath
    except ImportError as exc:  # pragma: no cover - mpmath ships with SymPy/SciPy setups
        raise ImportError("the exact oracles of mfac_linalg.testing need mpmath "
                          "(pip install mpmath)") from exc
    return mpmath


def _to_mp(a):
    """float64 array -> object array of mpf (exact: every double is an mpf)."""
    if isinstance(a, np.ndarray) and a.dtype == object:
        return a
    mp = _mpmath()
    return np.frompyfunc(mp.mpf, 1, 1)(np.asarray(a, dtype=np.float64)).astype(object)


def _to_float(a):
    """object array of mpf -> float64, each entry rounded once to nearest."""
    return np.frompyfunc(float, 1, 1)(a).astype(np.float64)


def _host64(a):
    """Any array (NumPy, CuPy, DLPack) -> float64 NumPy array on the host.  A complex
    array with a non-zero imaginary part is a TypeError: the operators checked here are
    real, and a cast would drop the imaginary part silently (with a ComplexWarning)."""
    from . import _backend as B
    h = np.asarray(B.to_host(a))
    if h.dtype.kind == "c":
        if np.any(h.imag != 0):
            raise TypeError(f"a real result was expected; got {h.dtype} values with a "
                            "non-zero imaginary part")
        h = h.real
    return np.asarray(h, dtype=np.float64)


def _real_array(a, name, *, ndim=2, square=False, allow_empty=False):
    """A real, finite float64 host array of ``ndim`` dimensions (TypeError for a
    non-numeric or complex input, ValueError for a bad shape or NaN/infinity)."""
    from . import _backend as B
    try:
        raw = np.asarray(B.to_host(a))
    except Exception as exc:
        raise TypeError(f"{name} must be a real array; got {type(a).__name__} ({exc})") \
            from None
    if raw.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a real array; got dtype {raw.dtype}")
    arr = np.array(raw, dtype=np.float64)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D; got shape {arr.shape}")
    if square and arr.shape[0] != arr.shape[1]:
        raise ValueError(f"{name} must be a square matrix; got shape {arr.shape}")
    if not allow_empty and arr.size == 0:
        raise ValueError(f"{name} must not be empty; got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite; got NaN or infinity")
    return arr


def refined_solve(apply_exact, solve, X, *, maxiter=60):
    r"""Solve A Y = X to float64 accuracy by iterative refinement with exact residuals.

    Repeats ``Y <- Y + solve(round(X - A Y))`` with the residual computed exactly by
    ``apply_exact`` (mpmath) and Y accumulated in mpmath, until the correction of each
    column is below 2⁻⁶⁰ of that column (max norms: every column is exact on its own
    scale, however small it is next to the others); the result is Y rounded once to
    float64.  Each sweep shrinks the
    error by about ε·cond(A) (``solve`` is any float64 solver, e.g. a Cholesky
    factorization), so it converges for cond(A) up to about 10¹⁵ and then is exact
    to one rounding, whatever cond(A) (docs/math.md §5).

    Parameters
    ----------
    apply_exact : callable
        ``apply_exact(Ymp)``: A times an object array of mpf (d, k), exactly.
    solve : callable
        ``solve(R)``: an approximate float64 solution of A Z = R for R (d, k).
    X : array_like, shape (d, k)
        The right-hand sides (float64).
    maxiter : int
        Sweeps before giving up.

    Returns
    -------
    numpy.ndarray, float64, shape (d, k)

    Raises
    ------
    ArithmeticError
        If the corrections stop shrinking (A too ill-conditioned for ``solve``).

    Examples
    --------
    >>> import numpy as np
    >>> from mfac_linalg.testing import refined_solve
    >>> from fractions import Fraction
    >>> A = np.array([[1.0, 1.0], [1.0, 1.0 + 1e-12]])          # cond(A) ~ 4e12
    >>> X = np.array([[1.0], [0.0]])
    >>> Y = refined_solve(lambda Y: A @ Y, lambda R: np.linalg.solve(A, R), X)
    >>> exact = -1 / (Fraction(A[1, 1]) - 1)                  # y_2 = -1/(A_22 - 1)
    >>> bool(Y[1, 0] == float(exact))                          # correctly rounded
    True
    """
    from . import _validate as V
    mp = _mpmath()
    maxiter = V.integer(maxiter, "maxiter", minimum=1)
    if not (callable(apply_exact) and callable(solve)):
        raise TypeError("apply_exact and solve must be callables; got "
                        f"{type(apply_exact).__name__} and {type(solve).__name__}")
    X = _real_array(X, "X", ndim=np.ndim(X) if np.ndim(X) in (1, 2) else 2,
                    allow_empty=True)
    with mp.workprec(MP_PREC):
        Xmp = _to_mp(X)
        Y = _to_mp(solve(X))
        last = math.inf
        for _ in range(maxiter):
            R = _to_float(Xmp - apply_exact(Y))
            D = np.asarray(solve(R), dtype=np.float64)
            Y = Y + _to_mp(D)
            # each column on its own scale: a column whose solution is far smaller than
            # another's (F's top eigenvector next to a random vector) is refined until its
            # own correction is below 2^-60 of it, not of the largest column
            step = _column_max(D)
            size = _column_max(_to_float(Y))
            rel = float(np.max(np.where(step == 0, 0.0, step / np.where(size > 0, size, 1.0)),
                               initial=0.0))
            if rel <= 2.0 ** -60:
                return _to_float(Y)
            if rel > 0.5 * last:
                raise ArithmeticError(
                    "refined_solve: the corrections stopped shrinking (the matrix is too "
                    "ill-conditioned for the float64 solver); use a better-conditioned case")
            last = rel
    raise ArithmeticError(f"refined_solve: no convergence in {maxiter} sweeps")


def _column_max(A):
    """max |A| per column (a 1-D array: one column) as a float64 vector."""
    A = np.abs(np.asarray(A, dtype=np.float64))
    A = A[:, None] if A.ndim == 1 else A.reshape(1, 1) if A.ndim == 0 else A
    return A.max(axis=0, initial=0.0)


# -- oracles ---------------------------------------------------------------------------

class Oracle:
    r"""The exact d × d matrix an operator represents, for :func:`check_operator`.

    Products come back rounded once to float64 from an exact computation, so a
    check against them needs no allowance for the oracle's own error.

    Parameters
    ----------
    d : int
        The dimension.
    apply : callable
        ``apply(X)``: A @ X for a float64 (d, k) array, exact to one rounding.
    kappa : float
        The conditioning factor κ of the operator's documented error bound (e.g.
        κ_W = λ_max(F)/λ for the Woodbury form, docs/math.md §1, §7).
    logdet : float, optional
        The value ``op.logdet()`` must return (for an inverse-Fisher operator: log det F).
    logdet_scale : float, optional
        The size against which logdet errors are measured (default d).
    fisher : Oracle, optional
        The oracle of ``op.fisher()`` (the forward matrix).
    model_error : float
        A relative error the operator is allowed on top of rounding, e.g. the
        documented convergence error of an iterative factorization (r/gap).
    symmetric, positive_definite : bool
        Properties of A used by the checks (adjoints, CG).

    Notes
    -----
    ``dense()`` is ``apply(I)``, computed once (O(d) products).

    Examples
    --------
    >>> import numpy as np
    >>> from mfac_linalg.testing import Oracle
    >>> o = Oracle.from_dense(np.diag([1.0, 2.0, 4.0]))
    >>> o.matmat(np.ones((3, 1)))[:, 0].tolist(), o.kappa
    ([1.0, 2.0, 4.0], 4.0)
    """

    def __init__(self, d, apply, *, kappa, logdet=None, logdet_scale=None, fisher=None,
                 model_error=0.0, symmetric=True, positive_definite=True, name="A"):
        from . import _validate as V
        self.d = V.integer(d, "d", minimum=0)
        if not callable(apply):
            raise TypeError(f"apply must be a callable; got {type(apply).__name__}")
        self._apply = apply
        self.kappa = V.real(kappa, "kappa", allow_inf=True, low=0.0)
        self.logdet = None if logdet is None else V.real(logdet, "logdet")
        self.logdet_scale = V.real(self.d if logdet_scale is None else logdet_scale,
                                   "logdet_scale", low=0.0, low_open=self.d > 0)
        if fisher is not None and not isinstance(fisher, Oracle):
            raise TypeError(f"fisher must be an Oracle or None; got {type(fisher).__name__}")
        self.fisher = fisher
        self.model_error = V.real(model_error, "model_error", low=0.0)
        self.symmetric = bool(symmetric)
        self.positive_definite = bool(positive_definite)
        self.name = name
        self._dense = None

    def __repr__(self):
        return f"<Oracle {self.name} d={self.d} kappa={self.kappa:.3g}>"

    def matmat(self, X):
        """A @ X (float64, exact to one rounding) for X of shape (d, k) or (d,)."""
        X = _real_array(X, "X", ndim=np.ndim(X) if np.ndim(X) in (1, 2) else 2,
                        allow_empty=True)
        if X.shape[0] != self.d:
            raise ValueError(f"X must have {self.d} rows (the oracle's d); got shape "
                             f"{X.shape}")
        if X.ndim == 1:
            return self._apply(X[:, None])[:, 0]
        return self._apply(X)

    def dense(self):
        """The matrix itself, float64 (d, d); computed once."""
        if self._dense is None:
            self._dense = self._apply(np.eye(self.d))
            self._dense.setflags(write=False)
        return self._dense

    @classmethod
    def from_dense(cls, A, *, kappa=None, logdet=None, fisher=None, model_error=0.0,
                   exact_logdet=True):
        """An oracle for a float64 matrix taken as exact: products in mpmath.

        ``kappa`` defaults to the 2-norm condition number of A; ``logdet``, if not
        given, is computed exactly in mpmath when A is symmetric positive definite
        (and ``exact_logdet``); a matrix positive definite to float64 eigenvalues but
        not exactly (within rounding of singular) gets ``logdet`` None and
        ``positive_definite`` False.  Cost O(d³) mpmath operations once, O(d²k) per product.
        """
        A = _real_array(A, "A", square=True, allow_empty=True)
        A.setflags(write=False)
        d = A.shape[0]
        symmetric = bool(np.array_equal(A, A.T))
        s = np.linalg.svd(A, compute_uv=False) if d else np.ones(1)
        if kappa is None:
            kappa = float(s[0] / s[-1]) if s[-1] > 0 else math.inf
        pd = symmetric and d > 0 and bool(np.linalg.eigvalsh(A)[0] > 0)
        mp = _mpmath()
        Amp = _to_mp(A)

        def apply_mp(X):
            with mp.workprec(MP_PREC):
                return Amp @ _to_mp(X)

        def apply(X):
            with mp.workprec(MP_PREC):
                return _to_float(apply_mp(X))

        if logdet is None and pd and exact_logdet:
            logdet = _mp_logdet(Amp, exact_pd=True)
            pd = logdet is not None         # positive definite in float64 only: it is not
        o = cls(d, apply, kappa=kappa, logdet=logdet, fisher=fisher, model_error=model_error,
                symmetric=symmetric, positive_definite=pd, name="dense")
        o._dense = A
        o._apply_mp = apply_mp
        return o

    def inverse(self, solve=None, *, logdet=None):
        """The oracle of A⁻¹ by :func:`refined_solve` (exact residuals from ``apply``).

        ``solve`` is the float64 solver for the corrections (default: Cholesky of
        ``dense()``, or LU where A is not positive definite).  ``logdet`` stays log det A
        (the library's inverse operators report log det of the matrix they invert), and
        ``fisher`` is this oracle.  ``ValueError`` where ``kappa`` is infinite,
        ``ArithmeticError`` where the float64 factorization of ``dense()`` fails (A
        singular to float64 precision).

        Examples
        --------
        >>> import numpy as np
        >>> from mfac_linalg.testing import Oracle
        >>> A = np.array([[4.0, 1.0], [1.0, 3.0]])
        >>> inv = Oracle.from_dense(A).inverse()
        >>> inv.matmat(np.array([1.0, 0.0])).tolist()          # (3, -1) / 11
        [0.2727272727272727, -0.09090909090909091]
        >>> inv.fisher is not None, abs(inv.logdet - float(np.log(11))) < 1e-15
        (True, True)
        """
        import scipy.linalg as sla
        mp = _mpmath()
        if solve is not None and not callable(solve):
            raise TypeError(f"solve must be a callable or None; got {type(solve).__name__}")
        if not self.kappa < math.inf:
            raise ValueError(f"the matrix of {self!r} is singular (kappa = inf): it has no "
                             "inverse")
        if solve is None:
            D = self.dense()
            try:
                if self.positive_definite:
                    c = sla.cho_factor(D, lower=True)
                    solve = lambda R: sla.cho_solve(c, R)  # noqa: E731
                else:
                    lu = sla.lu_factor(D, check_finite=False)
                    solve = lambda R: sla.lu_solve(lu, R)  # noqa: E731
            except np.linalg.LinAlgError:
                raise ArithmeticError(
                    f"the matrix of {self!r} is singular to float64 precision: the "
                    "refinement needs kappa up to about 1e15") from None
        fwd = self
        exact = getattr(self, "_apply_mp", None)

        def apply_exact(Ymp):
            if exact is not None:
                return exact(Ymp)
            # an oracle without an mpmath product: apply it to the float64 parts of Y
            # (Y = Y0 + Y1, both rounded), each product exact to one rounding
            Y0 = _to_float(Ymp)
            Y1 = _to_float(Ymp - _to_mp(Y0))
            return _to_mp(fwd.matmat(Y0)) + _to_mp(fwd.matmat(Y1))

        def apply(X):
            return refined_solve(apply_exact, solve, X)

        inv = Oracle(self.d, apply, kappa=self.kappa,
                     logdet=logdet if logdet is not None else self.logdet,
                     logdet_scale=self.logdet_scale, fisher=self, model_error=self.model_error,
                     symmetric=self.symmetric, positive_definite=self.positive_definite,
                     name=f"inv({self.name})")
        del mp
        return inv


def _mp_logdet(Amp, *, rounded=True, exact_pd=False):
    """log det of a symmetric positive definite object array of mpf (Cholesky, mpmath);
    a float (rounded once) or, with ``rounded=False``, an mpf.

    ``exact_pd``: the matrix was judged positive definite in float64 (eigenvalues), which
    a matrix within rounding of singular can pass while it is not, exactly; return None
    where the exact Cholesky fails (mpmath's "not positive-definite" escaped otherwise)."""
    mp = _mpmath()
    with mp.workprec(MP_PREC):
        M = mp.matrix(Amp.tolist())
        # pivots judged relative to the matrix's scale (mpmath's default tolerance is the
        # absolute eps, 2^-320 ~ 5e-97, which refused lambda I of lambda < 5e-97)
        top = max((abs(M[i, i]) for i in range(M.rows)), default=mp.mpf(0))
        try:
            L = mp.cholesky(M, tol=mp.eps * top * max(M.rows, 1))
        except ValueError:
            if exact_pd:
                return None
            raise
        v = 2 * mp.fsum(mp.log(L[i, i]) for i in range(L.rows))
        return float(v) if rounded else v


def fisher_oracle(grads, damping=0.0, *, N=None):
    r"""The exact oracle of F = λI + GᵀG/N itself (λ >= 0; λ = 0 gives the empirical
    Fisher GᵀG/N, e.g. a curvlinops ``EFLinearOperator`` with N = 1 for a summed loss).

    Products are computed in mpmath in the factored form λX + Gᵀ(GX)/N (F is never
    formed in mpmath) and rounded once.  ``kappa`` is κ_W = λ_max(F)/λ (the Woodbury
    form's conditioning factor) for λ > 0, cond(GᵀG) for λ = 0 (infinite when G has
    rank < d: no relative bound exists there); ``logdet`` = log det F in mpmath (None
    when F is singular).  Cost: O(r³) mpmath operations once (r = min(m, d)),
    O(mdk) per product with k columns.

    Parameters
    ----------
    grads : array_like, shape (m, d)
        The gradients as rows, exactly as the operator holds them.
    damping : float
        λ >= 0.
    N : float, optional
        The normalization (default m).

    Returns
    -------
    Oracle

    Examples
    --------
    >>> import numpy as np
    >>> from mfac_linalg.testing import fisher_oracle
    >>> G = np.array([[1.0, 2.0], [3.0, 4.0]])
    >>> o = fisher_oracle(G, 0.5, N=1)
    >>> o.matmat(np.array([1.0, 0.0])).tolist()           # (0.5 I + G^T G) e_1
    [10.5, 14.0]
    >>> round(float(np.exp(o.logdet)), 9)                 # det = 10.5 * 20.5 - 14**2
    19.25
    """
    from . import _validate as V
    mp = _mpmath()
    G = _real_array(grads, "grads")
    m, d = G.shape
    lam = V.real(damping, "damping", low=0.0)
    N = float(m) if N is None else V.real(N, "N", low=0.0, low_open=True)
    with np.errstate(over="ignore"):          # an overflow is refused just below
        sv = np.linalg.svd(G, compute_uv=False) ** 2 / N if G.size else np.zeros(1)
    if not (np.isfinite(sv).all() and math.isfinite(lam + float(sv.max()))):
        raise ValueError("grads is too large: the eigenvalues of GᵀG/N overflow float64; "
                         "rescale the gradients (and the damping by the square of the scale)")
    eig = lam + np.concatenate([sv, np.zeros(max(0, d - sv.size))])
    top = float(eig.max())
    if lam > 0:
        kappa = top / lam
    else:
        kappa = top / float(eig.min()) if eig.min() > 0 else math.inf
    ld = None
    with mp.workprec(MP_PREC):
        Gmp = _to_mp(G)
        lam_mp, N_mp = mp.mpf(lam), mp.mpf(N)
        if lam > 0 and m <= d:
            C = Gmp @ Gmp.T + np.diag([N_mp * lam_mp] * m).astype(object)
            ld = float(d * mp.log(lam_mp) + _mp_logdet(C, rounded=False)
                       - m * mp.log(N_mp * lam_mp))
        elif eig.min() > 0:
            Fm = (Gmp.T @ Gmp) / N_mp + np.diag([lam_mp] * d).astype(object)
            ld = _mp_logdet(Fm, exact_pd=True)
            if ld is None:        # lambda = 0 and G of rank < d, exactly (float64 SVD: > 0)
                kappa = math.inf
    scale = float(max(m, d) + np.abs(np.log(eig[eig > 0])).sum())

    def apply_mp(X):
        with mp.workprec(MP_PREC):
            Xmp = _to_mp(X)
            return lam_mp * Xmp + (Gmp.T @ (Gmp @ Xmp)) / N_mp

    def apply_F(X):
        with mp.workprec(MP_PREC):
            return _to_float(apply_mp(X))

    fwd = Oracle(d, apply_F, kappa=kappa, logdet=ld, logdet_scale=scale,
                 positive_definite=bool(eig.min() > 0) and kappa < math.inf, name="F")
    fwd._apply_mp = apply_mp
    return fwd


def inverse_fisher_oracle(grads, damping, *, N=None):
    r"""The exact oracle of F⁻¹ for F = λI + GᵀG/N (docs/math.md §1, §5).

    Products with F are computed exactly in the factored form λX + Gᵀ(GX)/N
    (mpmath, F never formed); products with F⁻¹ by :func:`refined_solve` with those
    exact residuals, so both are exact to one float64 rounding.  ``logdet`` is
    log det F by the determinant lemma, d log λ + log det(NλI + GGᵀ) − m log(Nλ),
    with the m × m (or, for m > d, the d × d) determinant in mpmath.

    Parameters
    ----------
    grads : array_like, shape (m, d)
        The gradients the operator holds, exactly as stored (round them to the
        operator's storage dtype first: a float32 window represents F of the float32
        values).
    damping : float
        λ > 0.
    N : float, optional
        The normalization (default m).

    Returns
    -------
    Oracle
        For F⁻¹, with ``kappa`` = κ_W = λ_max(F)/λ, ``logdet`` = log det F and
        ``fisher`` the oracle of F (same κ).

    Raises
    ------
    ArithmeticError
        F is singular to float64 precision (κ beyond about 10¹⁵-10¹⁶: the refinement
        has no float64 solver to start from); its products then raise the same when the
        refinement stops converging.

    Examples
    --------
    >>> import numpy as np
    >>> import mfac_linalg as ml
    >>> from mfac_linalg.testing import inverse_fisher_oracle
    >>> G = np.random.default_rng(0).standard_normal((3, 6))
    >>> o = inverse_fisher_oracle(G, 1e-3)
    >>> x = np.ones(6)
    >>> F = 1e-3 * np.eye(6) + G.T @ G / 3
    >>> bool(np.allclose(F @ o.matmat(x), x, rtol=0, atol=1e-9))
    True
    >>> bool(abs(o.logdet - np.linalg.slogdet(F)[1]) < 1e-9)
    True
    """
    import scipy.linalg as sla
    from . import _validate as V
    lam = V.real(damping, "damping", low=0.0, low_open=True)
    G = _real_array(grads, "grads")
    fwd = fisher_oracle(G, lam, N=N)
    m, d = G.shape
    N = float(m) if N is None else V.real(N, "N", low=0.0, low_open=True)
    # float64 corrections through the dual (Woodbury) form when m < d, else Cholesky of F
    try:
        if m < d:
            cC = sla.cho_factor(N * lam * np.eye(m) + G @ G.T, lower=True)
            solve = lambda R: (R - G.T @ sla.cho_solve(cC, G @ R)) / lam  # noqa: E731
        else:
            cF = sla.cho_factor(lam * np.eye(d) + G.T @ G / N, lower=True)
            solve = lambda R: sla.cho_solve(cF, R)  # noqa: E731
    except np.linalg.LinAlgError:
        raise ArithmeticError(
            f"inverse_fisher_oracle: F is singular to float64 precision (kappa = "
            f"{fwd.kappa:.3g}; the refinement needs about 1e15 or less): use a larger "
            "damping") from None
    inv = fwd.inverse(solve)
    inv.name = "inv(F)"
    return inv


def kronecker_oracle(terms=(), *, shift=0.0, basis=None, inverse=True):
    r"""The exact oracle of a damped Kronecker-factored matrix or of its inverse.

    M = Σ_t P_t ⊗ Q_t + shift·I, or, with ``basis=(U, W, S)``,
    M = (U ⊗ W) diag(vec S) (U ⊗ W)ᵀ + shift·I (EKFAC, docs/math.md §4).  Vectors
    are row-major vec(V) of V (d_out × d_in), the library's layout:
    (P ⊗ Q) vec(V) = vec(P V Qᵀ).  Products with M are exact in mpmath from the given
    factors (taken as exact); with M⁻¹ by :func:`refined_solve`, corrections solved
    with the dense ``np.kron`` matrix.

    Parameters
    ----------
    terms : sequence of (P, Q)
        Square float64 factors, P (d_out, d_out), Q (d_in, d_in).  A factor symmetric up
        to rounding (max |P − Pᵀ| <= 16 n ε max |P|) is taken as (P + Pᵀ)/2; others as
        they are (a non-symmetric M).
    shift : float
        The multiple of I added.
    basis : (U, W, S), optional
        An eigenbasis form instead of (or added to) ``terms``.
    inverse : bool
        Return the oracle of M⁻¹ (default) or of M.

    Returns
    -------
    Oracle
        ``kappa`` = cond(M) (2-norm), ``logdet`` = log det M (mpmath) where M is
        symmetric positive definite (else None), ``symmetric`` whether M is, exactly
        (factors that are not symmetric give a non-symmetric M: its transpose products
        are checked against Mᵀ), ``fisher`` = the oracle of M when ``inverse``.

    Examples
    --------
    >>> import numpy as np
    >>> from mfac_linalg.testing import kronecker_oracle
    >>> P, Q = np.diag([1.0, 2.0]), np.diag([1.0, 3.0, 5.0])
    >>> o = kronecker_oracle([(P, Q)], shift=1.0)
    >>> o.matmat(np.ones(6)).tolist()
    [0.5, 0.25, 0.16666666666666666, 0.3333333333333333, 0.14285714285714285, 0.09090909090909091]
    """
    from . import _validate as V
    mp = _mpmath()
    shift = V.real(shift, "shift")
    inverse = V.boolean(inverse, "inverse")
    if isinstance(terms, (str, bytes)) or not hasattr(terms, "__iter__"):
        raise TypeError(f"terms must be a sequence of (P, Q) pairs; got {type(terms).__name__}")
    pairs = []
    for t, pq in enumerate(terms):
        if isinstance(pq, (str, bytes)) or not hasattr(pq, "__len__") or len(pq) != 2 \
                or hasattr(pq, "dtype"):
            raise TypeError(f"terms[{t}] must be a pair (P, Q) of square matrices; got "
                            f"{type(pq).__name__}")
        pairs.append((_near_symmetric(_real_array(pq[0], f"terms[{t}][0]", square=True)),
                      _near_symmetric(_real_array(pq[1], f"terms[{t}][1]", square=True))))
    terms = pairs
    if basis is not None:
        if isinstance(basis, (str, bytes)) or not hasattr(basis, "__len__") \
                or len(basis) != 3 or hasattr(basis, "dtype"):
            raise TypeError(f"basis must be a triple (U, W, S); got {type(basis).__name__}")
        U = _real_array(basis[0], "basis[0] (U)", square=True)
        W = _real_array(basis[1], "basis[1] (W)", square=True)
        S = _real_array(basis[2], "basis[2] (S)")
        d_out, d_in = U.shape[0], W.shape[0]
        if S.shape != (d_out, d_in):
            raise ValueError(f"basis[2] (S) must have shape {(d_out, d_in)}; got {S.shape}")
    else:
        if not terms:
            raise ValueError("kronecker_oracle needs terms or basis")
        d_out, d_in = terms[0][0].shape[0], terms[0][1].shape[0]
    for t, (P, Q) in enumerate(terms):
        if (P.shape[0], Q.shape[0]) != (d_out, d_in):
            raise ValueError(f"terms[{t}] must have factors of sizes ({d_out}, {d_in}) like "
                             f"the others; got ({P.shape[0]}, {Q.shape[0]})")
    d = d_out * d_in
    dense = shift * np.eye(d)
    for P, Q in terms:
        dense = dense + np.kron(P, Q)
    if basis is not None:
        K = np.kron(U, W)
        dense = dense + (K * S.reshape(-1)[None, :]) @ K.T
    with mp.workprec(MP_PREC):
        terms_mp = [(_to_mp(P), _to_mp(Q)) for P, Q in terms]
        shift_mp = mp.mpf(float(shift))
        if basis is not None:
            U_mp, W_mp, S_mp = _to_mp(U), _to_mp(W), _to_mp(S)

    def apply_mp(X):
        with mp.workprec(MP_PREC):
            k = X.shape[1]
            out = np.empty((d, k), dtype=object)
            for c in range(k):       # an oracle: clarity over speed
                V = _to_mp(X[:, c].reshape(d_out, d_in))
                Y = shift_mp * V
                for Pm, Qm in terms_mp:
                    Y = Y + Pm @ V @ Qm.T
                if basis is not None:
                    T = U_mp.T @ V @ W_mp
                    Y = Y + U_mp @ (T * S_mp) @ W_mp.T
                out[:, c] = Y.reshape(-1)
            return out

    def apply(X):
        with mp.workprec(MP_PREC):
            return _to_float(apply_mp(X))

    # M is symmetric when every factor is; otherwise decide it exactly (a sum of
    # non-symmetric terms can still be symmetric)
    symmetric = all(np.array_equal(P, P.T) and np.array_equal(Q, Q.T) for P, Q in terms)
    exact = None
    if not symmetric:
        exact = apply_mp(np.eye(d))
        symmetric = bool((exact == exact.T).all())
    if symmetric:
        eig = np.linalg.eigvalsh((dense + dense.T) / 2)
        pd = bool(eig[0] > 0)
        sv = np.abs(eig)
    else:          # a non-symmetric M: the 2-norm condition number, no Cholesky, no logdet
        sv = np.linalg.svd(dense, compute_uv=False)
        pd = False
    small = float(sv.min())
    kappa = float(sv.max()) / small if small > 0 else math.inf
    if inverse and not small > 0:
        raise ValueError("the matrix of terms, shift and basis is singular (an eigenvalue "
                         "is 0): it has no inverse; add a shift or pass inverse=False")
    logdet = None
    if pd:
        logdet = _mp_logdet(apply_mp(np.eye(d)) if exact is None else exact, exact_pd=True)
        pd = logdet is not None
    fwd = Oracle(d, apply, kappa=kappa, logdet=logdet,
                 logdet_scale=float(d + np.abs(np.log(sv[sv > 0])).sum()),
                 symmetric=symmetric, positive_definite=pd, name="M")
    fwd._apply_mp = apply_mp
    fwd._dense = dense
    dense.setflags(write=False)
    if not inverse:
        return fwd
    inv = fwd.inverse()
    inv.name = "inv(M)"
    return inv


def _near_symmetric(P):
    """P, or its symmetric part (P + Pᵀ)/2 where P is symmetric up to rounding
    (max |P − Pᵀ| <= 16 n ε max |P|: a symmetric factor computed in floating point, e.g.
    U diag(s) Uᵀ); a factor further from symmetric is kept as it is."""
    n = P.shape[0]
    asym = float(np.abs(P - P.T).max()) if P.size else 0.0
    if 0.0 < asym <= 16.0 * n * np.finfo(np.float64).eps * float(np.abs(P).max()):
        return (P + P.T) / 2
    return P


def block_diag_oracle(oracles):
    """The oracle of blockdiag(A_1, A_2, ...) from the blocks' oracles.

    ``kappa`` is the largest block κ (each block's products carry their own bound),
    ``logdet`` the sum and ``fisher`` the block-diagonal of the blocks' ``fisher``
    where every block has one.  Its products cost the sum of the blocks' products,
    O(Σ_i cost(A_i)); building it costs O(number of blocks).

    Parameters
    ----------
    oracles : iterable of Oracle
        The blocks' oracles, in diagonal order (at least one); block i acts on the rows
        ``d_1 + ... + d_{i-1}`` up to ``d_1 + ... + d_i`` of the input.

    Returns
    -------
    Oracle
        The oracle of the block-diagonal matrix, of dimension Σ_i d_i; ``symmetric`` and
        ``positive_definite`` hold when they hold for every block, ``model_error`` is the
        largest block's.

    Raises
    ------
    ValueError
        If ``oracles`` is empty.

    Examples
    --------
    >>> import numpy as np
    >>> from mfac_linalg.testing import Oracle, block_diag_oracle
    >>> o = block_diag_oracle([Oracle.from_dense(np.eye(2)), Oracle.from_dense(2 * np.eye(1))])
    >>> o.dense().tolist()
    [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]]
    """
    if isinstance(oracles, Oracle) or not hasattr(oracles, "__iter__"):
        raise TypeError(f"oracles must be an iterable of Oracle; got {type(oracles).__name__}")
    oracles = list(oracles)
    if not oracles:
        raise ValueError("oracles must not be empty")
    for i, o in enumerate(oracles):
        if not isinstance(o, Oracle):
            raise TypeError(f"oracles[{i}] must be an Oracle; got {type(o).__name__}")
    offs = np.concatenate([[0], np.cumsum([o.d for o in oracles])])

    def apply(X):
        return np.concatenate([o.matmat(X[a:b]) for o, a, b in
                               zip(oracles, offs[:-1], offs[1:])], axis=0)

    lds = [o.logdet for o in oracles]
    fis = [o.fisher for o in oracles]
    return Oracle(int(offs[-1]), apply, kappa=max(o.kappa for o in oracles),
                  logdet=None if any(v is None for v in lds) else sum(lds),
                  logdet_scale=sum(o.logdet_scale for o in oracles),
                  fisher=None if any(f is None for f in fis) else block_diag_oracle(fis),
                  model_error=max(o.model_error for o in oracles),
                  symmetric=all(o.symmetric for o in oracles),
                  positive_definite=all(o.positive_definite for o in oracles),
                  name="blockdiag")


# -- hypothesis strategies -----------------------------------------------------------

_KINDS = ("normal", "lowrank", "duplicates", "zero_rows", "scaled", "tall", "single")


def _make_gradients(rng, m, d, kind, rank):
    if kind == "tall":
        m = max(m, d + 1)
    if kind == "single":
        m = 1
    G = rng.standard_normal((m, d))
    if kind == "lowrank":
        r = max(1, min(rank, m, d))
        G = rng.standard_normal((m, r)) @ rng.standard_normal((r, d)) / math.sqrt(r)
    elif kind == "duplicates" and m > 1:
        src = rng.integers(0, max(1, m // 2), size=m)
        G = G[src]
    elif kind == "zero_rows" and m > 1:
        zero = rng.random(m) < 0.5
        zero[rng.integers(m)] = True                  # at least one zero row, as named
        G[zero] = 0.0
    elif kind == "scaled":
        G = G * (10.0 ** rng.uniform(-4, 4, size=(m, 1)))
    return G


def gradient_matrices(*, max_m=12, max_d=12, kinds=_KINDS, dtype=np.float64, rank=None):
    """A hypothesis strategy for gradient matrices G (m, d).

    Kinds: ``"normal"``; ``"lowrank"`` (rank drawn from 1..min(m, d)); ``"duplicates"``
    (rows repeated); ``"zero_rows"``; ``"scaled"`` (row norms over 8 decades);
    ``"tall"`` (m > d); ``"single"`` (m = 1).  Values come from a seeded generator
    (the sizes, kind and rank shrink).  Hypothesis is imported when called.

    Parameters
    ----------
    max_m, max_d : int
        Upper bounds on m (except ``"tall"``, which takes m = max(m, d + 1)) and d.
    kinds : sequence of str
        The kinds to draw from.
    dtype : numpy dtype
        float64 or float32 (values are rounded once to it).
    rank : int, optional
        Every matrix drawn has rank <= ``rank`` (its rows projected onto a random
        ``rank``-dimensional subspace), whatever the kind.

    Returns
    -------
    hypothesis.strategies.SearchStrategy of numpy.ndarray

    Raises
    ------
    TypeError
        A non-integer ``max_m``/``max_d``/``rank``, ``kinds`` not a sequence, or a
        ``dtype`` that is not a dtype.
    ValueError
        ``max_m``/``max_d``/``rank`` < 1, an unknown or empty ``kinds`` (or one name as a
        string), or a dtype other than float64/float32.

    Examples
    --------
    >>> from hypothesis import given, settings
    >>> import numpy as np
    >>> from mfac_linalg.testing import gradient_matrices
    >>> @settings(max_examples=5, deadline=None)
    ... @given(gradient_matrices(max_m=4, max_d=5, kinds=("tall",)))
    ... def test(G):
    ...     assert G.shape[0] > G.shape[1]
    >>> test()
    >>> @settings(max_examples=5, deadline=None)
    ... @given(gradient_matrices(max_m=6, max_d=6, rank=2))
    ... def test_rank(G):
    ...     assert np.linalg.matrix_rank(G) <= 2
    >>> test_rank()
    """
    from hypothesis import strategies as st
    from . import _validate as V
    max_m = V.integer(max_m, "max_m", minimum=1)
    max_d = V.integer(max_d, "max_d", minimum=1)
    if isinstance(kinds, (str, bytes)):     # one name, not a sequence of names
        raise ValueError(f"kinds must be a non-empty subset of {_KINDS}; got {kinds!r} "
                         f"(for one kind write ({kinds!r},))")
    if not hasattr(kinds, "__iter__"):
        raise TypeError(f"kinds must be a sequence of kind names from {_KINDS}; got "
                        f"{type(kinds).__name__} {kinds!r}")
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in _KINDS]
    if bad or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {_KINDS}; got {kinds!r}")
    if rank is not None:
        rank = V.integer(rank, "rank", minimum=1)
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float64 or float32; got {dtype!r}") from None
    if dt not in (np.float64, np.float32):
        raise ValueError(f"dtype must be float64 or float32; got {dt}")
    dtype = dt

    @st.composite
    def strat(draw):
        kind = draw(st.sampled_from(tuple(kinds)))
        m = draw(st.integers(1, max_m))
        d = draw(st.integers(1, max_d))
        r = draw(st.integers(1, max(1, min(m, d))))
        seed = draw(st.integers(0, 2 ** 32 - 1))
        rng = np.random.default_rng(seed)
        G = _make_gradients(rng, m, d, kind, r)
        if rank is not None and rank < d:
            Q, _ = np.linalg.qr(rng.standard_normal((d, rank)))
            G = (G @ Q) @ Q.T
        return G.astype(dtype)

    return strat()


def fisher_problems(*, max_m=12, max_d=12, kinds=_KINDS, ratio=(1e-8, 1e2),
                    dtype=np.float64):
    """A hypothesis strategy for (G, damping): G from :func:`gradient_matrices`, and
    λ = r·λ_max(GᵀG/m) with r log-uniform in ``ratio`` (r itself when G = 0).

    Each draw costs one gradient matrix (see :func:`gradient_matrices`) and one spectral
    norm of G, O(m d min(m, d)).  Hypothesis is imported when called.

    Parameters
    ----------
    max_m, max_d : int
        Upper bounds on the number of gradients m and the dimension d (as in
        :func:`gradient_matrices`).
    kinds : sequence of str
        The kinds of gradient matrix to draw from (see :func:`gradient_matrices`).
    ratio : (float, float)
        The range (low, high), both > 0, of r = λ / λ_max(GᵀG/m); r is drawn log-uniformly.
    dtype : numpy dtype
        float64 or float32, the dtype of G (λ is a Python float).

    Returns
    -------
    hypothesis.strategies.SearchStrategy of (numpy.ndarray, float)
        Draws pairs ``(G, damping)`` with G of shape (m, d) and damping > 0.

    Raises
    ------
    TypeError
        If ``ratio`` is not a pair of real numbers, or another argument has a wrong type.
    ValueError
        If a bound of ``ratio`` is not > 0 and finite or low > high, or another argument
        is refused by :func:`gradient_matrices` (all checked at the call).

    Examples
    --------
    >>> from hypothesis import given, settings
    >>> from mfac_linalg.testing import fisher_problems
    >>> @settings(max_examples=5, deadline=None)
    ... @given(fisher_problems(max_m=3, max_d=3))
    ... def test(problem):
    ...     G, lam = problem
    ...     assert lam > 0
    >>> test()
    """
    from hypothesis import strategies as st
    from . import _validate as V
    if isinstance(ratio, (str, bytes)) or not hasattr(ratio, "__len__") or len(ratio) != 2:
        raise TypeError(f"ratio must be a pair (low, high); got {type(ratio).__name__} "
                        f"{ratio!r}")
    r_lo = V.real(ratio[0], "ratio[0]", low=0.0, low_open=True)
    r_hi = V.real(ratio[1], "ratio[1]", low=r_lo)
    # the gradient matrices' arguments are checked now, not when an example is drawn
    gradient_matrices(max_m=max_m, max_d=max_d, kinds=kinds, dtype=dtype)
    lo, hi = math.log10(r_lo), math.log10(r_hi)

    @st.composite
    def strat(draw):
        G = draw(gradient_matrices(max_m=max_m, max_d=max_d, kinds=kinds, dtype=dtype))
        # clamped: 10 ** log10(r) can round past the bound (10 ** log10(5.0) > 5.0)
        r = min(max(10.0 ** draw(st.floats(lo, hi)), r_lo), r_hi)
        top = float(np.linalg.norm(G.astype(np.float64), 2) ** 2 / G.shape[0])
        return G, r * (top if top > 0 else 1.0)

    return strat()


# -- the protocol check -----------------------------------------------------------------

class OperatorCheckError(AssertionError):
    """Raised by :func:`check_operator`: an ``AssertionError`` whose message lists every
    failed check; ``report`` (a :class:`CheckReport`) holds every result.

    Examples
    --------
    >>> import numpy as np
    >>> from mfac_linalg.testing import OperatorCheckError, check_operator
    >>> class Half:
    ...     shape, dtype = (2, 2), np.dtype(np.float64)
    ...     def matvec(self, x):
    ...         return 0.5 * x
    >>> try:
    ...     check_operator(Half(), np.eye(2), skip=("pickle",))
    ... except OperatorCheckError as err:
    ...     print(err.report.failures[0])
    matvec: error 0.5 > bound 3.55e-15
    """

    def __init__(self, message, report):
        super().__init__(message)
        self.report = report


class CheckReport:
    """What :func:`check_operator` measured: ``ratios`` (per check, error / bound, or
    ``None`` for a structural check), ``failures`` (messages) and ``skipped`` (checks
    the operator has no method for); ``worst`` is the largest ratio.

    Examples
    --------
    >>> import numpy as np
    >>> from mfac_linalg.testing import check_operator
    >>> class Twice:
    ...     shape, dtype = (3, 3), np.dtype(np.float64)
    ...     def matvec(self, x):
    ...         return 2 * x
    >>> report = check_operator(Twice(), 2 * np.eye(3), skip=("pickle",))
    >>> report.failures, report.worst[1] < 1, "matmat" in report.skipped
    ([], True, True)
    """

    def __init__(self):
        self.ratios = {}
        self.failures = []
        self.skipped = []

    @property
    def worst(self):
        """(name, ratio) of the largest error / bound ratio."""
        rs = [(k, v) for k, v in self.ratios.items() if v is not None]
        return max(rs, key=lambda kv: kv[1]) if rs else (None, 0.0)

    def __repr__(self):
        name, r = self.worst
        return (f"<CheckReport {len(self.ratios)} checks, {len(self.failures)} failed, "
                f"{len(self.skipped)} skipped, worst {name}={r:.3g}>")


def _nth(v, j, kk):
    """Item [j][kk] of a property's value as :func:`check_operator` walks it (a
    non-sequence counts as a sequence of one)."""
    a = v[j] if isinstance(v, (list, tuple)) else v
    return a[kk] if isinstance(a, (list, tuple)) else a


def _is_linear_operator(op):
    """A SciPy (or, when loaded, CuPy) ``LinearOperator``."""
    import sys
    from scipy.sparse.linalg import LinearOperator
    types = [LinearOperator]
    cupyx_linalg = sys.modules.get("cupyx.scipy.sparse.linalg")
    if cupyx_linalg is not None:
        types.append(cupyx_linalg.LinearOperator)
    return isinstance(op, tuple(types))


def _xp_of(op):
    be = getattr(op, "backend", None)
    xp = getattr(be, "xp", None)
    return xp if xp is not None else np


def _col_err(got, ref):
    """max over columns of ||got - ref|| / ||ref|| (float64, host); inf for a result of
    the wrong size (its exact shape is a structural check of its own)."""
    got = _host64(got)
    if got.size != ref.size:
        return math.inf
    got = got.reshape(ref.shape)
    diff = np.linalg.norm((got - ref).reshape(ref.shape[0], -1), axis=0)
    den = np.linalg.norm(ref.reshape(ref.shape[0], -1), axis=0)
    den = np.where(den > 0, den, 1.0)
    return float((diff / den).max()) if diff.size else 0.0


class _Tracer:
    """Counts ``_matmat`` calls (and the columns in each) and ``_todense`` calls on one
    library operator instance (instance attributes shadow the class hooks)."""

    def __init__(self, op):
        self.op = op
        self.calls = []
        self.dense = 0
        from ._operator import Operator
        self.active = isinstance(op, Operator)

    def __enter__(self):
        if self.active:
            op, orig = self.op, type(self.op)._matmat.__get__(self.op)
            op._matmat = lambda X: self.calls.append(tuple(X.shape)) or orig(X)
            if hasattr(type(op), "_todense"):
                origd = type(op)._todense.__get__(op)
                op._todense = lambda: setattr(self, "dense", self.dense + 1) or origd()
        return self

    def __exit__(self, *exc):
        if self.active:
            self.op.__dict__.pop("_matmat", None)
            self.op.__dict__.pop("_todense", None)
        return False


#: Check names of :func:`check_operator` besides the methods of DEFAULT_TOLERANCES.
_CHECK_NAMES = {"pickle", "readonly", "fisher", "cg", "structure", "algebra"}


def check_operator(op, oracle, *, rng=None, tolerances=None, eps=None, k=3,
                   methods=None, skip=(), strict=True, _prefix=""):
    r"""Check every method of the operator protocol against an exact oracle.

    Each numerical check compares with the oracle and passes when its error is at
    most the method's bound ``c * kappa * (eps + model_error)`` (κ and the model
    error δ from the oracle, e.g. κ_W = λ_max(F)/λ for the Woodbury form), with
    ``c`` from ``tolerances`` (default :data:`DEFAULT_TOLERANCES`) and ``eps`` the
    unit roundoff of ``op.dtype``; no allowance is made for the oracle, which is exact.
    Errors are measured as:

    * products (``matvec`` on (d,) and (d, 1), ``matmat``, ``rmatvec``, ``rmatmat``,
      ``@`` both ways, ``.T``/``.H``/``adjoint()``, ``to_scipy()``): per column,
      ‖y − y*‖ / ‖y*‖;
    * ``todense``: ‖T − A‖_F / ‖A‖_F;  ``diagonal``, ``entry``/``op[i, j]``:
      max |e − e*| / ‖A‖₂;  ``quad``: |q − q*| / (‖A‖₂ ‖x‖²);
    * ``logdet``: |ℓ − ℓ*| / ``oracle.logdet_scale`` (for the Fisher oracles
      max(m, d) + Σ|log λ_i(F)|; the first-order error of a log-determinant).

    Structural checks: ``shape``; the exact shape of every product (``matvec``,
    ``rmatvec``, ``op @ x`` and ``x @ op`` of a (d,) x are (d,), not a (d, 1) column);
    for operators of the library's protocol
    (subclasses of :class:`mfac_linalg.Operator`) results of the input's type, dtype
    and shape, ``matmat`` with k columns as one call of the ``_matmat`` hook (no
    column loop, no dense fallback) and ``entry``/``diagonal`` that never build the
    dense matrix; the lazy algebra (``2 * op``, ``op * 2``, ``op / 2``, ``-op``,
    ``op + op``, ``op * x`` as a product, ``np.asarray(op)`` a TypeError);
    ``op[i, j] == op.entry(i, j)``; ``to_scipy()`` passes matmat through in one call
    and solves with ``scipy.sparse.linalg.cg`` (positive definite oracles); the
    caller's arrays are never modified; arrays handed out (by ``todense()``,
    ``diagonal()`` and array-valued properties) are read-only or
    copies: writing into them changes neither the products nor what the same method
    or property hands out next (checked on a deep copy); ``pickle`` and ``copy.deepcopy`` give
    operators with bit-identical products; ``op.fisher()`` passes the same check
    against ``oracle.fisher``.

    Cost: O(d) products for ``todense`` plus a few more; the oracle's mpmath
    products dominate (keep d in the tens).

    Parameters
    ----------
    op : operator
        Anything with ``shape`` and ``matvec``; other methods are checked where
        they exist and listed in ``report.skipped`` where they do not (no such
        attribute, or the ``NotImplementedError`` of a base class's default it
        inherits: :class:`mfac_linalg.Operator`'s, SciPy's ``LinearOperator``'s).  ``matvec`` is
        never skipped, and any exception from a method the operator has (an
        ``AttributeError`` from inside it, a ``NotImplementedError`` for some
        inputs) is a failure of that check, with the exception's text.
    oracle : Oracle or array_like
        The exact matrix (an array is taken as exact, :meth:`Oracle.from_dense`).
    rng : numpy.random.Generator, optional
        For the test vectors (default: seed 0).
    tolerances : dict, optional
        Overrides of the per-method constants c.
    eps : float, optional
        Unit roundoff (default: ``np.finfo(op.dtype).eps``, float64 if no dtype).
    k : int
        Columns of the block checks.
    methods : collection of str, optional
        Check only these (names as in :data:`DEFAULT_TOLERANCES`, plus ``"pickle"``,
        ``"readonly"``, ``"fisher"``, ``"cg"``, ``"structure"``, ``"algebra"``).
    skip : collection of str
        Checks to leave out (same names).
    strict : bool
        Refuse (``ValueError``) a case where some bound is >= 0.5: such a check
        could not fail.

    Returns
    -------
    CheckReport
        ``ratios`` (error / bound per check), ``skipped``.

    Raises
    ------
    OperatorCheckError
        (an ``AssertionError``) listing every failed check, with the report.
    TypeError
        ``op`` without ``shape`` and ``matvec``, or an argument of a wrong type (``rng``
        not a Generator, ``k`` not an integer, ``methods``/``skip`` a string, ...).
    ValueError
        ``strict`` and a bound >= 0.5; ``k`` < 1, ``eps`` or a tolerance not > 0, an
        unknown name in ``methods``, ``skip`` or ``tolerances``.

    Examples
    --------
    A user-written operator (2 I + u uᵀ, a plain class), checked against its dense
    matrix; what it does not implement is skipped:

    >>> import numpy as np
    >>> from mfac_linalg.testing import check_operator
    >>> class RankOne:
    ...     def __init__(self, u):
    ...         self.u, self.shape, self.dtype = u, (u.size, u.size), u.dtype
    ...     def matvec(self, x):                     # (d,) or (d, 1)
    ...         return self.matmat(x.reshape(-1, 1)).reshape(x.shape)
    ...     def matmat(self, X):
    ...         return 2 * X + np.outer(self.u, self.u @ X)
    >>> u = np.arange(4.0)
    >>> report = check_operator(RankOne(u), 2 * np.eye(4) + np.outer(u, u),
    ...                         skip=("pickle",))    # doctest classes cannot be pickled
    >>> report.failures, report.ratios["matmat"] < 1
    ([], True)
    >>> report.skipped[:4]
    ['rmatvec', 'rmatmat', 'matmul', 'adjoint']

    A wrong operator fails, and the error names the method:

    >>> class Wrong(RankOne):
    ...     def matmat(self, X):
    ...         return 2 * X
    >>> check_operator(Wrong(u), 2 * np.eye(4) + np.outer(u, u), skip=("pickle",))
    Traceback (most recent call last):
    ...
    mfac_linalg.testing.OperatorCheckError: Wrong failed 3 check(s):
      matvec: error 0.862 > bound 2.84e-14
      matvec.(d,1): error 0.862 > bound 2.84e-14
      matmat: error 0.871 > bound 2.84e-14
    """
    from collections.abc import Mapping
    from . import _validate as V
    if not (hasattr(op, "shape") and callable(getattr(op, "matvec", None))):
        raise TypeError(f"op must be an operator with shape and matvec; got "
                        f"{type(op).__name__}")
    if isinstance(oracle, Oracle):
        orc = oracle
    else:
        orc = Oracle.from_dense(oracle)
    if rng is None:
        rng = np.random.default_rng(0)
    elif not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator or None; got "
                        f"{type(rng).__name__}")
    k = V.integer(k, "k", minimum=1)
    strict = V.boolean(strict, "strict")
    tol = dict(DEFAULT_TOLERANCES)
    if tolerances is not None and not isinstance(tolerances, Mapping):
        raise TypeError(f"tolerances must be a dict of method -> constant; got "
                        f"{type(tolerances).__name__}")
    if tolerances:
        unknown = set(tolerances) - set(DEFAULT_TOLERANCES)
        if unknown:
            raise ValueError(f"tolerances has unknown methods {sorted(map(str, unknown))}; "
                             f"known: {sorted(DEFAULT_TOLERANCES)}")
        tol.update({name: V.real(c, f"tolerances[{name!r}]", low=0.0, low_open=True)
                    for name, c in tolerances.items()})
    known = set(DEFAULT_TOLERANCES) | _CHECK_NAMES
    for arg, value in (("methods", methods), ("skip", skip)):
        if value is None and arg == "methods":
            continue
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise TypeError(f"{arg} must be a collection of check names (e.g. "
                            f"('matvec',)); got {type(value).__name__} {value!r}")
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"{arg} has unknown check names {sorted(map(str, unknown))}; "
                             f"known: {sorted(known)}")
    if methods is not None:
        methods = set(methods)
    skip = set(skip)
    op_dtype = np.dtype(getattr(op, "dtype", np.float64))
    if eps is None:
        eps = float(np.finfo(op_dtype if op_dtype.kind == "f" else np.float64).eps)
    else:
        eps = V.real(eps, "eps", low=0.0, low_open=True)
    d = orc.d
    rep = CheckReport()
    base = orc.kappa * (eps + orc.model_error)
    from ._operator import Operator
    protocol = isinstance(op, Operator)

    def want(name):
        return (methods is None or name in methods) and name not in skip

    def bound(method):
        b = tol[method] * base
        if strict and b >= 0.5:
            raise ValueError(f"{_prefix}{method}: the bound {b:.3g} (c={tol[method]}, "
                             f"eps={eps:.3g}, kappa={orc.kappa:.3g}) is >= 0.5, so the check "
                             "could not fail; use a better-conditioned case or a smaller eps")
        return b

    def record(name, method, err):
        b = bound(method)
        ratio = err / b if b > 0 else (0.0 if err == 0 else math.inf)
        rep.ratios[_prefix + name] = ratio
        if not err <= b:          # NaN fails too
            rep.failures.append(f"{_prefix}{name}: error {err:.3g} > bound {b:.3g}")

    def structural(name, cond, msg=""):
        rep.ratios.setdefault(_prefix + name, None)
        if not cond:
            rep.failures.append(f"{_prefix}{name}: {msg}")

    def shaped(name, y, expected, what):
        """The exact shape of a result (a (d, 1) column for a (d,) input is wrong)."""
        got = tuple(getattr(y, "shape", ()))
        structural(f"{name}.shape", got == expected,
                   f"{what} gave shape {got}, expected {expected}")

    def guarded(name, fn, needs=()):
        # skipped only when the operator lacks a method the check needs (no attribute, or
        # None), or when a base class's default says it is not implemented (a
        # NotImplementedError raised by the library's Operator or SciPy's LinearOperator,
        # _unimplemented); matvec is never skipped.  Any other exception, including an
        # AttributeError or a NotImplementedError from inside a method the operator has,
        # is a failure of the check.
        try:
            if any(_absent(op, m) for m in needs):
                rep.skipped.append(_prefix + name)
                return
            fn()
        except OperatorCheckError:              # from a nested fisher() check
            raise
        except ValueError as exc:
            if str(exc).startswith(_prefix) and "could not fail" in str(exc):
                raise
            rep.failures.append(f"{_prefix}{name}: raised ValueError: {exc}")
        except Exception as exc:
            if name not in _NEVER_SKIPPED and _unimplemented(exc):
                rep.skipped.append(_prefix + name)
            else:
                rep.failures.append(f"{_prefix}{name}: raised {type(exc).__name__}: {exc}")

    xp = _xp_of(op)
    dt = op_dtype if op_dtype.kind == "f" else np.dtype(np.float64)
    xh = rng.standard_normal(d)
    Xh = rng.standard_normal((d, k))
    if orc.symmetric and k >= 2 and d >= 2:
        # the last column probes the hardest direction: the eigenvector of A's smallest
        # |eigenvalue| (for an inverse Fisher: F's top eigenvector, where the Woodbury
        # form's subtraction cancels), so the products' errors reach their bound
        w, U = np.linalg.eigh(orc.dense())
        Xh[:, -1] = U[:, np.argmin(np.abs(w))] * math.sqrt(d)
    # the vectors handed to the operator, in its namespace and dtype; exact float64 copies
    x = xp.asarray(xh.astype(dt))
    X = xp.asarray(Xh.astype(dt))
    xh, Xh = _host64(x), _host64(X)
    inputs = [(x, xh.copy()), (X, Xh.copy())]
    ref_x, ref_X = orc.matmat(xh), orc.matmat(Xh)
    A_T = (lambda Z: orc.matmat(Z)) if orc.symmetric else (lambda Z: orc.dense().T @ Z)
    ref_tx, ref_tX = A_T(xh), A_T(Xh)

    # -- structure and products ----------------------------------------------------
    def c_structure():
        structural("shape", tuple(op.shape) == (d, d), f"shape {tuple(op.shape)} != {(d, d)}")
        r = repr(op)
        structural("repr", type(op).__name__ in r or "LinearOperator" in r,
                   f"repr {r!r} does not name the class")

    def c_matvec():
        y = op.matvec(x)
        structural("matvec.type", type(y) is type(x) and tuple(y.shape) == (d,)
                   and (y.dtype == x.dtype or not protocol),
                   f"got {type(y).__name__} {tuple(y.shape)} {y.dtype}, expected "
                   f"{type(x).__name__} {(d,)} {x.dtype}")
        record("matvec", "matvec", _col_err(y, ref_x))
        # a product hands out a result of its own: the next product (of another vector)
        # must not overwrite it (an output buffer reused from call to call)
        kept = np.array(_host64(y), copy=True)
        op.matvec(-x)
        structural("matvec.fresh", np.array_equal(_host64(y), kept, equal_nan=True),
                   "the result of matvec(x) changed when matvec was called again (a "
                   "buffer reused from call to call; hand out a new array per product)")
        y1 = op.matvec(x[:, None])
        structural("matvec.(d,1)", tuple(y1.shape) == (d, 1), f"shape {tuple(y1.shape)}")
        record("matvec.(d,1)", "matvec", _col_err(y1, ref_x[:, None]))
        if not protocol:
            return
        other = np.float64 if dt == np.float32 else np.float32
        xo = xp.asarray(xh.astype(other))
        yo = op.matvec(xo)
        structural("matvec.dtype_kept", yo.dtype == xo.dtype,
                   f"{np.dtype(other).name} input gave {yo.dtype}")

    def c_matmat():
        with _Tracer(op) as tr:
            Y = op.matmat(X)
        structural("matmat.type", type(Y) is type(X) and tuple(Y.shape) == (d, k)
                   and (Y.dtype == X.dtype or not protocol),
                   f"got {type(Y).__name__} {tuple(Y.shape)} {Y.dtype}")
        if tr.active:
            structural("matmat.one_pass", tr.calls == [(d, k)] and tr.dense == 0,
                       f"_matmat calls {tr.calls}, todense calls {tr.dense} (expected one "
                       f"call with all {k} columns)")
        record("matmat", "matmat", _col_err(Y, ref_X))

    def c_rmatvec():
        y = op.rmatvec(x)
        shaped("rmatvec", y, (d,), "rmatvec(x) of a (d,) x")
        record("rmatvec", "rmatvec", _col_err(y, ref_tx))

    def scipy_transpose():
        # a SciPy LinearOperator without rmatvec has no transpose products either: its
        # rmatmat and adjoint defer to rmatvec, which raises SciPy's NotImplementedError
        # (then the check is skipped) where other ways of reaching it raise TypeError
        if not protocol and _is_linear_operator(op):
            op.rmatvec(x)

    def c_rmatmat():
        scipy_transpose()
        Y = op.rmatmat(X)
        shaped("rmatmat", Y, (d, k), "rmatmat(X) of a (d, k) X")
        record("rmatmat", "rmatmat", _col_err(Y, ref_tX))

    def c_matmul():
        if not (hasattr(type(op), "__matmul__") and hasattr(type(op), "__rmatmul__")):
            rep.skipped.append(_prefix + "matmul")
            return
        for label, product, shape, ref in (("op@x", lambda: op @ x, (d,), ref_x),
                                           ("op@X", lambda: op @ X, (d, k), ref_X),
                                           ("x@op", lambda: x @ op, (d,), ref_tx),
                                           ("X.T@op", lambda: (X.T @ op).T, (d, k), ref_tX)):
            y = product()
            shaped(f"matmul.{label}", y, shape, label if label != "X.T@op" else "(X.T@op).T")
            record(f"matmul.{label}", "matmul", _col_err(y, ref))

    def c_adjoint():
        scipy_transpose()
        ways = [(label, get) for label, attr, get in (
            ("T", "T", lambda: op.T), ("H", "H", lambda: op.H),
            ("adjoint()", "adjoint", lambda: op.adjoint())) if not _absent(op, attr)]
        if not ways:
            rep.skipped.append(_prefix + "adjoint")
        for label in ("T", "H", "adjoint()"):
            if ways and label not in dict(ways):
                rep.skipped.append(f"{_prefix}adjoint.{label}")
        for label, get in ways:
            Y = get().matmat(X)
            shaped(f"adjoint.{label}", Y, (d, k), f"{label}.matmat(X)")
            record(f"adjoint.{label}", "adjoint", _col_err(Y, ref_tX))

    norm2 = float(np.linalg.norm(orc.dense(), 2)) or 1.0

    def c_diagonal():
        with _Tracer(op) as tr:
            g = op.diagonal()
        structural("diagonal.type", tuple(g.shape) == (d,), f"shape {tuple(g.shape)}")
        if tr.active and type(op)._diagonal is Operator._diagonal:
            rep.skipped.append(_prefix + "diagonal.no_dense (the generic column fallback)")
        elif tr.active:
            structural("diagonal.no_dense", tr.dense == 0 and (d, d) not in tr.calls,
                       f"diagonal built the dense matrix ({tr.calls}, todense {tr.dense})")
        ref, gh = np.diag(orc.dense()), _host64(g)
        record("diagonal", "diagonal", float(np.abs(gh - ref).max()) / norm2
               if gh.shape == ref.shape else math.inf)

    def c_entry():
        pairs = sorted({(0, 0), (d - 1, 0), (0, d - 1), (d // 2, d // 3), (d - 1, d - 1)})
        D = orc.dense()
        worst = 0.0
        subscriptable = hasattr(type(op), "__getitem__")
        if not subscriptable:
            rep.skipped.append(_prefix + "getitem")
        with _Tracer(op) as tr:
            for i, j in pairs:
                e = op.entry(i, j)
                structural("entry.type", isinstance(e, float), f"entry gave {type(e).__name__}")
                worst = max(worst, abs(e - D[i, j]) / norm2)
                en = op.entry(i - d, j - d)
                structural("entry.negative", en == e, f"entry({i - d}, {j - d}) = {en} != {e}")
                if subscriptable:
                    structural("getitem", op[i, j] == e, f"op[{i}, {j}] != entry({i}, {j})")
        if tr.active:
            structural("entry.no_dense", tr.dense == 0 and all(c[1] < d or d == 1
                                                                for c in tr.calls),
                       f"entry built the dense matrix ({tr.calls}, todense {tr.dense})")
        record("entry", "entry", worst)

    def c_todense():
        T = op.todense()
        structural("todense.type", tuple(T.shape) == (d, d), f"shape {tuple(T.shape)}")
        D, Th = orc.dense(), _host64(T)
        record("todense", "todense", float(np.linalg.norm(Th - D) / (np.linalg.norm(D) or 1.0))
               if Th.shape == D.shape else math.inf)

    def c_quad():
        q = op.quad(x)
        structural("quad.type", isinstance(q, float), f"quad gave {type(q).__name__}")
        record("quad", "quad", abs(q - float(xh @ ref_x)) / (norm2 * float(xh @ xh) or 1.0))
        qs = _host64(op.quad(X))
        ref = np.einsum("ij,ij->j", Xh, ref_X)
        structural("quad.block", qs.shape == (k,), f"shape {qs.shape}")
        record("quad.block", "quad",
               float((np.abs(qs - ref) / (norm2 * (Xh * Xh).sum(axis=0))).max()))

    def c_logdet():
        if orc.logdet is None:
            rep.skipped.append(_prefix + "logdet (no oracle value)")
            return
        ld = op.logdet()
        record("logdet", "logdet", abs(float(ld) - orc.logdet) / orc.logdet_scale)

    def c_to_scipy():
        import scipy.sparse.linalg as spla
        if xp is not np:
            lo = op.to_cupyx()
            record("to_cupyx", "to_scipy", _col_err(lo.matvec(x), ref_x))
            return
        lo = op.to_scipy()
        structural("to_scipy.type", isinstance(lo, spla.LinearOperator),
                   f"to_scipy gave {type(lo).__name__}")
        record("to_scipy.matvec", "to_scipy", _col_err(lo.matvec(x), ref_x))
        with _Tracer(op) as tr:
            Y = lo.matmat(X)
        if tr.active:
            structural("to_scipy.one_pass", tr.calls == [(d, k)],
                       f"_matmat calls {tr.calls} (expected one with {k} columns)")
        record("to_scipy.matmat", "to_scipy", _col_err(Y, ref_X))
        record("to_scipy.H", "to_scipy", _col_err(lo.H.matvec(x), ref_tx))
        if want("cg") and not (orc.positive_definite and orc.symmetric and orc.kappa <= 1e10):
            rep.skipped.append(_prefix + "cg (needs a symmetric positive definite oracle "
                               "with kappa <= 1e10)")
        elif want("cg"):
            b = xh
            try:
                sol, info = spla.cg(lo, b, rtol=1e-10, maxiter=200 * d)
            except TypeError:     # SciPy < 1.12
                sol, info = spla.cg(lo, b, tol=1e-10, maxiter=200 * d)
            res = float(np.linalg.norm(orc.matmat(_host64(sol)) - b) / np.linalg.norm(b))
            structural("cg.converged", info == 0, f"cg info {info}")
            # cg stops on its own residual (1e-10); the operator's error adds at most
            # bound * kappa to the residual measured with the exact matrix
            record("cg.residual", "to_scipy", max(0.0, res - 1e-10) / max(orc.kappa, 1.0))

    def c_readonly_and_copies():
        y0 = _host64(op.matvec(x))
        if not (want("pickle") or want("readonly")):
            return
        try:
            clone = copy.deepcopy(op)
        except Exception as exc:
            rep.failures.append(f"{_prefix}deepcopy: raised {type(exc).__name__}: {exc}")
            return
        yc = _host64(clone.matvec(x))
        structural("deepcopy", np.array_equal(yc, y0),
                   f"deepcopy's products differ (by {_col_err(yc, y0):.2g} relative)")
        if want("pickle"):
            try:
                back = pickle.loads(pickle.dumps(op))
                yb = _host64(back.matvec(x))
                structural("pickle", np.array_equal(yb, y0), "pickle round trip's products "
                           f"differ (by {_col_err(yb, y0):.2g} relative)")
            except Exception as exc:
                rep.failures.append(f"{_prefix}pickle: raised {type(exc).__name__}: {exc}")
        if not want("readonly"):
            return
        # every array handed out: (label, a getter that hands it out again, the array, a
        # host copy of its values); a method that fails or is missing is left to its own
        # check
        from . import _backend as B
        handed = []

        def hand_out(label, getter):
            try:
                arr = getter()
                before = np.array(B.to_host(arr), copy=True)
            except Exception:
                return
            handed.append((label, getter, arr, before))

        for name in ("todense", "diagonal"):
            hand_out(name + "()", lambda name=name: getattr(clone, name)())
        for name in dir(type(clone)):
            if name.startswith("_") or not isinstance(getattr(type(clone), name, None), property):
                continue
            try:
                v = getattr(clone, name)
            except Exception:
                continue
            for j, a in enumerate(v if isinstance(v, (list, tuple)) else [v]):
                for kk, b in enumerate(a if isinstance(a, (list, tuple)) else [a]):
                    if hasattr(b, "shape") and hasattr(b, "dtype") and getattr(b, "size", 0):
                        hand_out(f"{name}[{j}][{kk}]", lambda name=name, j=j, kk=kk:
                                 _nth(getattr(clone, name), j, kk))
        written = []        # only arrays that took the write can have changed anything
        for item in handed:
            arr = item[2]
            if isinstance(arr, np.generic):
                continue    # a NumPy scalar: immutable
            try:
                if getattr(getattr(arr, "flags", None), "writeable", True):
                    arr[...] = arr * 2 + 1 + (arr == -1)     # changes every finite value
                    written.append(item)
            except (ValueError, TypeError):
                pass        # read-only: fine
        # what the same method or property hands out next, read before any product runs
        # (a cache handed out writable changes it, even where the products do not read
        # the cache; a property that legitimately changes with the products, such as a
        # call counter, is not confused with it)
        changed = []
        for label, getter, _, before in written:
            try:
                again = np.asarray(B.to_host(getter()))
            except Exception as exc:
                changed.append(f"{label} (then raised {type(exc).__name__}: {exc})")
                continue
            if not (again.shape == before.shape
                    and np.array_equal(again, before, equal_nan=before.dtype.kind in "fc")):
                changed.append(label)
        y1 = _host64(clone.matvec(x))
        structural("readonly", np.array_equal(y1, yc),
                   "writing to arrays handed out changed the products: "
                   + ", ".join(label for label, *_ in written))
        structural("readonly.handed_out", not changed,
                   "writing to arrays handed out changed what is handed out next: "
                   + ", ".join(changed) + " (hand out read-only arrays or copies)")

    def c_algebra():
        if not protocol:
            rep.skipped.append(_prefix + "algebra")
            return
        # exact scalings (powers of two) and a sum of the operator with itself keep the
        # products' bound; op * x is a product (the SciPy convention)
        for label, new, factor in (("2*op", lambda: 2 * op, 2.0), ("op*2", lambda: op * 2, 2.0),
                                   ("op/2", lambda: op / 2, 0.5), ("-op", lambda: -op, -1.0),
                                   ("op+op", lambda: op + op, 2.0)):
            record(f"algebra.{label}", "matmat", _col_err(new().matmat(X), factor * ref_X))
        y = op * x
        shaped("algebra.op*x", y, (d,), "op * x")
        record("algebra.op*x", "matvec", _col_err(y, ref_x))
        try:
            np.asarray(op)
        except TypeError:
            structural("algebra.asarray", True)
        else:
            structural("algebra.asarray", False, "np.asarray(op) did not raise TypeError")

    def c_fisher():
        if orc.fisher is None:
            rep.skipped.append(_prefix + "fisher")
            return
        f = op.fisher()
        sub = check_operator(f, orc.fisher, rng=rng, tolerances=tolerances, eps=eps, k=k,
                             methods=methods, strict=strict, _prefix=_prefix + "fisher().")
        rep.ratios.update(sub.ratios)
        rep.skipped.extend(sub.skipped)
        if hasattr(f, "inverse"):
            back = f.inverse()
            structural("fisher().inverse", back is op or np.array_equal(
                _host64(back.matmat(X)), _host64(op.matmat(X))),
                "fisher().inverse() is neither op nor an operator with op's products")

    # (check name, check, the methods it needs: the check is skipped where one is absent)
    checks = [("structure", c_structure, ()), ("matvec", c_matvec, ()),
              ("matmat", c_matmat, ("matmat",)), ("rmatvec", c_rmatvec, ("rmatvec",)),
              ("rmatmat", c_rmatmat, ("rmatmat",)), ("matmul", c_matmul, ()),
              ("adjoint", c_adjoint, ()), ("diagonal", c_diagonal, ("diagonal",)),
              ("entry", c_entry, ("entry",)), ("todense", c_todense, ("todense",)),
              ("quad", c_quad, ("quad",)), ("logdet", c_logdet, ("logdet",)),
              ("to_scipy", c_to_scipy, ("to_cupyx" if xp is not np else "to_scipy",)),
              ("algebra", c_algebra, ()), ("fisher", c_fisher, ("fisher",)),
              ("pickle", c_readonly_and_copies, ())]
    for name, fn, needs in checks:
        if name == "pickle" and not want("pickle") and want("readonly"):
            name = "readonly"
        elif not want(name):
            continue
        try:
            guarded(name, fn, needs)
        except OperatorCheckError as exc:       # from a nested fisher() check
            rep.ratios.update(exc.report.ratios)
            rep.failures.extend(exc.report.failures)
            rep.skipped.extend(exc.report.skipped)
    for arr, ref in inputs:
        structural("inputs_unchanged", np.array_equal(_host64(arr), ref),
                   "the operator modified the caller's array")
    if rep.failures:
        raise OperatorCheckError(
            f"{type(op).__name__} failed {len(rep.failures)} check(s):\n  "
            + "\n  ".join(rep.failures), rep)
    return rep


#: Checks that an operator cannot skip: every operator has ``shape`` and ``matvec``.
_NEVER_SKIPPED = {"structure", "matvec"}

#: Modules of the base classes whose defaults raise NotImplementedError for a method a
#: subclass does not implement (the library's Operator and sharded operators, SciPy's and
#: CuPy's LinearOperator).
_DEFAULT_MODULES = {"mfac_linalg._operator", "mfac_linalg.distributed._base",
                    "scipy.sparse.linalg._interface", "cupyx.scipy.sparse.linalg._interface"}

_NOTHING = object()


def _absent(op, name):
    """True when ``op`` has no attribute ``name`` (or it is None): a check that needs it
    is skipped.  An AttributeError raised *inside* an existing property propagates (a
    failure of the check, not a missing method)."""
    try:
        value = getattr(op, name)
    except AttributeError:
        if inspect.getattr_static(op, name, _NOTHING) is _NOTHING:
            return True
        raise
    return value is None


def _unimplemented(exc):
    """True when ``exc`` is a NotImplementedError raised by a base class's default (the
    library's ``Operator``, SciPy's ``LinearOperator``) that the object's class inherits:
    the operator does not implement that method.  One raised by the operator's own code
    (an implemented method that refuses some inputs), or by a default an override
    calls through ``super()``, is not: it is a failure."""
    if not isinstance(exc, NotImplementedError):
        return False
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    frame = tb.tb_frame
    if frame.f_globals.get("__name__") not in _DEFAULT_MODULES:
        return False
    owner = frame.f_locals.get("self")
    if owner is None:
        return False
    resolved = inspect.getattr_static(type(owner), frame.f_code.co_name, None)
    resolved = getattr(resolved, "__func__", resolved)
    return getattr(resolved, "__code__", None) is frame.f_code
