"""The operator protocol shared by every operator of the library, written once,
and its lazy algebra.

Subclasses implement only private hooks on validated inputs (SciPy's
``_interface.py`` pattern):

``_matmat(X)``
    ``X`` is a 2-D (d, k) array of the operator's backend in its compute dtype;
    return ``A @ X`` in one pass over the operator's data (never a loop over
    the k columns).
``_rmatmat(X)``
    ``A^T @ X``; needed only by operators that are not symmetric.
``_diagonal()``, ``_entry(i, j)``, ``_quad(X)``
    Optional fast paths; the defaults go through ``_matmat``.
``_repr_fields()``
    Extra ``key=value`` fields for ``__repr__``.

Symmetry is a per-operator property (``symmetric``): every operator the library
builds is symmetric (the class default), and for those ``adjoint()``, ``.T`` and
``.H`` return the operator itself.  The algebra keeps it where it holds: sums of
symmetric operators and real multiples of one are symmetric, products generally
are not (``A @ A`` of a symmetric A is).

Every operator is a :class:`scipy.sparse.linalg.LinearOperator` (a subclass that
does not use its constructor): ``aslinearoperator(op)`` returns ``op`` itself, so
SciPy's solvers and ``aslinearoperator(op).matmat(X)`` keep the one-pass matmat.

Arguments of the products and ``quad`` go through the dtype policy of
:mod:`mfac_linalg._backend`; an ndarray subclass is used as a plain ndarray view
(its own arithmetic never runs), and results are plain arrays in the machine's byte
order, except that a 2-D result for a ``numpy.matrix`` argument is a
``numpy.matrix`` (SciPy's ``LinearOperator`` convention).
"""
from __future__ import annotations

import contextlib
import math
import numbers

import numpy as np
from scipy.sparse.linalg import LinearOperator as _SciPyLinearOperator

from . import _backend as B
from . import _validate as _v

__all__ = ["Operator", "OutOfRangeError", "check_damping", "DENSE_LIMIT", "SumOperator",
           "ScaledOperator", "ProductOperator"]


class NonFiniteInput(Exception):
    """Raised by a ``_matmat`` that checks its input for NaN/inf itself (see
    ``Operator._checks_own_finite``); the public method turns it into a ValueError
    naming the argument."""


#: ``todense`` refuses operators with more than this many entries (64 Mi entries,
#: 512 MiB in float64) unless ``max_elements`` is raised explicitly.
DENSE_LIMIT = 1 << 26

#: ``op ** p`` keeps p references (a product applies op p times): p up to 2^20.
_MAX_POWER = 1 << 20


class _DivisionByZero(ZeroDivisionError, ValueError):
    """``op / 0`` or the inverse of ``0 * op``: a ``ZeroDivisionError`` (as for Python
    numbers) that is also the ``ValueError`` of a bad argument value."""


def _reciprocal(a, name):
    """1 / a for a nonzero finite float, refusing a value whose reciprocal overflows."""
    if a == 0:
        raise _DivisionByZero(f"{name} must be nonzero; got {a!r}")
    r = 1.0 / a
    if math.isinf(r):
        raise ValueError(f"{name} must have a finite reciprocal (|{name}| >= "
                         f"{1 / np.finfo(np.float64).max:.3g}); got {a!r}")
    return r


class OutOfRangeError(IndexError, ValueError):
    """An index outside ``[-d, d)``: both an ``IndexError`` and a ``ValueError``.

    Examples
    --------
    >>> import numpy as np, mfac_linalg as ml
    >>> op = ml.StaticInverseFisher(np.ones((1, 3)), 1.0)
    >>> try:
    ...     op[3, 0]
    ... except ml.OutOfRangeError as exc:
    ...     print(exc)
    i must be in [-3, 3); got 3
    """


def check_damping(damping, name="damping", *, dtype=np.float64):
    """Validate a damping (kept for the modules that call it): see
    :func:`mfac_linalg._validate.damping`.  Returns a float."""
    return _v.damping(damping, name, dtype=dtype)


def _index(i, name, d):
    i = _v.integer(i, name)
    if not -d <= i < d:
        raise OutOfRangeError(f"{name} must be in [-{d}, {d}); got {i}")
    return i + d if i < 0 else i


