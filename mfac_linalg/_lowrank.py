r"""The form shared by the static, block and OBS code: :math:`\alpha I + \beta V^T V`.

An inverse Fisher block :math:`F_k^{-1}` with :math:`F_k = \lambda I_b + G_k^T G_k / N`
(:math:`G_k` the m x b columns of the gradients in block k) is held as
:math:`\alpha I + \beta V_k^T V_k` in one of two forms (docs/math.md §1):

* **dual** (Woodbury): with :math:`W_k` any matrix with :math:`W_k^T W_k = G_k^T G_k`
  (:math:`G_k` itself when m < b, its QR factor :math:`R_k` (b x b) when m >= b),
  :math:`C_k = N\lambda I + W_k W_k^T = L_k L_k^T` and :math:`V_k = L_k^{-1} W_k`:
  :math:`F_k^{-1} = (I - V_k^T V_k)/\lambda`, so :math:`\alpha = 1/\lambda`,
  :math:`\beta = -1/\lambda`;
* **primal** (m >= b only): :math:`F_k = L_k L_k^T` and :math:`V_k = L_k^{-1}`:
  :math:`\alpha = 0`, :math:`\beta = 1`.

Which form (:func:`build`): the dual form always when m < b.  When m >= b the
form is chosen by accuracy.  The primal form's relative error is about
:math:`\epsilon\,\kappa(F_k) = \epsilon\,\lambda_{max}/\lambda_{min}` (the Gram
product's rounding moves the smallest eigenvalue by :math:`\epsilon\lambda_{max}`);
the dual form's is at most :math:`\epsilon\,\lambda_{max}/\lambda` (the subtraction
``x - V^T V x``) and about :math:`\epsilon\,\lambda_{min}/\lambda` for a right-hand
side that reaches the smallest eigenvalue, because the null space of the
gradients is represented exactly.  So the dual form is taken when
:math:`\lambda_{min}(F_k) \le 4\lambda` (rank-deficient or nearly so: its
worst-case bound is then within a factor 4 of the primal's, and its typical
error is far smaller); otherwise the primal form.  :math:`\lambda_{min}` comes
from the eigenvalues of the Gram matrix (O(b^3), below the O(m b^2) product; see
:func:`build`).

Everything m x m or b x b is float64; V is stored in the gradients' dtype.
Blocks of equal size and form are stacked (leading axis) and computed as one
batch; a stack of one block (the static operator) goes through plain 2-D BLAS.
"""
from __future__ import annotations

import math
from contextlib import nullcontext as _no_context

import numpy as np

from . import _backend as B
from . import _threads
from ._threads import host_threads
from . import _validate as _v
from ._capacitance import NotPositiveDefinite   # the library's one such error (public)
from ._operator import NonFiniteInput

__all__ = ["LowRank", "build", "column_sumsq", "DUAL_MARGIN", "NotPositiveDefinite"]

#: the dual form is chosen for m >= b when lambda_min(F_k) <= DUAL_MARGIN * lambda
DUAL_MARGIN = 4.0


def _mT(A):
    return A.swapaxes(-1, -2)


def _sumsq(A, xp):
    """Squared norms of the columns (last axis) over every other axis, no temporaries."""
    return xp.einsum("ij,ij->j" if A.ndim == 2 else "nij,nij->j", A, A)


#: below this many elements a column-norm pass runs on one thread: on the 2-core
#: benchmark machine the threaded pass lost to one einsum for V of 1e7 elements and
#: gained for 6.4e7 (docs/benchmarks.md)
PARALLEL_MIN = 1 << 25

#: the compiled host pass (kernels/host.py) from this many elements of V (below, one
#: einsum costs less than the call), and on several threads from PARALLEL_MIN_COMPILED
#: (a thread's start, about 0.1 ms, against a read of V of 2^20 float32 at 0.1-0.2 ms)
COMPILED_MIN = 1 << 14
PARALLEL_MIN_COMPILED = 1 << 20


