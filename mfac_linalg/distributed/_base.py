"""What the sharded operators share: the local-slice protocol and flagged collectives.

Every collective call of a sharded operator follows one rule: a rank that fails
locally (a bad argument, non-finite data, an allocation) still takes part in the
collective, with zeros and its failure flag set, and then every rank raises (the
failing rank its own exception, the others :class:`RemoteRankError`).  So the ranks
always run the same sequence of collectives, and no rank goes on alone.
"""
from __future__ import annotations

from contextlib import nullcontext as _no_context

import numpy as np

from .. import _backend as B
from .. import _validate as V
from .._operator import DENSE_LIMIT, Operator, _index
from .comm import agree, as_comm, check_replicas, raise_failed
from .layout import ColumnLayout

__all__ = ["ShardedOperator", "ShardedFisherOperator"]


class _FlaggedCollectives:
    """The flagged collectives of the sharded operators (the module docstring's rule): a
    sum all-reduce with one failure flag per rank, a header table, the agreement on k,
    the two global columns of ``entry`` and the gathered rows of ``todense``.  Needs
    ``_comm``, ``_layout``, ``_backend`` and ``_dglobal``."""

    def _xp(self):
        return self._backend.xp

    def _flagged_sum(self, payload, n, err, what):
        """All-reduce ``payload`` (n float64 numbers, or None after a local failure) with one
        failure flag per rank appended; raise on every rank if any rank failed.  Returns
        the summed n numbers (a flat float64 array)."""
        xp = self._xp()
        P = self._comm.size
        buf = xp.zeros(n + P, dtype=np.float64)
        if err is None and payload is not None:
            try:
                buf[:n] = payload.reshape(-1)
            except Exception as exc:     # e.g. out of memory
                err = exc
        if err is not None:
            buf[:n] = 0.0
            buf[n + self._comm.rank] = 1.0
        self._comm.allreduce_sum(buf)
        raise_failed(buf[n:], err, what)
        return buf[:n]

    def _header(self, values, err, what):
        """One all-reduce of a P x (1 + h) host table (flag, values of each rank); raises on
        every rank if any failed; returns the P x h table of values."""
        P = self._comm.size
        tab = np.zeros((P, 1 + len(values)), dtype=np.float64)
        if err is None:
            tab[self._comm.rank, 1:] = values
        else:
            tab[self._comm.rank, 0] = 1.0
        self._comm.allreduce_sum(tab)
        raise_failed(tab[:, 0], err, what)
        return tab[:, 1:]

    def _agree_k(self, X, err, name, what):
        """Agree on the number of right-hand sides k (one small all-reduce)."""
        tab = self._header([X.shape[1] if X is not None else 0], err, what)
        ks = [int(v) for v in tab[:, 0]]
        if len(set(ks)) != 1:
            raise ValueError(f"{name} must have the same number of columns on every rank; got "
                             f"{ks} (rank order)")
        return ks[0]

    def _check_same_pair(self, tail, i, j):
        P = self._comm.size
        iv, jv = tail[:P], tail[P:]
        if len(set(iv.tolist())) != 1 or len(set(jv.tolist())) != 1:
            raise ValueError("entry(i, j) must be called with the same (i, j) on every rank; "
                             f"got i = {[int(v) for v in iv]}, j = {[int(v) for v in jv]}")

    def _pair_columns(self, getcol, i, j, err, m):
        """The two global columns i and j of an m-row array held by columns (``getcol(local
        index)`` gives a float64 column): one all-reduce, owners contributing."""
        P = self._comm.size
        n = 2 * m + 2 * P
        buf = None
        if err is None:
            try:
                buf = self._xp().zeros(n, dtype=np.float64)
                for slot, g in ((0, i), (1, j)):
                    p, loc = self._layout.owner(g)
                    if p == self._comm.rank:
                        buf[slot * m:(slot + 1) * m] = getcol(loc)
                buf[2 * m + self._comm.rank] = i
                buf[2 * m + P + self._comm.rank] = j
            except Exception as exc:
                err = exc
        out = self._flagged_sum(buf, n, err, "entry")
        self._check_same_pair(np.asarray(B.to_host(out[2 * m:])), i, j)
        return out[:m], out[m:2 * m]

    def _gather_rows(self, local, m, what):
        """The global m x d array whose columns each rank holds locally (float64 all-reduce,
        zeros elsewhere: exact)."""
        d = self._dglobal
        err = None
        full = None
        try:
            full = self._xp().zeros((m, d), dtype=np.float64)
            self._layout.place(local.astype(np.float64), self._comm.rank, full, axis=1)
        except Exception as exc:
            err = exc
        return self._flagged_sum(full, m * d, err, what).reshape(m, d)


