"""The CUDA ring buffer: float32 and 16-bit storage with the fused kernel passes.

Rows are padded to a multiple of 8 values (16-byte vectors); 16-bit rows are held
as raw ``uint16`` words that the kernels convert to float32.  The kernels accumulate
in float32, or with ``wide`` in float64 with one rounding of the result (docs/math.md
§7; ``accumulate="float64"``): then pass 1 writes no y and pass 2 reads
x and float64 coefficients and writes y = float32((x - G_h^T c) / lambda).  This
module (with ``_backend`` and ``kernels/``) is the only place of the window that
touches CuPy: the kernel launches, the workspace memset and the one host read.

Workspace ``ws`` (float64, m + 4), zeroed by one memset per first pass: ``u`` (m),
then ``status`` = [NaN/inf flag of the vector, the engine's pivot or det M, the scale
of det M, spare], shared with the kernel engine so that an update synchronises once.
The workspace is reused from call to call: use a window from one CUDA stream at a
time (the window's lock serialises the calls of several host threads).
"""
from __future__ import annotations

import numpy as np

from .. import _validate as V
from ..kernels import sliding as K_
from ..kernels.step_graph import step_graph
from .buffer import RingBuffer, Write

__all__ = ["CudaRingBuffer"]


class CudaRingBuffer(RingBuffer):
    """:class:`~.buffer.RingBuffer` whose passes for one vector are fused kernels.

    ``begin`` is one kernel: it writes g into its slot (saving the old row), computes
    u = G g, flags NaN/inf in g and, for a step, writes y = g / lambda (the start of
    pass 2); ``finish_step`` is pass 2, y -= G_h^T c / lambda.
    """

    fused = True
    wide_chunk = 1 << 25     # float64 values per converted chunk of the multi-column passes
    #: a full window's update and step as one CUDA graph (``step_graph``) where the engine
    #: allows it, instead of the kernels launched one by one (the same results).  Off
    #: until a device has run its tests and measured it against the launches
    #: (tests/test_step_graph.py turns it on per window)
    graphs = False

    def __init__(self, window, dim, storage, backend, wide=False):
        self.m, self.d = int(window), int(dim)
        self.ld = K_.padded(self.d)
        self.name = storage
        self.storage = np.dtype(np.float32 if storage == "float32" else np.uint16)
        self.backend = backend
        self.wide = bool(wide)
        self.coef_dtype = np.dtype(np.float64 if self.wide else np.float32)
        xp = backend.xp
        with backend.device_context():
            self.G = xp.zeros((self.m, self.ld), dtype=self.storage)
            self.ws = xp.zeros(self.m + 4, dtype=np.float64)
            # its views, made once (every update and vector product passes them)
            self._u, self._flag, self._st = (self.ws[:self.m], self.ws[self.m:self.m + 1],
                                             self.ws[self.m:self.m + 4])
            self.Gold = xp.zeros(self.ld, dtype=self.storage)
            self._graphs = {}        # want_y -> (engine, lam, shift, StepGraph or None)
            self._part = self._count = None
            bx = K_.combine_grid(self.m, self.ld, storage)[0]
            splits = K_.combine_max_splits(self.m, self.ld, storage)
            if self.wide and splits > 1:       # pass 2's split partial sums (small d)
                self._part = xp.empty(splits * self.ld, dtype=np.float64)
                self._count = xp.zeros(bx, dtype=np.uint32)

    @property
    def compute_dtype(self):
        return np.dtype(np.float32)

    def prepare(self, rows, check=True, name="g"):
        """float32 rows; their NaN/inf check is fused into the first pass."""
        return rows.astype(np.float32, copy=False)

    def write_rows(self, r0, rows, name="G"):
        """Bulk write (``from_gradients``): rounded to the storage format on the device;
        a value that is not finite once stored is refused."""
        xp = self.backend.xp
        self._room(r0, rows, name)
        r32 = rows.astype(np.float32, copy=False)
        V.finite(r32, name, self.backend)
        if self.name == "float32":
            raw = r32
        else:
            if self.name == "float16":
                raw, mask = r32.astype(xp.float16).view(xp.uint16), 0x7C00
            else:                                  # bfloat16: round to nearest even
                b = r32.view(xp.uint32)
                raw = ((b + xp.uint32(0x7FFF) + ((b >> 16) & xp.uint32(1))) >> 16).astype(
                    xp.uint16)
                mask = 0x7F80
            if bool(((raw & xp.uint16(mask)) == mask).any()):
                raise ValueError(f"{name} must be finite in {self.name} storage; got values that "
                                 f"overflow {self.name}")
        self.G[r0:r0 + raw.shape[0], :self.d] = raw
        return r0 + raw.shape[0]

    def _stored(self, row):
        """g as the kernels read it: contiguous float32 of length ld, rounded to the
        storage format (no copy for unpadded contiguous float32)."""
        if (self.name == "float32" and self.ld == self.d and row.flags.c_contiguous
                and row.data.ptr % 16 == 0):        # the kernels load 16-byte vectors
            return row
        out = self.backend.xp.zeros(self.ld, dtype=np.float32)
        out[:self.d] = row
        if self.name != "float32":
            K_.round_to(self.name, out, out)
        return out

    def _zero_ws(self):
        ws = self.ws
        ws.data.memset_async(0, ws.nbytes)
        return ws

    def begin(self, slot, row, rows, *, lam=1.0, want_y=False, check=True):
        xq = self._stored(row)
        self._zero_ws()
        xp = self.backend.xp
        y = xp.empty(self.ld, dtype=np.float32) if want_y and not self.wide else None
        K_.rows_dot(self.G, self.name, xq, self._u, slot=slot, rows=rows, backup=self.Gold,
                    flag=self._flag if check else None, y=y, inv_lam=1.0 / lam,
                    wide=self.wide)
        if want_y and self.wide:        # pass 2 writes all of y: made after the launch
            y = xp.empty(self.ld, dtype=np.float32)
        return Write(slot, self.Gold, self._u, xq, y, self._st)

    def check_gram(self, w):
        """Deferred: an overflowed u shows as a non-finite pivot at the engine's commit."""

    def finish_step(self, w, c, n, lam):
        """Pass 2 of the fused step, c in ``coef_dtype`` (slot order, length >= n)."""
        return self._pass2(w.x, w.y, c, n, lam)

    def _pass2(self, x, y, c, n, lam):
        """y = (x - G_h^T c) / lambda, where pass 1 wrote y = x / lambda unless ``wide``."""
        if self.wide:
            K_.combine_wide(self.G, self.name, c, x, y, lam, self._part, self._count, rows=n)
        else:
            K_.combine(self.G, self.name, c, y, -1.0 / lam, rows=n)
        return self._result(y)

    def _result(self, y):
        return y if self.ld == self.d else y[:self.d]

    # -- a full window's update or step as one CUDA graph --------------------------------
    def step_graph(self, eng, rows, lam, shift, want_y):
        """The :class:`~mfac_linalg.kernels.step_graph.StepGraph` that runs the next
        update (``want_y`` False) or step, or None: the engine cannot take one
        (``eng.graph_fits``: not a full explicit window with a valid inverse for
        ``shift``), ``graphs`` is off, or building it failed for this engine, damping
        and shift.  Built on first use (the capture launches nothing) and kept."""
        if not (self.graphs and eng.graph_fits(rows, shift)):
            return None
        kept = self._graphs.get(want_y)
        if kept is None or kept[0] is not eng or kept[1:3] != (lam, shift):
            with self.backend.device_context():
                graph = step_graph(self, eng, lam, shift, want_y)
            kept = self._graphs[want_y] = (eng, lam, shift, graph)
        return kept[3]

    def reset(self):
        self._graphs.clear()        # the old engine's graphs (and its memory) go
        super().reset()

    def load(self, G):
        self._graphs.clear()
        super().load(G)

    def launch_graph(self, graph, slot, row, want_y):
        """Launch ``graph`` (``step_graph``) for g = ``row`` into ``slot``: the
        :class:`~.buffer.Write` to undo, its y (length ld) complete once
        ``graph.status()`` returns.  Nothing has run where this raises."""
        xq = self._stored(row)
        y = self.backend.xp.empty(self.ld, dtype=np.float32) if want_y else None
        graph.launch(slot, xq, y)
        return Write(slot, self.Gold, self._u, xq, y, self._st)

    def graph_result(self, w):
        """The step's result of a graph's Write (``launch_graph``), length d."""
        return self._result(w.y)

    # -- one vector: the fused matvec ---------------------------------------------------
    def start_vector(self, x, n, lam, check):
        """Pass 1 for one vector: u = G_h x into the workspace (float64; with ``wide``
        float64 accumulators), x's NaN/inf flag raised if ``check``, and without
        ``wide`` y = x / lambda.  Returns (u, pending) for :meth:`combine_vector`."""
        if (self.ld == self.d and x.dtype == np.float32 and x.flags.c_contiguous
                and x.data.ptr % 16 == 0):          # the kernels load 16-byte vectors
            xq = x
        else:
            xq = self.backend.xp.zeros(self.ld, dtype=np.float32)
            xq[:self.d] = x
        self._zero_ws()
        y = self.backend.xp.empty(self.ld, dtype=np.float32)
        K_.rows_dot(self.G, self.name, xq, self._u, rows=n,
                    flag=self._flag if check else None, y=None if self.wide else y,
                    inv_lam=1.0 / lam, wide=self.wide)
        return self._u, (xq, y)

    def combine_vector(self, pending, c, n, lam):
        """Pass 2 for one vector: y = (x - G_h^T c) / lambda, c in ``coef_dtype`` (float64
        sums and one rounding with ``wide``, else y -= G_h^T c / lambda in place on the
        y = x / lambda of pass 1)."""
        x, y = pending
        return self._pass2(x, y, c, n, lam)

    def flagged(self):
        """Synchronise and read the vector's NaN/inf flag (through page-locked memory,
        as the engine reads an update's status)."""
        read = self.__dict__.get("_read")
        if read is None:
            read = self._read = K_.PinnedRead(1)
        return bool(read(self._flag)[0])

    # -- reads -----------------------------------------------------------------------------
    def held(self, n):
        G = self.G if n == self.m else self.G[:n]
        return K_.to_float32(G, self.name)

    def held_columns(self, n, cols):
        return K_.to_float32(self.G[:n, cols], self.name)

    def sq_colsum(self, n):
        Gh = self.held(n)[:, :self.d]
        return self.backend.xp.einsum("ij,ij->j", Gh, Gh)
