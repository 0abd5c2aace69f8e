r"""The m x m float64 machinery: the capacitance engines of the sliding window.

Notation of docs/math.md §1-§2: C = s I + K, with K = G G^T the Gram matrix of
the m slots of a ring buffer G (rows of empty slots are zero) and s = N * damping
the shift.  Everything here is float64 and O(m^2) or O(m^3); nothing touches
d-sized data except :func:`gram` and :func:`gram64`.

Engines: one interface
----------------------
An engine keeps K (slot order) and a representation of C^{-1} that an exact
rebuild or a two-phase replacement keeps current.  Its interface, which the
single-device window (``mfac_linalg.sliding``) and the column-sharded window
both code against::

    eng = pick_engine(backend, storage, normalize, engine="auto", window=m)
    eng.rebuild(K, n, shift, start=0)      # exact, from the Gram matrix; atomic
    p = eng.replace(slot, u, shift, rebuild=False, status=None)
                                           # new state into spare storage, nothing
                                           # committed (K's row ``slot`` is written
                                           # in place, its old value kept in p)
    c = eng.coefficients(p)                # C_new^{-1} u (slot order), before commit
    ok = eng.commit(p)                     # make p current (may raise, see below)
    eng.rollback(p)                        # or undo it: the engine as before replace
    eng.solve(U)                           # C^{-1} U, U (n, k) in slot order
    eng.inner(U)                           # diag(U^T C^{-1} U), (k,)
    eng.logdet()                           # log det C over the n held slots
    eng.factor()                           # (L, order): C[order][:, order] = L L^T

``u`` is the new Gram row of ``slot``: u = G g over the buffer after g was written
into ``slot`` (float64, length m; zero for empty slots).  ``slot`` must be the
slot the ring buffer writes next, ``(start + n) % m``; a full window evicts the
oldest gradient there.  ``commit`` returns True when the state it makes current
is the one whose :meth:`coefficients` were handed out, and False when a deferred
check (GPU) found the incremental update doubtful and it rebuilt C exactly
instead (the caller recomputes from the committed state).  ``commit`` raises
:class:`NotPositiveDefinite`, :class:`NonFiniteGradient` (a NaN/inf flag that
the ring buffer's first pass wrote into ``status[0]``) or :class:`GramOverflow`;
then, and after any error of ``replace``, the engine is exactly as it was
before ``replace`` once :meth:`rollback` ran (``replace`` itself restores it
when it raises).  ``status`` (GPU kernel engines): a zeroed float64 device array
of length 4 shared with the ring buffer, read with one host synchronisation in
``commit``.

Two engines:

* :class:`CholeskyEngine` (arrival order, oldest first): C = L L^T, kept by a
  rank-one deletion (Gill, Golub, Murray and Saunders 1974, method C1; below)
  and an append per replacement, O(m^2).  CPU, and on the GPU through the
  kernels (``mfac_linalg.kernels.engines``).
* :class:`ExplicitEngine` (slot order, all m slots): C^{-1} itself, a
  replacement being a Schur-complement deletion and insertion (GEMV-shaped, no
  triangular solves; docs/math.md §2) with cancellation guards, log det C
  tracked through det C_new / det C = c_s sigma.  Chosen on the GPU for 32- and 16-bit storage with
  ``normalize="window"``; also available on the CPU.

A change of the shift (``normalize="count"`` while the window fills) or a due
refresh makes ``replace`` rebuild exactly, O(m^3), into the spare storage.

Rank-one update without a Python loop over rows
-----------------------------------------------
Deleting the oldest gradient is deleting the first row and column of C.  With
L = [[l11, 0], [l21, L22]], the factor of the remaining block C22 is
chol(L22 L22^T + v v^T), v = l21.  Write L22 L22^T + v v^T = L22 (I + p p^T)
L22^T with p = L22^{-1} v.  The Cholesky factor of I + p p^T is
D + tril(p beta^T, -1) with

    1/alpha_j = 1 + sum_{k<j} p_k^2,  d_j = sqrt(1 + alpha_j p_j^2),  beta_j = alpha_j p_j / d_j,

so the new factor is, entry by entry (i >= j),

    Lnew_ij = L22_ij d_j + beta_j (v_i - sum_{k<=j} L22_ik p_k).

The prefix sums run along rows; we sweep column blocks of ``block`` columns so
the working set stays in cache.  The result is written into the spare buffer,
shifted one row and column up-left, so that the current factor stays intact
until the commit.

Factor buffers are m x m and *padded*: ``[[L_n, 0], [0, I]]``, so every
triangular solve runs on the whole contiguous buffer and gives the active
solution in its first n entries for a right-hand side that is zero beyond n.
"""
from __future__ import annotations

