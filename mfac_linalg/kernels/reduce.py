"""Column sums of squares of a stack of matrices on the GPU: one read, float64 sums.

``sumsq_columns(V, alpha, beta, out)`` writes out[n, j] = alpha + beta * sum_i V[n, i, j]^2
for V (nb, r, c) (or (r, c)) of float32 or float64, any strides.  It is what the
diagonals need (diag(V^T V) of the static and block operators, F's diagonal
diag(G^T G)): ``numpy.einsum("nij,nij->nj")`` in CuPy launches tiny batched products
or a squared temporary as large as V, several times the time of one read of V.

Each thread owns one column j of one matrix n and sums a run of rows in float64 (so
float32 data loses nothing to the accumulation; the result is rounded once, after
alpha + beta * s); a warp reads 32 consecutive columns of a row, so a row-major V
is read coalesced, once.  When nb * c threads are too few to fill the GPU the rows
are cut into runs whose float64 partial sums a second kernel adds in a fixed order:
no atomics, so the result is bit-reproducible.
"""
from __future__ import annotations

import numpy as np

from ._compile import function

__all__ = ["sumsq_columns"]

SOURCE = r"""
template <typename T, typename O>
__device__ void sumsq_run(const T* __restrict__ V, double* __restrict__ part,
                          O* __restrict__ out, long long sb, long long sr, long long sc,
                          int r, int c, int run, int nruns, double alpha, double beta) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const int k = blockIdx.y, n = blockIdx.z;
    if (j >= c) return;
    const int i0 = k * run, i1 = min(r, i0 + run);
    const T* p = V + n * sb + (long long)i0 * sr + j * sc;
    double s0 = 0.0, s1 = 0.0;
    int i = i0;
    for (; i + 1 < i1; i += 2) {
        const double a = (double)p[0], b = (double)p[sr];
        s0 = fma(a, a, s0);
        s1 = fma(b, b, s1);
        p += 2 * sr;
    }
    if (i < i1) { const double a = (double)p[0]; s0 = fma(a, a, s0); }
    const double s = s0 + s1;
    if (nruns == 1) out[(long long)n * c + j] = (O)(alpha + beta * s);
    else part[((long long)n * nruns + k) * c + j] = s;
}

template <typename O>
__device__ void sumsq_finish(const double* __restrict__ part, O* __restrict__ out, int c,
                             int nruns, double alpha, double beta) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const int n = blockIdx.y;
    if (j >= c) return;
    const double* p = part + (long long)n * nruns * c + j;
    double s = 0.0;
    for (int k = 0; k < nruns; ++k) s += p[(long long)k * c];
    out[(long long)n * c + j] = (O)(alpha + beta * s);
}

extern "C" {
#define RUN(NAME, T, O) \
__global__ void NAME(const T* V, double* part, O* out, long long sb, long long sr, \
                     long long sc, int r, int c, int run, int nruns, double alpha, \
                     double beta) { \
    sumsq_run<T, O>(V, part, out, sb, sr, sc, r, c, run, nruns, alpha, beta); }
RUN(sumsq_run_f32_f32, float, float)
RUN(sumsq_run_f32_f64, float, double)
RUN(sumsq_run_f64_f32, double, float)
RUN(sumsq_run_f64_f64, double, double)
__global__ void sumsq_finish_f32(const double* part, float* out, int c, int nruns,
                                 double alpha, double beta) {
    sumsq_finish<float>(part, out, c, nruns, alpha, beta); }
__global__ void sumsq_finish_f64(const double* part, double* out, int c, int nruns,
                                 double alpha, double beta) {
    sumsq_finish<double>(part, out, c, nruns, alpha, beta); }
}
"""

_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}
#: threads of the grid below which the rows are cut into runs (a few waves on an H100/H200)
TARGET_THREADS = 1 << 19
THREADS = 256
MAX_GRID = 65535


def supports(V):
    """True where :func:`sumsq_columns` handles V's dtype (float32, float64)."""
    return np.dtype(V.dtype) in _SUFFIX


def sumsq_columns(V, alpha=0.0, beta=1.0, out_dtype=None):
    """alpha + beta * sum_i V[..., i, :]**2 for V (r, c) -> (c,) or (nb, r, c) -> (nb, c).

    float64 accumulation, one rounding to ``out_dtype`` (default V's dtype); one read
    of V; deterministic.  Non-finite values propagate (callers check finiteness)."""
    import cupy as cp
    two_d = V.ndim == 2
    V3 = V[None] if two_d else V
    nb, r, c = V3.shape
    if nb > MAX_GRID:                   # the grid's z extent: in slices of the stack
        return cp.concatenate([sumsq_columns(V3[s:s + MAX_GRID], alpha, beta, out_dtype)
                               for s in range(0, nb, MAX_GRID)])
    dt = np.dtype(V.dtype)
    od = np.dtype(dt if out_dtype is None else out_dtype)
    out = cp.empty((nb, c), dtype=od)
    if out.size == 0:
        return out[0] if two_d else out
    if r == 0:
        out[...] = alpha
        return out[0] if two_d else out
    sb, sr, sc = (s // dt.itemsize for s in V3.strides)
    nruns = max(1, min(-(-TARGET_THREADS // (nb * c)), -(-r // 16), MAX_GRID))
    run = -(-r // nruns)
    nruns = -(-r // run)
    part = cp.empty((nb, nruns, c), dtype=np.float64) if nruns > 1 else out
    grid = (-(-c // THREADS), nruns, nb)
    function(SOURCE, f"sumsq_run_{_SUFFIX[dt]}_{_SUFFIX[od]}")(
        grid, (THREADS,),
        (V3, part, out, np.int64(sb), np.int64(sr), np.int64(sc), np.int32(r), np.int32(c),
         np.int32(run), np.int32(nruns), np.float64(alpha), np.float64(beta)))
    if nruns > 1:
        function(SOURCE, f"sumsq_finish_{_SUFFIX[od]}")(
            (-(-c // THREADS), nb), (THREADS,),
            (part, out, np.int32(c), np.int32(nruns), np.float64(alpha), np.float64(beta)))
    return out[0] if two_d else out
