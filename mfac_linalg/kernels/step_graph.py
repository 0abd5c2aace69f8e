"""A full sliding window's update and step on the GPU as one CUDA graph.

An update of a full window with the explicit kernel engine is a memset, pass 1 (write g
into its slot, u = G g, g's NaN/inf flag), the replacement of C^{-1} (two kernels) and,
for a step, pass 2 (y = (g - G^T c) / lambda), then one read of the status.  At small d
the host takes longer to launch them one by one than the GPU takes to run them.  One
graph, captured once per window, runs them all.  What changes from call to call lives
in an array of the device that the graph's first node fills from page-locked host
memory: the addresses of g and y, the slot, and the addresses of C^{-1}, of its
replacement and of K (the engine swaps the first two on every commit and reallocates K
when it rebuilds).  The kernels' ``_p`` variants (:mod:`mfac_linalg.kernels.sliding`)
read them there.  The graph's last node copies the status (g's flag, det M and the
guards' verdict) into page-locked memory, so the call synchronises once and the
engine's commit reads the status from there.  The arithmetic is the kernels' own: the
results are bit for bit those of the launches one by one where pass 1 is deterministic
(d within one column chunk; beyond it its float64 atomics vary from run to run in the
last bits, as the launches do).

Off for now (``CudaRingBuffer.graphs``): no device has yet run tests/test_step_graph.py
or timed the graph against the launches.
"""
from __future__ import annotations

import numpy as np

from . import sliding as K_

__all__ = ["StepGraph", "step_graph"]

#: int64 entries of the per-call array P: x, y, slot, C^{-1}, the new C^{-1}, K
_P_LEN = 6


def step_graph(buf, eng, lam, shift, want_y):
    """A :class:`StepGraph`, or None where building it fails with a CUDA error (no memory
    for its few buffers, a capture spoiled by another thread): the window then launches
    the kernels one by one."""
    import cupy as cp
    try:
        return StepGraph(buf, eng, lam, shift, want_y)
    except (cp.cuda.memory.OutOfMemoryError, cp.cuda.runtime.CUDARuntimeError,
            cp.cuda.driver.CUDADriverError):
        return None


class StepGraph:
    """The update (``want_y`` False) or the step (True) of one full window as a graph.

    ``buf``: the window's :class:`~mfac_linalg.sliding.cuda_buffer.CudaRingBuffer`;
    ``eng``: its :class:`~mfac_linalg.kernels.engines.ExplicitKernelEngine`, holding m
    gradients with a valid C^{-1} for ``shift``; ``lam``: the damping.  The graph serves
    every later update of this buffer and engine with this damping and shift (the
    buffer keeps it: ``CudaRingBuffer.step_graph``).  Capturing runs nothing: the
    kernels are loaded first and the graph is captured on a stream of its own, then
    launched on the current one.
    One window's graph serves one call at a time (the window's lock) and, like the
    window's other launches, the current CUDA stream of each call.
    """

    def __init__(self, buf, eng, lam, shift, want_y):
        import cupy as cp
        self.eng = eng
        self._launched = None           # the stream of a launch not yet synchronised
        self.lam, self.shift, self.want_y = float(lam), float(shift), bool(want_y)
        m, kind, wide = buf.m, buf.name, buf.wide
        # page-locked: P (6 int64), then the status (4 float64) the last node copies back
        self._host = cp.cuda.alloc_pinned_memory(8 * (_P_LEN + 4))
        self._P = np.frombuffer(self._host, np.int64, _P_LEN)
        self._status = np.frombuffer(self._host, np.float64, 4, offset=8 * _P_LEN)
        self._P[...] = 0
        self.P = cp.zeros(_P_LEN, dtype=np.int64)
        for name in K_.graph_kernels(kind, wide, self.want_y, True):
            K_.fn(name)                 # compiled and loaded: the capture only launches
        rt = cp.cuda.runtime
        side = cp.cuda.Stream(non_blocking=True)
        with side:
            side.begin_capture()
            try:
                rt.memcpyAsync(self.P.data.ptr, self._P.ctypes.data, 8 * _P_LEN,
                               rt.memcpyHostToDevice, side.ptr)
                buf.ws.data.memset_async(0, buf.ws.nbytes)
                K_.rows_dot_p(self.P, buf.G, kind, buf._u, backup=buf.Gold, flag=buf._flag,
                              want_y=self.want_y and not wide, inv_lam=1.0 / lam, wide=wide)
                K_.window_replace_p(self.P, m, buf._u, eng._Kold, eng._x, eng._ax, eng._dg,
                                    eng._z, eng._c32, buf._st[1:3], shift)
                if self.want_y and wide:
                    K_.combine_wide_p(self.P, buf.G, kind, eng._z, lam, buf._part,
                                      buf._count)
                elif self.want_y:
                    K_.combine_p(self.P, buf.G, kind, eng._c32, -1.0 / lam)
                rt.memcpyAsync(self._status.ctypes.data, buf._st.data.ptr, 32,
                               rt.memcpyDeviceToHost, side.ptr)
            except BaseException:
                try:
                    side.end_capture()
                except Exception:       # pragma: no cover - the capture's own error
                    pass
                raise
            self.graph = side.end_capture()

    def __del__(self):
        # the page-locked P goes back to CuPy's pool, which hands it out again at once:
        # a launch never synchronised (an interrupted call) must have read it first
        if getattr(self, "_launched", None) is not None:
            try:
                self._launched.synchronize()
            except Exception:           # pragma: no cover - interpreter shutdown
                pass

    def launch(self, slot, x, y):
        """Launch one update (y None) or step on the current stream: g as stored (``x``,
        float32 of length ld, 16-byte aligned, alive until :meth:`status`) into
        ``slot``, the replacement of C^{-1} into the engine's spare and, for a step, y
        (float32, length ld).  Nothing has run where this raises."""
        import cupy as cp
        if self._launched is not None:  # never synchronised (an interrupted call): its
            self._launched.synchronize()    # first node must have read P before P changes
            self._launched = None
        eng, P = self.eng, self._P
        P[0] = x.data.ptr
        P[1] = 0 if y is None else y.data.ptr
        P[2] = slot
        P[3] = eng.Ci.data.ptr
        P[4] = eng._spare.data.ptr
        P[5] = eng.K.data.ptr
        stream = cp.cuda.get_current_stream()
        self.graph.launch(stream)
        self._launched = stream

    def status(self):
        """Synchronise the stream of the last launch once and return the status it
        copied (float64: g's flag, det M, the guards' verdict, spare)."""
        self._launched.synchronize()
        self._launched = None
        return self._status.copy()