import math

import numpy as np

from . import _backend as B

__all__ = ["gram", "gram64", "cholesky_shifted", "logdet_factor", "padded_identity",
           "padded_solve", "delete_first", "append", "NotPositiveDefinite",
           "NonFiniteGradient", "GramOverflow", "Pending", "CholeskyEngine",
           "ExplicitEngine", "pick_engine", "ENGINES"]

_BLOCK = 128
ENGINES = ("auto", "cholesky", "explicit")
_KERNEL_STORAGE = ("float32", "float16", "bfloat16")


class NotPositiveDefinite(ValueError):
    """The capacitance matrix is not numerically positive definite.

    Raised when the m x m capacitance matrix C = Nλ I_m + G Gᵀ of docs/math.md §1 (or
    its sliding-window update, §2) fails its Cholesky factorization: the damping λ is
    too small for the gradients' scale, so the Woodbury inverse cannot be formed
    reliably.  A failed update leaves the operator's state as it was (a failed
    construction builds nothing).  A subclass of ``ValueError``; the message gives Nλ.
    The remedy is a larger damping or rescaled gradients.

    Examples
    --------
    Three identical gradients (G Gᵀ of rank one) with a damping far below their scale:

    >>> import numpy as np
    >>> from mfac_linalg import NotPositiveDefinite, StaticInverseFisher
    >>> try:
    ...     StaticInverseFisher(np.ones((3, 4)), damping=1e-30)
    ... except NotPositiveDefinite as err:
    ...     print(type(err).__name__, isinstance(err, ValueError))
    NotPositiveDefinite True
    """


class NonFiniteGradient(ValueError):
    """A gradient held NaN or infinity (found in the ring buffer's first pass)."""

    def __init__(self, msg="g must be finite; got NaN or infinity"):
        super().__init__(msg)


class GramOverflow(ValueError):
    """A finite gradient whose Gram products overflow (u = G g holds inf or NaN)."""

    def __init__(self, msg=None):
        super().__init__(msg or "g is too large: its Gram products G g overflow; rescale it "
                         "(and the damping by the square of the scale)")


# -- small float64 helpers (also used by the static operator) ---------------------
def gram(G, backend, out=None):
    """K = G G^T in float64, exactly symmetric.  O(d m^2), one matrix product.

    The product runs in the storage dtype of ``G`` (float32 accumulation for
    float32 data); only the m x m result is promoted to float64.
    """
    K = (G @ G.T).astype(np.float64, copy=False)
    K = (K + K.T) * 0.5
    if out is not None:
        out[...] = K
        return out
    return K


def gram64(G, backend, chunk=1 << 16):
    """K = G G^T accumulated in float64 (column chunks of G, bounded extra memory)."""
    xp = backend.xp
    m, d = G.shape
    K = xp.zeros((m, m), dtype=np.float64)
    for start in range(0, d, chunk):
        Gc = G[:, start:start + chunk].astype(np.float64)
        K += Gc @ Gc.T
    return (K + K.T) * 0.5


def _npd(shift, K, backend):
    xp = backend.xp
    big = B.scalar(xp.abs(K).max()) if K.size else 0.0
    return NotPositiveDefinite(
        "the capacitance matrix N*damping*I + G G^T is not numerically positive "
        "definite: the damping is too small relative to the gradients' scale "
        f"(N*damping = {shift:.3e}, largest Gram entry {big:.3e})")


def cholesky_shifted(K, shift, backend):
    """Lower factor of K + shift * I (float64).  Raises NotPositiveDefinite."""
    xp = backend.xp
    n = K.shape[0]
    C = K + shift * xp.eye(n, dtype=np.float64)
    try:
        return backend.cholesky_lower(C)
    except np.linalg.LinAlgError:
        raise _npd(shift, K, backend) from None