class ShardedOperator(_FlaggedCollectives, Operator):
    """A symmetric d x d operator whose vectors are split over ranks by a column layout.

    ``shape`` is the global (d, d).  ``matvec``/``matmat``/``dot``/``@`` take this
    rank's slice x_p (``local_dim`` rows) and return this rank's slice of the result;
    ``diagonal()`` is this rank's slice; ``entry``, ``quad`` and ``logdet`` are global
    and equal on every rank; ``todense()`` is the global matrix on every rank.  Every
    method but ``diagonal``, ``logdet`` and the attributes is collective: all ranks
    call it together, with the same arguments apart from their slices.
    """

    # -- set-up ------------------------------------------------------------------------
    def _init_sharded(self, comm, layout, dtype, backend, *, check_finite=True):
        self._comm = comm
        self._layout = layout
        self._init_operator(layout.local_dim(comm.rank), dtype, backend,
                            check_finite=check_finite)
        self._dglobal = layout.dim

    @staticmethod
    def _setup_comm(comm, layout):
        """(Communicator, layout or None, error or None): checked locally, never raising."""
        comm = as_comm(comm)
        err = None
        if layout is not None:
            if not isinstance(layout, ColumnLayout):
                err = TypeError(f"layout must be a ColumnLayout or None; got "
                                f"{type(layout).__name__}")
            elif layout.size != comm.size:
                err = ValueError(f"layout must have one entry per rank ({comm.size}); got "
                                 f"{layout.size}")
        return comm, layout, err

    # -- attributes -----------------------------------------------------------------------
    @property
    def shape(self):
        """``(d, d)``, the global shape."""
        return (self._dglobal, self._dglobal)

    @property
    def local_dim(self):
        """d_p, the number of coordinates this rank holds."""
        return self._d

    @property
    def layout(self):
        """The :class:`ColumnLayout` (which global coordinates each rank holds)."""
        return self._layout

    @property
    def comm(self):
        """The communicator."""
        return self._comm

    @property
    def rank(self):
        return self._comm.rank

    def _repr_fields(self):
        return [f"local_dim={self._d}", f"rank={self._comm.rank}/{self._comm.size}"]

    def __repr__(self):
        fields = " ".join([f"d={self._dglobal}"] + self._repr_fields())
        return f"<{type(self).__name__} {fields} {self._dtype.name} {self.device}>"

    def __reduce__(self):
        raise TypeError(f"a {type(self).__name__} holds a communicator and cannot be pickled; "
                        "save each rank's state with state_dict()/save() where available")

    def to_scipy(self):
        """Refused: a sharded operator maps local slices collectively, which no SciPy
        solver knows how to drive."""
        raise TypeError(f"{type(self).__name__} acts on each rank's slice collectively; a "
                        "SciPy LinearOperator would run its dot products on one slice only. "
                        "Gather the vectors (layout.gather / distributed.allgather) or use "
                        "the single-process operator")

    to_cupyx = to_scipy

    def _local_block(self, x, name, kind):
        """Validate this rank's slice; never raises (returns the error instead)."""
        try:
            try:
                X, was_1d = B.as_vector_block(x, name, self._d, self._backend,
                                              finite=self._check_finite)
            except ValueError as exc:
                if "shape" not in str(exc):
                    raise
                raise ValueError(f"{exc} (rank {self._comm.rank}'s slice: local_dim="
                                 f"{self._d} of d={self._dglobal})") from None
            out_dtype = X.dtype
            if X.dtype != self._dtype:
                with np.errstate(over="ignore"):     # refused just below, by name
                    X = X.astype(self._dtype)
                # x was checked before the cast; a finite float64 x can overflow float32
                if self._check_finite and not bool(self._backend.xp.isfinite(X).all()):
                    raise self._cast_overflow(name)
            if kind == "matvec" and X.shape[1] != 1:
                raise ValueError(f"{name} must have shape ({self._d},) or ({self._d}, 1) on rank "
                                 f"{self._comm.rank}; got shape {tuple(X.shape)}")
            if kind == "matmat" and was_1d:
                raise ValueError(f"{name} must be 2-D with shape ({self._d}, k) on rank "
                                 f"{self._comm.rank}; got shape ({self._d},)")
            return X, was_1d, out_dtype, None
        except Exception as exc:
            return None, None, None, exc

    # -- the protocol on local slices ----------------------------------------------------------
    def _sharded_apply(self, x, name, kind):
        X, was_1d, out_dtype, err = self._local_block(x, name, kind)
        k = 1 if kind == "matvec" else self._agree_k(X, err, name, kind)
        check = self._check_finite and self._backend.is_host
        with np.errstate(over="ignore", invalid="ignore") if check else _no_context():
            Y = self._collective_matmat(X, k, err, kind)     # an overflow: refused below
            if Y.dtype != out_dtype:
                Y = Y.astype(out_dtype)
        if check:
            # as the single-device operators: a result that overflows (in the operator's
            # dtype or the caller's) is refused; on every rank (one more all-reduce of P
            # flags on the host; on the GPU it would add a synchronisation, as there)
            bad = None
            if not bool(np.isfinite(Y).all()):
                bad = ValueError(f"{name} is too large: its products with the operator "
                                 "overflow; rescale it")
            agree(self._comm, bad, kind)
        return Y[:, 0] if was_1d else Y

    def matvec(self, x):
        """This rank's slice of ``A @ x`` from its slice ``x`` (d_p,) or (d_p, 1).  Collective:
        one all-reduce of m float64 numbers (plus one flag per rank); on the host with
        ``check_finite``, one more of P flags (a result that overflows is refused on every
        rank)."""
        return self._sharded_apply(x, "x", "matvec")

    def matmat(self, X):
        """This rank's rows of ``A @ X`` from its rows of ``X`` (d_p, k).  Collective: a
        k-agreement all-reduce of P numbers, then one of m k numbers (and on the host with
        ``check_finite`` one of P flags, as ``matvec``)."""
        return self._sharded_apply(X, "X", "matmat")

    def rmatvec(self, x):
        """``A^T @ x`` = ``A @ x`` (symmetric).  Collective."""
        return self.matvec(x)

    def rmatmat(self, X):
        """``A^T @ X`` = ``A @ X`` (symmetric).  Collective."""
        return self.matmat(X)

    def dot(self, x):
        """``matvec`` or ``matmat`` by the shape of this rank's slice.  Collective."""
        if isinstance(x, Operator):
            return self._refuse(self._algebra_error())
        return self._sharded_apply(x, "x", "dot")

    def _refuse(self, err):
        """Raise ``err`` on this rank and :class:`RemoteRankError` on the others, through
        the first collective of ``dot`` / ``@`` / ``*`` / ``matmat`` / ``quad`` (the
        k-agreement header), where the other ranks called one of those with valid
        arguments and wait in it.  (``matvec`` has no such header, to keep its one
        all-reduce: ranks must call the same method, as for every collective.)"""
        self._agree_k(None, err, "x", "dot")
        raise err        # not reached: the header raises it

    __call__ = dot

    def __matmul__(self, x):
        return self.dot(x)

    def __rmatmul__(self, x):
        # x @ A = (A x^T)^T for symmetric A
        if isinstance(x, Operator):
            return self._refuse(self._algebra_error())
        try:
            arr, _ = B.asarray(x, "x", backend=self._backend)
        except Exception as exc:            # refused on every rank (the product's header)
            return self._refuse(exc)
        return self.dot(arr.T).T if arr.ndim == 2 else self.dot(arr)

    def _algebra_error(self):
        return TypeError(f"{type(self).__name__} takes part in no lazy algebra (its products "
                         "are collective over the ranks' slices); combine the results of "
                         "its products instead")

    def _no_algebra(self, *args):
        raise self._algebra_error()

    __add__ = __radd__ = __sub__ = __rsub__ = __truediv__ = __pow__ = _no_algebra
    __neg__ = __pos__ = _no_algebra

    def __mul__(self, x):
        """``op * x`` for an array slice x: ``op @ x`` (SciPy's convention); a scalar or an
        operator is refused (no lazy algebra)."""
        try:
            scalar = isinstance(x, Operator) or np.ndim(x) == 0 and not hasattr(x, "__len__")
        except Exception:                   # e.g. a ragged list: the product refuses it,
            return self.dot(x)              # by name, on every rank
        if scalar:
            # refused through the product's header: another rank may hold an array here
            return self._refuse(self._algebra_error())
        return self.dot(x)

    def __rmul__(self, x):
        return self._no_algebra()

    def adjoint(self):
        """The operator itself (symmetric)."""
        return self

    T = property(adjoint)
    H = property(adjoint)

    def transpose(self):
        return self

    def inverse(self):
        """Not available on a sharded operator (use the products)."""
        return self._no_algebra()

    def quad(self, x):
        """``x^T A x`` (global, the same on every rank) from each rank's slice: a float for
        (d_p,), a (k,) array for (d_p, k).  Collective."""
        X, was_1d, out_dtype, err = self._local_block(x, "x", "dot")
        k = self._agree_k(X, err, "x", "quad")
        q = self._collective_quad(X, k, err)
        return float(B.to_host(q)[0]) if was_1d else q.astype(out_dtype, copy=False)

    def __getitem__(self, key):
        """``op[i, j]`` is ``entry(i, j)``; a key that is not a pair fails on every rank
        (through ``entry``'s collective), not on this one alone."""
        if not (isinstance(key, tuple) and len(key) == 2):
            err = TypeError(f"index with a pair of integers, op[i, j]; got {key!r}")
            return float(self._collective_entry(0, 0, err))
        return self.entry(*key)

    def entry(self, i, j):
        """The global entry ``A[i, j]`` (global indices), the same float on every rank.
        Collective: one all-reduce of 2 m + 3 P numbers."""
        err = None
        try:
            i = _index(i, "i", self._dglobal)
            j = _index(j, "j", self._dglobal)
        except Exception as exc:
            err, i, j = exc, 0, 0
        return float(self._collective_entry(i, j, err))

    def diagonal(self):
        """This rank's slice of the diagonal, (d_p,).  Local: no communication."""
        return self._diagonal()

    def todense(self, *, max_elements=DENSE_LIMIT):
        """The global dense d x d matrix, on every rank (for tests and small problems).

        Collective: a flagged header (P numbers), then one all-reduce of the m x d factor.
        Raises ``ValueError`` on every rank when d*d exceeds ``max_elements`` (or it is
        not a non-negative integer) on any rank, there its own error, elsewhere
        :class:`~mfac_linalg.distributed.RemoteRankError`.
        """
        d = self._dglobal
        err = None
        try:
            limit = V.count_limit(max_elements, "max_elements")   # NaN refused
            if d * d > limit:
                raise ValueError(f"todense would build a {d} x {d} matrix ({d * d} entries > "
                                 f"max_elements={max_elements}); raise max_elements "
                                 "explicitly if you mean it")
        except Exception as exc:
            err = exc
        self._header([], err, "todense")     # each rank's verdict, before the big all-reduce
        return self._collective_todense()

    def check_replicas(self):
        """Check that the replicated m x m state is bitwise identical on every rank.

        Collective: one all-reduce of P x 4 numbers (64-bit digests), O(m^2) hashing.
        Raises :class:`~mfac_linalg.distributed.ReplicaDivergenceError` on every rank
        if any rank differs from rank 0.  Returns None.
        """
        check_replicas(self._comm, self._replicated(), type(self).__name__)

    # -- hooks of the subclasses -----------------------------------------------------------
    def _replicated(self):
        raise NotImplementedError

    def _collective_matmat(self, X, k, err, what):
        raise NotImplementedError

    def _collective_quad(self, X, k, err):
        raise NotImplementedError

    def _collective_entry(self, i, j, err):
        raise NotImplementedError

    def _collective_todense(self):
        raise NotImplementedError


