"""The operator protocol shared by every operator of the library, written once.

Subclasses implement only private hooks on validated inputs (SciPy's
``_interface.py`` pattern):

``_matmat(X)``
    ``X`` is a 2-D (d, k) array of the operator's backend in its compute dtype;
    return ``A @ X`` in one pass over the operator's data (never a loop over
    the k columns).
``_diagonal()``, ``_entry(i, j)``
    Optional fast paths; the defaults go through ``_matmat``.
``_repr_fields()``
    Extra ``key=value`` fields for ``__repr__``.

Every operator of the library is symmetric, so ``adjoint()``, ``.T`` and
``.H`` return the operator itself and ``rmatvec``/``rmatmat`` equal
``matvec``/``matmat``.
"""
from __future__ import annotations

import numbers
import operator

import numpy as np

from . import _backend as B

__all__ = ["Operator", "OutOfRangeError", "check_damping", "DENSE_LIMIT"]


class NonFiniteInput(Exception):
    """Raised by a ``_matmat`` that checks its input for NaN/inf itself (see
    ``Operator._checks_own_finite``); the public method turns it into a ValueError
    naming the argument."""

#: ``todense`` refuses operators with more than this many entries (64 Mi entries,
#: 512 MiB in float64) unless ``max_elements`` is raised explicitly.
DENSE_LIMIT = 1 << 26


class OutOfRangeError(IndexError, ValueError):
    """An index outside ``[-d, d)``: both an ``IndexError`` and a ``ValueError``."""


def check_damping(damping, name="damping"):
    """Validate a damping: a real, finite, strictly positive scalar.  Returns a float."""
    arr = None
    if not isinstance(damping, (bool, np.bool_)):
        try:
            arr = np.asarray(B.to_host(damping))
        except Exception:
            arr = None
    if arr is None or arr.ndim != 0 or arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real scalar; got {type(damping).__name__}")
    value = float(arr)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0; got {value}")
    return value


def _index(i, name, d):
    if isinstance(i, (bool, np.bool_)) or not isinstance(i, (numbers.Integral, np.integer)):
        raise TypeError(f"{name} must be an integer; got {type(i).__name__}")
    i = operator.index(i)
    if not -d <= i < d:
        raise OutOfRangeError(f"{name} must be in [-{d}, {d}); got {i}")
    return i + d if i < 0 else i