def logdet_factor(L, backend):
    """log det(L L^T) = 2 sum log diag(L), O(n).

    On the host with ``math.log`` and an exactly rounded sum (``math.fsum``): the same
    bits for the same factor wherever it is computed.  A vectorised ``log`` may take a
    SIMD path that depends on the array's memory alignment, so replicas of one state
    (the ranks of a sharded window) could disagree in the last bit."""
    if not L.shape[0]:
        return 0.0
    diag = np.asarray(B.to_host(backend.xp.diagonal(L)), dtype=np.float64)
    if not np.all(diag > 0.0):                  # not a factor of a PD matrix: as NumPy says
        with np.errstate(divide="ignore", invalid="ignore"):
            return 2.0 * float(np.log(diag).sum())
    return 2.0 * math.fsum(math.log(v) for v in diag.tolist())


def padded_identity(m, backend):
    """An m x m factor buffer holding the empty factor: the identity padding."""
    return backend.xp.eye(m, dtype=np.float64)


def padded_solve(L, R, n, backend, *, trans=False):
    """Solve L_n X = R (``trans``: L_n^T X = R) with the padded factor buffer L.

    R has n rows; it is zero-padded to the buffer's m rows so the solve runs on
    the whole contiguous buffer (no copy of a strided block).  Returns n rows.
    """
    m = L.shape[0]
    rhs = backend.xp.zeros((m,) + R.shape[1:], dtype=np.float64)
    rhs[:n] = R
    return backend.solve_triangular(L, rhs, lower=True, trans=trans)[:n]


def delete_first(src, n, dst, backend, block=_BLOCK):
    """Factor of C[1:, 1:] from the factor of C, shifted one row and column up-left.

    Reads ``src`` (active size n), writes ``dst`` (active size n - 1, padded).
    O(n^2): one triangular solve and one blocked sweep (module docstring).
    ``src`` is not modified.
    """
    xp = backend.xp
    m = src.shape[0]
    m1 = n - 1
    if m1 > 0:
        # p = L22^{-1} l21 = -l11 * (L^{-1} e_0)[1:n]  (a solve with the whole buffer)
        e0 = xp.zeros(m, dtype=np.float64)
        e0[0] = 1.0
        x = backend.solve_triangular(src, e0, lower=True)
        p = x[1:n] * (-src[0, 0])
        v = src[1:n, 0]
        L22 = src[1:n, 1:n]
        p2 = p * p
        inv_alpha = xp.empty_like(p2)
        inv_alpha[0] = 1.0
        xp.cumsum(p2[:-1], out=inv_alpha[1:])
        inv_alpha[1:] += 1.0
        alpha = 1.0 / inv_alpha
        dj = xp.sqrt(1.0 + alpha * p2)
        beta = alpha * p / dj
        run = xp.zeros(m1, dtype=np.float64)  # running sum_{k<j0} L22_ik p_k
        upper = xp.triu(xp.ones((block, block), dtype=bool), 1)
        for j0 in range(0, m1, block):
            j1 = min(m1, j0 + block)
            w = j1 - j0
            Lb = L22[j0:, j0:j1]
            M = Lb * p[j0:j1]
            xp.cumsum(M, axis=1, out=M)
            M += run[j0:, None]
            run[j0:] = M[:, -1]
            xp.subtract(v[j0:, None], M, out=M)      # Lnew = Lb * d + (v - M) * beta
            M *= beta[j0:j1]
            M += Lb * dj[j0:j1]
            M[:w][upper[:w, :w]] = 0.0               # zero above the diagonal
            dst[j0:m1, j0:j1] = M
    dst[max(m1, 0):n, :] = 0.0                       # padding rows/columns m1.. : identity
    dst[:n, max(m1, 0):n] = 0.0
    idx = xp.arange(max(m1, 0), n)
    dst[idx, idx] = 1.0
    return dst