class ShardedFisherOperator(ShardedOperator):
    r"""The damped empirical Fisher F of a sharded inverse-Fisher operator (the forward map).

    Built by ``fisher()`` of a sharded inverse-Fisher operator, from that operator's own
    data and state (it follows a window's later updates); the same layout, local-slice
    semantics and collectives (:class:`ShardedOperator`).  For gradients G (m x d)
    and N as the inverse operator's,

    .. math::  F = \lambda I + \tfrac1N G^T G,\qquad F x = \lambda x + \tfrac1N G^T (G x),

    so a product costs the inverse operator's pass 1 (one all-reduce of m k numbers)
    and a local pass 2; ``diagonal`` (λ + Σ_i g_i²/N on the local columns) is local;
    ``entry`` all-reduces the two columns; ``logdet`` is the inverse operator's (log det
    F).  ``inverse()`` returns that operator.

    Parameters
    ----------
    inverse_op : ShardedStaticInverseFisher or ShardedSlidingWindowInverseFisher

    Examples
    --------
    >>> import numpy as np
    >>> import mfac_linalg as ml
    >>> from mfac_linalg.distributed import ShardedStaticInverseFisher
    >>> G = np.random.default_rng(0).standard_normal((3, 7))
    >>> F = ShardedStaticInverseFisher(G, 0.5).fisher()
    >>> bool(np.allclose(F.todense(), 0.5 * np.eye(7) + G.T @ G / 3))
    True
    """

    def __init__(self, inverse_op):
        if not isinstance(inverse_op, ShardedOperator):
            raise TypeError(f"inverse_op must be a sharded inverse-Fisher operator; got "
                            f"{type(inverse_op).__name__}")
        self._inv = inverse_op
        self._init_sharded(inverse_op.comm, inverse_op.layout, inverse_op.dtype,
                           inverse_op.backend, check_finite=inverse_op._check_finite)

    def _repr_fields(self):
        return self._inv._repr_fields()

    def inverse(self):
        """The sharded inverse-Fisher operator this F came from."""
        return self._inv

    def logdet(self):
        """log det F (the inverse operator's, from the same factor).  Local."""
        return self._inv.logdet()

    def _replicated(self):
        return self._inv._replicated()

    def _collective_matmat(self, X, k, err, what):
        return self._inv._fisher_matmat(X, k, err)

    def _collective_quad(self, X, k, err):
        return self._inv._fisher_quad(X, k, err)

    def _collective_entry(self, i, j, err):
        return self._inv._fisher_entry(i, j, err)

    def _collective_todense(self):
        return self._inv._fisher_todense()

    def _diagonal(self):
        return self._inv._fisher_diagonal()
