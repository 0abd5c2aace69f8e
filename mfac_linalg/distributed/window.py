"""The column-sharded sliding window (docs/math.md §2 and §6)."""
from __future__ import annotations

import collections.abc
import json
import math
import os
import tempfile
import zipfile

import numpy as np

from .. import _backend as B
from .. import _validate as V
from .comm import agree, as_comm, state_digest
from ._base import ShardedFisherOperator, ShardedOperator
from .sharded import agree_setup, layout_digest
from .layout import ColumnLayout

__all__ = ["ShardedSlidingWindowInverseFisher"]

FORMAT = "mfac_linalg.sharded_window"
FORMAT_VERSION = 1
_NORMALIZE = ("window", "count")
_ENGINES = ("auto", "cholesky", "explicit")
_STORAGE_CODE = {"float64": 1.0, "float32": 2.0, "float16": 3.0, "bfloat16": 4.0}


def _parts():
    """The single-device window's ring buffer factory and engine picker (imported late:
    they are the same code the single-device window runs)."""
    from .._capacitance import pick_engine  # noqa: PLC0415
    from ..sliding.buffer import make_buffer  # noqa: PLC0415
    return make_buffer, pick_engine


class _Shell:
    """Just enough of an operator for a flagged set-up header before one exists."""

    def __init__(self, comm):
        self._comm = comm


def _storage_name(dtype, backend):
    name = getattr(dtype, "name", None) or (dtype.__name__ if isinstance(dtype, type)
                                            else str(dtype))
    allowed = B.storage_dtype_names(backend)
    if name not in allowed:
        extra = "" if backend.is_gpu else " (float16 and bfloat16 storage need the GPU)"
        raise ValueError(f"dtype must be one of {allowed}; got {dtype!r}{extra}")
    return name


