"""Host (CPU) kernels compiled with Numba, where Numba is installed (the ``numba`` extra).

``sumsq_columns(V, alpha, beta, out, n0, n1, c0, c1)`` writes

    out[n, j] = alpha + beta * sum_i V[n, i, j]^2,   n0 <= n < n1,  c0 <= j < c1,

for a stack V (nb, r, c) of float32 or float64: the pass behind the static and block
operators' diagonals (diag(V^T V)) and F's diagonal (diag(G^T G)), with the semantics
of the GPU kernel in ``reduce.py``: float64 sums (a float32 V loses nothing to the
accumulation), one rounding to ``out``'s dtype after ``alpha + beta * s``, one read of
V.  Without it the host reduces with ``numpy.einsum``, which accumulates in V's dtype,
rounds three times and runs at 2-4x one read of V (it holds the GIL, so threads do not
help: docs/benchmarks.md).

The kernel walks its columns in tiles of ``TILE`` float64 sums (64 KiB, held in L2)
and adds eight rows of V per sweep over a tile (a matrix at most ``NARROW`` wide: one
row a sweep, so a block streams through in memory order), so each element of V is
read once.  V is read in place through its strides wherever its rows are contiguous
(a C-ordered stack, or column ranges of a C-ordered matrix such as the blocks that
``overwrite_grads=True`` leaves in the caller's gradient array); a stack whose
columns are contiguous instead (the transpose of a C-ordered one, as a primal-form
block factor L^-T is stored) is summed along them with four partial sums.  The
kernels release the GIL (``nogil=True``): ``_lowrank.row_sumsq`` runs one call per thread on disjoint column
ranges or runs of blocks, with the library's own threads rather than Numba's
threading layer (whose default is not safe for calls from several Python threads at
once).  Each column's sum is formed in a fixed order whatever the split, so the result
does not depend on the number of threads.  Non-finite values propagate (callers check
finiteness); a float64 sum beyond float32's range rounds to inf.

``project`` and ``combine`` are the sliding window's two passes over a float32
buffer with ``accumulate="float64"`` (docs/math.md §7) for one vector: u = G_h x and
y = (x - G_h^T c) / lambda with float64 products and sums, y rounded once.  Without
them those passes convert the buffer to float64 chunk by chunk and run float64 BLAS,
3.7-6.3x the time of a float32 step or matvec on 2 cores; compiled, the conversion
happens in registers and they take 1.2-1.7x (docs/benchmarks.md).

Set the environment variable ``MFAC_LINALG_NUMBA=0`` to keep the NumPy path with Numba
installed.  The compiled code is cached on disk by Numba (``cache=True``), so the
first call on a machine compiles (about a second a dtype) and later processes load it;
where Numba finds no writable cache directory it compiles in memory in every process.
"""
from __future__ import annotations

import os
import threading

__all__ = ["available", "supports", "sumsq_columns", "project", "combine", "TILE", "NARROW"]

#: float64 running sums a tile holds (64 KiB)
TILE = 8192
#: matrices at most this wide are read row after row (a small block streams through
#: in order, its sums held in L1); wider ones eight rows a sweep (fewer loads and
#: stores of the sums).  Chosen by V's width, never by a piece's, so the order of
#: each column's sum does not depend on the threads.
NARROW = 2048

_kernel = None          # the compiled column-norm kernels, once built
_passes = None          # the compiled pass kernels (project, combine), once built
_state = None           # None: not tried; True / False: Numba usable or not
_lock = threading.Lock()


def available():
    """True when Numba imports, compiles (``NUMBA_DISABLE_JIT`` unset) and
    ``MFAC_LINALG_NUMBA`` is not ``0``."""
    global _state
    if os.environ.get("MFAC_LINALG_NUMBA", "1").strip() == "0":
        return False
    if _state is None:
        try:
            import numba
            # NUMBA_DISABLE_JIT=1 (debugging, coverage) makes njit return the Python
            # function: thousands of times slower than einsum, so not used then
            _state = not numba.config.DISABLE_JIT
        except Exception:   # not installed, or broken (an llvmlite mismatch): use NumPy
            _state = False
    return _state


def supports(V):
    """Whether the kernels take the stack V (nb, r, c): a float32 or float64 host array
    in native byte order whose strides are non-negative and whose rows (or, as for a
    primal-form block factor L^-T, columns) are contiguous: C-ordered stacks, their
    transposes, and column ranges of a C-ordered matrix (the blocks ``overwrite_grads``
    leaves in the caller's gradient array)."""
    import numpy as np
    if not (isinstance(V, np.ndarray) and V.ndim == 3 and V.dtype in (np.float32, np.float64)
            and V.dtype.isnative):
        return False
    if V.size == 0:
        return True
    it = V.itemsize
    used = [(s, n) for s, n in zip(V.strides, V.shape) if n > 1]   # length-1 axes: any
    if any(s < 0 or s % it for s, _ in used):
        return False
    # the contiguous axis must really be (a broadcast axis has stride 0); the others
    # may be anything, a broadcast 0 included (the same row read again is right)
    cols = V.shape[2] <= 1 or V.strides[2] == it
    rows = V.shape[1] <= 1 or V.strides[1] == it
    return cols or rows