class Operator:
    """Base class of every operator: a symmetric d x d linear map.

    Parameters (set by subclasses through ``_init_operator``)
    ----------
    d : int
        The dimension.
    dtype : numpy dtype
        The dtype results are computed in (float32 or float64).
    backend : Backend
        Where the operator's arrays live.
    """

    _check_finite = True
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

    @property
    def ndim(self):
        return 2

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

    # -- products ------------------------------------------------------------
    def _prepare(self, x, name, *, fused=False):
        """Validate x; check it for NaN/inf unless ``fused`` and the operator's
        ``_matmat`` checks it itself, in the same pass (``_checks_own_finite``)."""
        X, was_1d = B.as_vector_block(x, name, self._d, self._backend, finite=False)
        if self._check_finite and not (fused and self._checks_own_finite(X)):
            B.check_finite(X, name, self._backend)
        out_dtype = X.dtype
        if X.dtype != self._dtype:
            X = X.astype(self._dtype)
        return X, was_1d, out_dtype

    def _checks_own_finite(self, X):
        """True where ``_matmat(X)`` checks X for NaN/inf itself (raising
        ``NonFiniteInput``), sparing a separate pass and synchronisation."""
        return False

    def _matmat_named(self, X, name):
        try:
            return self._matmat(X)
        except NonFiniteInput:
            raise ValueError(f"{name} must be finite; got NaN or infinity") from None

    def _finish(self, Y, was_1d, out_dtype):
        if Y.dtype != out_dtype:
            Y = Y.astype(out_dtype)
        return Y[:, 0] if was_1d else Y

    def matvec(self, x):
        """``A @ x`` for ``x`` of shape (d,) or (d, 1); same shape and dtype back."""
        X, was_1d, out_dtype = self._prepare(x, "x", fused=True)
        if X.shape[1] != 1:
            raise ValueError(f"x must have shape ({self._d},) or ({self._d}, 1); got shape "
                             f"{tuple(X.shape) if not was_1d else (self._d,)}")
        return self._finish(self._matmat_named(X, "x"), was_1d, out_dtype)

    def matmat(self, X):
        """``A @ X`` for ``X`` of shape (d, k), one pass over the operator's data."""
        X, was_1d, out_dtype = self._prepare(X, "X", fused=True)
        if was_1d:
            raise ValueError(f"X must be 2-D with shape ({self._d}, k); got shape ({self._d},)")
        return self._finish(self._matmat_named(X, "X"), False, out_dtype)

    def rmatvec(self, x):
        """``A^T @ x`` (= ``A @ x``: the operator is symmetric)."""
        return self.matvec(x)

    def rmatmat(self, X):
        """``A^T @ X`` (= ``A @ X``: the operator is symmetric)."""
        return self.matmat(X)

    def dot(self, x):
        """``A @ x`` for (d,) or (d, k) input."""
        X, was_1d, out_dtype = self._prepare(x, "x", fused=True)
        return self._finish(self._matmat_named(X, "x"), was_1d, out_dtype)

    def __matmul__(self, x):
        if isinstance(x, Operator):
            return NotImplemented
        return self.dot(x)

    def __rmatmul__(self, x):
        # x @ A = (A^T x^T)^T = (A x^T)^T for symmetric A
        arr, _ = B.asarray(x, "x", backend=self._backend)
        if arr.ndim == 1:
            return self.dot(arr)
        if arr.ndim == 2:
            return self.dot(arr.T).T
        raise ValueError(f"x must be 1-D or 2-D; got shape {arr.shape}")

    # -- adjoints: all operators here are symmetric ---------------------------
    def adjoint(self):
        """The adjoint operator: the operator itself (it is symmetric)."""
        return self

    @property
    def T(self):
        return self

    @property
    def H(self):
        return self

    def transpose(self):
        return self

    # -- entries -----------------------------------------------------------
    def diagonal(self):
        """The diagonal, a (d,) array of the operator's backend and dtype."""
        return self._diagonal()

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
        return float(self._entry(i, j))

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
        """``x^T A x`` for ``x`` of shape (d,) (a float) or (d, k) (a (k,) array)."""
        X, was_1d, out_dtype = self._prepare(x, "x")
        q = self._quad(X)
        return float(B.to_host(q)[0]) if was_1d else q.astype(out_dtype, copy=False)

    def _quad(self, X):
        return (X * self._matmat(X)).sum(axis=0)

    # -- dense and adapters --------------------------------------------------
    def todense(self, *, max_elements=DENSE_LIMIT):
        """The dense d x d matrix (for tests and small problems).

        Raises ``ValueError`` when d*d exceeds ``max_elements``.
        """
        if self._d * self._d > max_elements:
            raise ValueError(f"todense would build a {self._d} x {self._d} matrix "
                             f"({self._d * self._d} entries > max_elements={max_elements}); "
                             "raise max_elements explicitly if you mean it")
        return self._todense()

    def _todense(self):
        xp = self._backend.xp
        return self._matmat(xp.eye(self._d, dtype=self._dtype))

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` with matvec *and* matmat passed through."""
        if self._backend.name != "cpu":
            raise TypeError("to_scipy() needs a CPU operator; use to_cupyx() on the GPU")
        return _adapter_class("scipy")(self)

    def to_cupyx(self):
        """A ``cupyx.scipy.sparse.linalg.LinearOperator`` (GPU operators only)."""
        if self._backend.name != "gpu":
            raise TypeError("to_cupyx() needs a GPU operator; use to_scipy() on the CPU")
        return _adapter_class("cupyx")(self)

    # -- repr ---------------------------------------------------------------
    def _repr_fields(self):
        return []

    def __repr__(self):
        fields = " ".join([f"d={self._d}"] + self._repr_fields())
        return f"<{type(self).__name__} {fields} {self._dtype.name} {self.device}>"


_ADAPTERS = {}


def _adapter_class(kind):
    """Build (once) a LinearOperator subclass of scipy or cupyx forwarding to an Operator."""
    if kind in _ADAPTERS:
        return _ADAPTERS[kind]
    if kind == "scipy":
        from scipy.sparse.linalg import LinearOperator
    else:
        from cupyx.scipy.sparse.linalg import LinearOperator

    class _Adapter(LinearOperator):
        def __init__(self, op):
            self.op = op
            super().__init__(dtype=op.dtype, shape=op.shape)

        def _matvec(self, x):
            return self.op.matvec(x)

        def _rmatvec(self, x):
            return self.op.matvec(x)

        def _matmat(self, X):
            return self.op.matmat(X)

        def _rmatmat(self, X):
            return self.op.matmat(X)

        def _adjoint(self):
            return self

        def __repr__(self):
            return f"<{kind} LinearOperator wrapping {self.op!r}>"

    _Adapter.__name__ = _Adapter.__qualname__ = f"{kind.capitalize()}Adapter"
    _ADAPTERS[kind] = _Adapter
    return _Adapter
