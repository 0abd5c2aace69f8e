"""Block-diagonal low-rank products on the GPU: every block in one kernel, V read about once.

``apply(V, X, alpha, beta)`` computes Y_n = alpha x_n + beta V_n^T (V_n x_n) for a stack
V (nb, r, b) (row-major blocks, float32 or float64) and one vector per block X (nb, b):
the products of :class:`~mfac_linalg._lowrank.LowRank` (dual form alpha = 1/lambda,
beta = -1/lambda; primal form alpha = 0).  CuPy's batched matmul with a single
right-hand side launches a batched GEMM per pass and runs far from the memory floor on
small blocks.

One thread block per matrix n.  Small blocks (rows of at most 32 16-byte groups, b <= 128
in float32 and b <= 64 in float64, a power of two of groups, r b / (16 / itemsize) at
most four groups a thread of 256 (16 KiB), V 16-byte aligned and C-contiguous) are held
in registers: every thread loads its part of V_n at once, so V_n is read once with all
its loads in flight, and both passes work on the registers (``_reg_plan``).  Otherwise
x_n is staged in shared memory, each warp forms the dot products u_i = V_n[i, :] . x_n
of its rows (coalesced along the row), then each thread owns columns j and sums
V_n[i, j] u_i over the rows (coalesced across the threads); its second read of V_n
(r b values, a few hundred KiB at most) is served mostly from L2, which the
neighbouring blocks in flight share.  Sums in float64 (free where float64
throughput matches float32, as on H100/H200; a few percent elsewhere, the kernel being
bound by memory), one rounding at the end; no atomics, so results are bit-reproducible
(for one kernel: the two kernels sum in different orders).
(``apply_wide``, for one large block, is the sliding window's two passes instead: its
pass 1 adds column chunks with float64 atomics, so y is reproducible to the rounding of
a float64 u, not bit for bit.)
"""
from __future__ import annotations

import threading

import numpy as np

from ._compile import function

__all__ = ["PerStream", "WideGraph", "apply", "apply_wide", "fits", "graph_fits", "wide_fits",
           "wide_graph", "wide_workspace"]

