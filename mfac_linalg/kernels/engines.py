"""The capacitance engines of :mod:`mfac_linalg._capacitance` on the GPU, through kernels.

Same interface and results as the array-API engines; the m x m work runs as the
kernels of :mod:`mfac_linalg.kernels.sliding` and every check that needs the
host (the new pivot, det of the 2 x 2 capacitance, the ring buffer's NaN/inf
flag of g) is deferred to :meth:`commit`, which reads ``status`` once: the one
host synchronisation of an update.  ``status`` is a zeroed float64 device array
of length 4 (flag of g, pivot or det M, the scale of det M, scratch) that the CUDA ring buffer shares
with the engine; an engine given none uses its own.
"""
from __future__ import annotations

import math

import numpy as np

from .. import _backend as B
from .._capacitance import CholeskyEngine, ExplicitEngine, GramOverflow, NonFiniteGradient
from . import sliding as K_

__all__ = ["CholeskyKernelEngine", "ExplicitKernelEngine"]


class _KernelChecks:
    """The deferred checks shared by both kernel engines."""

    def _own_status(self):
        self._status[...] = 0
        return self._status

    def _check_status(self, p):
        """Synchronise once and raise for a flagged g or an overflowed Gram row."""
        if p.checked:
            return
        p.checked = True
        if B.scalar(p.status[0]):
            raise NonFiniteGradient()
        if p.u is not None and not bool(self.backend.xp.isfinite(p.u).all()):
            raise GramOverflow()

    def _read_status(self, status):
        """``status`` (float64, at most 4 values, on the device) on the host: one copy
        into page-locked memory of the engine's own and one synchronisation."""
        read = self.__dict__.get("_pinned")
        if read is None:
            read = self._pinned = K_.PinnedRead(4)
        return read(status)

    def graph_fits(self, rows, shift):
        """Whether the next replacement (of ``rows`` held gradients, ``shift`` N lambda)
        may run inside a :class:`~mfac_linalg.kernels.step_graph.StepGraph`: only the
        explicit engine's may."""
        return False

    def _exact_into_spare(self, p):
        if p.status is not None:
            self._check_status(p)       # a NaN in g must not reach the factorisation
        super()._exact_into_spare(p)

    def _verify(self, p):
        """The deferred checks of :meth:`commit`: one read of ``status`` (flag of g, the
        pivot or det M, its scale); raise for a flagged g or an overflow; rebuild exactly
        (return False) when the incremental pivot is doubtful (``_pivot_ok``)."""
        if p.rebuilt or p.deferred:
            self._check_status(p)
            return True
        # the one host synchronisation (done already where a CUDA graph copied the status)
        value = self._read_status(p.status) if p.host is None else p.host
        p.checked = True
        if value[0]:
            raise NonFiniteGradient()
        if self._pivot_ok(p, value):
            return True
        if not math.isfinite(value[1]) and not bool(self.backend.xp.isfinite(p.u).all()):
            raise GramOverflow()
        self._exact(p)          # exact state from K; raises if C really is singular
        return False


class CholeskyKernelEngine(_KernelChecks, CholeskyEngine):
    """:class:`~mfac_linalg._capacitance.CholeskyEngine` with the deletion sweep, the
    append and the solves as kernels (cuBLAS trsv for the triangular solves)."""

    def _alloc(self):
        super()._alloc()
        xp = self.backend.xp
        self._Kold = xp.zeros(self.m, dtype=np.float64)
        self._status = xp.zeros(4, dtype=np.float64)

    def replace(self, slot, u, shift, *, rebuild=False, defer=False, status=None):
        return super().replace(slot, u, shift, rebuild=rebuild, defer=defer,
                               status=self._own_status() if status is None else status)

    def _write_gram(self, p):
        """K row/column ``slot`` = u (old row kept), u gathered to arrival order: one kernel."""
        xp = self.backend.xp
        p.ua = xp.empty(self.m, dtype=np.float64)
        K_.gram_update(self.K, p.u, self._Kold, p.slot, p.ua, p.start, p.n)
        p.old_K = self._Kold

    def _incremental(self, p, full):
        """Deletion (p by one trsv, the coefficients in one block-scan kernel, the O(m^2)
        update one block per row), then the append: a trsv and one kernel that writes
        the new row, z = L_new^{-1} u and the pivot into status[1]."""
        xp = self.backend.xp
        n = p.n
        Lnew = self._spare
        if full:
            self._delete_first(self.L, Lnew)
        else:
            Lnew[...] = self.L
        ell = p.ua[:n - 1].copy()
        K_.trsv(Lnew, ell, n - 1, transpose=False)
        z = xp.empty(n, dtype=np.float64)
        K_.append_row(Lnew, ell, z, p.status[1:2], p.ua[n - 1:n], n - 1, p.shift)
        p.z = z

    def _delete_first(self, src, dst):
        xp = self.backend.xp
        n1 = self.m - 1
        if n1 <= 0:
            return dst
        p = src[1:, 0].copy()
        K_.trsv(src, p, n1, transpose=False, offset=1)
        dj = xp.empty(n1, dtype=np.float64)
        beta = xp.empty(n1, dtype=np.float64)
        K_.ggms_coeffs(p, dj, beta, n1)
        K_.chol_delete(src, dst, p, dj, beta, self.m)
        return dst

    def _pivot_ok(self, p, value):
        # +inf passes "> 0": an overflowed Gram entry of g itself must not
        return bool(math.isfinite(value[1]) and value[1] > 0.0)

    def coefficients(self, p, dtype=np.float64):
        """C_new^{-1} u in slot order, length m (the first n entries are read), float32
        or float64 for the kernel pass 2; two triangular solves and a scatter."""
        n = p.n
        if p.z is not None:
            z = p.z
        else:
            z = p.ua[:n].copy()
            K_.trsv(self._spare, z, n, transpose=False)
        return self._scatter(self._spare, z, n, p.start, dtype)

    def _scatter(self, L, z, n, start, dtype):
        K_.trsv(L, z, n, transpose=True)
        c = self.backend.xp.empty(self.m, dtype=dtype)
        K_.scatter(z, c, start, n)
        return c

    def solve_kernel(self, u, dtype=np.float32):
        """C^{-1} u (slot order, length m) in ``dtype`` for u from the kernel pass 1."""
        n = self.n
        z = K_.gather_f64(u, self.backend.xp.empty(self.m, dtype=np.float64), self.start, n)
        K_.trsv(self.L, z, n, transpose=False)
        return self._scatter(self.L, z, n, self.start, dtype)