def append(L, n, c, cnn, backend):
    """Extend the padded factor ``L`` (active size n) by one row for a new column of C.

    ``c`` (n,) holds the new gradient's entries of C with the older ones (factor
    order), ``cnn`` the new diagonal entry of C (the shift included).  Writes row
    n of ``L`` and returns ``(ell, lnn)`` with ell = L_n^{-1} c.  Raises
    NotPositiveDefinite, leaving ``L`` unchanged, when cnn - |ell|^2 <= 0.
    """
    xp = backend.xp
    if n:
        ell = padded_solve(L, c, n, backend)
        r = cnn - B.scalar(ell @ ell)
    else:
        ell = xp.zeros(0, dtype=np.float64)
        r = cnn
    if not r > 0.0:
        raise NotPositiveDefinite("appending a gradient made the capacitance matrix "
                                  "numerically singular: the damping is too small "
                                  "relative to the gradients' scale")
    lnn = math.sqrt(r)
    L[n, :n] = ell
    L[n, n] = lnn
    return ell, lnn


# -- the transaction ---------------------------------------------------------------
class Pending:
    """One replacement in flight: everything :meth:`commit` makes current and
    :meth:`rollback` undoes.  Engines fill the fields they use.

    Attributes: ``slot``, ``u`` (the new Gram row), ``old_K`` (the row it replaced),
    ``n``, ``start``, ``shift`` (the state after commit), ``rebuilt`` (the new state
    came from an exact rebuild), ``z`` (engine-specific partial solution), ``status``
    (device flags, GPU), ``host`` (those flags on the host, where a CUDA graph read
    them), ``logdet`` (explicit engine: log det C after commit).
    """

    __slots__ = ("slot", "u", "old_K", "n", "start", "shift", "rebuilt", "z", "status",
                 "logdet", "checked", "c32", "ua", "deferred", "host")

    def __init__(self, slot, u, n, start, shift, status=None):
        self.slot, self.u, self.n, self.start, self.shift = slot, u, n, start, shift
        self.status = status
        self.old_K = None
        self.rebuilt = False
        self.z = None
        self.logdet = None
        self.checked = status is None
        self.c32 = None
        self.ua = None
        self.deferred = False
        self.host = None        # the status as a CUDA graph copied it to the host (GPU)


class _Engine:
    """What both engines share: the Gram matrix, the held count, the transaction."""

    kind = ""

    def __init__(self, window, backend):
        self.m = int(window)
        self.backend = backend
        with backend.device_context():
            self.K = backend.xp.zeros((self.m, self.m), dtype=np.float64)
            self._alloc()
        self.n = 0
        self.start = 0
        self.shift = 0.0
        self.valid = False          # a factor matching K, n, start and shift (rebuild sets it)

    # subclasses: _alloc, _exact_into_spare(n, shift, start), _incremental(p), _swap(p)
    def perm(self, n=None, start=None):
        """Slots of the held gradients in arrival order (oldest first), host ints."""
        n = self.n if n is None else n
        start = self.start if start is None else start
        return (start + np.arange(n)) % self.m

    def rebuild(self, K, n, shift, start=0):
        """Exact state from the Gram matrix K (m x m, slot order): O(m^3).  Atomic:
        raises NotPositiveDefinite and leaves the engine as it was."""
        xp = self.backend.xp
        with self.backend.device_context():
            Knew = xp.array(K, dtype=np.float64)
        old = self.K
        self.K = Knew
        try:
            p = Pending(-1, None, int(n), int(start), float(shift))
            self._exact_into_spare(p)
        except Exception:
            self.K = old
            raise
        self._swap(p)
        self.n, self.start, self.shift = p.n, p.start, p.shift
        self.valid = True

    def refresh(self):
        """Rebuild exactly from the current K (atomic)."""
        self.rebuild(self.K, self.n, self.shift, self.start)

    def _write_gram(self, p):
        s = p.slot
        p.old_K = self.K[s].copy()
        self.K[s, :] = p.u
        self.K[:, s] = p.u

    def _restore_gram(self, p):
        if p.old_K is not None:
            self.K[p.slot, :] = p.old_K
            self.K[:, p.slot] = p.old_K

    def _pending(self, slot, u, shift, status):
        m, n = self.m, self.n
        if slot != (self.start + n) % m:
            raise ValueError(f"slot must be {(self.start + n) % m} (the ring buffer's next "
                             f"slot); got {slot}")
        full = n == m
        return Pending(slot, u, n if full else n + 1,
                       (self.start + 1) % m if full else self.start, float(shift), status)

    def replace(self, slot, u, shift, *, rebuild=False, defer=False, status=None):
        """Stage the replacement of ``slot``'s gradient (see the module docstring).

        ``defer``: write the Gram row only; the commit leaves the engine without a
        valid factor until a later ``replace(..., rebuild=True)`` or :meth:`refresh`
        (a batch of updates pays one O(m^3) rebuild instead of one per gradient).
        """
        p = self._pending(slot, u, shift, status)
        full = self.n == self.m
        self._write_gram(p)
        if defer:
            p.deferred = True
            return p
        try:
            if rebuild or p.shift != self.shift or not self.valid:
                self._exact_into_spare(p)
            else:
                self._incremental(p, full)
        except Exception:
            self._restore_gram(p)
            raise
        return p

    def commit(self, p):
        """Make ``p`` current.  Returns True, or False when a deferred check made it
        rebuild exactly (the coefficients handed out for ``p`` are then stale)."""
        ok = self._verify(p)
        if p.deferred:
            self.valid = False
        else:
            self._swap(p)
            self.valid = True
        self.n, self.start, self.shift = p.n, p.start, p.shift
        return ok

    def rollback(self, p):
        """Undo ``p`` (its Gram row); the factor was never touched."""
        self._restore_gram(p)

    def _verify(self, p):
        return True

    def snapshot(self):
        """A copy of the whole state (for an atomic batch): O(m^2) memory."""
        return (self.K.copy(), self._state_matrix().copy(), self.n, self.start, self.shift,
                self.valid, getattr(self, "logdet_C", None))

    def restore(self, snap):
        K, F, self.n, self.start, self.shift, self.valid, ld = snap
        self.K[...] = K
        self._state_matrix()[...] = F
        if ld is not None:
            self.logdet_C = ld

    def _exact(self, p):
        """Rebuild into the spare storage and mark ``p`` rebuilt."""
        self._exact_into_spare(p)
        p.rebuilt = True
        p.z = None


