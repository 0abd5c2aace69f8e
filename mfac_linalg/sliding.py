"""M-FAC sliding window: the inverse Fisher of the last m gradients, O(dm + m^2) per update."""
from __future__ import annotations

import math
import zipfile

import numpy as np

from . import _backend as B
from . import _capacitance as cap
from ._operator import NonFiniteInput, Operator, check_damping
from .kernels import sliding as K_
from .static import FisherOperator

__all__ = ["SlidingWindowInverseFisher"]

FORMAT_VERSION = 1
_NORMALIZE = ("window", "count")


class SlidingWindowInverseFisher(Operator):
    r"""Inverse of the damped empirical Fisher over the last ``window`` gradients.

    Represents :math:`F^{-1}` for

    .. math:: F = \lambda I + \frac{1}{N} \sum_{i \in \text{held}} g_i g_i^T,

    with N = ``window`` (``normalize="window"``, the published convention:
    empty slots count as zero gradients) or N = the number of gradients held
    (``normalize="count"``).  A ring buffer G (window x dim, storage dtype)
    holds the gradients; with the capacitance C = N lambda I + G_h G_h^T
    (float64, the n held gradients in arrival order, oldest first) and its
    Cholesky factor C = L L^T,

    .. math:: F^{-1} x = (x - G_h^T C^{-1} G_h x) / \lambda.

    ``update(g)`` keeps L current in O(dim m + m^2) without refactoring
    (docs/math.md section 2): u = G g (one pass, which also gives the new row of
    the Gram matrix), delete the oldest = a rank-one update of a block of L,
    append the newest = one triangular solve.  ``step(g)`` adds g and returns
    F^{-1} g in two passes over the buffer (u serves as pass 1 of the IHVP and
    the forward solve comes free with the append).

    On the GPU with float32 / float16 / bfloat16 storage the passes run as CUDA
    kernels, and (``normalize="window"``) the m x m work keeps the explicit inverse
    C^{-1} in slot order, updated by rank-two Woodbury steps (GEMV-shaped, O(m^2), no
    triangular solves) with the same exact refresh (docs/sliding.md).

    Parameters
    ----------
    dim : int
        d, the gradient dimension.
    window : int
        m >= 1, the number of gradients kept.
    damping : float
        lambda > 0.
    dtype : {"float32", "float64"} (and "float16", "bfloat16" on the GPU)
        Storage dtype of the buffer (the m x m work is float64).
    device : None, "cpu", "gpu" or "cuda:N"
        Where the buffer lives (None: the CPU).
    normalize : {"window", "count"}
        N = window, or N = number of gradients held.
    refresh_every : int, optional
        Refactor C exactly from the Gram matrix every this many incremental
        updates (default: ``window``), bounding the drift of the updated
        factor; amortised it costs O(m^2) per update.
    check_finite : bool
        Check vectors for NaN/inf in ``matvec`` and friends (gradients are
        always checked: they would poison the state).

    Costs (n = gradients held <= m)
    -----
    ``update`` O(dim m + m^2); while a ``normalize="count"`` window fills
    (N changes at every update) the factor is rebuilt lazily at the next
    query, O(n^3).  ``step`` O(dim m + m^2).  ``matvec`` O(dim n + n^2),
    ``matmat`` one pass for k columns, ``quad`` O(dim n + n^2), ``entry``
    O(n^2), ``diagonal`` O(dim n^2) (a triangular solve over the buffer, in
    column chunks), ``logdet`` O(n).  Memory: the buffer (m x dim) and three
    m x m float64 matrices (Gram matrix, factor, a second factor buffer so
    that a failed update leaves the old factor intact); on the GPU kernel path
    also one spare row (the replaced gradient, kept until the update commits)
    and a few length-m vectors.  The kernel path reuses that workspace from call
    to call: use a window from one CUDA stream at a time.
    """

    def __init__(self, dim, window, damping, *, dtype="float32", device=None,
                 normalize="window", refresh_every=None, check_finite=True):
        dim = _positive_int(dim, "dim")
        window = _positive_int(window, "window")
        lam = check_damping(damping)
        if normalize not in _NORMALIZE:
            raise ValueError(f"normalize must be 'window' or 'count'; got {normalize!r}")
        be = B.backend_for_device(device)
        dt, kind = _storage(dtype, be)
        refresh_every = window if refresh_every is None else _positive_int(refresh_every,
                                                                             "refresh_every")
        self._init_operator(dim, np.float64 if dt == np.float64 else np.float32, be,
                            check_finite=check_finite)
        self._m = window
        self._damping = lam
        self._normalize = normalize
        self._storage = dt
        # GPU kernel path (float32 and 16-bit storage): rows padded to a multiple of 8,
        # 16-bit values held as raw uint16 (the kernels convert, float32 accumulation)
        self._kind = kind
        self._ld = K_.padded(dim) if kind else dim
        self._refresh_every = refresh_every
        with be.device_context():
            xp = be.xp
            self._G = xp.zeros((window, self._ld), dtype=dt)
            self._K = xp.zeros((window, window), dtype=np.float64)
            self._L = cap.padded_identity(window, be)
            self._Lspare = cap.padded_identity(window, be)
        self._count = 0
        self._since_refresh = 0
        self._stale = False
        # GPU kernel path: _L / _Lspare hold the explicit inverse C^{-1} over all m slots
        # (slot order; empty slots are zero gradients) instead of a Cholesky factor, updated
        # by rank-two Woodbury steps: GEMV-shaped, no sequential triangular solves
        # (docs/math.md section 2, "pick by measurement"); the exact refresh bounds its drift.
        self._explicit = bool(kind) and normalize == "window"
        self._logdetC = 0.0
        if kind:
            # kernel-path workspace, reused by every call (stream-ordered): ws = [u (m),
            # NaN/inf flag, det, a.x2], zeroed by one memset per pass 1; the old row and
            # Gram row of the slot being replaced (for a rollback); x2, z, c of the
            # explicit step
            with be.device_context():
                self._ws = xp.zeros(window + 3, dtype=np.float64)
                self._Gold = xp.zeros(self._ld, dtype=dt)
                self._Kold = xp.zeros(window, dtype=np.float64)
                self._x2 = xp.zeros(window, dtype=np.float64)
                self._z = xp.zeros(window, dtype=np.float64)
                self._c32 = xp.zeros(window, dtype=np.float32)
        if self._explicit:
            self._init_explicit()

    def _init_explicit(self):
        xp = self._backend.xp
        s = self._N() * self._damping
        self._L[...] = xp.eye(self._m) / s
        self._Lspare[...] = xp.eye(self._m) / s
        self._logdetC = self._m * math.log(s)

    # -- state ---------------------------------------------------------------
    @property
    def count(self):
        """Number of gradients held (0 .. window)."""
        return self._n()

    @property
    def total(self):
        """Number of gradients added since construction or ``reset()``."""
        return self._count

    @property
    def window(self):
        """m, the capacity of the window."""
        return self._m

    @property
    def damping(self):
        return self._damping

    @property
    def normalize(self):
        return self._normalize

    @property
    def storage_dtype(self):
        """The buffer's dtype name: float32, float64, or (GPU) float16 / bfloat16."""
        return self._kind or self._storage.name

    def _n(self):
        return min(self._count, self._m)

    def _N(self):
        n = self._n()
        return self._m if self._normalize == "window" else max(n, 1)

    def _perm(self):
        """Slots of the held gradients in arrival order (oldest first)."""
        n = self._n()
        start = (self._count - n) % self._m
        return (start + np.arange(n)) % self._m

    def _repr_fields(self):
        return [f"m={self._m}", f"held={self._n()}", f"damping={self._damping:.0e}",
                f"normalize={self._normalize}"]

    def gradients(self):
        """The held gradients in arrival order (oldest first), as a copy (n x dim).

        16-bit buffers come back as float32 (the values as stored)."""
        perm = self._backend.xp.asarray(self._perm())
        return self._held()[perm][:, :self._d].copy()

    def reset(self):
        """Forget every gradient (keeps dim, window, damping, dtype, device)."""
        self._G[...] = 0
        self._K[...] = 0
        xp = self._backend.xp
        self._L[...] = xp.eye(self._m)
        self._Lspare[...] = xp.eye(self._m)
        self._count = 0
        self._since_refresh = 0
        self._stale = False
        if self._explicit:
            self._init_explicit()

    # -- factor maintenance ------------------------------------------------
    def _refactor(self):
        """Exact factor from the Gram matrix in arrival order: O(n^3)."""
        if self._explicit:
            return self._refactor_explicit()
        n = self._n()
        be = self._backend
        L = self._Lspare
        L[...] = be.xp.eye(self._m)
        if n:
            p = be.xp.asarray(self._perm())
            Kp = self._K[p][:, p]
            L[:n, :n] = cap.cholesky_shifted(Kp, self._N() * self._damping, be)
        self._L, self._Lspare = L, self._L
        self._stale = False
        self._since_refresh = 0

    def _refactor_explicit(self):
        """Exact C^{-1} = (N lambda I + K)^{-1} over all m slots from its Cholesky factor."""
        be = self._backend
        xp = be.xp
        Lc = cap.cholesky_shifted(self._K, self._N() * self._damping, be)
        Li = be.solve_triangular(Lc, xp.eye(self._m), lower=True)
        self._Lspare[...] = Li.T @ Li
        self._L, self._Lspare = self._Lspare, self._L
        self._logdetC = cap.logdet_factor(Lc, be)
        self._stale = False
        self._since_refresh = 0

    def _ensure_factor(self):
        if self._stale:
            self._refactor()

    def _validate_rows(self, g, finite=True):
        arr, _ = B.asarray(g, "g", backend=self._backend)
        if arr.ndim == 1:
            arr = arr[None, :]
        elif arr.ndim != 2:
            raise ValueError(f"g must be (dim,) or (k, dim) with dim={self._d}; got shape "
                             f"{tuple(arr.shape)}")
        if arr.shape[1] != self._d:
            raise ValueError(f"g must be (dim,) or (k, dim) with dim={self._d}; got "
                             f"{arr.shape[1]} columns")
        if finite:
            B.check_finite(arr, "g", self._backend)
        return arr.astype(np.float32 if self._kind else self._storage, copy=False)

    def _add_one(self, row, checked=True):
        """Add one gradient; atomic (restores G and K if the factor update fails).

        ``checked``: the row was checked for NaN/inf already (else the kernel
        path checks it at its synchronisation point and undoes the update).

        Returns (u, z, xq) for the fused step: u = G g in slot order (float64);
        when the factor was updated incrementally, z = L^{-1} u in arrival order
        (else None); on the kernel path xq, the padded float32 gradient as stored.
        """
        if self._kind:
            return self._add_one_kernel(row, check=not checked)
        be = self._backend
        xp = be.xp
        m = self._m
        s = self._count % m
        n_old = self._n()
        full = n_old == m
        undo = {"s": s, "old_row": self._G[s].copy(), "old_K": self._K[s].copy()}
        xq = None
        self._G[s] = row
        u = (self._G @ self._G[s]).astype(np.float64)   # one pass: the new Gram row
        self._K[s, :] = u
        self._K[:, s] = u
        self._count += 1
        try:
            incremental = not self._stale and self._since_refresh < self._refresh_every and (
                self._normalize == "window" or full)
            if not incremental:
                self._stale = True
                return u, None, xq
            n = self._n()
            perm = xp.asarray(self._perm())
            ua = u[perm]                                  # arrival order, newest last
            shift = self._N() * self._damping
            if full:
                cap.delete_first(self._L, m, self._Lspare, be)
                Lnew = self._Lspare
            else:
                Lnew = self._L
            try:
                ell, lnn = cap.append(Lnew, n - 1, ua[:-1], float(ua[-1]) + shift, be)
            except cap.NotPositiveDefinite:
                self._refactor()        # exact factor from K; raises if C really is singular
                return u, None, xq
            if full:
                self._L, self._Lspare = self._Lspare, self._L
            self._since_refresh += 1
            z = xp.empty(n, dtype=np.float64)
            z[:-1] = ell
            z[-1] = (float(ua[-1]) - B.scalar(ell @ ell)) / lnn
            return u, z, xq
        except Exception:
            self._rollback(undo)
            raise

    def _add_one_kernel(self, row, check=True, y=None):
        """The GPU kernel path of :meth:`_add_one` (float32 and 16-bit storage).

        About a dozen launches and one host synchronisation (the positivity
        check of the new pivot and the NaN/inf flag of g): one kernel writes g
        into its slot and computes u = G g (and, given ``y``, starts the step's
        pass 2: y = g / lambda); one updates the Gram row/column and gathers u in
        arrival order; the factor update is a trsv, a one-block coefficient
        kernel and a row-parallel kernel; the append is a trsv and one kernel that
        also yields z = L^{-1} u.  Returns (u, z, xq) like :meth:`_add_one`.
        """
        be = self._backend
        xp = be.xp
        m = self._m
        full = self._n() == m
        pending = self._kernel_pass1(row, check, y)
        s, u, xq = pending["s"], pending["u"], pending["xq"]
        n = self._n()
        start = (self._count - n) % m
        if self._explicit:
            return self._replace_explicit(pending)
        try:
            ua = xp.empty(m, dtype=np.float64)
            K_.gram_update(self._K, u, self._Kold, s, ua, start, n)
            pending["old_K"] = self._Kold
            incremental = not self._stale and self._since_refresh < self._refresh_every and (
                self._normalize == "window" or full)
            if not incremental:
                self._check_flag()
                self._stale = True
                return u, None, xq
            if full:
                cap.delete_first(self._L, m, self._Lspare, be)
                Lnew = self._Lspare
            else:
                Lnew = self._L
            ell = ua[:n - 1].copy()
            K_.trsv(Lnew, ell, n - 1, transpose=False)
            z = xp.empty(n, dtype=np.float64)
            ws = self._ws
            K_.append_row(Lnew, ell, z, ws[m + 1:m + 2], ua[n - 1:n], n - 1,
                          self._N() * self._damping)
            bad, r = ws[m:m + 2].get()                 # the one host synchronisation
            if bad or not r > 0.0:
                if not full:                           # put back the padding row
                    Lnew[n - 1, :n] = 0.0
                    Lnew[n - 1, n - 1] = 1.0
                if bad:
                    raise ValueError("g must be finite; got NaN or infinity")
                self._refactor()        # exact factor from K; raises if C really is singular
                return u, None, xq
            if full:
                self._L, self._Lspare = self._Lspare, self._L
            self._since_refresh += 1
            return u, z, xq
        except Exception:
            self._rollback(pending)
            raise

    def _kernel_pass1(self, row, check, y=None):
        """Kernel path, first pass: write g into the oldest slot s and compute u = G g in
        one kernel (which also saves the old row for :meth:`_rollback`, raises the
        workspace's NaN/inf flag if ``check``, and sets y = g / lambda if y is given);
        bump the count.  Returns the pending update: s, u (a view of the workspace), the
        stored gradient xq (padded float32) and what :meth:`_rollback` restores.
        """
        m = self._m
        s = self._count % m
        rows = min(self._n() + 1, m)
        if self._kind == "float32" and self._ld == self._d and row.flags.c_contiguous:
            xq = row                       # written as it is: no copy
        else:
            xq = self._padded_vector(row, round_=True)
        ws = self._ws
        ws.data.memset_async(0, ws.nbytes)
        u = ws[:m]
        K_.rows_dot(self._G, self._kind, xq, u, slot=s, rows=rows, backup=self._Gold,
                    flag=ws[m:m + 1] if check else None, y=y, inv_lam=1.0 / self._damping)
        self._count += 1
        return {"s": s, "old_row": self._Gold, "old_K": None, "xq": xq, "u": u, "z": None}

    def _check_flag(self):
        """Synchronise and raise if pass 1 found NaN or infinity in g (the flag is zero
        when the check was off)."""
        if self._ws[self._m:self._m + 1].get()[0]:
            raise ValueError("g must be finite; got NaN or infinity")

    def _step_explicit(self, row):
        """The fused step on the explicit path: five launches (a memset, pass 1 with the
        slot write and y = g / lambda, the two kernels of the rank-two update, which also
        give the coefficients c = C_new^{-1} u, and pass 2), all enqueued before the one
        synchronisation, so the host's launches overlap the GPU's work."""
        y = self._backend.xp.empty(self._ld, dtype=np.float32)
        pending = self._replace_explicit_launch(self._kernel_pass1(row, True, y))
        xq = pending["xq"]
        if pending["z"] is None:                     # stale: rebuilt at the query below
            return self.matvec(xq[:self._d])
        self._combine_kernel(y, self._c32)           # pass 2, enqueued
        if not self._replace_explicit_finish(pending):
            return self.matvec(xq[:self._d])
        return y[:self._d]

    def _replace_explicit(self, pending):
        """Rank-two update of C^{-1} for the pending slot replacement (explicit path).

        Returns (u, z, xq) like :meth:`_add_one` with z = C_new^{-1} u (slot order), or z None
        when the inverse was rebuilt exactly instead (refresh due, or a doubtful pivot).
        """
        pending = self._replace_explicit_launch(pending)
        u, xq = pending["u"], pending["xq"]
        if pending["z"] is None:
            return u, None, xq
        return u, (pending["z"] if self._replace_explicit_finish(pending) else None), xq

    def _replace_explicit_launch(self, pending):
        """Enqueue the rank-two update into the spare buffer; no host synchronisation
        (except when a refresh is due: the Gram row is updated, g's flag checked, and the
        window marked stale).

        The check (det M > 0, g finite) and the commit happen in
        :meth:`_replace_explicit_finish`, so that a caller can enqueue more work first
        (the fused step launches its second pass before it waits).
        """
        m = self._m
        u, s, ws = pending["u"], pending["s"], self._ws
        try:
            if self._stale or self._since_refresh >= self._refresh_every:
                K_.gram_update(self._K, u, self._Kold, s)
                pending["old_K"] = self._Kold
                self._check_flag()
                self._stale = True
                return pending
            K_.window_replace(self._L, self._Lspare, u, self._K, self._Kold, self._x2,
                              ws[m + 2:m + 3], self._z, self._c32, ws[m + 1:m + 2], s)
            pending["old_K"] = self._Kold
            pending["z"] = self._z                    # C_new^{-1} u, slot order
            return pending
        except Exception:
            self._rollback(pending)
            raise

    def _replace_explicit_finish(self, pending):
        """Synchronise once, check, and commit (True) or rebuild exactly (False); raises and
        rolls back if g was not finite or C cannot be factored."""
        m = self._m
        try:
            bad, dv = self._ws[m:m + 2].get()
            if bad:
                raise ValueError("g must be finite; got NaN or infinity")
            if not (dv > 1e-300 and math.isfinite(dv)):
                self._refactor()         # exact inverse from K; raises if C really is singular
                return False
        except Exception:
            self._rollback(pending)
            raise
        self._L, self._Lspare = self._Lspare, self._L
        self._logdetC += math.log(dv)
        self._since_refresh += 1
        return True

    def _rollback(self, pending):
        """Undo a slot replacement: the count, the buffer row and (if it was written) the
        Gram row/column."""
        s = pending["s"]
        self._count -= 1
        self._G[s] = pending["old_row"]
        if pending["old_K"] is not None:
            self._K[s, :] = pending["old_K"]
            self._K[:, s] = pending["old_K"]

    def _coefficients_kernel(self, z):
        """Back-substitute L^T c = z in place and scatter c to slot order as float32."""
        n = self._n()
        K_.trsv(self._L, z, n, transpose=True)
        c32 = self._backend.xp.empty(self._m, dtype=np.float32)
        K_.scatter_f32(z, c32, (self._count - n) % self._m, n)
        return c32

    def update(self, g):
        """Add one gradient (dim,) or a batch (k, dim) in order, evicting the oldest.

        O(dim m + m^2) per gradient.  Atomic: a gradient with the wrong shape
        or non-finite values (one bad row in a batch) raises and leaves the
        state exactly as before.
        """
        # on the kernel path each row's NaN/inf check is fused into its first pass
        rows = self._validate_rows(g, finite=not self._kind)
        checked = not self._kind
        if rows.shape[0] == 1:
            self._add_one(rows[0], checked=checked)
            return self
        snap = self._snapshot()
        try:
            for r in rows:
                self._add_one(r, checked=checked)
        except Exception:
            self._restore(snap)
            raise
        return self

    def step(self, g):
        """``update(g)`` then return F^{-1} g, fused: two passes over the buffer in all.

        ``g`` is one gradient (dim,); the result has g's dtype and namespace.
        """
        arr, _ = B.asarray(g, "g", backend=self._backend)
        if arr.ndim != 1 or arr.shape[0] != self._d:
            raise ValueError(f"g must have shape ({self._d},) for step; got shape "
                             f"{tuple(arr.shape)}")
        out_dtype = arr.dtype
        # on the kernel path the finiteness of g is read at the update's one sync
        row = self._validate_rows(arr, finite=not self._kind)[0]
        if self._explicit:
            return self._step_explicit(row).astype(out_dtype, copy=False)
        if self._kind:
            y = self._backend.xp.empty(self._ld, dtype=np.float32)
            u, z, xq = self._add_one_kernel(row, check=True, y=y)
            if z is None:       # factor rebuilt lazily: the general path
                return self.matvec(xq[:self._d]).astype(out_dtype, copy=False)
            self._combine_kernel(y, self._coefficients_kernel(z))
            return y[:self._d].astype(out_dtype, copy=False)
        u, z, xq = self._add_one(row)
        if z is None:           # factor rebuilt lazily: the general path
            return self.matvec(arr).astype(out_dtype, copy=False)
        c = self._back_solve(z)
        x = arr.astype(self._dtype, copy=False)
        return self._combine(x[:, None], c[:, None])[:, 0].astype(out_dtype, copy=False)

    # -- snapshots for atomic batches ----------------------------------------------
    def _snapshot(self):
        return {"G": self._G.copy(), "K": self._K.copy(), "L": self._L.copy(),
                "logdetC": self._logdetC,
                "count": self._count, "since": self._since_refresh, "stale": self._stale}

    def _restore(self, snap):
        self._G[...] = snap["G"]
        self._K[...] = snap["K"]
        self._L[...] = snap["L"]
        self._logdetC = snap["logdetC"]
        self._count = snap["count"]
        self._since_refresh = snap["since"]
        self._stale = snap["stale"]

    # -- products ----------------------------------------------------------------
    def _held(self):
        """The held rows in slot order as a float array (n, ld); 16-bit buffers converted."""
        n = self._n()
        G = self._G if n == self._m else self._G[:n]
        if self._kind in ("bfloat16", "float16"):
            return K_.to_float32(G, self._kind)
        return G

    def _pad(self, X):
        """X (d, k) zero-padded to the buffer's row length (ld, k)."""
        if self._ld == self._d:
            return X
        Xp = self._backend.xp.zeros((self._ld,) + X.shape[1:], dtype=X.dtype)
        Xp[:self._d] = X
        return Xp

    def _padded_vector(self, x, *, round_=False):
        """A contiguous float32 (ld,) copy of x, rounded to the storage format if asked."""
        xp = self._backend.xp
        out = xp.zeros(self._ld, dtype=np.float32)
        out[:self._d] = x
        if round_ and self._kind in ("bfloat16", "float16"):
            K_.round_to(self._kind, out, out)
        return out

    def _combine_kernel(self, y, c32):
        """Kernel pass 2: y -= G_h^T c / lambda, in place (y = x / lambda from pass 1)."""
        return K_.combine(self._G, self._kind, c32, y, -1.0 / self._damping, rows=self._n())

    def _to_arrival(self, U):
        """Rows of U (slot order, n rows) into arrival order."""
        return U[self._backend.xp.asarray(self._perm())]

    def _back_solve(self, Z):
        """Solve L^T C' = Z (arrival order, n rows) and return C' in slot order (float64)."""
        be = self._backend
        n = self._n()
        m = self._m
        rhs = be.xp.zeros((m,) + Z.shape[1:], dtype=np.float64)
        rhs[:n] = Z
        Ca = cap.backward(self._L, rhs, be)[:n]
        out = be.xp.empty_like(Ca)
        out[be.xp.asarray(self._perm())] = Ca
        return out

    def _solve_C(self, U):
        """C^{-1} U for U (n, k) in slot order; returns slot order, float64."""
        if self._explicit:
            n = self._n()
            return self._L[:n, :n] @ U
        be = self._backend
        n, m = self._n(), self._m
        rhs = be.xp.zeros((m,) + U.shape[1:], dtype=np.float64)
        rhs[:n] = self._to_arrival(U)
        Z = cap.forward(self._L, rhs, be)[:n]
        return self._back_solve(Z)

    def _combine(self, X, Cs):
        """(X - G_h^T Cs) / lambda: pass 2."""
        Gh = self._held()
        Y = (Gh.T @ (-Cs).astype(Gh.dtype))[:self._d]
        Y = Y.astype(X.dtype, copy=False)
        Y += X
        Y *= 1.0 / self._damping
        return Y

    def _matmat(self, X):
        if self._n() == 0:
            return X * (1.0 / self._damping)
        self._ensure_factor()
        if self._kind and X.shape[1] == 1:      # kernel path: two kernel passes
            xp = self._backend.xp
            x = X[:, 0]
            if self._ld == self._d and x.dtype == np.float32 and x.flags.c_contiguous:
                xq = x
            else:
                xq = self._padded_vector(x)
            n, m = self._n(), self._m
            start = (self._count - n) % m
            ws = self._ws
            ws.data.memset_async(0, ws.nbytes)
            u = ws[:m]
            y = xp.empty(self._ld, dtype=np.float32)
            K_.rows_dot(self._G, self._kind, xq, u, rows=n,                 # pass 1
                        flag=ws[m:m + 1] if self._check_finite else None, y=y,
                        inv_lam=1.0 / self._damping)
            if self._explicit:
                c32 = (self._L @ u).astype(np.float32)
            else:
                z = K_.gather_f64(u, xp.empty(m, dtype=np.float64), start, n)
                K_.trsv(self._L, z, n, transpose=False)
                c32 = self._coefficients_kernel(z)
            self._combine_kernel(y, c32)                                   # pass 2
            if self._check_finite and ws[m:m + 1].get()[0]:
                raise NonFiniteInput
            return y[:self._d, None].astype(X.dtype, copy=False)
        Gh = self._held()
        U = (Gh @ self._pad(X).astype(Gh.dtype, copy=False)).astype(np.float64)   # pass 1
        return self._combine(X, self._solve_C(U))

    def _checks_own_finite(self, X):
        """The kernel path of one vector flags NaN/inf during its first pass."""
        return bool(self._kind) and X.shape[1] == 1 and self._n() > 0

    def _quad(self, X):
        xp = self._backend.xp
        xx = xp.einsum("ij,ij->j", X, X).astype(np.float64)
        if self._n() == 0:
            return xx / self._damping
        self._ensure_factor()
        Gh = self._held()
        U = (Gh @ self._pad(X).astype(Gh.dtype, copy=False)).astype(np.float64)
        if self._explicit:
            return (xx - xp.einsum("ij,ij->j", U, self._solve_C(U))) / self._damping
        n, m = self._n(), self._m
        rhs = xp.zeros((m, U.shape[1]), dtype=np.float64)
        rhs[:n] = self._to_arrival(U)
        Z = cap.forward(self._L, rhs, self._backend)[:n]
        return (xx - xp.einsum("ij,ij->j", Z, Z)) / self._damping

    def _diagonal(self, chunk=4096):
        xp = self._backend.xp
        out = xp.full(self._d, 1.0 / self._damping, dtype=self._dtype)
        n = self._n()
        if n == 0:
            return out
        self._ensure_factor()
        Gh = self._held()
        m = self._m
        if self._explicit:      # 1 - sum_i g_i (C^{-1} G_h)_i, in column chunks: O(dim n^2)
            for a in range(0, self._d, chunk):
                b = min(self._d, a + chunk)
                Gc = Gh[:, a:b].astype(np.float64)
                s_ = (Gc * self._solve_C(Gc)).sum(axis=0)
                out[a:b] -= (s_ / self._damping).astype(self._dtype)
            return out
        perm = xp.asarray(self._perm())
        for a in range(0, self._d, chunk):
            b = min(self._d, a + chunk)
            rhs = xp.zeros((m, b - a), dtype=np.float64)
            rhs[:n] = Gh[perm, a:b]
            Z = cap.forward(self._L, rhs, self._backend)[:n]
            out[a:b] -= (xp.einsum("ij,ij->j", Z, Z) / self._damping).astype(self._dtype)
        return out

    def _entry(self, i, j):
        if self._n() == 0:
            return (1.0 / self._damping) if i == j else 0.0
        self._ensure_factor()
        Gh = self._held()
        U = Gh[:, [i, j]].astype(np.float64)
        Cs = self._solve_C(U[:, 1:2])
        val = B.scalar(U[:, 0] @ Cs[:, 0])
        return ((1.0 if i == j else 0.0) - val) / self._damping

    # -- inverse-Fisher extras -------------------------------------------------------
    def logdet(self):
        r"""log det F = d log lambda + log det C - n log(N lambda)  (determinant lemma).  O(n)."""
        n = self._n()
        lam = self._damping
        if n == 0:
            return self._d * math.log(lam)
        self._ensure_factor()
        if self._explicit:      # log det C over all m slots, less the m - n empty ones
            ld = self._logdetC - (self._m - n) * math.log(self._N() * lam)
        else:
            ld = cap.logdet_factor(self._L[:n, :n], self._backend)
        return self._d * math.log(lam) + ld - n * math.log(self._N() * lam)

    def lowrank_batches(self):
        """Yield (columns (1, d), 1/lambda, -1/lambda, V (1, n, d)) with V = L^{-1} G_h (arrival
        order): F^{-1} = (I - V^T V)/lambda.  Forms V: O(dim n^2) time, n x dim memory."""
        n = self._n()
        xp = self._backend.xp
        if n == 0:
            yield np.arange(self._d)[None, :], 1.0 / self._damping, 0.0, \
                xp.zeros((1, 1, self._d), dtype=self._dtype)
            return
        self._ensure_factor()
        if self._explicit:      # a Cholesky factor on demand, slot order: O(n^3)
            Gh = self._held()[:, :self._d].astype(np.float64)
            Lh = cap.cholesky_shifted(self._K[:n, :n], self._N() * self._damping, self._backend)
        else:
            Gh = self._held()[xp.asarray(self._perm())][:, :self._d].astype(np.float64)
            Lh = self._L[:n, :n]
        V = self._backend.solve_triangular(Lh, Gh, lower=True)
        yield np.arange(self._d)[None, :], 1.0 / self._damping, -1.0 / self._damping, \
            V.astype(self._dtype)[None]

    def fisher(self):
        """The forward F (same protocol); a live view that follows later updates."""
        return FisherOperator(self)

    def _fisher_matmat(self, X):
        """F X = lambda X + G_h^T (G_h X) / N: two passes, O(dim n k)."""
        Y = X * self._damping
        if self._n():
            Gh = self._held()
            U = Gh @ self._pad(X).astype(Gh.dtype, copy=False)
            Y += (Gh.T @ (U * (1.0 / self._N())))[:self._d].astype(X.dtype, copy=False)
        return Y

    def _fisher_diagonal(self):
        """lambda + sum_i g_i^2 / N: one pass, O(dim n)."""
        xp = self._backend.xp
        out = xp.full(self._d, self._damping, dtype=self._dtype)
        if self._n():
            Gh = self._held()[:, :self._d]
            out += (xp.einsum("ij,ij->j", Gh, Gh) / self._N()).astype(self._dtype)
        return out

    def _fisher_entry(self, i, j):
        """lambda delta_ij + G_h[:, i] . G_h[:, j] / N: O(n)."""
        val = self._damping if i == j else 0.0
        if self._n():
            Gh = self._held()
            val += B.scalar(Gh[:, i].astype(np.float64) @ Gh[:, j].astype(np.float64)) / self._N()
        return val

    # -- checkpointing -------------------------------------------------------------
    def state_dict(self):
        """The whole state as host NumPy arrays and Python scalars (a copy).

        On the GPU kernel path (explicit C^{-1}) the checkpoint stores no factor: it is
        marked stale, and this window is marked stale too, so both rebuild C^{-1} exactly
        from the Gram matrix at their next use and stay bit-identical.
        """
        if self._explicit:
            self._stale = True
        return {
            "format_version": FORMAT_VERSION,
            "dim": self._d, "window": self._m, "damping": self._damping,
            "normalize": self._normalize, "dtype": self.storage_dtype,
            "refresh_every": self._refresh_every,
            "count": self._count, "since_refresh": self._since_refresh,
            "stale": self._stale,
            "G": B.to_host(self._G[:, :self._d]).copy(), "K": B.to_host(self._K).copy(),
            "L": np.eye(self._m) if self._explicit else B.to_host(self._L).copy(),
        }

    def load_state_dict(self, state):
        """Restore a state from :meth:`state_dict` (validated first; nothing changes on error)."""
        st = _validate_state(state)
        for key, mine in (("dim", self._d), ("window", self._m)):
            if st[key] != mine:
                raise ValueError(f"state: {key}={st[key]} does not match this window's {key}={mine}")
        if st["dtype"] != self.storage_dtype:
            raise ValueError(f"state: dtype={st['dtype']} does not match this window's "
                             f"dtype={self.storage_dtype}")
        xp = self._backend.xp
        with self._backend.device_context():
            G, K, L = (xp.asarray(st[k]) for k in ("G", "K", "L"))
        self._G[:, :self._d] = G
        self._K[...] = K
        self._L[...] = L
        self._Lspare[...] = xp.eye(self._m)
        self._damping = st["damping"]
        self._normalize = st["normalize"]
        self._refresh_every = st["refresh_every"]
        self._count = st["count"]
        self._since_refresh = st["since_refresh"]
        self._stale = st["stale"] or self._explicit
        return self

    def save(self, path):
        """Write the state to an ``.npz`` file (no pickles)."""
        st = self.state_dict()
        arrays = {k: np.asarray(v) for k, v in st.items() if k not in ("normalize", "dtype")}
        arrays["normalize"] = np.array(st["normalize"])
        arrays["dtype"] = np.array(st["dtype"])
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path, *, device=None):
        """Read a window written by :meth:`save` (``allow_pickle=False``); refuses bad files."""
        try:
            with np.load(path, allow_pickle=False) as f:
                raw = {k: f[k] for k in f.files}
        except FileNotFoundError:
            raise
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
            raise ValueError(f"cannot read a sliding-window file from {path}: {exc}") from None
        state = {}
        for k, v in raw.items():
            state[k] = v if v.ndim else v[()]
        for k in ("normalize", "dtype"):
            if k in state:
                state[k] = str(state[k])
        st = _validate_state(state)
        win = cls(st["dim"], st["window"], st["damping"], dtype=st["dtype"], device=device,
                  normalize=st["normalize"], refresh_every=st["refresh_every"])
        return win.load_state_dict(st)


