"""M-FAC sliding window: the inverse Fisher of the last m gradients, O(dm + m^2) per update."""
from __future__ import annotations

import collections.abc
import math
import threading

import numpy as np

from .. import _backend as B
from .. import _validate as V
from .._capacitance import ENGINES, pick_engine
from .._operator import NonFiniteInput, Operator
from ..static import FisherOperator
from . import checkpoint as ckpt
from .buffer import ACCUMULATE, make_buffer

__all__ = ["SlidingWindowInverseFisher"]


class SlidingWindowInverseFisher(ckpt.Checkpointing, Operator):
    r"""Inverse of the damped empirical Fisher over the last ``window`` gradients.

    Represents :math:`F^{-1}` for

    .. math:: F = \lambda I + \frac{1}{N} \sum_{i \in \text{held}} g_i g_i^T,

    with N = ``window`` (``normalize="window"``, the published convention: empty
    slots count as zero gradients) or N = the number n of gradients held
    (``normalize="count"``).  A ring buffer G (window x dim, storage dtype) holds
    the gradients; with the capacitance C = N lambda I + G_h G_h^T (float64),

    .. math:: F^{-1} x = (x - G_h^T C^{-1} G_h x) / \lambda

    (docs/math.md §1-§2): two passes over the buffer and an m x m solve.  An m x m
    *engine* keeps C^{-1} current: a Cholesky factor in arrival order, updated by a
    rank-one deletion and an append per gradient, or (GPU, 32/16-bit storage,
    ``normalize="window"``) the explicit inverse updated by a Schur-complement
    deletion and insertion;
    an exact refactorisation every ``refresh_every`` updates bounds the drift.

    Parameters
    ----------
    dim : int
        d, the gradient dimension.
    window : int
        m >= 1, the number of gradients kept.
    damping : float
        lambda, inside ``mfac_linalg._validate.damping_range`` of the result dtype.
    dtype : {"float32", "float64"} (and "float16", "bfloat16" on the GPU)
        Storage dtype of the buffer (the m x m work is float64; results float64 for
        float64 storage, float32 otherwise).
    device : None, "cpu", "gpu" or "cuda:N"
    normalize : {"window", "count"}
    refresh_every : int, optional
        Rebuild C exactly from the Gram matrix every this many incremental updates
        (default ``window``); amortised O(m^2) per update.
    check_finite : bool
        Check vectors for NaN/inf in ``matvec`` and friends (gradients are always
        checked, after the cast to the storage dtype, and so is their Gram row).
    engine : {"auto", "cholesky", "explicit"}
        The m x m scheme (``mfac_linalg._capacitance.pick_engine``).
    accumulate : {"auto", "float32", "float64"}
        The accumulator of the passes over float32 or 16-bit storage (docs/math.md §7).
        "float64": every product of stored values is exact in float64, the sums and
        x - G_h^T c are float64 and the result is rounded once, so the error is the
        final float32 rounding plus about 1e-16 κ (κ = λ_max(F)/λ), against about
        6e-8 κ in float32 (1 % at κ = 1e5: small damping).  "auto" is "float64" for
        float32 storage on a GPU with fast float64 (H100, H200, A100, V100, P100: one
        float64 FMA per stored value stays within the memory-bound passes, 0.7-2.2 %
        slower on an H100 at d = 1e6) and "float32" otherwise: for 16-bit storage (about
        10 % on an H100), on the CPU (1.2-1.7x slower with Numba's compiled passes for one
        vector, else the buffer converted in chunks, 4-6x) and on GPUs with slow float64.  float64 storage always accumulates
        in float64.  A float64-accumulating window takes gradients whose Gram products
        overflow float32.

    Costs (n = gradients held <= m; docs/sliding.md has the table)
    ---------------------------------------------------------------
    ``update``/``step`` O(dim m + m^2), plus O(m^3) when N lambda changes (count,
    filling) or a refresh is due; ``matvec``/``quad`` O(dim n + n^2), ``matmat`` one
    pass for k columns; ``entry`` O(n^2); ``diagonal`` O(dim n^2); ``logdet`` O(n).

    Atomicity and threads
    ---------------------
    An update, step or batch commits, or raises (``ValueError`` naming ``g`` for bad
    shapes, NaN/inf after the cast, overflowing Gram products;
    ``NotPositiveDefinite``) and leaves the window bit for bit as it was.  Queries
    never write shared state; a lock per window serialises calls from threads.

    Examples
    --------
    >>> import numpy as np
    >>> from mfac_linalg import SlidingWindowInverseFisher
    >>> rng = np.random.default_rng(0)
    >>> w = SlidingWindowInverseFisher(50, 4, 0.1, dtype="float64")
    >>> for _ in range(6):
    ...     y = w.step(rng.standard_normal(50))
    >>> w.count, y.shape
    (4, (50,))
    >>> H = w.gradients()
    >>> F = 0.1 * np.eye(50) + H.T @ H / 4
    >>> x = rng.standard_normal(50)
    >>> bool(np.allclose(w.matvec(x), np.linalg.solve(F, x)))
    True
    """

    def __init__(self, dim, window, damping, *, dtype="float32", device=None,
                 normalize="window", refresh_every=None, check_finite=True, engine="auto",
                 accumulate="auto"):
        dim = V.positive_int(dim, "dim")
        window = V.positive_int(window, "window")
        normalize = V.choice(normalize, "normalize", ckpt.NORMALIZE)
        self._engine_choice = V.choice(engine, "engine", ENGINES)
        self._accumulate_choice = V.choice(accumulate, "accumulate", ACCUMULATE)
        be = B.backend_for_device(device)
        buf = make_buffer(window, dim, _storage(dtype, be), be, accumulate)
        self._damping = V.damping(damping, dtype=buf.compute_dtype)
        self._refresh_every = window if refresh_every is None else V.positive_int(
            refresh_every, "refresh_every")
        self._init_operator(dim, buf.compute_dtype, be,
                            check_finite=V.boolean(check_finite, "check_finite"))
        self._m, self._normalize, self._buf = window, normalize, buf
        self._lock = threading.RLock()
        self._fresh_engine()

    def _fresh_engine(self):
        self._count = self._since_refresh = 0
        self._eng = pick_engine(self._backend, self._buf.name, self._normalize,
                                self._engine_choice, window=self._m)
        self._eng.rebuild(self._eng.K, 0, self._shift(0))

    @classmethod
    def from_gradients(cls, G, damping, *, window=None, **kwargs):
        """A full window from its gradients in one O(dim m^2 + m^3) set-up (no m updates).

        ``G``: an (m, dim) array (oldest first), or an iterator of (k, dim) row blocks
        with ``window`` = their total rows (bounded extra memory).  ``dtype`` defaults
        to G's; ``device`` to where G lives; other keywords as the constructor's.

        >>> import numpy as np
        >>> G = np.random.default_rng(1).standard_normal((3, 8))
        >>> w = SlidingWindowInverseFisher.from_gradients(G, 0.5)
        >>> (w.count, w.window, w.storage_dtype)
        (3, 3, 'float64')
        """
        return _from_gradients(cls, G, damping, window, kwargs)

    # -- state -----------------------------------------------------------------------
    count = property(lambda self: self._n(), doc="Number of gradients held (0 .. window).")
    total = property(lambda self: self._count, doc="Gradients added since construction or reset.")
    window = property(lambda self: self._m, doc="m, the capacity of the window.")
    damping = property(lambda self: self._damping, doc="lambda.")
    normalize = property(lambda self: self._normalize, doc='"window" or "count".')
    refresh_every = property(lambda self: self._refresh_every, doc="Updates between refreshes.")
    storage_dtype = property(lambda self: self._buf.name, doc="The buffer's dtype name.")
    engine = property(lambda self: self._eng.kind, doc='The m x m engine: "cholesky" or "explicit".')
    accumulate = property(lambda self: "float64" if self._buf.wide or self._buf.name == "float64"
                          else "float32",
                          doc='The accumulator of the passes: "float32" or "float64".')

    def _n(self):
        return min(self._count, self._m)

    def _shift(self, n):
        return ckpt.shift_of(self._normalize, self._m, n, self._damping)

    def _N(self, n):
        return self._m if self._normalize == "window" else max(n, 1)

    def _repr_fields(self):
        return [f"m={self._m}", f"held={self._n()}", f"damping={self._damping:.0e}",
                f"normalize={self._normalize}", f"engine={self._eng.kind}",
                f"accumulate={self.accumulate}"]

    def gradients(self):
        """The held gradients in arrival order (oldest first), a copy (n x dim); 16-bit
        buffers come back as float32 (the values as stored).  O(dim n)."""
        with self._lock:
            return self._buf.rows(self._eng.perm())

    def reset(self):
        """Forget every gradient (keeps dim, window, damping, dtype, device, engine)."""
        with self._lock:
            self._buf.reset()
            self._fresh_engine()

    def refresh(self):
        """Rebuild the m x m state exactly from the Gram matrix now: O(m^3); atomic."""
        with self._lock:
            self._eng.refresh()
            self._since_refresh = 0
        return self

    # -- updates ------------------------------------------------------------------------
    def _rows(self, g, *, one=False):
        """(g's dtype, g prepared for the buffer): one row (d,) as it is (no views to
        make), else rows (k, d); ``one``: only one row is taken (``step``)."""
        arr, _ = B.asarray(g, "g", backend=self._backend)
        if one and (arr.ndim != 1 or arr.shape[0] != self._d):
            raise ValueError(f"g must have shape ({self._d},) for step; got shape "
                             f"{tuple(arr.shape)}")
        if arr.ndim not in (1, 2) or arr.shape[-1] != self._d:
            raise ValueError(f"g must be (dim,) or (k, dim) with dim={self._d}; got shape "
                             f"{tuple(arr.shape)}")
        # g's NaN/inf check is deferred to its Gram row (buf.check_gram, or the CUDA
        # kernel's flag): no separate pass over g
        return arr.dtype, self._buf.prepare(arr, check=False)

    def _push(self, row, *, want_y=False, rebuild=False, defer=False):
        """One transaction: pass 1 (write g, u = G g), the engine's staged replacement,
        pass 2 if a step, the commit; any error undoes both and re-raises."""
        slot, rows = self._count % self._m, min(self._n() + 1, self._m)
        buf, eng, lam, shift = self._buf, self._eng, self._damping, self._shift(rows)
        rebuild = rebuild or self._since_refresh >= self._refresh_every
        # a full GPU window: the whole update as one CUDA graph where the engine takes it
        graph = None if rebuild or defer else buf.step_graph(eng, rows, lam, shift, want_y)
        if graph is not None:
            p = eng.graph_pending(slot, shift)
            w = buf.launch_graph(graph, slot, row, want_y)      # nothing ran if it raises
            p.u, p.status = w.u, w.status
        else:
            w = buf.begin(slot, row, rows, lam=lam, want_y=want_y)
            try:
                buf.check_gram(w)
                p = eng.replace(slot, w.u, shift, defer=defer, status=w.status,
                                rebuild=rebuild)
            except BaseException:
                buf.undo(w)
                raise
        try:
            y = None
            if graph is not None:
                p.host = graph.status()                 # the one host synchronisation
                y = buf.graph_result(w) if want_y else None
            elif want_y:
                y = buf.finish_step(w, eng.coefficients(p, buf.coef_dtype), p.n, lam)
            ok = eng.commit(p)
        except BaseException:
            eng.rollback(p)
            buf.undo(w)
            raise
        self._count += 1
        self._since_refresh = 0 if p.rebuilt else self._since_refresh + 1
        return y if ok else None, w

    def update(self, g):
        """Add one gradient (dim,) or a batch (k, dim) in order, evicting the oldest.

        O(dim m + m^2) per gradient.  Atomic (class docstring): on any error the
        window is bit for bit as before.  Returns the window.
        """
        with self._lock:
            _, rows = self._rows(g)
            if rows.ndim == 1:
                self._push(rows)
                return self
            if rows.shape[0] == 1:
                self._push(rows[0])
                return self
            push_batch(self, rows, self._push)
        return self

    def step(self, g):
        """``update(g)`` then return F^{-1} g, fused: two passes over the buffer in all.

        ``g`` is one gradient (dim,); the result has g's dtype and namespace.
        """
        with self._lock:
            out_dtype, row = self._rows(g, one=True)
            y, w = self._push(row, want_y=True)
            if y is None:           # a deferred check rebuilt C exactly: recompute
                x = w.x[:self._d].astype(self._dtype, copy=False)
                y = self._matmat(x[:, None])[:, 0]
            return y.astype(out_dtype, copy=False)

    # -- products -------------------------------------------------------------------------
    def _matmat(self, X):
        with self._lock:
            n, lam, buf, eng = self._n(), self._damping, self._buf, self._eng
            if n == 0:
                return X * (1.0 / lam)
            if buf.fused and X.shape[1] == 1:          # kernel path: two kernel passes
                u, pending = buf.start_vector(X[:, 0], n, lam, self._check_finite)
                y = buf.combine_vector(pending, eng.solve_kernel(u, buf.coef_dtype), n, lam)
                if self._check_finite and buf.flagged():
                    raise NonFiniteInput
                return y[:, None].astype(X.dtype, copy=False)
            return buf.combine(X, eng.solve(buf.project(X, n)), n, lam)

    def _checks_own_finite(self, X):
        """The kernel path of one vector flags NaN/inf during its first pass."""
        return self._buf.fused and X.shape[1] == 1 and self._n() > 0

    def _quad(self, X):
        with self._lock:
            X64 = X.astype(np.float64) if self._buf.wide else X    # faithful: float64 x.x
            xx = self._backend.xp.einsum("ij,ij->j", X64, X64).astype(np.float64)
            n = self._n()
            if n:
                xx = xx - self._eng.inner(self._buf.project(X, n))
            return xx / self._damping

    def _diagonal(self, chunk=4096):
        """1/lambda - sum_i g_i (C^{-1} G_h)_i / lambda in column chunks: O(dim n^2)."""
        with self._lock:
            out = self._backend.xp.full(self._d, 1.0 / self._damping, dtype=self._dtype)
            n = self._n()
            for a, b, Gc in (self._buf.column_chunks(n, chunk) if n else ()):
                # 1/lambda - s/lambda in float64, rounded once
                out[a:b] = ((1.0 - self._eng.inner(Gc)) / self._damping).astype(self._dtype)
            return out

    def _entry(self, i, j):
        with self._lock:
            val = 1.0 if i == j else 0.0
            n = self._n()
            if n:
                U = self._buf.columns([i, j], n)
                val -= B.scalar(U[:, 0] @ self._eng.solve(U[:, 1:2])[:, 0])
            return val / self._damping

    # -- inverse-Fisher extras ------------------------------------------------------------
    def logdet(self):
        r"""log det F = d log lambda + log det C - n log(N lambda) (determinant lemma).  O(n)."""
        with self._lock:
            n = self._n()
            ld = self._d * math.log(self._damping)
            return ld + (self._eng.logdet() - n * math.log(self._shift(n)) if n else 0.0)

    def lowrank_batches(self):
        """Yield (columns (1, d), 1/lambda, -1/lambda, V (1, n, d)) with V = L^{-1} G_h in
        the engine's order: F^{-1} = (I - V^T V)/lambda.  A fresh array: O(dim n^2)."""
        with self._lock:
            n, d, lam = self._n(), self._d, self._damping
            if n:
                L, order = self._eng.factor()
                Gh = self._buf.rows(order).astype(np.float64)
                V_ = self._backend.solve_triangular(L, Gh, lower=True).astype(self._dtype)
        if not n:
            V_ = self._backend.xp.zeros((1, d), dtype=self._dtype)
        yield np.arange(d)[None, :], 1.0 / lam, (-1.0 / lam if n else 0.0), V_[None]

    def fisher(self):
        """The forward F (same protocol); a live view that follows later updates."""
        return FisherOperator(self)

    def _fisher_matmat(self, X):
        """F X = lambda X + G_h^T (G_h X) / N: two passes, O(dim n k)."""
        with self._lock:
            Y = X * self._damping
            n = self._n()
            if n:
                Y += self._buf.fisher_product(X, n, self._N(n))
            return Y

    def _fisher_diagonal(self):
        """lambda + sum_i g_i^2 / N: one pass, O(dim n)."""
        with self._lock:
            out = self._backend.xp.full(self._d, self._damping, dtype=self._dtype)
            n = self._n()
            if n:
                out += (self._buf.sq_colsum(n) / self._N(n)).astype(self._dtype)
            return out

    def _fisher_entry(self, i, j):
        """lambda delta_ij + G_h[:, i] . G_h[:, j] / N: O(n)."""
        with self._lock:
            val = self._damping if i == j else 0.0
            n = self._n()
            if n:
                U = self._buf.columns([i, j], n)
                val += B.scalar(U[:, 0] @ U[:, 1]) / self._N(n)
            return val