class CholeskyEngine(_Engine):
    """C = L L^T in arrival order (oldest first), a padded m x m factor and a spare.

    Costs: ``replace`` O(m^2) (deletion sweep + one triangular solve), O(m^3)
    when it rebuilds; ``solve`` O(n^2 k); ``logdet`` O(n).
    """

    kind = "cholesky"

    def _alloc(self):
        self.L = padded_identity(self.m, self.backend)
        self._spare = padded_identity(self.m, self.backend)

    def _swap(self, p):
        self.L, self._spare = self._spare, self.L

    def _state_matrix(self):
        return self.L

    def _exact_into_spare(self, p):
        be = self.backend
        L = self._spare
        if p.n:
            q = be.xp.asarray(self.perm(p.n, p.start))
            Ln = cholesky_shifted(self.K[q][:, q], p.shift, be)   # raises: spare untouched
            L[...] = be.xp.eye(self.m)
            L[:p.n, :p.n] = Ln
        else:
            L[...] = be.xp.eye(self.m)
        p.rebuilt = True
        p.z = None

    def _incremental(self, p, full):
        be = self.backend
        xp = be.xp
        ua = p.u[xp.asarray(self.perm(p.n, p.start))]        # arrival order, newest last
        if full:
            delete_first(self.L, self.m, self._spare, be)
        else:
            self._spare[...] = self.L
        try:
            ell, lnn = append(self._spare, p.n - 1, ua[:-1], float(ua[-1]) + p.shift, be)
        except NotPositiveDefinite:
            self._exact(p)            # exact factor from K; raises if C really is singular
            return
        z = xp.empty(p.n, dtype=np.float64)
        z[:-1] = ell
        z[-1] = (float(ua[-1]) - B.scalar(ell @ ell)) / lnn
        p.z = z                                              # L_new^{-1} u, arrival order

    def coefficients(self, p, dtype=np.float64):
        """C_new^{-1} u in slot order (n,), from the staged factor."""
        return self._solve_slots(self._spare, p.u, p.n, p.start, z=p.z)

    def _solve_slots(self, L, U, n, start, z=None):
        """(L L^T)^{-1} U in slot order for U in slot order (z: L^{-1} U in arrival order,
        when already known)."""
        be = self.backend
        q = be.xp.asarray(self.perm(n, start))
        Z = padded_solve(L, U[q], n, be) if z is None else z
        Ca = padded_solve(L, Z, n, be, trans=True)
        out = be.xp.empty_like(Ca)
        out[q] = Ca
        return out

    def solve(self, U):
        """C^{-1} U for U (n, k) in slot order; returns slot order, float64."""
        return self._solve_slots(self.L, U, self.n, self.start)

    def inner(self, U):
        """diag(U^T C^{-1} U) = |L^{-1} U|^2 column by column, (k,)."""
        be = self.backend
        Z = padded_solve(self.L, U[be.xp.asarray(self.perm())], self.n, be)
        return be.xp.einsum("ij,ij->j", Z, Z)

    def logdet(self):
        """log det C over the held slots: 2 sum log diag L.  O(n)."""
        return logdet_factor(self.L[:self.n, :self.n], self.backend)

    def factor(self):
        """(L_n, order): C restricted to the held slots in ``order`` is L_n L_n^T."""
        return self.L[:self.n, :self.n].copy(), self.perm()

    # -- checkpoints ----------------------------------------------------------------
    def export(self):
        """(factor m x m, log det C) as host arrays for a checkpoint."""
        return B.to_host(self.L).copy(), self.logdet()

    def load(self, K, F, n, shift, start, logdet=None):
        """Take a validated checkpoint's state as it is (bit for bit)."""
        xp = self.backend.xp
        with self.backend.device_context():
            self.K = xp.array(K, dtype=np.float64)
            self.L = xp.array(F, dtype=np.float64)
            self._spare = padded_identity(self.m, self.backend)
        self.n, self.start, self.shift = int(n), int(start), float(shift)
        self.valid = True