def _is_scalar(x):
    return isinstance(x, (numbers.Number, np.generic)) or (
        getattr(x, "ndim", None) == 0 and hasattr(x, "dtype"))


def _foreign_linop(x):
    """A SciPy LinearOperator that is not one of ours (composed through SciPy)."""
    return isinstance(x, _SciPyLinearOperator) and not isinstance(x, Operator)


class _Algebra:
    """The lazy algebra's operators (``+ - * / @ **``, unary ``-``) of :class:`Operator`:
    they build :class:`SumOperator`, :class:`ScaledOperator` and :class:`ProductOperator`
    nodes; nothing is computed until a product is asked for."""

    def __matmul__(self, x):
        if _is_scalar(x):
            raise TypeError("op @ scalar is not defined (as for NumPy arrays); use op * a")
        return self.dot(x)

    def __rmatmul__(self, x):
        # x @ A = (A^T x^T)^T
        if _is_scalar(x):
            raise TypeError("scalar @ op is not defined (as for NumPy arrays); use a * op")
        if _foreign_linop(x):
            return NotImplemented
        arr, _ = B.asarray(_v.plain_array(x), "x", backend=self._backend)
        if arr.ndim == 1:
            return self._out(self._protocol_product(arr, "x", adjoint=True), x)
        if arr.ndim == 2:
            if arr.shape[1] != self._d:
                raise ValueError(f"x must have shape ({self._d},) or (k, {self._d}) for "
                                 f"x @ op; got shape {tuple(arr.shape)}")
            return self._out(self._protocol_product(arr.T, "x", adjoint=True).T, x)
        raise ValueError(f"x must be 1-D or 2-D; got shape {tuple(arr.shape)}")

    def __mul__(self, x):
        """``op * a`` (a scalar): the scaled operator; ``op * x`` (an array): ``op @ x``;
        ``op * op2``: the product (SciPy's convention)."""
        if _is_scalar(x):
            return ScaledOperator(x, self)
        return self.dot(x)

    def __rmul__(self, x):
        if _is_scalar(x):
            return ScaledOperator(x, self)
        return self.__rmatmul__(x)

    def __truediv__(self, a):
        if not _is_scalar(a):
            return NotImplemented
        a = _v.real(a, "divisor")
        return ScaledOperator(_reciprocal(a, "divisor"), self)

    def __neg__(self):
        return ScaledOperator(-1.0, self)

    def __pos__(self):
        return self

    def __add__(self, other):
        if isinstance(other, Operator):
            return SumOperator([self, other])
        if _foreign_linop(other):
            return self.to_scipy() + other
        return NotImplemented

    def __radd__(self, other):
        return NotImplemented if not isinstance(other, Operator) else other.__add__(self)

    def __sub__(self, other):
        if isinstance(other, Operator):
            return SumOperator([self, ScaledOperator(-1.0, other)])
        if _foreign_linop(other):
            return self.to_scipy() - other
        return NotImplemented

    def __pow__(self, p):
        """``op ** p`` (an integer 1 <= p <= 2^20): the lazy product of p factors op;
        each product applies op p times, O(p) times op's cost."""
        p = _v.integer(p, "exponent", minimum=1, maximum=_MAX_POWER)
        return self if p == 1 else ProductOperator([self] * p)

    def __call__(self, x):
        """``op(x)`` is ``op.dot(x)`` (as for SciPy's operators)."""
        return self.dot(x)