SOURCE = r"""
template <typename T>
__device__ void block_apply(const T* __restrict__ V, const T* __restrict__ X,
                            T* __restrict__ Y, int r, int b, double alpha, double beta,
                            double* __restrict__ flag) {
    extern __shared__ double sh[];
    double* xs = sh;            // b values
    double* us = sh + b;        // r values
    double* part = us + r;      // (groups, b) partial sums of pass 2 when b < blockDim
    const int n = blockIdx.x;
    const T* Vn = V + (long long)n * r * b;
    const T* xn = X + (long long)n * b;
    for (int j = threadIdx.x; j < b; j += blockDim.x) xs[j] = (double)xn[j];
    __syncthreads();
    // pass 1: u_i = V[i, :] . x, four rows per warp at a time (four loads in flight)
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int i0 = 4 * warp; i0 < r; i0 += 4 * nw) {
        const int nr = min(4, r - i0);
        const T* row = Vn + (long long)i0 * b;
        double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
        if (nr == 4) {
            for (int j = lane; j < b; j += 32) {
                const double xj = xs[j];
                a0 = fma((double)row[j], xj, a0);
                a1 = fma((double)row[b + j], xj, a1);
                a2 = fma((double)row[2 * b + j], xj, a2);
                a3 = fma((double)row[3 * b + j], xj, a3);
            }
        } else {
            for (int j = lane; j < b; j += 32) {
                const double xj = xs[j];
                a0 = fma((double)row[j], xj, a0);
                if (nr > 1) a1 = fma((double)row[b + j], xj, a1);
                if (nr > 2) a2 = fma((double)row[2 * b + j], xj, a2);
            }
        }
        #pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            a0 += __shfl_xor_sync(0xffffffffu, a0, o);
            a1 += __shfl_xor_sync(0xffffffffu, a1, o);
            a2 += __shfl_xor_sync(0xffffffffu, a2, o);
            a3 += __shfl_xor_sync(0xffffffffu, a3, o);
        }
        if (lane == 0) {
            us[i0] = a0;
            if (nr > 1) us[i0 + 1] = a1;
            if (nr > 2) us[i0 + 2] = a2;
            if (nr > 3) us[i0 + 3] = a3;
        }
    }
    __syncthreads();
    // pass 2: y_j = alpha x_j + beta sum_i V[i, j] u_i; with b < blockDim the rows are
    // split among G groups of b threads (partial sums added in a fixed order)
    const int G = b < (int)blockDim.x ? (int)blockDim.x / b : 1;
    const int g = threadIdx.x / b;
    T* yn = Y + (long long)n * b;
    bool bad = false;
    if (G > 1) {
        if (g < G) {
            const int j = threadIdx.x - g * b;
            double c0 = 0.0, c1 = 0.0, c2 = 0.0, c3 = 0.0;
            int i = g;
            for (; i + 3 * G < r; i += 4 * G) {
                c0 = fma((double)Vn[(long long)i * b + j], us[i], c0);
                c1 = fma((double)Vn[(long long)(i + G) * b + j], us[i + G], c1);
                c2 = fma((double)Vn[(long long)(i + 2 * G) * b + j], us[i + 2 * G], c2);
                c3 = fma((double)Vn[(long long)(i + 3 * G) * b + j], us[i + 3 * G], c3);
            }
            for (; i < r; i += G) c0 = fma((double)Vn[(long long)i * b + j], us[i], c0);
            part[g * b + j] = (c0 + c1) + (c2 + c3);
        }
        __syncthreads();
        for (int j = threadIdx.x; j < b; j += blockDim.x) {
            double acc = 0.0;
            for (int k = 0; k < G; ++k) acc += part[k * b + j];
            const T v = (T)(alpha * xs[j] + beta * acc);
            bad |= !isfinite((double)v);
            yn[j] = v;
        }
    } else {
        for (int j = threadIdx.x; j < b; j += blockDim.x) {
            double c0 = 0.0, c1 = 0.0, c2 = 0.0, c3 = 0.0;
            int i = 0;
            for (; i + 3 < r; i += 4) {
                c0 = fma((double)Vn[(long long)i * b + j], us[i], c0);
                c1 = fma((double)Vn[(long long)(i + 1) * b + j], us[i + 1], c1);
                c2 = fma((double)Vn[(long long)(i + 2) * b + j], us[i + 2], c2);
                c3 = fma((double)Vn[(long long)(i + 3) * b + j], us[i + 3], c3);
            }
            for (; i < r; ++i) c0 = fma((double)Vn[(long long)i * b + j], us[i], c0);
            const T v = (T)(alpha * xs[j] + beta * ((c0 + c1) + (c2 + c3)));
            bad |= !isfinite((double)v);
            yn[j] = v;
        }
    }
    if (bad && flag != nullptr) flag[0] = 1.0;     // the check: one host read of flag
}

// ---- small blocks held in registers: V_n read once, every load in flight at once ----
// For b/VEC a power of two <= 32 (VEC = 16 / sizeof(T) values per 16-byte load) and r b
// <= K VEC blockDim values: thread t owns the 16-byte group c = t % (b/VEC) of the rows
// g + k blockDim/(b/VEC), k < K (g = t / (b/VEC)), loaded together before any
// arithmetic, so the block's one read of V_n has K loads in flight per thread and
// pass 2 reads the registers instead of V again.  Pass 1's row sums: a fixed
// shuffle tree over the b/VEC threads of a row; pass 2's column sums: each thread
// over its rows in k order, then the row groups in order (shared memory).  float64
// sums, one rounding, no atomics: bit-reproducible for a given launch (not bit-equal
// to block_apply, whose sums run in another order).  Launch bound 256 threads; K = 4
// (the one compiled) takes 64 registers a thread in float32 (48 in float64): four
// blocks of 256 threads a multiprocessor.
template <typename T> struct Vec16;
template <> struct Vec16<float> { typedef float4 type; };
template <> struct Vec16<double> { typedef double2 type; };

template <typename T, int K>
__device__ void block_apply_reg(const T* __restrict__ V, const T* __restrict__ X,
                                T* __restrict__ Y, int r, int b, double alpha, double beta,
                                double* __restrict__ flag) {
    typedef typename Vec16<T>::type W;
    constexpr int VEC = 16 / sizeof(T);
    extern __shared__ double sh[];
    const int bv = b / VEC;                   // threads of a row
    const int rows_per = blockDim.x / bv;     // rows of one k step
    double* us = sh;                          // r values
    double* part = sh + r;                    // rows_per x b partial sums of pass 2
    const int n = blockIdx.x;
    const W* Vn = reinterpret_cast<const W*>(V + (long long)n * r * b);
    const T* xn = X + (long long)n * b;
    const int c = threadIdx.x % bv, g = threadIdx.x / bv;
    W v[K];
    #pragma unroll
    for (int k = 0; k < K; ++k) {
        const int i = g + k * rows_per;
        if (i < r) v[k] = Vn[(long long)i * bv + c];
    }
    double xv[VEC];
    #pragma unroll
    for (int q = 0; q < VEC; ++q) xv[q] = (double)xn[VEC * c + q];
    // pass 1: u_i = V[i, :] . x
    #pragma unroll
    for (int k = 0; k < K; ++k) {
        if (k * rows_per >= r) break;         // the same for every thread of the block
        const int i = g + k * rows_per;
        const T* e = reinterpret_cast<const T*>(&v[k]);
        double p = 0.0;
        if (i < r) {
            #pragma unroll
            for (int q = 0; q < VEC; ++q) p = fma((double)e[q], xv[q], p);
        }
        for (int o = bv >> 1; o > 0; o >>= 1) p += __shfl_xor_sync(0xffffffffu, p, o);
        if (c == 0 && i < r) us[i] = p;
    }
    __syncthreads();
    // pass 2: y_j = alpha x_j + beta sum_i V[i, j] u_i, from the registers
    double acc[VEC];
    #pragma unroll
    for (int q = 0; q < VEC; ++q) acc[q] = 0.0;
    #pragma unroll
    for (int k = 0; k < K; ++k) {
        if (k * rows_per >= r) break;
        const int i = g + k * rows_per;
        if (i < r) {
            const T* e = reinterpret_cast<const T*>(&v[k]);
            const double ui = us[i];
            #pragma unroll
            for (int q = 0; q < VEC; ++q) acc[q] = fma((double)e[q], ui, acc[q]);
        }
    }
    #pragma unroll
    for (int q = 0; q < VEC; ++q) part[g * b + VEC * c + q] = acc[q];
    __syncthreads();
    T* yn = Y + (long long)n * b;
    bool bad = false;
    for (int j = threadIdx.x; j < b; j += blockDim.x) {
        double s = 0.0;
        for (int h = 0; h < rows_per; ++h) s += part[h * b + j];
        const T y = (T)(alpha * (double)xn[j] + beta * s);
        bad |= !isfinite((double)y);
        yn[j] = y;
    }
    if (bad && flag != nullptr) flag[0] = 1.0;
}

extern "C" {
__global__ void __launch_bounds__(256, 2)
block_apply_reg_f32_4(const float* V, const float* X, float* Y, int r, int b,
                       double alpha, double beta, double* flag) {
    block_apply_reg<float, 4>(V, X, Y, r, b, alpha, beta, flag); }
__global__ void __launch_bounds__(256, 2)
block_apply_reg_f64_4(const double* V, const double* X, double* Y, int r, int b,
                       double alpha, double beta, double* flag) {
    block_apply_reg<double, 4>(V, X, Y, r, b, alpha, beta, flag); }
__global__ void block_apply_f32(const float* V, const float* X, float* Y, int r, int b,
                                double alpha, double beta, double* flag) {
    block_apply<float>(V, X, Y, r, b, alpha, beta, flag); }
__global__ void block_apply_f64(const double* V, const double* X, double* Y, int r, int b,
                                double alpha, double beta, double* flag) {
    block_apply<double>(V, X, Y, r, b, alpha, beta, flag); }
}
"""

