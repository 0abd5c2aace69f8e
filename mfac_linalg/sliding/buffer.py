"""The ring buffer of the sliding window: m gradients as rows, the two passes over them.

A :class:`RingBuffer` holds G (m x ld, the storage dtype; rows of empty slots are
zero) and computes, over its rows, the only d-sized work of the window
(docs/math.md §2):

* pass 1, ``project(X, n)``: U = G_h X (float64, n x k), and ``begin(slot, g, rows)``:
  write g into ``slot`` and return u = G g, the new Gram row (the same pass);
* pass 2, ``combine(X, C, n, lam)``: Y = (X - G_h^T C) / lambda.

With ``wide`` (``accumulate="float64"`` of the window, docs/math.md §7) the passes
over float32 or 16-bit storage accumulate in float64 and round the result once:
every stored value is exact in float64, so the products are exact, the sums carry
float64 rounding only, and y = (x - G_h^T c) / lambda keeps its digits where it
cancels (small lambda, x near the span of G).

A column-sharded window holds a column block of G on each device and runs the
same two passes on its block, with an all-reduce of U (or u) between them.
The CUDA subclass (:mod:`.cuda_buffer`) fuses them into kernels for float32 and
16-bit storage; :func:`make_buffer` picks.
"""
from __future__ import annotations

import numpy as np

from .. import _threads
from .. import _validate as V

__all__ = ["RingBuffer", "Write", "make_buffer", "KERNEL_STORAGE"]

KERNEL_STORAGE = ("float32", "float16", "bfloat16")
#: the compiled host passes (kernels/host.py) from this many stored values (n dim),
#: on several threads from PARALLEL_MIN
COMPILED_MIN = 1 << 14
PARALLEL_MIN = 1 << 20
#: values of the window's ``accumulate``
ACCUMULATE = ("auto", "float32", "float64")


def resolve_accumulate(accumulate, storage, backend=None):
    """"float32" or "float64": the accumulator of the passes over a buffer of ``storage``.

    float64 storage accumulates in float64 (``accumulate="float32"`` is refused).
    "auto" is float64 for float32 storage on a GPU with fast float64
    (``backend.fast_float64``: H100, H200, A100, ...), where the kernels stay
    memory-bound (measured on an H100: 0.7-2.2 % slower at d = 1e6, docs/benchmarks.md)
    and the error falls from up to 1e4-1e6x to 1x the float32 rounding of the exact
    result; float32 elsewhere: for 16-bit storage (float64 costs 9-11 % there, the
    buffer read being half as long), on the CPU (1.2-1.7x a float32 pass on 2 cores with
    Numba's compiled passes for one vector, else the buffer converted chunk by chunk:
    4-6x) and on GPUs with 1/32-1/64 of the
    float32 rate in float64.
    """
    accumulate = V.choice(accumulate, "accumulate", ACCUMULATE)
    if storage == "float64":
        if accumulate == "float32":
            raise ValueError("accumulate must be 'auto' or 'float64' for float64 storage; "
                             "got 'float32'")
        return "float64"
    if accumulate == "auto":
        fast = storage == "float32" and backend is not None and backend.fast_float64
        return "float64" if fast else "float32"
    return accumulate


class Write:
    """One staged slot write: what :meth:`RingBuffer.undo` restores, and pass 1's output.

    ``u``: the new Gram row (float64, length m); ``x``: the gradient as stored (float);
    ``y``: the fused step's output in progress (CUDA), ``status``: device flags (CUDA)."""

    __slots__ = ("slot", "old", "u", "x", "y", "status")

    def __init__(self, slot, old, u, x, y=None, status=None):
        self.slot, self.old, self.u, self.x, self.y, self.status = slot, old, u, x, y, status