def first_block(G, name, cols):
    """``(blocks, arr, backend)`` of a ``from_gradients``-style set-up: G one (m, ``cols``)
    array (``blocks`` None) or an iterator of (k, ``cols``) row blocks (``arr`` its
    first).  Raises for an empty iterator."""
    blocks = G if isinstance(G, collections.abc.Iterator) else None
    first = next(blocks, None) if blocks is not None else G
    if blocks is not None and first is None:
        raise ValueError(f"{name} must yield at least one (k, {cols}) row block; got an "
                         "empty iterator")
    arr, be = B.asarray(first, name, allow_half=True)
    return blocks, arr, be


def window_rows(arr, blocks, window, name):
    """m of a ``from_gradients``-style set-up: the rows of one array (``window``, if
    given, must equal them), or ``window`` for an iterator of blocks."""
    if blocks is not None:
        return V.positive_int(window, "window")
    m = arr.shape[0]
    if window is not None and V.positive_int(window, "window") != m:
        raise ValueError(f"window must equal the number of rows of {name} ({m}) when {name} "
                         f"is an array; got window={window} (pass {name}[-window:] for the "
                         "last rows)")
    return m


def _from_gradients(cls, G, damping, window, kwargs):
    """The set-up of :meth:`SlidingWindowInverseFisher.from_gradients`."""
    blocks, arr, be = first_block(G, "G", "dim")
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"G must be 2-D (m, dim) with m, dim >= 1; got shape "
                         f"{tuple(arr.shape)}")
    m = window_rows(arr, blocks, window, "G")
    kwargs.setdefault("dtype", arr.dtype.name)
    kwargs.setdefault("device", be)
    w = cls(arr.shape[1], m, damping, **kwargs)
    with w._lock:
        r = w._buf.write_rows(0, arr)
        for b in (blocks or ()):
            r = w._buf.write_rows(r, B.asarray(b, "G", backend=w._backend,
                                               allow_half=True)[0])
        if r != m:
            raise ValueError(f"G must hold window={m} rows; got {r}")
        K = w._buf.gram(m)
        V.gram_finite(K, "G", w._backend)
        w._eng.rebuild(K, m, w._shift(m))
        w._count = m
    return w