_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}
#: shared memory the kernel may ask for (float64 x, u and pass-2 partial sums)
MAX_SHARED = 40 * 1024
MAX_GRID = 2**31 - 1


def fits(V):
    """True where :func:`apply` takes V: a C-contiguous float32/float64 stack whose
    blocks' (b + r) float64 values fit the shared memory."""
    if V.ndim != 3 or np.dtype(V.dtype) not in _SUFFIX or not V.flags.c_contiguous:
        return False
    nb, r, b = V.shape
    return 0 < nb <= MAX_GRID and _shared(r, b, _threads(r, b)) <= MAX_SHARED


def _threads(r, b):
    return 512 if r * b >= 65536 else 256


def _shared(r, b, threads):
    """Bytes of shared memory: x, u and, when b < threads, the pass-2 partial sums."""
    return 8 * (b + r + (threads // b) * b if b < threads else b + r)


_ASK = object()


def apply(V, X, alpha, beta, check=False, flag=None, out=None, plan=_ASK):
    """Y (nb, b) = alpha X + beta V_k^T (V_k X_k) per block, for V (nb, r, b) with
    ``fits(V)`` and X (nb, b) of V's dtype (copied to contiguous if it is not).
    Returns Y, or with ``check`` (Y, flag): ``flag`` a one-element float64 device array
    that the kernel sets to 1 when an entry of Y is not finite (a NaN or infinity in X,
    or a result beyond the dtype's range), read once by the caller; a ``flag`` given is
    used as it is (zeroed by the caller, shared by several launches).  ``out``: where Y
    goes when it is a C-contiguous (nb, b) array of V's dtype that does not overlap X
    (the block operator's result, written in place of a copy), else a new array.
    ``plan``: ``_reg_plan(V)`` where the caller keeps it (V unchanged), else asked here."""
    import cupy as cp
    nb, r, b = V.shape
    X = cp.ascontiguousarray(X, dtype=V.dtype)
    if (out is not None and out.shape == (nb, b) and out.dtype == V.dtype
            and out.flags.c_contiguous and not _overlap(out, X)):
        Y = out
    else:
        Y = cp.empty((nb, b), dtype=V.dtype)
    if check and flag is None:
        flag = cp.zeros(1, dtype=np.float64)
    args = (V, X, Y, np.int32(r), np.int32(b), np.float64(alpha), np.float64(beta),
            np.uintp(0) if flag is None else flag)
    if plan is _ASK:
        plan = _reg_plan(V)
    if plan is not None:        # small blocks: held in registers, V read once
        items, threads, shared = plan
        function(SOURCE, f"block_apply_reg_{_SUFFIX[np.dtype(V.dtype)]}_{items}")(
            (nb,), (threads,), args, shared_mem=shared)
    else:
        threads = _threads(r, b)
        function(SOURCE, f"block_apply_{_SUFFIX[np.dtype(V.dtype)]}")(
            (nb,), (threads,), args, shared_mem=_shared(r, b, threads))
    return (Y, flag) if check else Y


#: 16-byte groups of V per thread that the register kernel is compiled for.  Four only:
#: measured on an H100 (docs/benchmarks.md, "GPU, seventh round"), 8 and 16 groups a
#: thread (94-142 registers, one or two blocks a multiprocessor) took 1.23-1.36x the
#: general kernel's time on 32-64 KiB blocks, 4 groups 0.44-0.80x on 4-16 KiB blocks
REG_ITEMS = (4,)
#: the register kernels' ``__launch_bounds__`` (threads a block, at most)
REG_LAUNCH_BOUND = 256
#: most threads a block of the register kernel may have, up to ``REG_LAUNCH_BOUND``
#: (of ``REG_ITEMS``, the fewest items a thread that fit under it are taken)
REG_MAX_THREADS = 256


def _reg_plan(V):
    """(items per thread, threads, shared memory bytes) of the register kernel for the
    stack V (nb, r, b), or None where it does not take V: rows of b / (16 / itemsize)
    16-byte groups, a power of two at most 32 (the threads of a row are one aligned
    part of a warp), V 16-byte aligned and C-contiguous, and r b small enough that
    every value has a register (``REG_ITEMS[-1]`` groups a thread, at most
    ``REG_MAX_THREADS`` threads).  Which kernel runs (so the order of the float64 sums,
    and the result's last bit) depends on the shape, V's alignment and the cap; each is
    bit-reproducible."""
    nb, r, b = V.shape
    vec = 16 // V.itemsize
    bv = b // vec
    if (b % vec or not 0 < bv <= 32 or bv & (bv - 1) or V.data.ptr % 16
            or not V.flags.c_contiguous):
        return None
    cap = min(REG_MAX_THREADS, REG_LAUNCH_BOUND)
    for items in REG_ITEMS:
        per = -(-r * bv // items)                      # threads that hold every value
        threads = max(32, -(-per // 32) * 32)          # whole warps (bv divides 32)
        shared = 8 * (r + threads // bv * b)
        if threads <= cap and shared <= MAX_SHARED:
            # u (r) and pass 2's partial sums (threads / bv row groups x b), float64
            return items, threads, shared
    return None


def _overlap(a, b):
    """Whether the memory of two contiguous device arrays overlaps."""
    a0, b0 = a.data.ptr, b.data.ptr
    return a0 < b0 + b.nbytes and b0 < a0 + a.nbytes


#: largest r b that :func:`apply_wide` takes: measured on an H100 against cuBLAS GEMVs and
#: elementwise passes with the check (docs/benchmarks.md), 0.55-0.84x the time at
#: r b = 1.5e7-2.6e7 and 0.98-1.08x at 1e8-1e9, where the passes are at the memory floor
#: either way; the cap lies between the two measured ranges
WIDE_MAX_ELEMENTS = 50_000_000


def wide_fits(V, alpha, max_elements=None):
    """True where :func:`apply_wide` takes V: one float32 block (1, r, b) too large for
    :func:`apply` (a small one, such as the ragged last block of a block operator, is
    faster there or through cuBLAS than through four launches) and at most
    ``max_elements`` values (``WIDE_MAX_ELEMENTS``), C-contiguous, 16-byte aligned rows
    (b a multiple of 4), alpha != 0 (the dual form)."""
    if max_elements is None:
        max_elements = WIDE_MAX_ELEMENTS
    return (V.ndim == 3 and V.shape[0] == 1 and V.shape[1] > 0 and V.dtype == np.float32
            and V.shape[1] * V.shape[2] <= max_elements
            and V.flags.c_contiguous and V.shape[2] % 4 == 0 and V.data.ptr % 16 == 0
            and alpha != 0 and not fits(V))


def wide_workspace(r, b):
    """A reusable workspace of :func:`apply_wide` for V (1, r, b) on the current device:
    (ws, u, flag, count, part), ws float64 holding u (r), the flag and the split sums'
    counters (``apply_wide`` zeroes it with one memset), part the split sums (None with
    one split).  One per thread and stream (``PerStream``): the products of one stream
    are ordered."""
    import cupy as cp
    from . import sliding as K
    bx, splits, _ = K.combine_grid(r, b, "float32")
    ws = cp.zeros(r + 1 + (bx + 1) // 2, dtype=np.float64)
    part = cp.empty(splits * b, dtype=np.float64) if splits > 1 else None
    return ws, ws[:r], ws[r:r + 1], ws[r + 1:].view(np.uint32)[:bx], part


def apply_wide(V, x, alpha, beta, check=False, flag=None, work=None, out=None):
    """y = alpha x + beta V^T (V x) for one large block V (1, r, b) (``wide_fits``) and x
    (b,): two passes of the sliding window's float64-faithful kernels (u = V x with float64
    accumulators, then y = float32(alpha (x - V^T (-beta/alpha) u)) with float64 sums,
    rounded once; docs/math.md §7), the rows of pass 2 split across blocks so that a
    small b still fills the GPU.  Returns (y, flag): ``flag`` a one-element float64
    device array set to 1 when ``check`` and an entry of y is not finite, else None (a
    ``flag`` given is used instead of a new one: zeroed by the caller).  ``work``: a
    :func:`wide_workspace` for V's shape to use (zeroed here) instead of a new one;
    ``out``: a contiguous float32 (b,) array that receives y instead of a new one."""
    import cupy as cp
    from . import sliding as K
    _, r, b = V.shape
    G = V[0]
    x = x.astype(np.float32, copy=False)
    if not x.flags.c_contiguous or x.data.ptr % 16:
        x = x.copy()
    # u (r), the flag, and the counters of the split sums (zeroed together, one memset)
    if work is None:
        work = wide_workspace(r, b)
    else:
        work[0].data.memset_async(0, work[0].nbytes)
    _, u, own, count, part = work
    if flag is None:
        flag = own
    K.rows_dot(G, "float32", x, u, rows=r, wide=True)
    y = cp.empty(b, dtype=np.float32) if out is None else out
    K.combine_wide(G, "float32", u, x, y, None, part, count, rows=r, cscale=-beta / alpha,
                   flag=flag if check else None, inv_lam=alpha)
    return y, (flag if check else None)


#: ``WideGraph`` is taken for V (1, r, b) with r >= GRAPH_MIN_ROWS or r b <=
#: GRAPH_SMALL: its own copies of x and y (16 b bytes of traffic a product, 8 b bytes
#: of memory per host thread and stream) are then at most 1/32 of the two passes' 8 r b
#: bytes and of V, or the call is latency-bound and the launches are what count; up to
#: GRAPH_MAX_ELEMENTS values: beyond ``WIDE_MAX_ELEMENTS``, where the launches saved
#: still outweigh the passes' 0.98-1.08x of cuBLAS's time (docs/benchmarks.md)
GRAPH_MIN_ROWS = 64
GRAPH_SMALL = 1 << 22
GRAPH_MAX_ELEMENTS = 150_000_000


def graph_fits(V, alpha):
    """Whether the static operator's product of one vector takes :class:`WideGraph`:
    ``wide_fits`` up to ``GRAPH_MAX_ELEMENTS`` values, and r >= ``GRAPH_MIN_ROWS`` or
    r b <= ``GRAPH_SMALL``."""
    if not wide_fits(V, alpha, GRAPH_MAX_ELEMENTS):
        return False
    _, r, b = V.shape
    return r >= GRAPH_MIN_ROWS or r * b <= GRAPH_SMALL


def wide_graph(V, alpha, beta, check=True):
    """A :class:`WideGraph`, or None where building it fails with a CUDA error (no memory
    for its buffers, a capture spoiled by another thread's device-wide synchronisation):
    the caller then takes the kernels one by one or cuBLAS for that thread and stream."""
    import cupy as cp
    try:
        return WideGraph(V, alpha, beta, check)
    except (cp.cuda.memory.OutOfMemoryError, cp.cuda.runtime.CUDARuntimeError,
            cp.cuda.driver.CUDADriverError):
        return None


class WideGraph:
    """:func:`apply_wide` for one V (1, r, b), alpha and beta as a CUDA graph: its
    memset, both passes and, with ``check``, the flag's copy to pinned host memory,
    captured once on a private stream over buffers of its own (x, y, the workspace).
    A call copies x in, launches the graph on the current stream and copies y out into
    a new array; with ``check`` it then synchronises once and reads the flag, without
    it returns at once (the result ordered on the stream, as any CuPy result): two
    copies, a launch and y's allocation (and a copy of x first where it is not
    contiguous) instead of the workspace's allocation and fill, views and two launches
    with their arguments; what it captures is ``apply_wide`` itself.
    Building one synchronises the current stream and runs the product once before the
    capture (the kernels compiled and loaded).  One instance per stream and thread (its
    buffers are its own): the caller keeps them (``LowRank``)."""

    def __init__(self, V, alpha, beta, check=True):
        import cupy as cp
        _, r, b = V.shape
        self.b, self.check = b, bool(check)
        self.x = cp.zeros(b, dtype=np.float32)
        self.y = cp.empty(b, dtype=np.float32)
        self.work = wide_workspace(r, b)
        flag = self.work[2]
        self._pinned = cp.cuda.alloc_pinned_memory(8) if self.check else None
        self._flag = (np.frombuffer(self._pinned, np.float64, 1) if self.check
                      else np.zeros(1))

        def body():
            apply_wide(V, self.x, alpha, beta, self.check, work=self.work, out=self.y)
            if self.check:
                cp.cuda.runtime.memcpyAsync(self._flag.ctypes.data, flag.data.ptr, 8,
                                            cp.cuda.runtime.memcpyDeviceToHost,
                                            cp.cuda.get_current_stream().ptr)

        cp.cuda.get_current_stream().synchronize()     # V and x ready for the side stream
        side = cp.cuda.Stream(non_blocking=True)
        with side:
            body()                      # the kernels compiled and loaded before capture
            side.synchronize()
            side.begin_capture()
            try:
                body()
            except BaseException:
                try:
                    side.end_capture()
                except Exception:       # pragma: no cover - the capture's own error
                    pass
                raise
            self.graph = side.end_capture()

    def __call__(self, x):
        """(y, flagged) for x (b,) float32 on V's device: y a new array; flagged True
        when ``check`` and an entry of y is not finite (NaN or infinity in x, or an
        overflow), else False."""
        import cupy as cp
        if not x.flags.c_contiguous:
            x = cp.ascontiguousarray(x)
        stream = cp.cuda.get_current_stream()
        nbytes = 4 * self.b
        self.x.data.copy_from_device_async(x.data, nbytes, stream)
        self.graph.launch(stream)
        y = cp.empty(self.b, dtype=np.float32)
        y.data.copy_from_device_async(self.y.data, nbytes, stream)
        if not self.check:
            return y, False
        stream.synchronize()
        return y, bool(self._flag[0])


#: streams a thread keeps a :class:`PerStream` object for
STREAMS_KEPT = 4


class PerStream:
    """Objects made by ``make()`` and kept per thread and current CUDA stream: the
    products of one stream are ordered after one another, so each may reuse the buffers
    of the one before (another stream or thread has its own).  At most
    ``STREAMS_KEPT`` streams a thread are kept, the least recently used dropped (its
    memory goes back to CuPy's pool, which orders reuse by stream); the stream is held
    with its object, so its handle is not reused meanwhile."""

    def __init__(self, make):
        self._make = make
        self._local = threading.local()

    def current(self):
        """The object of this thread's current stream, made on first use."""
        import cupy as cp
        kept = getattr(self._local, "kept", None)
        if kept is None:
            kept = self._local.kept = {}
        stream = cp.cuda.get_current_stream()
        entry = kept.pop(stream.ptr, None)
        if entry is None:
            while len(kept) >= STREAMS_KEPT:
                del kept[next(iter(kept))]
            entry = (stream, self._make())
        kept[stream.ptr] = entry                 # most recently used last
        return entry[1]

    def streams(self):
        """The handles of this thread's kept streams, least recently used first."""
        return list(getattr(self._local, "kept", {}))