def row_sumsq(V, backend, alpha=None, beta=None):
    """sum_i V[..., i, :]**2: (r, c) -> (c,) or (nb, r, c) -> (nb, c), in V's dtype;
    with ``alpha``, ``beta``: alpha + beta * that, each thread scaling its own slice while
    it is in cache (no further pass over the result).

    One read of V.  On the GPU and, where Numba is installed, on the host
    (``kernels/host.py``) the sums are float64 and the result is rounded once, after
    alpha + beta * s; else the host reduces with ``numpy.einsum`` in V's dtype.  On the
    host, large arrays are cut into pieces (column ranges for a 2-D V or a stack of few
    blocks, else four runs of blocks a thread: ``_in_pieces``) and each piece is reduced on
    its own thread (the compiled kernel releases the GIL; ``einsum`` holds it on some
    paths, docs/benchmarks.md), writing its own
    slice of the result: the same sums, in the same order per column, as one call over
    the whole array.  Overflow is not reported here (callers check finiteness where it
    can happen).  O(size of V)."""
    xp = backend.xp
    if backend.is_gpu:
        red = B.kernel_module("reduce")
        if red.supports(V):                  # one read, float64 sums (kernels/reduce.py)
            with backend.device_context():
                return (red.sumsq_columns(V) if beta is None
                        else red.sumsq_columns(V, alpha, beta))
    two_d = V.ndim == 2
    V3 = V[None] if two_d else V
    nthreads = host_threads() if backend.is_host else 1
    host = B.kernel_module("host") if backend.is_host and V.size >= COMPILED_MIN else None
    if host is not None and host.available() and host.supports(V3):
        out3 = np.empty((V3.shape[0], V3.shape[-1]), dtype=V.dtype)
        a, b = (0.0, 1.0) if beta is None else (alpha, beta)

        def piece(sn, sc):
            host.sumsq_columns(V3, a, b, out3, sn.start, sn.stop, sc.start, sc.stop)
        _in_pieces(V3, nthreads if V.size >= PARALLEL_MIN_COMPILED else 1, piece,
                   col_pieces=4, min_cols=host.TILE)
        return out3[0] if two_d else out3

    spec = "ij,ij->j" if two_d else "nij,nij->nj"

    def affine(o):
        if beta is not None:
            o *= beta
            o += alpha
        return o

    if nthreads == 1 or V.size < PARALLEL_MIN:
        with np.errstate(over="ignore"):
            return affine(xp.einsum(spec, V, V))
    out = np.empty((V.shape[-1],) if two_d else (V.shape[0], V.shape[-1]), dtype=V.dtype)

    def piece(sn, sc):
        A, o = (V[:, sc], out[sc]) if two_d else (V[sn, :, sc], out[sn, sc])
        with np.errstate(over="ignore"):   # finiteness is the caller's check
            affine(np.einsum(spec, A, A, out=o))
    _in_pieces(V3, nthreads, piece)
    return out