def _positive_int(v, name):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an integer; got {type(v).__name__}")
    if v < 1:
        raise ValueError(f"{name} must be >= 1; got {v}")
    return int(v)


def _storage(dtype, backend):
    """(buffer dtype, kernel kind or None) for a storage dtype name on a backend."""
    name = getattr(dtype, "name", None) or (dtype.__name__ if isinstance(dtype, type) else str(dtype))
    allowed = ("float32", "float64") + (("float16", "bfloat16") if backend.name == "gpu" else ())
    if name not in allowed:
        extra = "" if backend.name == "gpu" else " (float16 and bfloat16 storage need the GPU)"
        raise ValueError(f"dtype must be one of {allowed}; got {dtype!r}{extra}")
    if backend.name != "gpu" or name == "float64":
        return np.dtype(name), None
    return (np.dtype(np.float32) if name == "float32" else np.dtype(np.uint16)), name


_STATE_KEYS = ("format_version", "dim", "window", "damping", "normalize", "dtype",
               "refresh_every", "count", "since_refresh", "stale", "G", "K", "L")


def _validate_state(state):
    """Check a state dict's keys, version, types and shapes; return a clean copy."""
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict; got {type(state).__name__}")
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
        raise ValueError(f"state is missing {missing}")
    ver = int(state["format_version"])
    if ver != FORMAT_VERSION:
        raise ValueError(f"state has format version {ver}; this library reads version "
                         f"{FORMAT_VERSION}")
    st = {k: state[k] for k in _STATE_KEYS}
    for k in ("dim", "window", "refresh_every"):
        st[k] = _positive_int(int(st[k]), k)
    for k in ("count", "since_refresh"):
        st[k] = int(st[k])
        if st[k] < 0:
            raise ValueError(f"state: {k} must be >= 0; got {st[k]}")
    st["damping"] = check_damping(float(st["damping"]))
    st["stale"] = bool(st["stale"])
    if st["normalize"] not in _NORMALIZE:
        raise ValueError(f"state: normalize must be 'window' or 'count'; got {st['normalize']!r}")
    if st["dtype"] not in ("float32", "float64", "float16", "bfloat16"):
        raise ValueError(f"state: dtype must be float32, float64, float16 or bfloat16; got "
                         f"{st['dtype']!r}")
    m, d = st["window"], st["dim"]
    gdt = "uint16" if st["dtype"] in ("float16", "bfloat16") else st["dtype"]
    for k, shape, dt in (("G", (m, d), gdt), ("K", (m, m), "float64"),
                         ("L", (m, m), "float64")):
        a = np.asarray(B.to_host(st[k]))
        if a.shape != shape:
            raise ValueError(f"state: {k} must have shape {shape}; got {a.shape}")
        if a.dtype != np.dtype(dt):
            raise ValueError(f"state: {k} must have dtype {dt}; got {a.dtype}")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise ValueError(f"state: {k} holds NaN or infinity")
        st[k] = a
    n = min(st["count"], m)
    if not st["stale"]:
        diag = np.diagonal(st["L"])
        if not (diag[:n] > 0).all() or not np.array_equal(st["L"][n:, n:], np.eye(m - n)):
            raise ValueError("state: L is not a valid factor for the gradients held")
    if n < m and np.any(st["G"][n:]):
        raise ValueError(f"state: count={st['count']} but rows beyond {n} of G are not empty")
    return st