class ExplicitKernelEngine(_KernelChecks, ExplicitEngine):
    """:class:`~mfac_linalg._capacitance.ExplicitEngine` as two kernels per replacement
    (a GEMV, then one block per row writing the new inverse, z = C_new^{-1} u in float64
    and float32, det M and the Gram row): no host synchronisation before commit.

    The replacement is the CPU engine's deletion and insertion (Schur complements) with
    the same cancellation guards (deletion growth <= 1e3, insertion pivot > 1e-6 of its
    diagonal), evaluated on the device; :meth:`commit` reads the verdict with det M in
    its one synchronisation and rebuilds exactly when a guard failed."""

    def _alloc(self):
        super()._alloc()
        xp = self.backend.xp
        m = self.m
        self._Kold = xp.zeros(m, dtype=np.float64)
        self._x = xp.zeros(m, dtype=np.float64)
        self._ax = xp.zeros(m, dtype=np.float64)
        self._dg = xp.zeros(m, dtype=np.float64)
        self._z = xp.zeros(m, dtype=np.float64)
        self._c32 = xp.zeros(m, dtype=np.float32)
        self._status = xp.zeros(4, dtype=np.float64)

    def replace(self, slot, u, shift, *, rebuild=False, defer=False, status=None):
        st = self._own_status() if status is None else status
        p = self._pending(slot, u, shift, st)
        p.checked = False
        if defer or rebuild or p.shift != self.shift or not self.valid:
            K_.gram_update(self.K, u, self._Kold, slot)
            p.old_K = self._Kold
            p.deferred = defer
            if defer:
                return p
            try:
                self._exact(p)
            except Exception:
                self._restore_gram(p)
                raise
            return p
        # status[1:3] receive det M = det C_new / det C and the guards' verdict
        K_.window_replace(self.Ci, self._spare, u, self.K, self._Kold, self._x, self._ax,
                          self._dg, self._z, self._c32, st[1:3], slot, p.shift)
        p.old_K = self._Kold
        p.z = self._z
        p.c32 = self._c32
        return p

    def graph_fits(self, rows, shift):
        """A full window before and after, a valid inverse for this shift: the
        replacement is the two kernels a :class:`~mfac_linalg.kernels.step_graph.StepGraph`
        captures (no exact rebuild staged up front)."""
        return rows == self.m == self.n and self.valid and shift == self.shift

    def graph_pending(self, slot, shift):
        """The :class:`~mfac_linalg._capacitance.Pending` of a replacement that a
        ``StepGraph`` runs: the fields ``replace`` sets for its two kernels (the caller
        adds u, the status and, once synchronised, the status on the host)."""
        p = self._pending(slot, None, shift, None)
        p.checked = False
        p.old_K, p.z, p.c32 = self._Kold, self._z, self._c32
        return p

    def _pivot_ok(self, p, value):
        if value[2] != 1.0:
            return False
        p.logdet = self.logdet_C + math.log(float(value[1]))
        return True

    def coefficients(self, p, dtype=np.float64):
        """C_new^{-1} u in slot order: float32 (length m, written by the replacement
        kernel) or float64."""
        if dtype != np.float32:
            return super().coefficients(p)
        if p.c32 is not None:
            return p.c32
        return (self._spare @ p.u).astype(np.float32)

    def solve_kernel(self, u, dtype=np.float32):
        """C^{-1} u over all m slots in ``dtype`` (u is zero for empty slots)."""
        return (self.Ci @ u).astype(dtype, copy=False)