class ExplicitEngine(_Engine):
    """C^{-1} itself over all m slots (slot order; empty slots are zero gradients).

    Replacing slot s is a deletion and an insertion (two Schur complements, each a GEMV
    and a rank-one update, O(m^2); the GPU kernels fuse the same two steps and guards
    into two kernels).  Accuracy: an inverse updated in place
    carries a relative error growing to ~ eps cond(C)^2 between refreshes (each
    deletion and insertion cancels in proportion to cond(C)), which the window's
    Woodbury form amplifies by kappa_W = lambda_max(F)/lambda; the factor stays at
    ~ eps kappa_W (docs/sliding.md, "Accuracy").  Replacements whose cancellation would
    lose more than three (deletion) or six (insertion pivot) digits rebuild exactly,
    O(m^3).  Prefer the Cholesky engine for a badly conditioned float64 window.  log det C
    is carried along by the two Schur complements: log det C_new = log det C +
    log (C^{-1})_ss + log sigma (the deletion's and the insertion's pivots; the GPU
    kernels return the product of the two as det M).  Costs: ``replace``
    O(m^2), O(m^3) when it rebuilds; ``solve`` O(n^2 k); ``logdet`` O(1).
    """

    kind = "explicit"

    def _alloc(self):
        self.Ci = self.backend.xp.eye(self.m, dtype=np.float64)
        self._spare = self.backend.xp.eye(self.m, dtype=np.float64)
        self.logdet_C = 0.0

    def _swap(self, p):
        self.Ci, self._spare = self._spare, self.Ci
        self.logdet_C = p.logdet

    def _state_matrix(self):
        return self.Ci

    def _exact_into_spare(self, p):
        """C^{-1} = (s I + K)^{-1} over all m slots from its Cholesky factor."""
        be = self.backend
        xp = be.xp
        Lc = cholesky_shifted(self.K, p.shift, be)
        Li = be.solve_triangular(Lc, xp.eye(self.m), lower=True)
        self._spare[...] = Li.T @ Li
        p.logdet = logdet_factor(Lc, be)
        p.rebuilt = True
        p.z = None

    def _incremental(self, p, full):
        """Replace slot s in two Schur-complement steps, each a GEMV and a rank-one
        update: delete s, (C_{-s})^{-1} = C^{-1}_{-s} - c c^T / c_s with c = C^{-1} e_s;
        insert the new row b = u (b_s = 0), y = (C_{-s})^{-1} b, pivot sigma = s + u_s -
        b.y > 0, C_new^{-1} = [[(C_{-s})^{-1} + y y^T / sigma, -y / sigma], [., 1/sigma]].
        det C_new = det C * c_s * sigma.  (The GPU kernels fuse the same steps and guards,
        ``mfac_linalg.kernels.engines``.)"""
        xp = self.backend.xp
        s, out = p.slot, self._spare
        c = self.Ci[:, s].copy()
        css = float(c[s])
        b = p.u.copy()
        cnn = p.shift + float(b[s])
        b[s] = 0.0
        # the deletion cancels: it amplifies the inverse's error by about
        # max|c|^2 / (c_s max diag C^{-1}); beyond 1e3 the inverse is rebuilt exactly
        growth = B.scalar(xp.abs(c).max()) ** 2 / (css * B.scalar(xp.diagonal(self.Ci).max())) \
            if css > 0.0 else math.inf
        if not growth <= 1e3:
            self._exact(p)
            return
        xp.subtract(self.Ci, xp.outer(c, c * (1.0 / css)), out=out)
        out[s, :] = 0.0
        out[:, s] = 0.0
        y = out @ b
        sigma = cnn - B.scalar(b @ y)
        if not (sigma > 1e-6 * cnn and math.isfinite(sigma)):
            # the pivot lost six digits or more to cancellation, and y y^T / sigma would
            # carry that into the inverse: rebuild exactly (raises if C_new is singular)
            self._exact(p)
            return
        out += xp.outer(y, y * (1.0 / sigma))
        out[s, :] = y * (-1.0 / sigma)
        out[:, s] = y * (-1.0 / sigma)
        out[s, s] = 1.0 / sigma
        p.z = out @ p.u
        p.logdet = self.logdet_C + math.log(css) + math.log(sigma)

    def coefficients(self, p, dtype=np.float64):
        """C_new^{-1} u in slot order (n,), from the staged inverse."""
        if p.z is not None:
            return p.z if p.n == p.z.shape[0] else p.z[:p.n]
        return self._spare[:p.n, :p.n] @ p.u[:p.n]

    def solve(self, U):
        """C^{-1} U for U (n, k) in slot order."""
        n = self.n
        return self.Ci[:n, :n] @ U

    def inner(self, U):
        return self.backend.xp.einsum("ij,ij->j", U, self.solve(U))

    def logdet(self):
        """log det C over the held slots: the m-slot value less the empty slots'."""
        return self.logdet_C - (self.m - self.n) * math.log(self.shift) if self.n else 0.0

    def factor(self):
        """(L_n, order) on demand: chol(s I + K_n) in slot order, O(n^3)."""
        n = self.n
        return cholesky_shifted(self.K[:n, :n], self.shift, self.backend), np.arange(n)

    def export(self):
        return B.to_host(self.Ci).copy(), self.logdet_C

    def load(self, K, F, n, shift, start, logdet=None):
        xp = self.backend.xp
        with self.backend.device_context():
            self.K = xp.array(K, dtype=np.float64)
            self.Ci = xp.array(F, dtype=np.float64)
            self._spare = xp.eye(self.m, dtype=np.float64)
        self.logdet_C = float(logdet)
        self.n, self.start, self.shift = int(n), int(start), float(shift)
        self.valid = True