def _flat(V):
    """(x, element strides): x a 1-D view of the memory from V's first element to its
    last (V's own buffer: nothing is copied), and V's strides in elements (those of
    axes of length one set to 0)."""
    import numpy as np
    it = V.itemsize
    st = tuple(s // it if n > 1 else 0 for s, n in zip(V.strides, V.shape))
    span = 0 if V.size == 0 else 1 + sum(s * (n - 1) for s, n in zip(st, V.shape))
    x = np.lib.stride_tricks.as_strided(V, shape=(span,), strides=(it,),
                                        writeable=False)
    return x, st


def _build(compile_):
    """Compiled kernels, cached on disk where Numba finds a writable place (it raises at
    decoration where it finds none: then compiled in memory, every process)."""
    try:
        return compile_(cache=True)
    except RuntimeError:        # "cannot cache function ...: no locator available"
        return compile_(cache=False)


def _kernels(name, compiler):
    """The module global ``name`` (``_kernel`` or ``_passes``), built once by the module
    function ``compiler`` (looked up when first needed) under the lock."""
    found = globals()[name]
    if found is None:
        with _lock:
            found = globals()[name]
            if found is None:
                found = globals()[name] = _build(globals()[compiler])
    return found


def project(G, x, u, r0, r1, d):
    """u[r0:r1] = G[r0:r1, :d] @ x[:d] with float64 products and sums (pass 1 of the
    sliding window with ``accumulate="float64"``, docs/math.md §7).  G: (m, ld)
    C-contiguous float32 or float64; x: float64 or float32 vector; u: float64 (m,).
    Each row's dot product is one thread's, in a fixed order (SIMD lanes over tiles
    of ``TILE``); rows go four at a time from r0, so callers that split the rows
    start every piece at a multiple of four (each row then takes the same loop
    whatever the split).  Releases the GIL."""
    _kernels("_passes", "_compile_passes")[0](G, x, u, int(r0), int(r1), int(d))


def combine(G, x, c, n, inv_lam, y, c0, c1):
    """y[c0:c1] = (x[c0:c1] - G[:n, c0:c1]^T c[:n]) * inv_lam, summed in float64 and
    rounded once to y's dtype (pass 2 with ``accumulate="float64"``).  G as for
    :func:`project`; x, y vectors (float32 or float64); c float64 (>= n,).  Each
    column's sum is formed in a fixed order whatever the split.  Releases the GIL."""
    _kernels("_passes", "_compile_passes")[1](G, x, c, int(n), float(inv_lam), y, int(c0),
                                              int(c1))


def _compile(cache):
    import numba
    import numpy as np

    @numba.njit(nogil=True, cache=cache, boundscheck=False, fastmath={"contract"})
    def kernel(x, r, c, sb, sr, alpha, beta, out, n0, n1, c0, c1):  # pragma: no cover
        # V[n, k, j] = x[n sb + k sr + j]: x the flat memory of V (rows contiguous)
        y = out.reshape(-1)
        acc = np.empty(max(1, min(TILE, c1 - c0)), np.float64)
        # unsigned flat indices: no negative-index wrap-around, so the loops vectorise
        for n in range(n0, n1):
            for s in range(c0, c1, TILE):
                w = min(c1 - s, TILE)
                for j in range(w):
                    acc[j] = 0.0
                base = n * sb + s
                k = 0
                if c > NARROW:
                    while k + 8 <= r:
                        p0 = base + k * sr
                        p1 = p0 + sr
                        p2 = p1 + sr
                        p3 = p2 + sr
                        p4 = p3 + sr
                        p5 = p4 + sr
                        p6 = p5 + sr
                        p7 = p6 + sr
                        for j in range(w):
                            a0 = np.float64(x[np.uintp(p0 + j)])
                            a1 = np.float64(x[np.uintp(p1 + j)])
                            a2 = np.float64(x[np.uintp(p2 + j)])
                            a3 = np.float64(x[np.uintp(p3 + j)])
                            a4 = np.float64(x[np.uintp(p4 + j)])
                            a5 = np.float64(x[np.uintp(p5 + j)])
                            a6 = np.float64(x[np.uintp(p6 + j)])
                            a7 = np.float64(x[np.uintp(p7 + j)])
                            acc[j] = (acc[j] + a0 * a0 + a1 * a1 + a2 * a2 + a3 * a3
                                      + a4 * a4 + a5 * a5 + a6 * a6 + a7 * a7)
                        k += 8
                while k < r:
                    p0 = base + k * sr
                    for j in range(w):
                        a0 = np.float64(x[np.uintp(p0 + j)])
                        acc[j] = acc[j] + a0 * a0
                    k += 1
                q = n * c + s
                for j in range(w):
                    y[np.uintp(q + j)] = alpha + beta * acc[j]

    @numba.njit(nogil=True, cache=cache, boundscheck=False, fastmath={"contract"})
    def kernel_t(x, r, c, sb, sc, alpha, beta, out, n0, n1, c0, c1):  # pragma: no cover
        # V[n, i, j] = x[n sb + j sc + i]: each column of V[n] contiguous; four sums
        y = out.reshape(-1)
        for n in range(n0, n1):
            for j in range(c0, c1):
                p = n * sb + j * sc
                s0 = 0.0
                s1 = 0.0
                s2 = 0.0
                s3 = 0.0
                i = 0
                while i + 4 <= r:
                    a0 = np.float64(x[np.uintp(p + i)])
                    a1 = np.float64(x[np.uintp(p + i + 1)])
                    a2 = np.float64(x[np.uintp(p + i + 2)])
                    a3 = np.float64(x[np.uintp(p + i + 3)])
                    s0 = s0 + a0 * a0
                    s1 = s1 + a1 * a1
                    s2 = s2 + a2 * a2
                    s3 = s3 + a3 * a3
                    i += 4
                while i < r:
                    a0 = np.float64(x[np.uintp(p + i)])
                    s0 = s0 + a0 * a0
                    i += 1
                y[np.uintp(n * c + j)] = alpha + beta * ((s0 + s1) + (s2 + s3))
    return kernel, kernel_t


def _compile_passes(cache):
    import numba
    import numpy as np

    @numba.njit(nogil=True, cache=cache, boundscheck=False,
                fastmath={"contract", "reassoc"})
    def project(G, x, u, r0, r1, d):                    # pragma: no cover - compiled
        # u[i] = sum_j G[i, j] x[j] in float64, rows r0..r1, over tiles of x; the
        # reassociation lets each dot product run in SIMD lanes (a fixed order per row)
        ld = G.shape[1]
        g = G.reshape(-1)
        for i in range(r0, r1):
            u[i] = 0.0
        for s in range(0, d, TILE):
            w = min(d - s, TILE)
            xs = x[s:s + w]
            i = r0
            while i + 4 <= r1:
                p0 = i * ld + s
                p1 = p0 + ld
                p2 = p1 + ld
                p3 = p2 + ld
                a0 = 0.0
                a1 = 0.0
                a2 = 0.0
                a3 = 0.0
                for j in range(w):
                    xv = np.float64(xs[j])
                    a0 += np.float64(g[np.uintp(p0 + j)]) * xv
                    a1 += np.float64(g[np.uintp(p1 + j)]) * xv
                    a2 += np.float64(g[np.uintp(p2 + j)]) * xv
                    a3 += np.float64(g[np.uintp(p3 + j)]) * xv
                u[i] += a0
                u[i + 1] += a1
                u[i + 2] += a2
                u[i + 3] += a3
                i += 4
            while i < r1:
                p0 = i * ld + s
                a0 = 0.0
                for j in range(w):
                    a0 += np.float64(g[np.uintp(p0 + j)]) * np.float64(xs[j])
                u[i] += a0
                i += 1

    @numba.njit(nogil=True, cache=cache, boundscheck=False, fastmath={"contract"})
    def combine(G, x, c, n, inv_lam, y, c0, c1):       # pragma: no cover - compiled
        # y[j] = (x[j] - sum_k c[k] G[k, j]) * inv_lam in float64, one rounding to y
        ld = G.shape[1]
        g = G.reshape(-1)
        acc = np.empty(max(1, min(TILE, c1 - c0)), np.float64)
        for s in range(c0, c1, TILE):
            w = min(c1 - s, TILE)
            for j in range(w):
                acc[j] = np.float64(x[s + j])
            k = 0
            while k + 4 <= n:
                p0 = k * ld + s
                p1 = p0 + ld
                p2 = p1 + ld
                p3 = p2 + ld
                b0 = -c[k]
                b1 = -c[k + 1]
                b2 = -c[k + 2]
                b3 = -c[k + 3]
                for j in range(w):
                    acc[j] = (acc[j] + b0 * np.float64(g[np.uintp(p0 + j)])
                              + b1 * np.float64(g[np.uintp(p1 + j)])
                              + b2 * np.float64(g[np.uintp(p2 + j)])
                              + b3 * np.float64(g[np.uintp(p3 + j)]))
                k += 4
            while k < n:
                p0 = k * ld + s
                b0 = -c[k]
                for j in range(w):
                    acc[j] = acc[j] + b0 * np.float64(g[np.uintp(p0 + j)])
                k += 1
            for j in range(w):
                y[s + j] = acc[j] * inv_lam
    return project, combine


def sumsq_columns(V, alpha, beta, out, n0, n1, c0, c1):
    """out[n, c0:c1] = alpha + beta * sum_i V[n, :, c0:c1]**2 for n0 <= n < n1 (see the
    module's docstring).  V: (nb, r, c) float32 or float64 host array that ``supports``
    takes; out: (nb, c), float32 or float64, C-contiguous.  Releases the GIL while it
    runs."""
    kernel, kernel_t = _kernels("_kernel", "_compile")
    x, (sb, sr, sc) = _flat(V)
    args = (float(alpha), float(beta), out, int(n0), int(n1), int(c0), int(c1))
    if sc == 1 or V.shape[2] <= 1:
        kernel(x, V.shape[1], V.shape[2], sb, sr, *args)
    else:
        kernel_t(x, V.shape[1], V.shape[2], sb, sc, *args)