def _storage(dtype, backend):
    """The storage dtype name: float32/float64, and float16/bfloat16 on the GPU."""
    name = getattr(dtype, "name", None) or (dtype.__name__ if isinstance(dtype, type)
                                            else dtype)
    allowed = ("float32", "float64") + (("float16", "bfloat16") if backend.is_gpu
                                        else ())
    if not isinstance(name, str):
        raise TypeError(f"dtype must be one of {allowed}; got {type(dtype).__name__}")
    if name not in allowed:
        extra = "" if backend.is_gpu else " (float16 and bfloat16 storage need the GPU)"
        raise ValueError(f"dtype must be one of {allowed}; got {dtype!r}{extra}")
    return name


def push_batch(win, rows, push):
    """Push the k rows of a batch in order as one transaction, on a window of the
    sliding family (this module's window and ``mfac_linalg.distributed``'s sharded one).

    ``push(row, defer=..., rebuild=...)`` is the window's one-gradient transaction.  When
    the shift N lambda changes along the batch (``normalize="count"`` while filling) or
    the batch is long (4 k > m), the intermediate engine checks are deferred and the last
    push rebuilds the m x m state exactly (O(m^3) once).  Any error restores the buffer,
    the engine and the counters bit for bit and re-raises.
    """
    k = rows.shape[0]
    defer = (win._normalize == "count" and win._n() < win._m) or 4 * k > win._m
    snap = (win._buf.snapshot(), win._eng.snapshot(), win._count, win._since_refresh)
    try:
        for i in range(k):
            last = i == k - 1
            push(rows[i], defer=defer and not last, rebuild=defer and last)
    except BaseException:
        win._buf.restore(snap[0])
        win._eng.restore(snap[1])
        win._count, win._since_refresh = snap[2], snap[3]
        raise