class RingBuffer:
    """m rows of ``dim`` values in the storage dtype (float32 or float64), any backend.

    Costs: ``begin`` O(dim rows) (one pass), ``project``/``combine`` O(dim n k),
    ``columns`` O(n), ``gram`` O(dim n^2).  Memory: m x dim plus one row (undo).
    """

    fused = False                     # no fused one-vector kernels
    wide_chunk = 1 << 18              # float64 values per converted column chunk (wide)
    coef_dtype = np.float64           # what combine wants for C

    def __init__(self, window, dim, storage, backend, wide=False):
        self.m, self.d, self.ld = int(window), int(dim), int(dim)
        self.storage = np.dtype(storage)
        self.name = self.storage.name
        self.backend = backend
        self.wide = bool(wide) and self.storage != np.float64
        self._old = None                  # the row an update replaces (for undo)
        with backend.device_context():
            self.G = backend.xp.zeros((self.m, self.ld), dtype=self.storage)

    @property
    def compute_dtype(self):
        """float64 for float64 storage, float32 otherwise (the window's result dtype)."""
        return np.dtype(np.float64 if self.storage == np.float64 else np.float32)

    # -- rows in --------------------------------------------------------------------
    def prepare(self, rows, check=True, name="g"):
        """Rows (k, dim) cast to what the buffer stores; finiteness checked after the
        cast (a finite float64 value can overflow float32)."""
        with np.errstate(over="ignore"):    # an overflow is refused just below
            out = rows.astype(self.storage, copy=False)
        if check:
            V.finite(out, name, self.backend)
        return out

    def _room(self, r0, rows, name="G"):
        """Refuse a row block that is not (k, dim) or that overflows the window."""
        if rows.ndim != 2 or rows.shape[1] != self.d:
            raise ValueError(f"{name} must be given as (k, {self.d}) row blocks; got a block "
                             f"of shape {tuple(rows.shape)}")
        if r0 + rows.shape[0] > self.m:
            raise ValueError(f"{name} must hold window={self.m} rows; got more")

    def write_rows(self, r0, rows, name="G"):
        """Write rows r0, r0 + 1, ... in bulk (no Gram row): ``from_gradients``.  Returns
        the next row."""
        self._room(r0, rows, name)
        rows = self.prepare(rows, name=name)
        self.G[r0:r0 + rows.shape[0], :self.d] = rows
        return r0 + rows.shape[0]

    def begin(self, slot, row, rows, *, lam=1.0, want_y=False, check=True):
        """Pass 1 of an update: write ``row`` into ``slot`` and return the new Gram row
        u = G[:rows] g (float64, length m) with the old row kept for :meth:`undo`."""
        xp = self.backend.xp
        if self._old is None:
            self._old = xp.empty(self.ld, dtype=self.storage)
        old = self._old                     # one preallocated row: one write in flight
        old[...] = self.G[slot]
        self.G[slot] = row
        x = self.G[slot]
        try:
            u = xp.zeros(self.m, dtype=np.float64)
            with np.errstate(over="ignore", invalid="ignore"):   # check_gram refuses it
                u[:rows] = (self.project(x[:, None], rows)[:, 0] if self.wide
                            else self.G[:rows] @ x)
        except BaseException:               # MemoryError, KeyboardInterrupt, ...: no Write
            self.G[slot] = old              # for the caller to undo, so undo it here
            raise
        return Write(slot, old, u, x)       # x: a view of the row as stored

    def step_graph(self, eng, rows, lam, shift, want_y):
        """A CUDA graph for the next update (the CUDA buffer's); None: launch one by one."""
        return None

    def check_gram(self, w):
        """u must be finite: O(m).  This is also g's NaN/inf check (``prepare(...,
        check=False)`` defers it here): a NaN or infinity in g makes u[slot] = g.g
        non-finite, and only then is g itself scanned, to tell "g must be finite"
        from "its Gram products overflow"."""
        if not bool(self.backend.xp.isfinite(w.u).all()):
            V.finite(w.x, "g", self.backend)
            V.gram_finite(w.u, "g", self.backend)

    def undo(self, w):
        """Put back the row ``w`` replaced."""
        self.G[w.slot] = w.old

    def finish_step(self, w, c, n, lam):
        """Pass 2 of the fused step: (g - G_h^T c) / lambda for the staged write."""
        return self.combine(w.x[:, None], c[:n, None], n, lam)[:, 0]

    # -- the two passes -----------------------------------------------------------------
    def held(self, n):
        """The first n rows (the held gradients in slot order), a view, as floats."""
        return self.G if n == self.m else self.G[:n]

    def _compiled(self, X, n):
        """(kernels/host.py, threads) for this one-vector pass where the compiled
        float64-faithful kernels take it (a wide float32 host buffer, Numba present,
        enough work to pay a call; threads from ``PARALLEL_MIN`` values), else None."""
        if not (self.wide and X.shape[1] == 1 and self.backend.is_host
                and n * self.d >= COMPILED_MIN and self.storage == np.float32):
            return None
        from .. import _backend as B
        host = B.kernel_module("host")
        if not (host.available() and self.G.flags.c_contiguous):
            return None
        return host, (_threads.host_threads() if n * self.d >= PARALLEL_MIN else 1)

    def project(self, X, n):
        """Pass 1: U = G_h X in float64, (n, k); X (dim, k)."""
        compiled = self._compiled(X, n)
        if compiled is not None:        # float64 products and sums, rows split over threads
            host, nt = compiled
            x = np.ascontiguousarray(X[:self.d, 0])
            u = np.empty(n, dtype=np.float64)
            # runs of whole groups of four rows (the kernel's unit): each row is summed
            # by the same loop whatever the split, so u does not depend on the threads
            runs = [(4 * a, min(n, 4 * b)) for a, b in _threads.split(-(-n // 4), 4 * nt)]
            _threads.run(runs, nt, lambda a, b: host.project(self.G, x, u, a, b, self.d))
            return u[:, None]
        if self.wide:
            X64 = X.astype(np.float64)
            U = self.backend.xp.zeros((n, X.shape[1]), dtype=np.float64)
            for a, b, Gc in self._wide_chunks(n):
                U += Gc @ X64[a:b]
            return U
        Gh = self.held(n)
        return (Gh @ self._pad(X).astype(Gh.dtype, copy=False)).astype(np.float64)

    def _wide_chunks(self, n):
        """(a, b, G_h[:, a:b] in float64) over column chunks of about
        ``wide_chunk`` values (a bounded float64 copy at a time)."""
        return self.column_chunks(n, max(256, self.wide_chunk // max(n, 1)))

    def combine(self, X, C, n, lam):
        """Pass 2: (X - G_h^T C) / lambda, in X's dtype; C (n, k) float64."""
        compiled = self._compiled(X, n)
        if compiled is not None:        # float64 sums, one rounding, columns over threads
            host, nt = compiled
            x = np.ascontiguousarray(X[:self.d, 0])
            c = np.ascontiguousarray(C[:n, 0], dtype=np.float64)
            y = np.empty(self.d, dtype=X.dtype)
            parts = _threads.split(self.d, max(nt, min(4 * nt, self.d // host.TILE)))
            _threads.run(parts, nt,
                         lambda a, b: host.combine(self.G, x, c, n, 1.0 / lam, y, a, b))
            return y[:, None]
        if self.wide:       # float64 sums and subtraction, one rounding (docs/math.md §7)
            Y = self.backend.xp.empty(X.shape, dtype=X.dtype)
            C = C[:n]
            for a, b, Gc in self._wide_chunks(n):
                Y[a:b] = (X[a:b].astype(np.float64) - Gc.T @ C) * (1.0 / lam)
            return Y
        Gh = self.held(n)
        Y = (Gh.T @ (-C).astype(Gh.dtype))[:self.d]
        Y = Y.astype(X.dtype, copy=False)
        Y += X
        Y *= 1.0 / lam
        return Y

    def fisher_product(self, X, n, N):
        """G_h^T (G_h X) / N in X's dtype: the forward Fisher's data term, two passes."""
        Gh = self.held(n)
        U = Gh @ self._pad(X).astype(Gh.dtype, copy=False)
        return (Gh.T @ (U * (1.0 / N)))[:self.d].astype(X.dtype, copy=False)

    def _pad(self, X):
        if self.ld == self.d:
            return X
        Xp = self.backend.xp.zeros((self.ld,) + X.shape[1:], dtype=X.dtype)
        Xp[:self.d] = X
        return Xp

    # -- reads -----------------------------------------------------------------------------
    def held_columns(self, n, cols):
        """G_h[:, cols] as floats (``cols`` a slice or index list): converts only those."""
        return self.G[:n, cols]

    def columns(self, idx, n):
        """Columns ``idx`` of the held rows as float64 (n, len(idx)): O(n len(idx))."""
        return self.held_columns(n, idx).astype(np.float64)

    def column_chunks(self, n, chunk):
        """(a, b, G_h[:, a:b] as float64) over the dimension in chunks."""
        for a in range(0, self.d, chunk):
            b = min(self.d, a + chunk)
            yield a, b, self.held_columns(n, slice(a, b)).astype(np.float64)

    def sq_colsum(self, n):
        """sum_i g_i^2 column by column (the compute dtype), O(dim n)."""
        Gh = self.held(n)[:, :self.d]
        return self.backend.xp.einsum("ij,ij->j", Gh, Gh)

    def gram(self, n, chunk=1 << 16):
        """K = G_h G_h^T over the held rows, float64 (m x m, zero beyond n), with the
        accumulation of pass 1 (the storage precision, float32 for 16-bit storage;
        float64 when ``wide``)."""
        xp = self.backend.xp
        K = xp.zeros((self.m, self.m), dtype=np.float64)
        # an overflow leaves inf/NaN in K, which every caller refuses by name
        # (_validate.gram_finite): no RuntimeWarning on the way
        with np.errstate(over="ignore", invalid="ignore"):
            for a in range(0, self.ld, chunk):
                Gc = self.held_columns(n, slice(a, a + chunk))
                if self.wide:
                    Gc = Gc.astype(np.float64)
                K[:n, :n] += (Gc @ Gc.T).astype(np.float64)
            return (K + K.T) * 0.5

    def rows(self, order):
        """Copies of the rows ``order`` (a host index array), as floats, (len, dim)."""
        Gh = self.held(self.m)
        return Gh[self.backend.xp.asarray(order)][:, :self.d].copy()

    # -- state -----------------------------------------------------------------------------
    def host_rows(self):
        """The raw stored rows (m, dim) as a host NumPy copy (16-bit: raw uint16)."""
        from .. import _backend as B
        return np.array(B.to_host(self.G[:, :self.d]), copy=True)

    def load(self, G):
        """Take raw rows (m, dim) as stored (validated by the caller)."""
        with self.backend.device_context():
            self.G[:, :self.d] = self.backend.xp.asarray(G)

    def snapshot(self):
        return self.G.copy()

    def restore(self, snap):
        self.G[...] = snap

    def reset(self):
        self.G[...] = 0


def make_buffer(window, dim, storage, backend, accumulate="auto"):
    """The ring buffer for a storage dtype name: the CUDA one (fused kernels) for float32
    and 16-bit storage on the GPU, else the array-API one; ``accumulate`` as the
    window's (:func:`resolve_accumulate`)."""
    wide = resolve_accumulate(accumulate, storage, backend) == "float64"
    if backend.is_gpu and storage in KERNEL_STORAGE:
        from .cuda_buffer import CudaRingBuffer
        return CudaRingBuffer(window, dim, storage, backend, wide)
    return RingBuffer(window, dim, storage, backend, wide)