class ShardedSlidingWindowInverseFisher(ShardedOperator):
    r"""Column-sharded inverse Fisher of the last ``window`` gradients (docs/math.md §2, §6).

    Represents the same matrix as :class:`~mfac_linalg.SlidingWindowInverseFisher` fed
    the concatenated gradients,

    .. math:: F = \lambda I + \frac1N \sum_{i\ \mathrm{held}} g_i g_i^T, \qquad
              F^{-1} x = (x - G_h^T C^{-1} G_h x)/\lambda, \quad C = N\lambda I + G_h G_h^T,

    with rank p holding the columns J_p of the ring buffer (m x d_p, the storage dtype)
    and the replicated m x m float64 engine (the Gram matrix K = G Gᵀ and the Cholesky
    factor of C in arrival order, or C⁻¹ in slot order): the same ring buffer, engines,
    kernels and storage dtypes as the single-device window, which they run on the
    local columns.  A step:

    1. pass 1 (local): write g_p into the slot, u_p = G_p g_p;
    2. one all-reduce of m float64 numbers (plus one flag per rank): u = Σ_p u_p, the
       new Gram row, identical on every rank;
    3. the engine's staged replacement (replicated, O(m²)) and, for ``step``, pass 2
       (local): y_p = (g_p − G_pᵀ c)/λ with c = C_new⁻¹ u;
    4. one all-reduce of P flags: every rank commits, or every rank undoes the slot
       write and the staged replacement and raises (the failing rank its own error,
       the others :class:`~mfac_linalg.distributed.RemoteRankError`).

    Local-slice semantics, collectives and failure rules are those of
    :class:`~mfac_linalg.distributed.ShardedStaticInverseFisher`: ``matvec``,
    ``matmat``, ``dot`` take and return this rank's slice; ``diagonal()`` is local;
    ``entry``, ``quad``, ``logdet`` are global; ``update``, ``step``, ``refresh``,
    ``check_replicas`` and ``load_state_dict`` are collective; ``gradients()``,
    ``reset()``, ``state_dict()`` and ``save()`` are local.

    Parameters
    ----------
    local_dim : int
        d_p, the number of columns this rank holds (>= 0).
    window : int
        m >= 1, the same on every rank.
    damping : float
        λ > 0, the same on every rank.
    comm : Communicator, torch ProcessGroup, mpi4py communicator or None
        Through :func:`~mfac_linalg.distributed.as_comm`.
    layout : ColumnLayout, optional
        Default: the ranks' blocks in rank order.
    dtype : {"float32", "float64"} (and "float16", "bfloat16" on the GPU)
        Storage dtype of the local buffer (the m x m work is float64).
    device : None, "cpu", "gpu" or "cuda:N"
    normalize : {"window", "count"}
        N = window (empty slots count as zero gradients) or N = number held.
    refresh_every : int, optional
        Rebuild the m x m state exactly from the Gram matrix every this many updates
        (default ``window``).
    engine : {"auto", "cholesky", "explicit"}
        The m x m engine (as the single-device window's).
    check_every : int, optional
        Compare a 64-bit digest of the replicated state over the ranks every this many
        updates (one all-reduce of 4 P numbers); a mismatch raises
        :class:`~mfac_linalg.distributed.ReplicaDivergenceError` on every rank.
        Default: never (call :meth:`check_replicas` yourself).
    check_finite : bool
        Check vector slices for NaN/inf (gradients are always checked).

    Costs (per rank, n held <= m)
    -----
    ``step`` O(d_p m + m²) and two all-reduces (m + P and P numbers); ``update`` the
    same per gradient after a P-number agreement on the number of rows;
    ``matvec`` O(d_p n + n²) and one of n + P; ``matmat`` adds a P-number agreement
    of k; ``quad`` likewise; ``entry`` O(n²), one all-reduce of 2 m + 3 P;
    ``diagonal`` O(d_p n²), local; ``logdet`` O(n); ``refresh`` O(d_p m² + m³) and
    one all-reduce of m²; ``todense`` one all-reduce of n d.  Memory: the local buffer
    (m x d_p) and the engine's m x m float64 matrices.

    Examples
    --------
    >>> import numpy as np
    >>> import mfac_linalg as ml
    >>> from mfac_linalg.distributed import ShardedSlidingWindowInverseFisher
    >>> rng = np.random.default_rng(0)
    >>> w = ShardedSlidingWindowInverseFisher(12, 3, 0.1, None, dtype="float64")
    >>> ref = ml.SlidingWindowInverseFisher(dim=12, window=3, damping=0.1, dtype="float64")
    >>> for _ in range(5):
    ...     g = rng.standard_normal(12)
    ...     y, y_ref = w.step(g), ref.step(g)
    >>> bool(np.allclose(y, y_ref, rtol=1e-12, atol=0)), w.count
    (True, 3)
    """

    def __init__(self, local_dim, window, damping, comm=None, *, layout=None,
                 dtype="float32", device=None, normalize="window", refresh_every=None,
                 engine="auto", check_every=None, check_finite=True):
        comm, layout, err = self._setup_comm(comm, layout)
        self._comm = comm
        self._backend = B.CPU
        vals = [0.0] * 13
        try:
            if err is not None:
                raise err
            local_dim = V.integer(local_dim, "local_dim", minimum=0)
            window = V.positive_int(window, "window")
            normalize = V.choice(normalize, "normalize", _NORMALIZE)
            engine = V.choice(engine, "engine", _ENGINES)
            be = B.backend_for_device(device)
            storage = _storage_name(dtype, be)
            make_buffer, pick_engine = _parts()
            buf = make_buffer(window, local_dim, storage, be)
            lam = V.damping(damping, dtype=buf.compute_dtype)
            refresh_every = window if refresh_every is None else V.positive_int(
                refresh_every, "refresh_every")
            check_every = None if check_every is None else V.positive_int(check_every,
                                                                          "check_every")
            check_finite = V.boolean(check_finite, "check_finite")
            self._backend = be
            vals = [window, local_dim, _STORAGE_CODE[storage], lam,
                    float(layout is not None), *layout_digest(layout),
                    _NORMALIZE.index(normalize), _ENGINES.index(engine), refresh_every,
                    check_every or 0]
        except Exception as exc:
            err = exc
        table = self._header(vals, err, "ShardedSlidingWindowInverseFisher set-up")
        layout = agree_setup(comm, table, layout=layout, what="ShardedSlidingWindowInverseFisher",
                             name="local_dim", labels={"m": "window", "dtype": "dtype"})
        for c, key in enumerate(("normalize", "engine", "refresh_every", "check_every"), 9):
            if len(set(table[:, c].tolist())) != 1:
                raise ValueError(f"ShardedSlidingWindowInverseFisher: {key} must be the same on "
                                 "every rank (the m x m state is replicated)")
        err = None
        try:
            eng = pick_engine(be, storage, normalize, engine, window=window)
        except Exception as exc:
            err = exc
        agree(comm, err, "ShardedSlidingWindowInverseFisher set-up")
        self._init_sharded(comm, layout, buf.compute_dtype, be, check_finite=check_finite)
        self._m, self._damping, self._normalize = window, lam, normalize
        self._refresh_every, self._check_every = refresh_every, check_every
        self._engine_choice = engine
        self._buf = buf
        self._eng = eng
        self._count = self._since_refresh = 0
        self._eng.rebuild(self._eng.K, 0, self._shift(0))

    @classmethod
    def from_local_gradients(cls, local_grads, damping, comm=None, *, window=None, **kwargs):
        """A full window from this rank's columns of its gradients, in one set-up.

        Collective: the rows are written locally, then one all-reduce of the m x m Gram
        matrix and one exact O(m³) build of the replicated state (no m updates).

        Parameters
        ----------
        local_grads : array_like (m, d_p), or an iterator of (k, d_p) row blocks
            This rank's columns of the gradients, oldest first (an iterator bounds the
            extra memory; then ``window`` gives the total number of rows).
        damping : float
        comm : as for the constructor
        window : int, optional
            m; required with an iterator.
        **kwargs
            The constructor's keywords; ``dtype`` defaults to the gradients' dtype and
            ``device`` to where they live.

        Returns
        -------
        ShardedSlidingWindowInverseFisher

        Examples
        --------
        >>> import numpy as np
        >>> from mfac_linalg.distributed import ShardedSlidingWindowInverseFisher as SW
        >>> G = np.random.default_rng(1).standard_normal((3, 8))
        >>> w = SW.from_local_gradients(G, 0.5)
        >>> (w.count, w.window, w.storage_dtype)
        (3, 3, 'float64')
        """
        blocks = local_grads if isinstance(local_grads, collections.abc.Iterator) else None
        first = next(blocks) if blocks is not None else local_grads
        arr, be = B.asarray(first, "local_grads", allow_half=True)
        err = None
        try:
            if arr.ndim != 2:
                raise ValueError(f"local_grads must be 2-D (m, d_p); got shape "
                                 f"{tuple(arr.shape)}")
            m = arr.shape[0] if blocks is None else V.positive_int(window, "window")
            d_p = arr.shape[1]
        except Exception as exc:
            err, m, d_p = exc, 1, 0
        kwargs.setdefault("dtype", arr.dtype.name)
        kwargs.setdefault("device", be)
        if err is not None:         # every rank must still meet the set-up's collectives
            comm = as_comm(comm)
            ShardedOperator._header(_Shell(comm), [0.0] * 13, err, "from_local_gradients")
        w = cls(d_p, m, damping, comm, **kwargs)
        Kp = None
        try:
            r = w._buf.write_rows(0, arr)
            for b in (blocks or ()):
                r = w._buf.write_rows(r, B.asarray(b, "local_grads", backend=w._backend,
                                                   allow_half=True)[0])
            if r != m:
                raise ValueError(f"local_grads must hold window={m} rows; got {r}")
            Kp = w._buf.gram(m)
        except Exception as exc:
            err = exc
        if err is not None:
            w._buf.reset()
        K = w._flagged_sum(Kp, m * m, err, "from_local_gradients").reshape(m, m)
        V.gram_finite(K, "local_grads", w._backend)
        w._eng.rebuild(K, m, w._shift(m))
        w._count = m
        return w

    # -- state ----------------------------------------------------------------------------
    count = property(lambda self: self._n(), doc="Number of gradients held (0 .. window).")
    total = property(lambda self: self._count, doc="Gradients added since construction or reset.")
    window = property(lambda self: self._m, doc="m, the capacity of the window.")
    damping = property(lambda self: self._damping, doc="λ.")
    normalize = property(lambda self: self._normalize, doc='"window" or "count".')
    refresh_every = property(lambda self: self._refresh_every, doc="Updates between refreshes.")
    storage_dtype = property(lambda self: self._buf.name, doc="The local buffer's dtype name.")
    engine = property(lambda self: self._eng.kind, doc='The m x m engine: "cholesky" or "explicit".')

    def _n(self):
        return min(self._count, self._m)

    def _N(self, n):
        return self._m if self._normalize == "window" else max(n, 1)

    def _shift(self, n):
        return self._N(n) * self._damping

    def _repr_fields(self):
        return super()._repr_fields() + [
            f"m={self._m}", f"held={self._n()}", f"damping={self._damping:.0e}",
            f"normalize={self._normalize}", f"engine={self._eng.kind}"]

    def _replicated(self):
        F, logdet_C = self._eng.export()
        meta = np.array([self._count, self._since_refresh, self._eng.n, self._eng.start,
                         self._eng.shift, logdet_C], dtype=np.float64)
        return [self._eng.K, F, meta]

    def gradients(self):
        """This rank's columns of the held gradients in arrival order, a copy (n x d_p).
        Local."""
        return self._buf.rows(self._eng.perm())

    def reset(self):
        """Forget every gradient.  Local, but every rank must call it (the m x m state
        is replicated: a reset on one rank only is a divergence)."""
        self._buf.reset()
        _, pick_engine = _parts()
        self._eng = pick_engine(self._backend, self._buf.name, self._normalize,
                                self._engine_choice, window=self._m)
        self._count = self._since_refresh = 0
        self._eng.rebuild(self._eng.K, 0, self._shift(0))

    def refresh(self):
        """Rebuild the replicated state exactly from the ranks' buffers: the Gram matrix
        all-reduced afresh (one all-reduce of m² numbers), then O(m³).  Collective and
        atomic.  Also repairs a divergence of the replicated state.  Returns self."""
        n, m = self._n(), self._m
        err, Kp = None, None
        try:
            Kp = self._buf.gram(n)
        except Exception as exc:
            err = exc
        K = self._flagged_sum(Kp, m * m, err, "refresh").reshape(m, m)
        V.gram_finite(K, "the gradients", self._backend)
        self._eng.rebuild(K, n, self._shift(n), self._eng.start)
        self._since_refresh = 0
        return self

    # -- updates ------------------------------------------------------------------------------
    def _rows(self, g, one):
        """This rank's rows (k, d_p) as stored; never raises (returns the error)."""
        try:
            arr, _ = B.asarray(g, "g", backend=self._backend)
            if one and (arr.ndim != 1 or arr.shape[0] != self._d):
                raise ValueError(f"g must have shape ({self._d},) for step on rank "
                                 f"{self._comm.rank}; got shape {tuple(arr.shape)}")
            rows = arr[None, :] if arr.ndim == 1 else arr
            if rows.ndim != 2 or rows.shape[1] != self._d:
                raise ValueError(f"g must be (local_dim,) or (k, local_dim) with local_dim="
                                 f"{self._d} on rank {self._comm.rank}; got shape "
                                 f"{tuple(arr.shape)}")
            out = self._buf.prepare(rows)
            if self._buf.fused:     # the CUDA buffer defers the check to its kernel, and
                V.finite(out, "g", self._backend)    # that flag would be read after the
            return arr.dtype, out, None              # ranks agreed: check it here
        except Exception as exc:
            return None, None, exc

    def _push(self, row, err, *, want_y=False, rebuild=False, defer=False):
        """One collective transaction (the class docstring's four stages)."""
        m = self._m
        slot, rows = self._count % m, min(self._n() + 1, m)
        buf, eng = self._buf, self._eng
        w = None
        if err is None:
            try:
                w = buf.begin(slot, row, rows, lam=self._damping, want_y=want_y, check=False)
            except Exception as exc:
                err = exc
        try:
            u = self._flagged_sum(None if w is None else w.u, m, err, "update")
        except BaseException:
            if w is not None:
                buf.undo(w)
            raise
        p, y, err = None, None, None
        try:
            w.u[...] = u
            V.gram_finite(u, "g", self._backend)     # replicated: every rank decides alike
            p = eng.replace(slot, w.u, self._shift(rows), defer=defer, status=w.status,
                            rebuild=rebuild or self._since_refresh >= self._refresh_every)
            if want_y:
                y = buf.finish_step(w, eng.coefficients(p, buf.coef_dtype), p.n, self._damping)
        except Exception as exc:
            err = exc
        try:
            agree(self._comm, err, "update")
            ok = eng.commit(p)
        except BaseException:
            if p is not None:
                eng.rollback(p)
            buf.undo(w)
            raise
        self._count += 1
        self._since_refresh = 0 if p.rebuilt else self._since_refresh + 1
        return y if ok else None, w

    def _after_update(self, before):
        ce = self._check_every
        if ce and self._count // ce != before // ce:
            self.check_replicas()

    def update(self, g):
        """Add this rank's slice of one gradient (d_p,) or of a batch (k, d_p), evicting
        the oldest.  Collective; atomic on every rank (on any error on any rank, every
        window is bit for bit as before).  O(d_p m + m²) and two all-reduces per gradient,
        after one of P numbers agreeing on the number of rows.  Returns self."""
        before = self._count
        _, rows, err = self._rows(g, False)
        tab = self._header([0 if rows is None else rows.shape[0]], err, "update")
        ks = [int(v) for v in tab[:, 0]]
        if len(set(ks)) != 1:
            raise ValueError(f"g must hold the same number of gradients on every rank; got "
                             f"{ks} (rank order)")
        k = ks[0]
        if k == 1:
            self._push(rows[0], None)
        else:
            defer = (self._normalize == "count" and self._n() < self._m) or 4 * k > self._m
            snap = (self._buf.snapshot(), self._eng.snapshot(), self._count,
                    self._since_refresh)
            try:
                for i in range(k):
                    last = i == k - 1
                    self._push(rows[i], None, defer=defer and not last, rebuild=defer and last)
            except BaseException:
                self._buf.restore(snap[0])
                self._eng.restore(snap[1])
                self._count, self._since_refresh = snap[2], snap[3]
                raise
        self._after_update(before)
        return self

    def step(self, g):
        """``update(g)`` then return this rank's slice of F⁻¹ g, fused: two passes over the
        local buffer, one all-reduce of m + P numbers and one of P flags.  Collective and
        atomic.  ``g`` is this rank's slice (d_p,); the result has its dtype."""
        before = self._count
        out_dtype, rows, err = self._rows(g, True)
        y, w = self._push(None if rows is None else rows[0], err, want_y=True)
        if y is None:           # the engine rebuilt exactly at its commit (replicated)
            x = w.x[:self._d].astype(self._dtype, copy=False)
            y = self._collective_matmat(x[:, None], 1, None, "step")[:, 0]
        self._after_update(before)
        return y.astype(out_dtype, copy=False)

    # -- collective hooks -----------------------------------------------------------------------
    def _project(self, X, k, err, extra=None):
        """U = G_h X summed over ranks (n x k float64), optionally with one extra row."""
        n = self._n()
        rows = n + (0 if extra is None else 1)
        payload = None
        if err is None:
            try:
                xp = self._backend.xp
                U = self._buf.project(X, n) if n else xp.zeros((0, k), dtype=np.float64)
                payload = U if extra is None else xp.concatenate([U, extra(X)])
            except Exception as exc:
                err = exc
        return self._flagged_sum(payload, rows * k, err, "ShardedSlidingWindowInverseFisher")\
            .reshape(rows, k)

    def _fused_vector(self, X, err):
        """The CUDA buffer's fused pass 1 for one vector (no float32 copy of a 16-bit
        buffer): u = G_h x all-reduced into the workspace, and y = x / λ.  Returns (u, y)."""
        n, m = self._n(), self._m
        u = y = None
        if err is None:
            try:
                u, y = self._buf.start_vector(X[:, 0], n, self._damping, False)
            except Exception as exc:
                err = exc
        us = self._flagged_sum(u, m, err, "ShardedSlidingWindowInverseFisher")
        u[...] = us
        return u, y

    def _collective_matmat(self, X, k, err, what):
        n = self._n()
        if self._buf.fused and k == 1 and n:
            u, y = self._fused_vector(X, err)
            y = self._buf.combine_vector(y, self._eng.solve32(u), n, self._damping)
            return y[:, None].astype(X.dtype, copy=False)
        U = self._project(X, k, err)
        if n == 0:
            return X * (1.0 / self._damping)
        return self._buf.combine(X, self._eng.solve(U), n, self._damping)

    def _collective_quad(self, X, k, err):
        xp = self._backend.xp
        n = self._n()
        if self._buf.fused and k == 1 and n:
            xx = self._flagged_sum(None if err else xp.einsum("ij,ij->j", X, X).astype(
                np.float64), 1, err, "quad")
            u, _ = self._fused_vector(X, None)
            return (xx - self._eng.inner(u[:n, None])) / self._damping
        S = self._project(X, k, err, extra=lambda X_: xp.einsum(
            "ij,ij->j", X_, X_).astype(np.float64)[None, :])
        U, xx = S[:-1], S[-1]
        if n:
            xx = xx - self._eng.inner(U)
        return xx / self._damping

    def _collective_entry(self, i, j, err):
        n = self._n()
        gi, gj = self._pair_columns(lambda c: self._buf.columns([c], n)[:, 0], i, j, err, n)
        val = 1.0 if i == j else 0.0
        if n:
            val -= B.scalar(gi @ self._eng.solve(gj[:, None])[:, 0])
        return val / self._damping

    def _collective_todense(self):
        xp = self._backend.xp
        n, d = self._n(), self._dglobal
        Gh = self._gather_rows(self._buf.columns(slice(0, self._d), n), n, "todense")
        A = -(Gh.T @ self._eng.solve(Gh)) if n else xp.zeros((d, d))
        A[xp.diag_indices(d)] += 1.0
        A *= 1.0 / self._damping
        return A.astype(self._dtype, copy=False)

    # -- local ------------------------------------------------------------------------------------
    def _diagonal(self, chunk=4096):
        """1/λ − Σ_i g_i (C⁻¹ G_h)_i / λ on the local columns, in chunks: O(d_p n²)."""
        out = self._backend.xp.full(self._d, 1.0 / self._damping, dtype=self._dtype)
        n = self._n()
        for a, b, Gc in (self._buf.column_chunks(n, chunk) if n else ()):
            out[a:b] -= (self._eng.inner(Gc) / self._damping).astype(self._dtype)
        return out

    def logdet(self):
        r"""log det F = d log λ + log det C − n log(N λ) (determinant lemma).  O(n), local."""
        n = self._n()
        ld = self._dglobal * math.log(self._damping)
        return ld + (self._eng.logdet() - n * math.log(self._shift(n)) if n else 0.0)

    # -- the forward F -------------------------------------------------------------------------------
    def fisher(self):
        """The forward F = λI + G_hᵀG_h/N on the same shards, a live view that follows later
        updates (a :class:`~mfac_linalg.distributed.ShardedFisherOperator`)."""
        return ShardedFisherOperator(self)

    def inverse(self):
        """F, the inverse of this F⁻¹ (``fisher()``)."""
        return self.fisher()

    def _fisher_matmat(self, X, k, err):
        """F X = λX + G_hᵀ (G_h X) / N: pass 1 all-reduced, pass 2 local."""
        n, lam = self._n(), self._damping
        U = self._project(X, k, err)
        if n == 0:
            return X * lam
        # combine(X, C, n, l) is (X - G_hᵀ C) / l: l = 1/λ and C = -U/(Nλ) give λX + G_hᵀU/N
        return self._buf.combine(X, U * (-1.0 / (self._N(n) * lam)), n, 1.0 / lam)

    def _fisher_quad(self, X, k, err):
        xp = self._backend.xp
        S = self._project(X, k, err, extra=lambda X_: xp.einsum(
            "ij,ij->j", X_, X_).astype(np.float64)[None, :])
        U = S[:-1]
        return self._damping * S[-1] + xp.einsum("ij,ij->j", U, U) / self._N(self._n())

    def _fisher_entry(self, i, j, err):
        n = self._n()
        gi, gj = self._pair_columns(lambda c: self._buf.columns([c], n)[:, 0], i, j, err, n)
        return B.scalar(gi @ gj) / self._N(n) + (self._damping if i == j else 0.0)

    def _fisher_diagonal(self):
        """λ + Σ_i g_i² / N on the local columns: one local pass, O(d_p n)."""
        out = self._backend.xp.full(self._d, self._damping, dtype=self._dtype)
        n = self._n()
        if n:
            out += (self._buf.sq_colsum(n) / self._N(n)).astype(self._dtype)
        return out

    def _fisher_todense(self):
        xp = self._backend.xp
        n, d = self._n(), self._dglobal
        Gh = self._gather_rows(self._buf.columns(slice(0, self._d), n), n, "todense")
        A = Gh.T @ Gh * (1.0 / self._N(n)) if n else xp.zeros((d, d))
        A[xp.diag_indices(d)] += self._damping
        return A.astype(self._dtype, copy=False)

    # -- checkpoints (one per rank) ------------------------------------------------------------------
    def state_dict(self):
        """This rank's state as host arrays and plain data (a copy), the layout recorded.
        Local."""
        F, logdet_C = self._eng.export()
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "rank": self._comm.rank, "size": self._comm.size,
            "layout": self._layout.to_dict(), "window": self._m, "damping": self._damping,
            "normalize": self._normalize, "dtype": self._buf.name,
            "refresh_every": self._refresh_every, "engine": self._eng.kind,
            "count": self._count, "since_refresh": self._since_refresh,
            "start": int(self._eng.start), "logdet_C": float(logdet_C),
            "G": self._buf.host_rows(), "K": np.array(B.to_host(self._eng.K), copy=True),
            "F": F,
        }

    def _validate_state(self, state):
        """Check a state against this window (layout, rank, shapes, values); a clean copy."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict; got {type(state).__name__}")
        keys = ("format", "format_version", "rank", "size", "layout", "window", "damping",
                "normalize", "dtype", "refresh_every", "engine", "count", "since_refresh",
                "start", "logdet_C", "G", "K", "F")
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"state is missing {missing}")
        if state["format"] != FORMAT or int(state["format_version"]) != FORMAT_VERSION:
            raise ValueError(f"state must be a {FORMAT} checkpoint of version {FORMAT_VERSION}; "
                             f"got {state['format']!r} version {state['format_version']}")
        layout = ColumnLayout.from_dict(state["layout"])
        if layout != self._layout:
            raise ValueError(f"state was saved under another column layout ({layout!r}, "
                             f"fingerprint {layout.fingerprint()}); this window's is "
                             f"{self._layout!r} ({self._layout.fingerprint()}): load it with the "
                             "layout it was saved with")
        for key, mine in (("rank", self._comm.rank), ("size", self._comm.size),
                          ("window", self._m), ("dtype", self._buf.name),
                          ("engine", self._eng.kind)):
            if state[key] != mine:
                raise ValueError(f"state: {key}={state[key]!r} does not match this window's "
                                 f"{key}={mine!r}")
        st = dict(state)
        st["damping"] = V.damping(float(state["damping"]), "state damping",
                                  dtype=self._buf.compute_dtype)
        st["normalize"] = V.choice(state["normalize"], "state normalize", _NORMALIZE)
        st["refresh_every"] = V.positive_int(int(state["refresh_every"]), "state refresh_every")
        m = self._m
        for k in ("count", "since_refresh", "start"):
            st[k] = V.integer(int(state[k]), f"state {k}", minimum=0)
        n = min(st["count"], m)
        if st["start"] != (st["count"] - n) % m:
            raise ValueError(f"state: start={st['start']} does not match count={st['count']}")
        raw = np.asarray(self._buf.host_rows()).dtype
        for k, shape, dt in (("G", (m, self._d), raw), ("K", (m, m), np.float64),
                             ("F", (m, m), np.float64)):
            a = np.asarray(B.to_host(state[k]))
            if a.shape != shape or a.dtype != dt:
                raise ValueError(f"state: {k} must be {np.dtype(dt).name} of shape {shape}; got "
                                 f"{a.dtype.name} of shape {a.shape}")
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                raise ValueError(f"state: {k} holds NaN or infinity")
            st[k] = a
        st["logdet_C"] = V.real(float(state["logdet_C"]), "state logdet_C")
        return st

    def load_state_dict(self, state):
        """Restore every rank's state (each rank passes its own).  Collective: every rank
        validates its state (a layout other than this window's is refused), the ranks
        agree, then load, then compare digests of the replicated state.  Nothing changes
        on any rank if any rank's state is refused.  Returns self."""
        err, st = None, None
        try:
            st = self._validate_state(state)
        except Exception as exc:
            err = exc
        return self._load(st, err)

    def _load(self, st, err):
        agree(self._comm, err, "load_state_dict")
        _, pick_engine = _parts()
        eng = pick_engine(self._backend, self._buf.name, st["normalize"],
                          self._engine_choice, window=self._m)
        n = min(st["count"], self._m)
        shift = (self._m if st["normalize"] == "window" else max(n, 1)) * st["damping"]
        eng.load(st["K"], st["F"], n, shift, st["start"], st["logdet_C"])
        old = (self._eng, self._buf.snapshot(), self._count, self._since_refresh,
               self._damping, self._normalize, self._refresh_every)
        self._eng = eng
        self._buf.load(st["G"])
        self._damping, self._normalize = st["damping"], st["normalize"]
        self._refresh_every = st["refresh_every"]
        self._count, self._since_refresh = st["count"], st["since_refresh"]
        try:
            self.check_replicas()
        except BaseException:
            (self._eng, snap, self._count, self._since_refresh, self._damping,
             self._normalize, self._refresh_every) = old
            self._buf.restore(snap)
            raise
        return self

    def save(self, path):
        """Write this rank's state to ``path`` (an ``.npz``; no pickles), atomically: a
        temporary file in the same folder, then a rename.  Local.  Returns the path."""
        path = V.path(path, "path")
        st = self.state_dict()
        arrays = {k: np.asarray(st[k]) for k in ("G", "K", "F")}
        meta = {k: v for k, v in st.items() if k not in arrays}
        arrays["meta"] = np.array(json.dumps(meta))
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    @staticmethod
    def read_state(path):
        """The state dict of a file written by :meth:`save` (``allow_pickle=False``)."""
        path = V.path(path, "path")
        try:
            with np.load(path, allow_pickle=False) as f:
                raw = {k: f[k] for k in f.files}
            meta = json.loads(str(raw.pop("meta")))
        except FileNotFoundError:
            raise
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
            raise ValueError(f"cannot read a sharded-window checkpoint from {path}: {exc}") \
                from None
        if not isinstance(meta, dict):
            raise ValueError(f"{path}: the metadata is not a dict")
        meta.update(raw)
        return meta

    def load(self, path):
        """Load this rank's checkpoint file into the window.  Collective (see
        :meth:`load_state_dict`); a file saved under another layout is refused."""
        err, st = None, None
        try:
            st = self._validate_state(self.read_state(path))
        except Exception as exc:
            err = exc
        return self._load(st, err)

    def digest(self):
        """The 64-bit digest of the replicated state (hex), the same on every rank while
        the replicas agree.  Local."""
        return state_digest(*self._replicated()).astype(np.uint16).tobytes().hex()

