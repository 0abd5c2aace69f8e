"""The column-sharded sliding window (docs/math.md §2 and §6)."""
from __future__ import annotations

import contextlib

import numpy as np

from .. import _backend as B
from .. import _validate as V
from ..sliding.window import SlidingWindowInverseFisher as _Single
from ..sliding.window import first_block, window_rows
from ._base import ShardedOperator
from ._window_checkpoint import FORMAT, FORMAT_VERSION, NORMALIZE as _NORMALIZE  # noqa: F401
from ._window_checkpoint import _WindowCheckpointing
from ._window_query import _WindowQueries
from ._window_update import _WindowUpdates
from .comm import agree, as_comm
from .sharded import agree_setup, layout_digest

__all__ = ["ShardedSlidingWindowInverseFisher"]
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


class ShardedSlidingWindowInverseFisher(_WindowUpdates, _WindowQueries, _WindowCheckpointing,
                                        ShardedOperator):
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
    accumulate : {"auto", "float32", "float64"}
        The accumulator of this rank's passes (as the single-device window's; it may
        differ between ranks: u is all-reduced, the replicated state stays identical).
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
                 engine="auto", check_every=None, check_finite=True, accumulate="auto"):
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
            buf = make_buffer(window, local_dim, storage, be, accumulate)
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
                             name="local_dim", labels={"m": "window", "dtype": "dtype"},
                             dtype_codes=_STORAGE_CODE)
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
            m; required with an iterator; with one array, the number of its rows (or
            None).
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
        blocks = arr = be = None
        err = None
        try:                    # every local check inside: a failure still meets the
            blocks, arr, be = first_block(local_grads, "local_grads", "d_p")   # collectives
            if arr.ndim != 2:
                raise ValueError(f"local_grads must be 2-D (m, d_p); got shape "
                                 f"{tuple(arr.shape)}")
            m = window_rows(arr, blocks, window, "local_grads")
            d_p = arr.shape[1]
        except Exception as exc:
            err, m, d_p = exc, 1, 0
        if err is not None:         # every rank must still meet the set-up's collectives
            comm = as_comm(comm)
            ShardedOperator._header(_Shell(comm), [0.0] * 13, err, "from_local_gradients")
        kwargs.setdefault("dtype", arr.dtype.name)
        kwargs.setdefault("device", be)
        w = cls(d_p, m, damping, comm, **kwargs)
        Kp = None
        try:
            r = w._buf.write_rows(0, arr, "local_grads")
            for b in (blocks or ()):
                r = w._buf.write_rows(r, B.asarray(b, "local_grads", backend=w._backend,
                                                   allow_half=True)[0], "local_grads")
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

    # -- state: the single-device window's, on the same attributes -----------------------------
    count, total, window = _Single.count, _Single.total, _Single.window
    normalize, refresh_every, engine = _Single.normalize, _Single.refresh_every, _Single.engine
    damping = property(lambda self: self._damping, doc="λ.")
    storage_dtype = property(lambda self: self._buf.name, doc="The local buffer's dtype name.")
    _n, _N, _shift = _Single._n, _Single._N, _Single._shift
    # the shared methods take the single-device window's lock: here a no-op (every call on
    # a rank is one of that rank's collectives, made from one thread)
    _lock = contextlib.nullcontext()

    def _new_engine(self, normalize):
        """A fresh m x m engine for this window's storage, engine choice and ``normalize``."""
        _, pick_engine = _parts()
        return pick_engine(self._backend, self._buf.name, normalize, self._engine_choice,
                           window=self._m)

    def _repr_fields(self):
        return super()._repr_fields() + [
            f"m={self._m}", f"held={self._n()}", f"damping={self._damping:.0e}",
            f"normalize={self._normalize}", f"engine={self._eng.kind}"]

    def _replicated(self):
        F, logdet_C = self._eng.export()
        # the settings that steer later updates too (a checkpoint of another rank's
        # settings must not load: the replicas would part at the next refresh or reset)
        meta = np.array([self._count, self._since_refresh, self._eng.n, self._eng.start,
                         self._eng.shift, logdet_C, self._damping,
                         _NORMALIZE.index(self._normalize), self._refresh_every],
                        dtype=np.float64)
        return [self._eng.K, F, meta]

    def gradients(self):
        """This rank's columns of the held gradients in arrival order, a copy (n x d_p).
        Local."""
        return self._buf.rows(self._eng.perm())

    def reset(self):
        """Forget every gradient.  Local, but every rank must call it (the m x m state
        is replicated: a reset on one rank only is a divergence)."""
        self._buf.reset()
        self._eng = self._new_engine(self._normalize)
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