def _in_pieces(V3, nthreads, piece, col_pieces=1, min_cols=1):
    """Run ``piece(sn, sc)`` over a partition of the stack V3 (nb, r, c) on ``nthreads``
    threads (``_threads.run``): ``col_pieces`` column ranges a thread, each at least
    ``min_cols`` wide, when the stack has few blocks (einsum is slower on many narrow
    strided pieces), else four runs of whole blocks a thread (contiguous)."""
    nb, _, c = V3.shape
    if nthreads == 1:
        piece(slice(0, nb), slice(0, c))
        return
    if nb < 4 * nthreads:
        parts = _threads.split(c, max(nthreads, min(col_pieces * nthreads,
                                                    c // max(1, min_cols))))
        jobs = [(slice(0, nb), slice(s, e)) for s, e in parts]
    else:
        jobs = [(slice(s, e), slice(0, c)) for s, e in _threads.split(nb, 4 * nthreads)]
    _threads.run(jobs, nthreads, piece)


class LowRank:
    r"""Stacked blocks of one size b and one form: block k is
    :math:`\alpha I + \beta V_k^T V_k` on the columns ``starts[k] + arange(b)``.

    Attributes
    ----------
    starts : numpy.ndarray (nb,)
        First column of each block (host).
    b, nb : int
        Block size and number of blocks.
    V : array (nb, r, b)
        The stored factor, in the gradients' dtype.
    L : array (nb, r, r), float64
        Cholesky factor of C_k (dual) or F_k (primal).
    alpha, beta : float
    primal : bool
    N, damping : normalisation and lambda (for the forward products).
    logdet : float
        sum_k log det F_k.
    """

    span = None     # (also for instances pickled before it existed)

    def __init__(self, starts, b, V, L, alpha, beta, primal, N, damping, logdet, backend):
        self.starts = np.asarray(starts, dtype=np.int64)
        self.b = int(b)
        self.nb = len(self.starts)
        if backend.is_gpu:
            # one layout on the GPU (the kernels read row-major blocks): results must not
            # depend on how V was produced, or copied
            V = backend.xp.ascontiguousarray(V)
        self.V, self.L = V, L
        self.alpha, self.beta = float(alpha), float(beta)
        self.primal = bool(primal)
        self.N, self.damping = N, damping
        self.logdet = float(logdet)
        self.backend = backend
        # set by with_index(): queries never write shared state (the exceptions, the
        # caches of facts about V (kernel_checks, _gpu_paths) and the GPU products'
        # buffers and graphs kept per thread and stream (_per_stream), are idempotent
        # or private to one thread and stream, and dropped by pickling)
        self.idx = None
        st = self.starts
        #: (first, last + 1) column when the blocks tile one contiguous range in order
        #: (then gathers and scatters are reshapes, no index arrays), else None
        self.span = ((int(st[0]), int(st[0]) + self.nb * self.b)
                     if self.nb and np.array_equal(st, st[0] + self.b * np.arange(self.nb))
                     else None)

    def view(self, Y):
        """The rows of Y (d, k) in this stack's blocks as a (nb, b, k) view where the
        blocks tile a contiguous range (``span``), else None."""
        if self.span is None:
            return None
        return Y[self.span[0]:self.span[1]].reshape(self.nb, self.b, *Y.shape[1:])

    def gather(self, X):
        """The rows of X (d, k) in this stack's blocks, as (nb, b, k): a view where the
        blocks tile a contiguous range (``span``), else a gathered copy."""
        if self.span is not None:
            return X[self.span[0]:self.span[1]].reshape(self.nb, self.b, *X.shape[1:])
        return X[self.idx]

    def scatter(self, out, Y):
        """Write Y (nb, b, ...) into the rows of ``out`` in this stack's blocks."""
        if self.span is not None:
            out[self.span[0]:self.span[1]] = Y.reshape(self.nb * self.b, *Y.shape[2:])
        else:
            out[self.idx] = Y

    def with_index(self):
        """Keep the column indices on the backend too (``idx``, for gathers and scatters
        of the block operator); returns self."""
        self.idx = self.backend.xp.asarray(self.cols())
        return self

    # -- layout ------------------------------------------------------------
    def cols(self):
        """Host (nb, b) column indices of the blocks (a fresh array)."""
        return self.starts[:, None] + np.arange(self.b)[None, :]

    def locate(self, start):
        """Position of the block starting at column ``start``, or None."""
        pos = int(np.searchsorted(self.starts, start))
        return pos if pos < self.nb and self.starts[pos] == start else None

    # -- inverse products ------------------------------------------------------
    def _squeeze(self, Xb):
        """(V, X) as 2-D arrays for a stack of one given a 2-D X (plain BLAS, no views
        to make), else as they are."""
        return (self.V[0], Xb) if Xb.ndim == 2 else (self.V, Xb)

    def kernel_checks(self, dtype, stacked=True):
        """True where a checked :meth:`matmat` of one vector of ``dtype`` (``stacked``: Xb
        of shape (nb, b, 1), else (b, 1)) with a flag of the caller's runs GPU kernels
        that raise it for a non-finite result: V's dtype, and V one large block
        (``wide_fits``) or a stack the block kernel takes (``fits``).  (Without a flag, V
        one large block in ``graph_fits``' range checks through the graph too,
        :meth:`vector`.)"""
        if not (self.backend.is_gpu and np.dtype(dtype) == self.V.dtype):
            return False
        wide, _, stack, _ = self._gpu_paths()
        return wide or (stacked and stack)

    def _gpu_paths(self):
        """(wide, graph, stack, plan): whether a one-vector GPU product of V's dtype may
        take ``apply_wide`` (V one large float32 block, ``wide_fits``), whether one with
        its own flag (or none) takes a ``WideGraph`` (``graph_fits``), whether it may take
        ``apply`` (a stack the block kernel takes), and the stack's register-kernel plan
        (``_reg_plan``); decided once, V never changing (it is asked on every matvec)."""
        paths = self.__dict__.get("_paths")
        if paths is None:
            kb = B.kernel_module("blocks")
            stack = bool(kb.fits(self.V))
            paths = self._paths = (bool(kb.wide_fits(self.V, self.alpha)),
                                   bool(kb.graph_fits(self.V, self.alpha)), stack,
                                   kb._reg_plan(self.V) if stack else None)
        return paths

    def vector(self, x, check):
        """(alpha I + beta V^T V) x for one vector x (b,) of V's dtype on V's device, as
        one CUDA graph (``WideGraph``, the float64-faithful passes), or None where the
        graph does not take V (``graph_fits``), this is not the GPU, or building the graph
        failed on this thread and stream (``wide_graph``: the caller's other paths then
        serve it).  ``check``: one synchronisation, ``NonFiniteInput`` when the result
        is not finite (as :meth:`matmat`); without it none (the first product of a
        thread and stream synchronises once, building the graph)."""
        if not (self.backend.is_gpu and self._gpu_paths()[1]):
            return None
        with self.backend.device_context():
            graph = self._per_stream("graph" if check else "graph0")
            if graph is None:           # building it failed on this thread and stream
                return None
            y, flagged = graph(x)
        if flagged:
            raise NonFiniteInput
        return y

    def _per_stream(self, kind):
        """This thread's ``kind`` (``"work"``: an ``apply_wide`` workspace for V;
        ``"graph"``, ``"graph0"``: a ``WideGraph`` with and without the check) for its
        current stream (``kernels/blocks.PerStream``): made on first use, reused by the
        later products of the same stream and thread."""
        streams = self.__dict__.get("_streams")
        if streams is None:
            streams = self.__dict__.setdefault("_streams", {})
        keep = streams.get(kind)
        if keep is None:
            kb = B.kernel_module("blocks")
            shape, V, a, b = self.V.shape[1:], self.V, self.alpha, self.beta
            make = ((lambda: kb.wide_workspace(*shape)) if kind == "work"
                    else (lambda: kb.wide_graph(V, a, b, kind == "graph")))
            keep = streams.setdefault(kind, kb.PerStream(make))
        return keep.current()

    def __getstate__(self):
        state = dict(self.__dict__)
        # about this V's memory, and this process's threads: made again there
        for key in ("_paths", "_streams"):
            state.pop(key, None)
        return state

    def matmat(self, Xb, check=False, flag=None, out=None):
        """(alpha I + beta V_k^T V_k) X_k for Xb of shape (nb, b, k), or (b, k) for a
        stack of one: two passes over V.

        The scale goes on the small (r, k) side and the d-sized result is built in
        place (no d-sized temporaries beyond the result).  On the GPU one vector goes
        through kernels (``kernels/blocks.py``, float64 sums rounded once): for one
        large block, the sliding window's two passes, as one CUDA graph (:meth:`vector`,
        ``graph_fits``; checked, a flag the kernel raises, read once) or, checked, for a
        flag of the caller's or a V outside the graph's range, launched one by one
        (``wide_fits``, :meth:`kernel_checks`); else cuBLAS's two GEMVs; for a stack,
        one thread block per block, with the flag when checked.

        ``check``: raise ``NonFiniteInput`` when X holds NaN or infinity or a product
        overflows, read from the result Y: with alpha != 0 every x_j enters y_j, and
        every u_i enters every y_j (0 * inf is NaN), so Y is finite exactly when X is
        and neither pass nor the final scaling overflows (a check of U alone missed a
        result that overflows the dtype only when scaled by alpha = 1/lambda).  One
        host read after pass 2.  ``flag`` (with ``check``, where :meth:`kernel_checks`):
        a zeroed one-element float64 device array the kernels raise instead, not read
        here (the caller reads it once for several products).  ``out`` (nb, b, 1): where
        the block kernel may write the result (the caller's array, no copy), which is
        then returned; other paths ignore it."""
        be = self.backend
        if be.is_gpu and Xb.shape[-1] == 1 and Xb.dtype == self.V.dtype:
            kb = B.kernel_module("blocks")
            wide, graph, stack, plan = self._gpu_paths()
            if graph and flag is None:
                # one large block (the static operator): the window's two float64-faithful
                # passes over many thread blocks as one CUDA graph; checked, its flag
                # read once
                y = self.vector(Xb.reshape(-1), check)
                if y is not None:
                    return y.reshape(Xb.shape)
            if check and wide:
                # the same passes launched one by one, for a flag of the caller's (a
                # stack of a block operator), a V the graph does not take, or a graph
                # that could not be built
                with be.device_context():
                    y, own = kb.apply_wide(self.V, Xb.reshape(-1), self.alpha, self.beta,
                                           True, flag, work=self._per_stream("work"))
                if flag is None and B.to_host(own)[0]:
                    raise NonFiniteInput
                return y.reshape(Xb.shape)
            if Xb.ndim == 3 and stack:
                # a stack: one thread block per block; checked, a flag the kernel raises
                # for a non-finite result
                dst = None if out is None else out[:, :, 0]
                with be.device_context():
                    res = kb.apply(self.V, Xb[:, :, 0], self.alpha, self.beta, check, flag,
                                   out=dst, plan=plan)
                if not check:
                    return res[:, :, None]
                if flag is None and B.scalar(res[1][0]):
                    raise NonFiniteInput
                return res[0][:, :, None]
        V, X = self._squeeze(Xb)
        # with ``check``, NaN/inf flow through on purpose and are reported below
        with np.errstate(invalid="ignore", over="ignore") if check else _no_context():
            U = V @ X                           # pass 1: (.., r, k)
            if not self.alpha:                  # primal: beta V^T V X
                if self.beta != 1.0:
                    U *= self.beta
                Y = _mT(V) @ U
            else:
                U *= self.beta / self.alpha     # dual: alpha (X + (beta/alpha) V^T U)
                Y = _mT(V) @ U                  # pass 2
                Y += X
                Y *= self.alpha
        if check and not bool(be.xp.isfinite(Y).all()):
            raise NonFiniteInput
        return Y

    def diagonal(self):
        """(nb, b) diagonals: alpha + beta * column norms of V_k squared.  One read of V
        (threaded on the host; on the GPU one kernel, float64 sums rounded once)."""
        return row_sumsq(self.V, self.backend, self.alpha, self.beta)

    def quad(self, Xb):
        """sum_k x_k^T (alpha I + beta V_k^T V_k) x_k for each of the k columns (float64);
        Xb (nb, b, k), or (b, k) for a stack of one."""
        xp = self.backend.xp
        V, X = self._squeeze(Xb)
        U = V @ X
        return (self.alpha * _sumsq(X, xp).astype(np.float64)
                + self.beta * _sumsq(U, xp).astype(np.float64))

    def entry(self, pos, i, j):
        """Entry (i, j) (local indices) of block ``pos``, float64 dot product."""
        V = self.V[pos]
        val = B.scalar(V[:, i].astype(np.float64) @ V[:, j].astype(np.float64))
        return (self.alpha if i == j else 0.0) + self.beta * val

    def dense(self, pos):
        """The dense b x b inverse block ``pos``, O(b^2 r)."""
        V = self.V[pos]
        H = _mT(V) @ V
        H *= self.beta
        H[self.backend.xp.diag_indices(self.b)] += self.alpha
        return H

    # -- forward products (through the factors) -----------------------------------
    def fisher_matmat(self, Xb):
        """F_k X_k: dual lambda X + V^T (L^T L (V X)) / N (L V = W); primal L (L^T X).
        Xb (nb, b, k), or (b, k) for a stack of one."""
        X64 = Xb.astype(np.float64)
        L = self.L[0] if Xb.ndim == 2 else self.L
        if self.primal:
            Y = L @ (_mT(L) @ X64)
        else:
            V = self._squeeze(Xb)[0].astype(np.float64)
            W = _mT(L) @ (L @ (V @ X64))
            Y = _mT(V) @ W
            Y *= 1.0 / self.N
            Y += self.damping * X64
        return Y.astype(Xb.dtype, copy=False)

    def fisher_entry(self, pos, i, j):
        """F_k[i, j]: O(r) (primal: rows of L) or O(r^2) (dual: columns of W = L V)."""
        L = self.L[pos]
        if self.primal:
            return B.scalar(L[i] @ L[j])
        V = self.V[pos]
        wi = L @ V[:, i].astype(np.float64)
        wj = L @ V[:, j].astype(np.float64)
        return B.scalar(wi @ wj) / self.N + (self.damping if i == j else 0.0)


# -- construction -------------------------------------------------------------------
def column_sumsq(G, backend, name="grads"):
    """diag(G^T G): the squared column norms of G (m, d), O(dm), in G's dtype.  Where
    they overflow that dtype, so would F's diagonal: a ValueError naming ``name``."""
    c = row_sumsq(G, backend)           # an overflow is reported just below
    _v.gram_finite(c, name, backend)
    return c


def _gram(W, backend, name):
    """W W^T (float64, symmetric) for W (nb, r, b); float32 data overflowing or too
    inexact is redone with float64 accumulation by the caller (``exact=True``)."""
    with np.errstate(over="ignore"):     # an overflow is detected (and redone) by the caller
        if W.shape[0] == 1:              # a 2-D GEMM: CuPy's batched matmul of one is slower
            K = (W[0] @ W[0].T).astype(np.float64, copy=False)[None]
        else:
            K = (W @ _mT(W)).astype(np.float64, copy=False)
    return (K + _mT(K)) * 0.5


def _gram64(W, backend):
    if W.shape[0] == 1:
        from ._capacitance import gram64
        return gram64(W[0], backend)[None]
    W64 = W.astype(np.float64)
    K = W64 @ _mT(W64)
    return (K + _mT(K)) * 0.5


def _cholesky(C, backend):
    """Batched lower Cholesky factor, or None when C is not numerically positive definite."""
    xp = backend.xp
    try:
        if C.shape[0] == 1 and backend.is_gpu:
            return backend.cholesky_lower(C[0])[None]       # checks finiteness itself
        L = backend.cholesky_lower(C[0])[None] if C.shape[0] == 1 else xp.linalg.cholesky(C)
    except np.linalg.LinAlgError:
        return None
    return L if bool(xp.isfinite(L).all()) else None


def _inv_lower(L, backend):
    """L^{-1} (batched, lower triangular, float64)."""
    xp = backend.xp
    r = L.shape[-1]
    if L.shape[0] == 1:
        return backend.solve_triangular(L[0], xp.eye(r), lower=True)[None]
    if backend.is_host and r >= 16:
        # LAPACK's triangular inverse, block by block: r^3 / 3 flops against a batched LU
        # solve's 8 r^3 / 3 (0.27 s against 0.73 s for 7813 blocks of r = 64; below r = 16
        # the loop's overhead loses to the batched call); it touches the lower triangle
        # only, so the strict upper one stays L's (a Cholesky factor's zeros)
        from scipy.linalg import lapack
        out = np.empty_like(L)
        for i in range(L.shape[0]):
            out[i], info = lapack.dtrtri(L[i], lower=1)
            if info != 0:      # a zero pivot: not from a Cholesky factor of an SPD matrix
                raise np.linalg.LinAlgError(f"singular triangular factor (block {i})")
        return out
    return xp.tril(xp.linalg.solve(L, xp.broadcast_to(xp.eye(r), L.shape)))


def _logdet_L(L, backend):
    xp = backend.xp
    return 2.0 * B.scalar(xp.log(xp.diagonal(L, axis1=-2, axis2=-1)).sum()) if L.size else 0.0


def _npd(name, shift):
    return NotPositiveDefinite(
        f"the capacitance matrix of {name} is not numerically positive definite: the damping "
        f"is too small for the gradients' scale (N*damping = {shift:.3e}); raise the damping "
        "or rescale the gradients")


#: elements of the temporary per chunk of blocks when V is written into W (in place)
INPLACE_CHUNK = 1 << 20


def _solve_into(L, W, backend):
    """V = L^{-1} W written over W (host only; W (nb, r, b), any strides with unit
    stride along b): one in-place BLAS trsm for a stack of one C-ordered block, else
    chunks of blocks through a temporary of about INPLACE_CHUNK elements.  Returns W."""
    nb, r, b = W.shape
    if nb == 1 and W[0].flags.c_contiguous:
        from scipy.linalg import blas
        trsm = blas.strsm if W.dtype == np.float32 else blas.dtrsm
        X = trsm(1.0, L[0].astype(W.dtype, copy=False), W[0].T, side=1, lower=1,
                 trans_a=1, overwrite_b=1)
        if not np.shares_memory(X, W):   # pragma: no cover - f2py copied after all
            W[0] = X.T
        return W
    for sl in _chunks(nb, r * max(r, b), backend):
        W[sl] = _inv_lower(L[sl], backend).astype(W.dtype) @ W[sl]
    return W


def _dual(W, starts, lam, N, backend, name, inplace=False):
    """Dual form for W (nb, r, b): C = N lam I + W W^T = L L^T, V = L^{-1} W
    (written over W when ``inplace``: host only, W then is the stored V)."""
    L = _dual_factor(W, lam, N, backend, name)
    return _dual_finish(W, L, starts, lam, N, backend, name, inplace)


def build_dual_inplace(views, starts, lam, N, backend, name="grads"):
    """Dual forms for several stacks W (nb, r, b) with r < b, each V written over its W
    (host only): every Cholesky factor first, then every solve, so that a factor that
    is not positive definite raises with every W unchanged."""
    Ls = [_dual_factor(W, lam, N, backend, name) for W in views]
    return [_dual_finish(W, L, st, lam, N, backend, name, True)
            for W, L, st in zip(views, Ls, starts)]


def _chunks(nb, per_block, backend):
    """Slices of a stack of nb blocks, each of about INPLACE_CHUNK elements of
    temporaries (``per_block`` elements a block) and at least two blocks, on the
    host; one slice on a GPU."""
    if not backend.is_host:
        return [slice(0, nb)]
    step = max(2, INPLACE_CHUNK // max(1, per_block))
    parts = [slice(s, min(nb, s + step)) for s in range(0, nb, step)]
    if len(parts) > 1 and parts[-1].stop - parts[-1].start == 1:
        # a stack of one takes the 2-D path (another LAPACK call): keep every chunk
        # batched, so the results are those of one batched call
        parts[-2:] = [slice(parts[-2].start, nb)]
    return parts


def _dual_factor(W, lam, N, backend, name):
    """The Cholesky factor L (nb, r, r) float64 of C = N lam I + W W^T, computed in
    chunks of blocks on the host (temporaries of a chunk, not of the stack)."""
    nb, r, b = W.shape
    parts = _chunks(nb, r * max(r, b), backend)
    if len(parts) == 1:
        return _dual_factor_chunk(W, lam, N, backend, name)
    L = backend.xp.empty((nb, r, r), dtype=np.float64)
    for sl in parts:
        L[sl] = _dual_factor_chunk(W[sl], lam, N, backend, name)
    return L


def _dual_factor_chunk(W, lam, N, backend, name):
    xp = backend.xp
    r = W.shape[1]
    shift = N * lam
    eye = xp.eye(r, dtype=np.float64)
    L = None
    if W.dtype != np.float64:
        # a float32 Gram that overflowed makes the factor non-finite: _cholesky says None
        L = _cholesky(_gram(W, backend, name) + shift * eye, backend)
    if L is None:   # float64 data, or a float32 Gram that overflowed or was too inexact
        K = _gram64(W, backend) if W.dtype != np.float64 else _gram(W, backend, name)
        _v.gram_finite(K, name, backend)
        L = _cholesky(K + shift * eye, backend)
        if L is None:
            raise _npd(name, shift)
    return L


def _dual_finish(W, L, starts, lam, N, backend, name, inplace):
    """V = L^{-1} W (over W when ``inplace``) and the LowRank of the dual form."""
    xp = backend.xp
    nb, r, b = W.shape
    shift = N * lam
    if inplace:
        V = _solve_into(L, W, backend)
    elif nb == 1:
        V = B.trsm_rows(L[0], W[0], backend)[None]
    else:
        parts = _chunks(nb, r * max(r, b), backend)
        V = xp.empty_like(W) if len(parts) > 1 else None
        for sl in parts:
            Vs = _inv_lower(L[sl], backend).astype(W.dtype) @ W[sl]
            if V is None:
                V = Vs
            else:
                V[sl] = Vs
    # |V| <= 1 in exact arithmetic (V^T V = I - lambda F^{-1}): a finite V sums to a
    # finite value, and a NaN or infinity in it makes the sum non-finite; no (r, b)
    # boolean temporary.  One host read for the check and log det L.
    vsum, ldl = B.to_host(xp.stack([V.sum().astype(np.float64),
                                    xp.log(xp.diagonal(L, axis1=-2, axis2=-1)).sum()]))
    if not math.isfinite(vsum):
        raise ValueError(f"{name} is too large for its dtype {W.dtype}: the factor overflows; "
                         "rescale it (and the damping by the square of the scale)")
    logdet = 2.0 * float(ldl) + nb * (b * math.log(lam) - r * math.log(shift))
    return LowRank(starts, b, V, L, 1.0 / lam, -1.0 / lam, False, N, lam, logdet, backend)


def _sel(A, mask, xp):
    """The blocks of the stack A where the host mask is True (A itself if all are)."""
    return A if mask.all() else A[xp.asarray(np.flatnonzero(mask))]


def _primal(K, Gb, starts, lam, N, backend, name):
    """Primal form from the Gram matrices K = G_k^T G_k (nb, b, b) float64:
    F_k = K / N + lam I = L L^T, V = L^{-1}.  A float32 Gram too inexact for the
    Cholesky is redone with float64 accumulation from ``Gb``."""
    xp = backend.xp
    b = K.shape[-1]
    eye = lam * xp.eye(b, dtype=np.float64)
    L = _cholesky(K / N + eye, backend)
    if L is None and Gb.dtype != np.float64:
        K = _gram64(_mT(Gb), backend)
        L = _cholesky(K / N + eye, backend)
    if L is None:
        raise _npd(name, lam)
    V = _inv_lower(L, backend).astype(Gb.dtype)
    return LowRank(starts, b, V, L, 0.0, 1.0, True, N, lam, _logdet_L(L, backend), backend)


def _qr_dual(Gb, starts, lam, N, backend, name):
    """Dual form for m >= b on the b x b factor R of G_k = Q_k R_k (O(m b^2))."""
    xp = backend.xp
    R = xp.linalg.qr(Gb[0], mode="r")[None] if Gb.shape[0] == 1 else \
        xp.linalg.qr(Gb, mode="r")
    if not bool(xp.isfinite(R).all()):
        raise ValueError(f"{name} is too large for its dtype {Gb.dtype}: its QR factor "
                         "overflows; rescale it (and the damping by the square of the scale)")
    return _dual(R, starts, lam, N, backend, name)


def build(Gb, starts, lam, N, backend, *, name="grads", form="auto", inplace=False):
    """Factor the blocks ``Gb`` (nb, m, b) (storage dtype) of F_k = lam I + G_k^T G_k / N.

    Returns a list of :class:`LowRank` (one per form present: blocks of the same
    size may take different forms).  ``form`` forces "dual" or "primal" (the
    primal form needs m >= b).  Cost O(nb m b min(m, b)); raises ValueError naming
    ``name`` when the products overflow or a factor is not positive definite.

    For m >= b the choice needs lambda_min(F_k) = lambda + mu_min(K_k / N): the
    eigenvalues of the Gram matrix (O(b^3), below the O(m b^2) Gram product), known
    to eps * mu_max; a block whose mu_min is below 3 lambda + 8 eps mu_max (eps of the
    storage dtype: indistinguishable from rank-deficient) takes the dual form, on
    its QR factor.

    ``inplace`` (host only): when m < b the factor V is written over ``Gb`` (which
    may be a strided view of the caller's gradients) and stored as that array; any
    error raised before the solve leaves ``Gb`` unchanged.  For m >= b (V is b x b)
    ``Gb`` is only read.
    """
    xp = backend.xp
    nb, m, b = Gb.shape
    starts = np.asarray(starts, dtype=np.int64)
    if m < b and form != "primal":
        return [_dual(Gb, starts, lam, N, backend, name, inplace=inplace)]
    if m < b:
        raise ValueError(f"form='primal' needs m >= b; got m={m}, b={b}")
    if form == "dual":
        return [_qr_dual(Gb, starts, lam, N, backend, name)]
    K = _gram(_mT(Gb), backend, name)                     # G_k^T G_k, (nb, b, b)
    if Gb.dtype != np.float64 and not bool(xp.isfinite(K).all()):
        K = _gram64(_mT(Gb), backend)
    _v.gram_finite(K, name, backend)
    if form == "auto":
        mu = B.to_host(xp.linalg.eigvalsh(K)) / N             # (nb, b), ascending
        eps = float(np.finfo(Gb.dtype).eps)
        dual = mu[:, 0] <= (DUAL_MARGIN - 1.0) * lam + 8.0 * eps * mu[:, -1]
    else:
        dual = np.zeros(nb, dtype=bool)
    out = []
    if dual.any():
        out.append(_qr_dual(_sel(Gb, dual, xp), starts[dual], lam, N, backend, name))
    if (~dual).any():
        out.append(_primal(_sel(K, ~dual, xp), _sel(Gb, ~dual, xp), starts[~dual], lam, N,
                           backend, name))
    return out