class Operator(_Algebra, _SciPyLinearOperator):
    """Base class of every operator: a d x d linear map (see the module docstring).

    Users do not build an ``Operator`` directly: the library's operators
    (:class:`StaticInverseFisher`, :class:`FisherOperator`, ...) and their lazy sums,
    scalings and products (``A + B``, ``2 * A``, ``A @ B``) are its subclasses.
    Products cost what the subclass's ``_matmat`` costs; the algebra adds O(d k) per
    term for a d x k block.

    Notes
    -----
    A subclass calls ``self._init_operator(d, dtype, backend, check_finite=True)`` in
    its constructor, which sets the dimension ``d`` (``shape`` is ``(d, d)``), the
    compute ``dtype`` of results (float32 or float64), the ``backend`` where the
    operator's arrays live, and ``check_finite`` (whether product inputs are checked
    for NaN/inf after the cast to ``dtype``).  It then implements ``_matmat`` (and
    ``_rmatmat`` where the operator is not symmetric).

    Examples
    --------
    >>> import numpy as np, mfac_linalg as ml
    >>> G = np.random.default_rng(0).standard_normal((4, 6))
    >>> A = ml.StaticInverseFisher(G, 0.5)
    >>> S = 2 * A - A.fisher()                      # lazy: nothing is formed
    >>> D = 2 * A.todense() - A.fisher().todense()
    >>> x = np.ones(6)
    >>> bool(np.allclose(S @ x, D @ x)), S.symmetric, (A @ A.fisher()).symmetric
    (True, True, False)
    """

    _check_finite = True
    _symmetric = True
    # make ``x @ op`` reach __rmatmul__ instead of NumPy/CuPy trying to coerce op
    __array_ufunc__ = None
    __array_priority__ = 1000

    def _init_operator(self, d, dtype, backend, *, check_finite=True):
        self._d = int(d)
        self._dtype = np.dtype(dtype)
        self._backend = backend
        self._check_finite = bool(check_finite)

    # -- properties --------------------------------------------------------
    @property
    def shape(self):
        """``(d, d)``."""
        return (self._d, self._d)

    ndim = 2

    @property
    def dtype(self):
        """The dtype of results (vectors come back in the input's dtype)."""
        return self._dtype

    @property
    def device(self):
        """``"cpu"`` or ``"gpu:N"``."""
        return repr(self._backend)

    @property
    def backend(self):
        """The :class:`~mfac_linalg._backend.Backend` holding the data."""
        return self._backend

    @property
    def symmetric(self):
        """True where A = A^T (every operator the library builds; see the module docstring)."""
        return self._symmetric

    # -- SciPy's LinearOperator base: its constructor is not used, so what it would set is
    # given here (SciPy >= 1.18 reads the array namespace ``_xp`` and pickles through it)
    @property
    def _xp(self):
        return B.scipy_namespace(self._backend)

    def __getstate__(self):
        return self.__dict__.copy()

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __array__(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} is a matrix-free operator, not an array: "
                        "use op.todense() for its dense matrix (size-guarded), or op @ x "
                        "for products")

    # -- products ------------------------------------------------------------
    def _prepare(self, x, name, *, fused=False):
        """Validate x; check it for NaN/inf unless ``fused`` and the operator's
        ``_matmat`` checks it itself, in the same pass (``_checks_own_finite``)."""
        X0, was_1d = B.as_vector_block(_v.plain_array(x), name, self._d, self._backend,
                                       finite=False)
        # results in the caller's float type (native byte order: the dtype policy's)
        out_dtype = X0.dtype
        if X0.dtype == self._dtype:
            X = X0
        else:
            with np.errstate(over="ignore"):     # an overflow is reported below, by name
                X = X0.astype(self._dtype)
        # checked after the cast to the compute dtype: a finite float64 vector can
        # overflow float32
        if self._check_finite and not (fused and self._checks_own_finite(X)):
            try:
                B.check_finite(X, name, self._backend)
            except ValueError:
                if X is not X0 and bool(self._backend.xp.isfinite(X0).all()):
                    raise self._cast_overflow(name) from None
                raise
        return X, was_1d, out_dtype

    def _fast_vector(self, x, name):
        """``A @ x`` by a shorter path of the operator's own for the one kind of vector it
        takes (the general validation and 2-D views skipped, the same result and the
        same errors), or None: the general path then runs.  None here."""
        return None

    def _checks_own_finite(self, X):
        """True where ``_matmat(X)`` checks X for NaN/inf itself (raising
        ``NonFiniteInput``), sparing a separate pass and synchronisation."""
        return False

    def _cast_overflow(self, name):
        """The error for finite input that overflows the operator's dtype when cast."""
        return ValueError(f"{name} is too large for the operator's dtype {self._dtype.name}: "
                          "its entries overflow when cast; rescale it")

    def _nonfinite(self, x, name):
        """The error for input that a ``_matmat`` flagged itself: NaN or infinity in x,
        finite x that overflows the operator's dtype when cast, or finite x whose
        products with the operator overflow (the same messages as :meth:`_prepare`)."""
        X0, _ = B.as_vector_block(_v.plain_array(x), name, self._d, self._backend,
                                  finite=False)
        xp = self._backend.xp
        if not bool(xp.isfinite(X0).all()):
            return ValueError(f"{name} must be finite; got NaN or infinity")
        if X0.dtype != self._dtype:
            with np.errstate(over="ignore"):
                cast_ok = bool(xp.isfinite(X0.astype(self._dtype)).all())
            if not cast_ok:
                return self._cast_overflow(name)
        return ValueError(f"{name} is too large: its products with the operator overflow; "
                          "rescale it")

    def _matmat(self, X):
        raise NotImplementedError(f"{type(self).__name__} does not implement _matmat")

    def _rmatmat(self, X):
        if self.symmetric:
            return self._matmat(X)
        raise NotImplementedError(f"{type(self).__name__} is not symmetric and does not "
                                  "implement _rmatmat")

    def _protocol_product(self, x, name, *, adjoint=False, shape=None):
        if shape != "matrix" and (self.symmetric or not adjoint):
            y = self._fast_vector(x, name)
            if y is not None:
                return y
        X, was_1d, out_dtype = self._prepare(x, name, fused=not adjoint or self.symmetric)
        if shape == "vector" and X.shape[1] != 1:
            raise ValueError(f"{name} must have shape ({self._d},) or ({self._d}, 1); got "
                             f"shape {tuple(X.shape)}")
        if shape == "matrix" and was_1d:
            raise ValueError(f"{name} must be 2-D with shape ({self._d}, k); got shape "
                             f"({self._d},)")
        # on the host a result that overflows (in the operator's dtype or the caller's) is
        # refused like input that does, by one pass over Y, O(d k), unless the product
        # checked its own result in the same dtype; on the GPU that check would add a
        # synchronisation to every product, and only the operators that synchronise
        # anyway make it (their own check)
        check = (self._check_finite and self._backend.is_host
                 and (not self._checks_own_finite(X) or out_dtype != self._dtype))
        try:
            quiet = np.errstate(over="ignore", invalid="ignore")
            with quiet if check else contextlib.nullcontext():
                Y = self._rmatmat(X) if adjoint else self._matmat(X)
                if Y.dtype != out_dtype:         # the caller's dtype, which may overflow too
                    Y = Y.astype(out_dtype)
            if check and not bool(np.isfinite(Y).all()):
                raise NonFiniteInput
        except NonFiniteInput:
            raise self._nonfinite(x, name) from None
        return Y[:, 0] if was_1d else Y

    #: True for operators that give ``torch.Tensor`` results for tensor arguments (the
    #: torch adapter, ``mfac_linalg.torch.PermutedOperator``, and the lazy sums, scalings
    #: and products with such a term); the others give arrays, as documented
    _tensors_out = False

    def _out(self, y, like):
        """A result back as a tensor like ``like`` where this operator gives tensors; a
        2-D result for a ``numpy.matrix`` argument as a ``numpy.matrix`` (SciPy's
        ``LinearOperator`` convention; the product itself ran on a plain array)."""
        if isinstance(like, np.matrix) and isinstance(y, np.ndarray) and y.ndim == 2:
            return y.view(np.matrix)
        if not self._tensors_out:
            return y
        from .torch.layout import _back
        return _back(y, like)

    def matvec(self, x):
        """``A @ x`` for ``x`` of shape (d,) or (d, 1); same shape and dtype back."""
        return self._out(self._protocol_product(x, "x", shape="vector"), x)

    def matmat(self, X):
        """``A @ X`` for ``X`` of shape (d, k), one pass over the operator's data."""
        return self._out(self._protocol_product(X, "X", shape="matrix"), X)

    def rmatvec(self, x):
        """``A^T @ x`` (= ``A @ x`` for a symmetric operator)."""
        return self._out(self._protocol_product(x, "x", adjoint=True, shape="vector"), x)

    def rmatmat(self, X):
        """``A^T @ X`` (= ``A @ X`` for a symmetric operator)."""
        return self._out(self._protocol_product(X, "X", adjoint=True, shape="matrix"), X)

    def dot(self, x):
        """``A @ x`` for (d,) or (d, k) input; ``A.dot(op2)`` is the lazy product."""
        if isinstance(x, Operator):
            return ProductOperator([self, x])
        if _foreign_linop(x):
            return self.to_scipy().dot(x)
        return self._out(self._protocol_product(x, "x"), x)

    # -- adjoints --------------------------------------------------------------
    def adjoint(self):
        """The adjoint operator: the operator itself when it is symmetric."""
        return self if self.symmetric else self._adjoint()

    def _adjoint(self):
        raise NotImplementedError(f"{type(self).__name__} is not symmetric and does not "
                                  "implement _adjoint")

    @property
    def T(self):
        """The transpose (= ``adjoint()``: the operators are real)."""
        return self.adjoint()

    @property
    def H(self):
        """The conjugate transpose (= ``adjoint()``)."""
        return self.adjoint()

    def transpose(self):
        """The transpose (= ``adjoint()``)."""
        return self.adjoint()

    def inverse(self):
        """The inverse operator.  An inverse-Fisher operator answers its ``fisher()``
        (and F its inverse-Fisher operator); scaled operators and products answer
        lazily (a^{-1} A^{-1}, B^{-1} A^{-1}).

        Raises
        ------
        TypeError
            An operator without an inverse available (a sum, a user operator).
        """
        fisher = getattr(self, "fisher", None)
        if callable(fisher):
            return fisher()
        raise TypeError(f"{type(self).__name__} has no inverse available (no fisher(), "
                        "not a scaled operator or product of invertible ones)")

    # -- entries -----------------------------------------------------------
    def diagonal(self):
        """The diagonal, a (d,) array of the operator's backend and dtype.  On the host an
        operator whose entries lie beyond the dtype's range (``1e307 * op``) raises
        ``ValueError``, as its products do."""
        return self._in_range(self._diagonal, "diagonal")

    #: True for the lazy sums, scalings and products, whose entries can lie beyond the
    #: float range although their terms' do not (``1e307 * op``): their ``diagonal``,
    #: ``todense`` and ``entry`` are checked (the library's own operators are finite by
    #: their set-up's checks, and skip the pass)
    _may_overflow = False

    def _in_range(self, compute, what):
        """``compute()``, refused on the host where it is not finite (entries of the
        operator beyond the float range: a scaled or summed operator), with no NumPy
        warning; on the GPU, or with ``check_finite=False``, as computed (no
        synchronisation, as for products)."""
        if not (self._may_overflow and self._backend.is_host and self._check_finite):
            return compute()
        with np.errstate(over="ignore", invalid="ignore"):
            out = compute()
        if not bool(np.isfinite(out).all()):
            raise ValueError(f"the operator's {what} is not finite: its entries lie beyond "
                             f"the range of {np.dtype(self._dtype).name} (a scaled or summed "
                             "operator too large); rescale it")
        return out

    def _diagonal(self):  # generic fallback: columns in chunks
        xp = self._backend.xp
        out = xp.empty(self._d, dtype=self._dtype)
        step = max(1, min(self._d, (1 << 24) // max(self._d, 1)))
        for start in range(0, self._d, step):
            stop = min(self._d, start + step)
            E = xp.zeros((self._d, stop - start), dtype=self._dtype)
            E[xp.arange(start, stop), xp.arange(stop - start)] = 1
            out[start:stop] = self._matmat(E)[xp.arange(start, stop), xp.arange(stop - start)]
        return out

    def entry(self, i, j):
        """The entry ``A[i, j]`` as a Python float (negative indices count from the end)."""
        i = _index(i, "i", self._d)
        j = _index(j, "j", self._d)
        if not (self._may_overflow and self._check_finite):
            return float(self._entry(i, j))
        with np.errstate(over="ignore", invalid="ignore"):
            v = float(self._entry(i, j))
        if not math.isfinite(v):
            raise ValueError(f"entry ({i}, {j}) is not finite: the operator's entries lie "
                             "beyond the float range (a scaled or summed operator too large); "
                             "rescale it")
        return v

    def _entry(self, i, j):
        xp = self._backend.xp
        e = xp.zeros((self._d, 1), dtype=self._dtype)
        e[j, 0] = 1
        return B.scalar(self._matmat(e)[i, 0])

    def __getitem__(self, key):
        if not (isinstance(key, tuple) and len(key) == 2):
            raise TypeError(f"index with a pair of integers, op[i, j]; got {key!r}")
        return self.entry(*key)

    # -- quadratic form --------------------------------------------------------
    def quad(self, x):
        """``x^T A x`` for ``x`` of shape (d,) (a float) or (d, k) (a (k,) array).

        Each column is scaled by a power of two to a largest entry in [1/2, 1) before
        the form is evaluated and the factor is put back after (exact, so results in
        the normal range are unchanged): a finite x whose form overflows gives
        ``inf`` of the right sign, not the NaN of ``inf - inf`` inside a factored
        form, and a tiny x keeps its digits instead of underflowing.  Where the form of
        the scaled x already overflows (the operator's own entries beyond the range, e.g.
        ``(1e200 * op) @ (1e200 * op)``), a ``ValueError`` as from :meth:`matvec`.
        """
        X, was_1d, out_dtype = self._prepare(x, "x")
        xp = self._backend.xp
        if X.shape[1]:
            _, e = xp.frexp(xp.abs(X).max(axis=0))   # max|x_k| = f 2^e, f in [1/2, 1)
            X = xp.ldexp(X, -e[None, :])
            try:
                with np.errstate(over="ignore", invalid="ignore"):
                    q = self._quad(X)
                if not bool(xp.isfinite(q).all()):
                    raise NonFiniteInput
            except NonFiniteInput:
                raise self._nonfinite(x, "x") from None
            with np.errstate(over="ignore", under="ignore"):
                q = xp.ldexp(q, 2 * e)
        else:
            q = self._quad(X)
        return float(B.to_host(q)[0]) if was_1d else self._out(q.astype(out_dtype, copy=False), x)

    def _quad(self, X):
        return (X * self._matmat(X)).sum(axis=0)

    # -- dense and adapters --------------------------------------------------
    def todense(self, *, max_elements=DENSE_LIMIT):
        """The dense d x d matrix (for tests and small problems), O(d^2) memory.

        Raises ``ValueError`` when d*d exceeds ``max_elements`` (an integer >= 0, or
        ``math.inf`` for no limit; a float such as 1.5 is a ``TypeError``, NaN a
        ``ValueError``).
        """
        limit = _v.count_limit(max_elements, "max_elements")
        if self._d * self._d > limit:
            raise ValueError(f"todense would build a {self._d} x {self._d} matrix "
                             f"({self._d * self._d} entries > max_elements={max_elements}); "
                             "raise max_elements explicitly if you mean it")
        return self._in_range(self._todense, "dense matrix")

    def _todense(self):
        xp = self._backend.xp
        return self._matmat(xp.eye(self._d, dtype=self._dtype))

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` with matvec *and* matmat passed through."""
        if not self._backend.is_host:
            raise TypeError("to_scipy() needs a CPU operator; use to_cupyx() on the GPU")
        return _adapter_class(self._backend)(self)

    def to_cupyx(self):
        """A ``cupyx.scipy.sparse.linalg.LinearOperator`` (GPU operators only)."""
        if self._backend.is_host:
            raise TypeError("to_cupyx() needs a GPU operator; use to_scipy() on the CPU")
        return _adapter_class(self._backend)(self)

    # -- repr ---------------------------------------------------------------
    def _repr_fields(self):
        return []

    def __repr__(self):
        fields = " ".join([f"d={self._d}"] + self._repr_fields())
        return f"<{type(self).__name__} {fields} {self._dtype.name} {self.device}>"


# -- the lazy algebra's nodes ------------------------------------------------------------

def _operands(ops, what):
    """Check operands of a sum/product: a non-empty sequence of operators of one shape
    on one backend.  Returns them as a list."""
    if isinstance(ops, (Operator, str, bytes)) or not hasattr(ops, "__iter__"):
        raise TypeError(f"ops must be a sequence of operators (the {what}'s operands); got "
                        f"{type(ops).__name__}")
    ops = list(ops)
    if not ops:
        raise ValueError(f"ops must hold at least one operator (the {what}'s operands); got "
                         "an empty sequence")
    for k, op in enumerate(ops):
        if not isinstance(op, Operator):
            raise TypeError(f"{what} operand {k} must be an operator; got {type(op).__name__}")
        if op.shape != ops[0].shape:
            raise ValueError(f"{what} of operators of different shapes: {ops[0].shape} and "
                             f"{op.shape}")
        if op.backend != ops[0].backend:
            raise TypeError(f"{what} of operators on different devices: {ops[0].device} and "
                            f"{op.device} (no silent host/device copies)")
    return ops


def _sub(op, X, adjoint=False):
    """op's product with X in op's own compute dtype (X is already validated)."""
    Xo = X.astype(op.dtype, copy=False)
    return op._rmatmat(Xo) if adjoint and not op.symmetric else op._matmat(Xo)


class SumOperator(Operator):
    """``A_1 + A_2 + ...`` (lazy): one product with each term per call, summed.

    Symmetric when every term is.  Costs: the sum of the terms' costs.
    ``inverse()`` is not available (a TypeError).

    Parameters
    ----------
    ops : sequence of Operator
        Operators of one shape on one backend (nested sums are flattened).

    Examples
    --------
    >>> import numpy as np, mfac_linalg as ml
    >>> A = ml.StaticInverseFisher(np.ones((2, 3)), 1.0)
    >>> S = A + A.fisher()
    >>> S, bool(np.allclose(S.todense(), A.todense() + A.fisher().todense()))
    (<SumOperator d=3 terms=2 float64 cpu>, True)
    """

    _may_overflow = True

    def __init__(self, ops):
        flat = []
        for op in _operands(ops, "sum"):
            flat.extend(op._ops if isinstance(op, SumOperator) else [op])
        self._ops = flat
        self._symmetric = all(op.symmetric for op in flat)
        self._tensors_out = any(op._tensors_out for op in flat)
        self._init_operator(flat[0].shape[0], np.result_type(*[op.dtype for op in flat]),
                            flat[0].backend)

    @property
    def terms(self):
        """The summed operators."""
        return list(self._ops)

    def _sum(self, parts):
        Y = None
        for P in parts:
            P = P.astype(self._dtype, copy=False)
            Y = P.copy() if Y is None else Y.__iadd__(P)
        return Y

    def _matmat(self, X):
        return self._sum(_sub(op, X) for op in self._ops)

    def _rmatmat(self, X):
        return self._sum(_sub(op, X, adjoint=True) for op in self._ops)

    def _adjoint(self):
        return SumOperator([op.adjoint() for op in self._ops])

    def _diagonal(self):
        return self._sum(op.diagonal() for op in self._ops)

    def _entry(self, i, j):
        return sum(op._entry(i, j) for op in self._ops)

    def inverse(self):
        raise TypeError("a sum of operators has no inverse available; solve with it "
                        "(e.g. scipy.sparse.linalg.cg(op, b)) instead")

    def _repr_fields(self):
        return [f"terms={len(self._ops)}"]


class ScaledOperator(Operator):
    """``a * A`` for a real scalar a (lazy).  Symmetric when A is; ``-A`` is ``-1 * A``.

    Costs: those of A.  ``inverse()`` is ``(1/a) * A.inverse()``.

    Parameters
    ----------
    a : real scalar
        Finite; a bool, a complex number or a string is a TypeError.
    op : Operator

    Examples
    --------
    >>> import numpy as np, mfac_linalg as ml
    >>> A = ml.StaticInverseFisher(np.ones((2, 3)), 1.0)
    >>> (2 * A).scalar, (-A).symmetric, bool(np.allclose((A / 4).todense(), A.todense() / 4))
    (2.0, True, True)
    """

    _may_overflow = True

    def __init__(self, a, op):
        a = _v.real(a, "scalar factor")
        if not isinstance(op, Operator):
            raise TypeError(f"op must be an operator; got {type(op).__name__}")
        if isinstance(op, ScaledOperator):
            ab = a * op._a      # merged only where the product neither overflows nor
            if math.isfinite(ab) and (ab != 0 or a == 0 or op._a == 0):   # underflows
                a, op = ab, op._op
        self._a = float(a)
        self._op = op
        self._symmetric = op.symmetric
        self._tensors_out = op._tensors_out
        self._init_operator(op.shape[0], op.dtype, op.backend)

    @property
    def scalar(self):
        """The factor a."""
        return self._a

    @property
    def operator(self):
        """The scaled operator A."""
        return self._op

    def _matmat(self, X):
        return self._a * self._op._matmat(X)

    def _rmatmat(self, X):
        return self._a * _sub(self._op, X, adjoint=True)

    def _adjoint(self):
        return ScaledOperator(self._a, self._op.adjoint())

    def _diagonal(self):
        return self._a * self._op.diagonal()

    def _entry(self, i, j):
        return self._a * self._op._entry(i, j)

    def _quad(self, X):
        return self._a * self._op._quad(X)

    def inverse(self):
        return ScaledOperator(_reciprocal(self._a, "scalar factor"), self._op.inverse())

    def _repr_fields(self):
        return [f"scalar={self._a:g}", f"of={type(self._op).__name__}"]


class ProductOperator(Operator):
    """``A_1 @ A_2 @ ...`` (lazy): X goes through the factors right to left, each
    once, all k columns together.

    Not symmetric in general (only a power ``A @ A @ ...`` of one symmetric A is);
    its ``adjoint()`` is the reversed product of the adjoints and ``inverse()`` the
    reversed product of the inverses.  Costs: the sum of the factors' costs;
    ``diagonal`` and ``entry`` go through products with unit vectors.

    Parameters
    ----------
    ops : sequence of Operator
        Operators of one shape on one backend, left to right (nested products are
        flattened).

    Examples
    --------
    >>> import numpy as np, mfac_linalg as ml
    >>> rng = np.random.default_rng(0)
    >>> A = ml.StaticInverseFisher(rng.standard_normal((2, 4)), 1.0)
    >>> B = ml.StaticInverseFisher(rng.standard_normal((3, 4)), 0.5)
    >>> P = A @ B
    >>> P.symmetric, bool(np.allclose(P.T.todense(), (A.todense() @ B.todense()).T))
    (False, True)
    >>> bool(np.allclose(P.inverse().todense(), np.linalg.inv(P.todense())))
    True
    """

    _may_overflow = True

    def __init__(self, ops):
        flat = []
        for op in _operands(ops, "product"):
            flat.extend(op._ops if isinstance(op, ProductOperator) else [op])
        self._ops = flat
        self._symmetric = all(op is flat[0] for op in flat) and flat[0].symmetric
        self._tensors_out = any(op._tensors_out for op in flat)
        self._init_operator(flat[0].shape[0], np.result_type(*[op.dtype for op in flat]),
                            flat[0].backend)

    @property
    def factors(self):
        """The multiplied operators, left to right."""
        return list(self._ops)

    def _chain(self, X, ops, adjoint):
        for op in ops:
            X = _sub(op, X, adjoint)
        return X.astype(self._dtype, copy=False)

    def _matmat(self, X):
        return self._chain(X, reversed(self._ops), False)

    def _rmatmat(self, X):
        return self._chain(X, self._ops, True)

    def _adjoint(self):
        return ProductOperator([op.adjoint() for op in reversed(self._ops)])

    def inverse(self):
        return ProductOperator([op.inverse() for op in reversed(self._ops)])

    def _repr_fields(self):
        return [f"factors={len(self._ops)}"]


_ADAPTERS = {}


def _adapter_class(backend):
    """Build (once per kind) a LinearOperator subclass of SciPy (CPU) or cupyx (GPU)
    forwarding to an Operator: matvec, matmat and their adjoints passed through."""
    base = B.linear_operator_base(backend)
    if base in _ADAPTERS:
        return _ADAPTERS[base]

    class _Adapter(base):
        def __init__(self, op):
            self.op = op
            super().__init__(dtype=op.dtype, shape=op.shape)

        def _matvec(self, x):
            return self.op.matvec(x)

        def _rmatvec(self, x):
            return self.op.rmatvec(x)

        def _matmat(self, X):
            return self.op.matmat(X)

        def _rmatmat(self, X):
            return self.op.rmatmat(X)

        def _adjoint(self):
            return self if self.op.symmetric else type(self)(self.op.adjoint())

        def __repr__(self):
            return f"<{base.__module__.split('.')[0]} LinearOperator wrapping {self.op!r}>"

        def __reduce__(self):       # the class is built here: pickle the operator instead
            return _adapt, (self.op,)

    _Adapter.__name__ = _Adapter.__qualname__ = (
        "ScipyAdapter" if backend.is_host else "CupyxAdapter")
    _ADAPTERS[base] = _Adapter
    return _Adapter


def _adapt(op):
    """``op``'s SciPy/cupyx adapter (unpickling a :meth:`Operator.to_scipy` result)."""
    return _adapter_class(op._backend)(op)