def engine_kind(backend, storage, normalize, engine="auto"):
    """The engine ``pick_engine`` builds: "explicit" for GPU 32/16-bit storage with
    ``normalize="window"`` (auto), else "cholesky"; an explicit choice wins."""
    if engine != "auto":
        return engine
    gpu_kernels = backend.is_gpu and storage in _KERNEL_STORAGE
    return "explicit" if gpu_kernels and normalize == "window" else "cholesky"


def pick_engine(backend, storage, normalize, engine="auto", *, window):
    """The m x m engine for a window: the one function that chooses.

    Parameters
    ----------
    backend : Backend
    storage : str
        The buffer's storage dtype name ("float64", "float32", "float16", "bfloat16").
    normalize : {"window", "count"}
    engine : {"auto", "cholesky", "explicit"}
    window : int
        m, the number of slots.

    Returns an engine with nothing held.  On the GPU it is the kernel variant
    (``mfac_linalg.kernels.engines``), on the CPU the array-API one.
    """
    kind = engine_kind(backend, storage, normalize, engine)
    if backend.is_gpu:
        mod = B.kernel_module("engines")
        cls = mod.ExplicitKernelEngine if kind == "explicit" else mod.CholeskyKernelEngine
    else:
        cls = ExplicitEngine if kind == "explicit" else CholeskyEngine
    return cls(window, backend)
