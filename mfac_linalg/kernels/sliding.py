"""CUDA kernels of the sliding window (and thin launchers), compiled by NVRTC at first use.

Buffers are row-major (m, ld) with ld a multiple of 8 (rows padded with zeros),
so every thread moves 16 bytes at a time: 4 float32 or 8 float16/bfloat16
values.  16-bit buffers are held as raw ``uint16`` arrays (CuPy needs no
bfloat16 dtype); the kernels convert with float32 accumulation.

Kernels
-------
rows_dot_*      u[r] += sum_j G[r, j] x[j] for all rows, float32 partial sums per
                block, float64 atomics into u; optionally, in the same pass, writes x
                into row ``slot`` (saving the old row), flags NaN/inf in x and writes
                y = x / lambda (the fused "write g and compute G g").
combine_*       y[j] += scale * sum_i G[i, j] c[i]: pass 2 of the IHVP, the rows
                split across blocks (atomics into y) so small d still fills the GPU.
*_w             the float64-faithful passes (docs/math.md §7): rows_dot with float64
                accumulators; combine_*_w writes y = float32((x - G^T c) / lambda) from
                float64 c and float64 sums (split partial sums added in a fixed order).
round_*         x -> storage dtype -> float32 (the gradient as it will be stored).
ggms_coeffs     the O(m) coefficients p^2 prefix sums, d_j, beta_j of the rank-one
                Cholesky update (one block, a block-wide scan).
chol_delete     the O(m^2) rank-one update itself: one block per row, a scan along
                the row, written shifted up-left into the spare factor buffer.
append_row      the new last row of the factor: l_nn = sqrt(c_nn - |ell|^2), and the
                forward-solved right-hand side z of the fused step.
gram_update     the Gram row/column of the new slot (old row saved for a rollback).
window_gemv, rank2_rows
                the explicit inverse's slot replacement (a deletion and an insertion):
                a GEMV, then one block per row writing the new inverse, z = C_new^{-1} u
                and the cancellation guards' verdict.
*_p             the same kernels for one CUDA graph that serves every update and step
                of a full window (``kernels/step_graph``): the slot and the addresses
                that change from call to call (x, y, C^{-1}, the new C^{-1}, K) read
                from a device array instead of the launch's arguments.
"""
from __future__ import annotations

import functools

import numpy as np

SOURCE = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>

__device__ __forceinline__ float warp_sum(float v) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ double warp_sum_d(double v) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ double warp_sum(double v) { return warp_sum_d(v); }
// one multiply-add into the accumulator's precision: a float32 product of float32
// values, or the exact (48-bit) product in a float64 accumulator
__device__ __forceinline__ float mac(float g, float x, float a) { return fmaf(g, x, a); }
__device__ __forceinline__ double mac(float g, float x, double a) {
    return fma((double)g, (double)x, a);
}
__device__ __forceinline__ double mac(float g, double x, double a) { return fma((double)g, x, a); }

// ---- 16-byte loads and stores as float -------------------------------------
__device__ __forceinline__ void load16(const float* p, float* o) {
    float4 v = *reinterpret_cast<const float4*>(p);
    o[0] = v.x; o[1] = v.y; o[2] = v.z; o[3] = v.w;
}
__device__ __forceinline__ void store16(float* p, const float* o) {
    *reinterpret_cast<float4*>(p) = make_float4(o[0], o[1], o[2], o[3]);
}
__device__ __forceinline__ void load16(const __nv_bfloat16* p, float* o) {
    uint4 v = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
    #pragma unroll
    for (int k = 0; k < 4; ++k) { float2 f = __bfloat1622float2(h[k]); o[2*k] = f.x; o[2*k+1] = f.y; }
}
__device__ __forceinline__ void store16(__nv_bfloat16* p, const float* o) {
    uint4 v; __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&v);
    #pragma unroll
    for (int k = 0; k < 4; ++k) h[k] = __floats2bfloat162_rn(o[2*k], o[2*k+1]);
    *reinterpret_cast<uint4*>(p) = v;
}
__device__ __forceinline__ void load16(const __half* p, float* o) {
    uint4 v = *reinterpret_cast<const uint4*>(p);
    const __half2* h = reinterpret_cast<const __half2*>(&v);
    #pragma unroll
    for (int k = 0; k < 4; ++k) { float2 f = __half22float2(h[k]); o[2*k] = f.x; o[2*k+1] = f.y; }
}
__device__ __forceinline__ void store16(__half* p, const float* o) {
    uint4 v; __half2* h = reinterpret_cast<__half2*>(&v);
    #pragma unroll
    for (int k = 0; k < 4; ++k) h[k] = __floats2half2_rn(o[2*k], o[2*k+1]);
    *reinterpret_cast<uint4*>(p) = v;
}
template <int V> __device__ __forceinline__ void loadx(const float* p, float* o) {
    #pragma unroll
    for (int k = 0; k < V; k += 4) load16(p + k, o + k);
}

// ---- pass 1: u = G x (float64 out), optional fused write of x into row slot --
// A: the accumulator (float, or double for the float64-faithful passes of docs/math.md §7).
// One block: R rows x one column chunk; the 1-D grid runs over the row groups first,
// so consecutive blocks read the same chunk of x (from L2) for different rows.
// Optional, in the same read of the buffer: the old contents of row ``slot`` are
// saved to ``backup`` before x overwrites them; a NaN or infinity in x sets
// flag[0] = 1; y = inv_lam * x is written (the start of pass 2).
template <typename T, int R, typename A>
__device__ void rows_dot_impl(const float* __restrict__ x, T* __restrict__ G,
                              double* __restrict__ u, int m, long long ld, int slot,
                              long long chunk, int groups, T* __restrict__ backup,
                              double* __restrict__ flag, float* __restrict__ y,
                              float inv_lam) {
    constexpr int V = 16 / sizeof(T);
    const int grp = (int)(blockIdx.x % (unsigned)groups);
    const long long c0 = (long long)(blockIdx.x / (unsigned)groups) * chunk;
    const long long c1 = min(c0 + chunk, ld);
    const int r0 = grp * R;
    const bool first = grp == 0;
    bool bad = false;
    A acc[R];
    #pragma unroll
    for (int k = 0; k < R; ++k) acc[k] = A(0);
    for (long long j = c0 + (long long)threadIdx.x * V; j < c1; j += (long long)blockDim.x * V) {
        float xv[V];
        loadx<V>(x + j, xv);
        if (first) {
            if (flag != nullptr) {
                #pragma unroll
                for (int t = 0; t < V; ++t) bad |= !isfinite(xv[t]);
            }
            if (y != nullptr) {
                #pragma unroll
                for (int t = 0; t < V; t += 4) {
                    float yv[4];
                    #pragma unroll
                    for (int q = 0; q < 4; ++q) yv[q] = xv[t + q] * inv_lam;
                    store16(y + j + t, yv);
                }
            }
        }
        #pragma unroll
        for (int k = 0; k < R; ++k) {
            const int r = r0 + k;
            if (r < m) {
                T* p = G + (long long)r * ld + j;
                float gv[V];
                if (r == slot) {
                    if (backup != nullptr) {
                        uint4 old = *reinterpret_cast<const uint4*>(p);
                        *reinterpret_cast<uint4*>(backup + j) = old;
                    }
                    store16(p, xv);
                    #pragma unroll
                    for (int t = 0; t < V; ++t) gv[t] = xv[t];
                } else {
                    load16(p, gv);
                }
                #pragma unroll
                for (int t = 0; t < V; ++t) acc[k] = mac(gv[t], xv[t], acc[k]);
            }
        }
    }
    if (bad) flag[0] = 1.0;
    __shared__ A red[R][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    #pragma unroll
    for (int k = 0; k < R; ++k) {
        A v = warp_sum(acc[k]);
        if (lane == 0) red[k][warp] = v;
    }
    __syncthreads();
    if (warp == 0) {
        #pragma unroll
        for (int k = 0; k < R; ++k) {
            A v = lane < nw ? red[k][lane] : A(0);
            v = warp_sum(v);
            if (lane == 0 && r0 + k < m) atomicAdd(u + r0 + k, (double)v);
        }
    }
}

// ---- pass 2's column accumulation, shared by both pass-2 kernels -------------------
// acc[t] += sum_{i0 <= i < i1} G[i, j + t] * (cscale * c[i]) for the V columns of this
// thread, c staged through the shared tile cs (TILE entries) and rows taken four at a
// time (one rounding per multiply-add, in the accumulator's precision A: mac()).
template <typename T, typename A, int TILE>
__device__ __forceinline__ void accumulate_rows(const T* __restrict__ G, const A* __restrict__ c,
                                                A cscale, A* cs, int i0, int i1, long long ld,
                                                long long j, bool active,
                                                A (&acc)[16 / sizeof(T)]) {
    constexpr int V = 16 / sizeof(T);
    for (int t0 = i0; t0 < i1; t0 += TILE) {
        const int t1 = min(t0 + TILE, i1);
        __syncthreads();
        for (int i = threadIdx.x; i < t1 - t0; i += blockDim.x) cs[i] = c[t0 + i] * cscale;
        __syncthreads();
        if (!active) continue;
        int i = t0;
        for (; i + 4 <= t1; i += 4) {
            float g0[V], g1[V], g2[V], g3[V];
            load16(G + (long long)(i + 0) * ld + j, g0);
            load16(G + (long long)(i + 1) * ld + j, g1);
            load16(G + (long long)(i + 2) * ld + j, g2);
            load16(G + (long long)(i + 3) * ld + j, g3);
            const A a0 = cs[i - t0], a1 = cs[i + 1 - t0], a2 = cs[i + 2 - t0], a3 = cs[i + 3 - t0];
            #pragma unroll
            for (int t = 0; t < V; ++t)
                acc[t] = mac(g3[t], a3, mac(g2[t], a2, mac(g1[t], a1, mac(g0[t], a0, acc[t]))));
        }
        for (; i < t1; ++i) {
            float g0[V];
            load16(G + (long long)i * ld + j, g0);
            const A a0 = cs[i - t0];
            #pragma unroll
            for (int t = 0; t < V; ++t) acc[t] = mac(g0[t], a0, acc[t]);
        }
    }
}

// ---- pass 2: y += scale * G^T c, rows split across blockIdx.y ---------------
template <typename T>
__device__ void combine_impl(const T* __restrict__ G, const float* __restrict__ c,
                             float* __restrict__ y, int m, long long ld, int rows_per,
                             float scale) {
    constexpr int V = 16 / sizeof(T);
    __shared__ float cs[2048];
    const int i0 = blockIdx.y * rows_per;
    const int i1 = min(i0 + rows_per, m);
    const long long j = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * V;
    const bool active = j < ld;
    float acc[V];
    #pragma unroll
    for (int t = 0; t < V; ++t) acc[t] = 0.f;
    accumulate_rows<T, float, 2048>(G, c, 1.0f, cs, i0, i1, ld, j, active, acc);
    if (!active) return;
    if (gridDim.y == 1) {
        float yv[4];
        #pragma unroll
        for (int t = 0; t < V; t += 4) {
            load16(y + j + t, yv);
            #pragma unroll
            for (int q = 0; q < 4; ++q) yv[q] = fmaf(scale, acc[t + q], yv[q]);
            store16(y + j + t, yv);
        }
    } else {
        #pragma unroll
        for (int t = 0; t < V; ++t) atomicAdd(y + j + t, scale * acc[t]);
    }
}

// ---- pass 2, float64-faithful (docs/math.md §7): y = float32((x - G^T c) / lambda) ----
// c float64, float64 accumulators (every product of a stored value and c exact to one
// float64 rounding), x - G^T c and the division by lambda in float64, one rounding to
// float32 at the end.  Rows split across blockIdx.y as in combine_impl; the splits'
// partial sums go to part[split, :] (float64) and the last block of each column range
// to finish (count: one zeroed counter per blockIdx.x, reset by that block) adds them in
// split order: the result does not depend on the blocks' scheduling.
template <typename T>
__device__ void combine_wide_impl(const T* __restrict__ G, const double* __restrict__ c,
                                  const float* __restrict__ x, float* __restrict__ y,
                                  double* __restrict__ part, unsigned* __restrict__ count,
                                  int m, long long ld, int rows_per, double inv_lam,
                                  double cscale, double* __restrict__ flag) {
    constexpr int V = 16 / sizeof(T);
    __shared__ double cs[1024];
    __shared__ bool last;
    const int i0 = blockIdx.y * rows_per;
    const int i1 = min(i0 + rows_per, m);
    const long long j = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * V;
    const bool active = j < ld;
    double acc[V];
    #pragma unroll
    for (int t = 0; t < V; ++t) acc[t] = 0.0;
    accumulate_rows<T, double, 1024>(G, c, cscale, cs, i0, i1, ld, j, active, acc);
    if (gridDim.y > 1) {
        if (active) {
            double* pp = part + (long long)blockIdx.y * ld + j;
            #pragma unroll
            for (int t = 0; t < V; ++t) pp[t] = acc[t];
        }
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) last = atomicAdd(count + blockIdx.x, 1u) == gridDim.y - 1;
        __syncthreads();
        if (!last) return;
        __threadfence();
        if (threadIdx.x == 0) count[blockIdx.x] = 0u;
        if (!active) return;
        #pragma unroll
        for (int t = 0; t < V; ++t) {
            double s = 0.0;
            for (int q = 0; q < (int)gridDim.y; ++q) s += __ldcg(part + (long long)q * ld + j + t);
            acc[t] = s;
        }
    }
    if (!active) return;
    float xv[V], yv[V];
    loadx<V>(x + j, xv);
    bool bad = false;
    #pragma unroll
    for (int t = 0; t < V; ++t) {
        yv[t] = (float)(((double)xv[t] - acc[t]) * inv_lam);
        bad |= !isfinite(yv[t]);
    }
    if (bad && flag != nullptr) flag[0] = 1.0;
    #pragma unroll
    for (int t = 0; t < V; t += 4) store16(y + j + t, yv + t);
}

extern "C" {
__global__ void rows_dot_f32(const float* x, float* G, double* u, int m, long long ld, int slot,
                             long long chunk, int groups, float* backup, double* flag, float* y,
                             float inv_lam)
{ rows_dot_impl<float, 4, float>(x, G, u, m, ld, slot, chunk, groups, backup, flag, y, inv_lam); }
__global__ void rows_dot_f32_w(const float* x, float* G, double* u, int m, long long ld, int slot,
                             long long chunk, int groups, float* backup, double* flag, float* y,
                             float inv_lam)
{ rows_dot_impl<float, 4, double>(x, G, u, m, ld, slot, chunk, groups, backup, flag, y, inv_lam); }
__global__ void rows_dot_bf16(const float* x, __nv_bfloat16* G, double* u, int m, long long ld, int slot,
                             long long chunk, int groups, __nv_bfloat16* backup, double* flag, float* y,
                             float inv_lam)
{ rows_dot_impl<__nv_bfloat16, 8, float>(x, G, u, m, ld, slot, chunk, groups, backup, flag, y, inv_lam); }
__global__ void rows_dot_bf16_w(const float* x, __nv_bfloat16* G, double* u, int m, long long ld, int slot,
                             long long chunk, int groups, __nv_bfloat16* backup, double* flag, float* y,
                             float inv_lam)
{ rows_dot_impl<__nv_bfloat16, 8, double>(x, G, u, m, ld, slot, chunk, groups, backup, flag, y, inv_lam); }
__global__ void rows_dot_f16(const float* x, __half* G, double* u, int m, long long ld, int slot,
                             long long chunk, int groups, __half* backup, double* flag, float* y,
                             float inv_lam)
{ rows_dot_impl<__half, 8, float>(x, G, u, m, ld, slot, chunk, groups, backup, flag, y, inv_lam); }
__global__ void rows_dot_f16_w(const float* x, __half* G, double* u, int m, long long ld, int slot,
                             long long chunk, int groups, __half* backup, double* flag, float* y,
                             float inv_lam)
{ rows_dot_impl<__half, 8, double>(x, G, u, m, ld, slot, chunk, groups, backup, flag, y, inv_lam); }

__global__ void combine_f32_w(const float* G, const double* c, const float* x, float* y,
                              double* part, unsigned* count, int m, long long ld, int rows_per,
                              double inv_lam,
                              double cscale, double* flag)
{ combine_wide_impl<float>(G, c, x, y, part, count, m, ld, rows_per, inv_lam, cscale, flag); }
__global__ void combine_bf16_w(const __nv_bfloat16* G, const double* c, const float* x, float* y,
                              double* part, unsigned* count, int m, long long ld, int rows_per,
                              double inv_lam,
                              double cscale, double* flag)
{ combine_wide_impl<__nv_bfloat16>(G, c, x, y, part, count, m, ld, rows_per, inv_lam, cscale, flag); }
__global__ void combine_f16_w(const __half* G, const double* c, const float* x, float* y,
                              double* part, unsigned* count, int m, long long ld, int rows_per,
                              double inv_lam,
                              double cscale, double* flag)
{ combine_wide_impl<__half>(G, c, x, y, part, count, m, ld, rows_per, inv_lam, cscale, flag); }

__global__ void combine_f32(const float* G, const float* c, float* y, int m, long long ld, int rows_per, float scale)
{ combine_impl<float>(G, c, y, m, ld, rows_per, scale); }
__global__ void combine_bf16(const __nv_bfloat16* G, const float* c, float* y, int m, long long ld, int rows_per, float scale)
{ combine_impl<__nv_bfloat16>(G, c, y, m, ld, rows_per, scale); }
__global__ void combine_f16(const __half* G, const float* c, float* y, int m, long long ld, int rows_per, float scale)
{ combine_impl<__half>(G, c, y, m, ld, rows_per, scale); }

__global__ void round_bf16(const float* x, float* out, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = __bfloat162float(__float2bfloat16_rn(x[i]));
}
__global__ void round_f16(const float* x, float* out, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = __half2float(__float2half_rn(x[i]));
}

// Inclusive prefix sum of v over the block (one tile), plus the running total *carry
// of earlier tiles; afterwards *carry holds the running total including this tile.
// Every thread of the block must call it (it synchronises); wsum: 32 shared doubles.
__device__ double block_scan_carry(double v, double* wsum, double* carry) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    #pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        double t = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += t;
    }
    if (lane == 31) wsum[warp] = v;
    __syncthreads();
    if (warp == 0) {
        double w = lane < (blockDim.x >> 5) ? wsum[lane] : 0.0;
        #pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            double t = __shfl_up_sync(0xffffffffu, w, o);
            if (lane >= o) w += t;
        }
        wsum[lane] = w;
    }
    __syncthreads();
    const double s = v + (warp > 0 ? wsum[warp - 1] : 0.0) + *carry;
    __syncthreads();                       // every thread has read *carry and wsum
    if (threadIdx.x == blockDim.x - 1) *carry = s;
    __syncthreads();
    return s;
}

// ---- the O(m) coefficients of the rank-one update (one block of 1024) --------
// inputs p (n1), outputs dj, beta (n1): 1/alpha_j = 1 + sum_{k<j} p_k^2
__global__ void ggms_coeffs(const double* __restrict__ p, double* __restrict__ dj,
                            double* __restrict__ beta, int n1) {
    __shared__ double wsum[32];
    __shared__ double carry;
    if (threadIdx.x == 0) carry = 0.0;
    __syncthreads();
    for (int base = 0; base < n1; base += blockDim.x) {
        const int j = base + threadIdx.x;
        const double pj = j < n1 ? p[j] : 0.0;
        const double sq = pj * pj;
        const double excl = block_scan_carry(sq, wsum, &carry) - sq;
        if (j < n1) {
            const double alpha = 1.0 / (1.0 + excl);
            const double d = sqrt(1.0 + alpha * sq);
            dj[j] = d;
            beta[j] = alpha * pj / d;
        }
    }
}

// ---- the O(m^2) rank-one update: row i of the new factor (i < n1 = n - 1) ----
// new[i, j] = L22[i, j] d_j + beta_j (v_i - sum_{k<=j} L22[i, k] p_k), j <= i,
// L22 = src[1:, 1:], v = src[1:, 0]; src and dst are m x m row-major.
__global__ void chol_delete(const double* __restrict__ src, double* __restrict__ dst,
                            const double* __restrict__ p, const double* __restrict__ dj,
                            const double* __restrict__ beta, int m, int n1) {
    const int i = blockIdx.x;
    if (i >= n1) return;
    const double* row = src + (long long)(i + 1) * m + 1;
    const double vi = src[(long long)(i + 1) * m];
    double* out = dst + (long long)i * m;
    __shared__ double wsum[32];
    __shared__ double carry;
    if (threadIdx.x == 0) carry = 0.0;
    __syncthreads();
    for (int base = 0; base <= i; base += blockDim.x) {
        const int j = base + threadIdx.x;
        const double lij = j <= i ? row[j] : 0.0;
        const double s = block_scan_carry(j <= i ? lij * p[j] : 0.0, wsum, &carry);
        if (j <= i) out[j] = lij * dj[j] + beta[j] * (vi - s);
    }
}

// ---- the new last row of the factor and the fused forward solve ------------
// L (m x m): writes L[n, 0:n] = ell, L[n, n] = lnn = sqrt(cnn - |ell|^2), cnn = un[0] + shift.
// z (n + 1): z[:n] = ell, z[n] = (un[0] - |ell|^2) / lnn (= L_new^{-1} u, last entry).
// r_out[0] = cnn - |ell|^2 (the caller checks r > 0 on the host: one sync per update).
__global__ void append_row(double* __restrict__ L, const double* __restrict__ ell,
                           double* __restrict__ z, double* __restrict__ r_out,
                           const double* __restrict__ un, int m, int n, double shift) {
    __shared__ double red[32];
    double s = 0.0;
    for (int j = threadIdx.x; j < n; j += blockDim.x) { const double e = ell[j]; s += e * e; }
    s = warp_sum_d(s);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) red[warp] = s;
    __syncthreads();
    if (warp == 0) {
        double w = lane < (blockDim.x >> 5) ? red[lane] : 0.0;
        w = warp_sum_d(w);
        if (lane == 0) red[0] = w;
    }
    __syncthreads();
    const double ss = red[0];
    const double u_n = un[0];
    const double r = u_n + shift - ss;
    const double lnn = r > 0.0 ? sqrt(r) : 0.0;
    double* row = L + (long long)n * m;
    for (int j = threadIdx.x; j < n; j += blockDim.x) { row[j] = ell[j]; z[j] = ell[j]; }
    if (threadIdx.x == 0) {
        row[n] = lnn;
        z[n] = r > 0.0 ? (u_n - ss) / lnn : 0.0;
        r_out[0] = r;
    }
}

// ---- Gram row/column update and arrival-order gather ------------------------
// oldK[k] = K[s, k] (the row before, for a rollback); K[s, :] = K[:, s] = u;
// ua[k] = u[(start + k) % m] for k < n (skipped when ua is null).
__global__ void gram_update(double* __restrict__ K, const double* __restrict__ u,
                            double* __restrict__ ua, double* __restrict__ oldK,
                            int m, int s, int start, int n) {
    const int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k < m) {
        const double v = u[k];
        oldK[k] = K[(long long)s * m + k];
        K[(long long)s * m + k] = v;
        K[(long long)k * m + s] = v;
    }
    if (ua != nullptr && k < n) ua[k] = u[(start + k) % m];
}

// arrival order from slot order: ua[k] = u[(start + k) % m], k < n
__global__ void gather_f64(const double* __restrict__ u, double* __restrict__ ua,
                           int m, int start, int n) {
    const int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k < n) ua[k] = u[(start + k) % m];
}

// ---- explicit inverse of C (GPU kernel path): replacement of slot s ------------------
// Replacing the gradient of slot s is a deletion and an insertion (two Schur complements,
// as the CPU ExplicitEngine does them), fused into two kernels, no host synchronisation:
//   deletion:  D = Ci - c c^T / c_s,  c = Ci e_s (row s of Ci; Ci is symmetric);
//   insertion: b = u with b_s = 0 (u: the new Gram row), y = D b = x - c x_s / c_s with
//              x = Ci b, pivot sigma = (shift + u_s) - b.y = (shift + u_s) - (b.x - x_s^2/c_s),
//              C_new^{-1} = D + y y^T / sigma off row/column s, -y / sigma on it, 1 / sigma at
//              (s, s);  det C_new / det C = c_s sigma.
//   window_gemv: x = Ci b, the terms ax[i] = b_i x_i of b.x (summed in rank2_rows in a
//                fixed order: no atomics, so the result is bit-reproducible) and dg[i] =
//                Ci[i, i];
//   rank2_rows:  rows of C_new^{-1} (one to four a block); in the same read z = C_new^{-1} u (the
//                step's coefficients, float64 and float32) and K[s, :] = K[:, s] = u (the
//                old row to oldK).  Block 0 writes status[0] = c_s sigma and status[1] = 1
//                when the replacement is trusted: c_s > 0, the deletion's growth
//                max|c|^2 / (c_s max diag Ci) <= 1e3 (it amplifies the inverse's error by
//                that much) and the pivot sigma > 1e-6 (shift + u_s) (at most six digits lost
//                to cancellation), all finite; else 0 and the engine rebuilds exactly.
__device__ __forceinline__ double block_sum_d(double v, double* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum_d(v);
    if (lane == 0) red[warp] = v;
    __syncthreads();
    if (warp == 0) {
        double w = lane < nw ? red[lane] : 0.0;
        w = warp_sum_d(w);
        if (lane == 0) red[0] = w;
    }
    __syncthreads();
    return red[0];
}

__device__ __forceinline__ double block_max_d(double v, double* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    if (warp == 0) {
        double w = lane < nw ? red[lane] : 0.0;
        for (int o = 16; o > 0; o >>= 1) w = fmax(w, __shfl_xor_sync(0xffffffffu, w, o));
        if (lane == 0) red[0] = w;
    }
    __syncthreads();
    return red[0];
}

// Up to REPLACE_ROWS rows of Ci (nr, the same in every block) per thread block: the
// vectors read for every row (u; c, x, u) are loaded once for nr rows.  Each row's sums
// are taken in the same order whatever nr (the same threads, strides and reductions), so
// the results do not depend on it.
#define REPLACE_ROWS 4

// block sums of v[r], r < nr, each in block_sum_d's order; red: 32 * REPLACE_ROWS values
__device__ __forceinline__ void block_sum_rows(double* v, int nr, double* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int r = 0; r < REPLACE_ROWS; ++r) {
        if (r < nr) {
            const double t = warp_sum_d(v[r]);
            if (lane == 0) red[r * 32 + warp] = t;
        }
    }
    __syncthreads();
    if (warp == 0) {
#pragma unroll
        for (int r = 0; r < REPLACE_ROWS; ++r) {
            if (r < nr) {
                double w = lane < nw ? red[r * 32 + lane] : 0.0;
                w = warp_sum_d(w);
                if (lane == 0) red[r * 32] = w;
            }
        }
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < REPLACE_ROWS; ++r)
        if (r < nr) v[r] = red[r * 32];
}

// rows i = nr * blockIdx.x + r of Ci: x[i] = (Ci b)_i, ax[i] = b_i x_i, dg[i] = Ci[i, i]
__device__ __forceinline__ void window_gemv_impl(const double* __restrict__ Ci,
                                                 const double* __restrict__ u,
                                                 double* __restrict__ x, double* __restrict__ ax,
                                                 double* __restrict__ dg, int m, int s, int nr) {
    __shared__ double red[32 * REPLACE_ROWS];
    const int i0 = blockIdx.x * nr;
    nr = min(nr, m - i0);                              // block-uniform
    const double* rows[REPLACE_ROWS];
    double v0[REPLACE_ROWS], v1[REPLACE_ROWS];
#pragma unroll
    for (int r = 0; r < REPLACE_ROWS; ++r) {
        rows[r] = Ci + (long long)(i0 + (r < nr ? r : 0)) * m;
        v0[r] = 0.0;
        v1[r] = 0.0;
    }
    int k = threadIdx.x;
    for (; k + (int)blockDim.x < m; k += 2 * blockDim.x) {
        const int k1 = k + blockDim.x;
        const double a = k == s ? 0.0 : u[k], b = k1 == s ? 0.0 : u[k1];
#pragma unroll
        for (int r = 0; r < REPLACE_ROWS; ++r) {
            if (r < nr) {
                v0[r] = fma(rows[r][k], a, v0[r]);
                v1[r] = fma(rows[r][k1], b, v1[r]);
            }
        }
    }
    if (k < m) {
        const double a = k == s ? 0.0 : u[k];
#pragma unroll
        for (int r = 0; r < REPLACE_ROWS; ++r)
            if (r < nr) v0[r] = fma(rows[r][k], a, v0[r]);
    }
#pragma unroll
    for (int r = 0; r < REPLACE_ROWS; ++r) v0[r] += v1[r];
    block_sum_rows(v0, nr, red);
    if (threadIdx.x == 0) {
#pragma unroll
        for (int r = 0; r < REPLACE_ROWS; ++r) {
            if (r < nr) {
                const int i = i0 + r;
                x[i] = v0[r];
                ax[i] = (i == s ? 0.0 : u[i]) * v0[r];
                dg[i] = rows[r][i];
            }
        }
    }
}

__global__ void window_gemv(const double* Ci, const double* u, double* x, double* ax,
                            double* dg, int m, int s, int nr)
{ window_gemv_impl(Ci, u, x, ax, dg, m, s, nr); }
// the step graph's variant (P: _graph_variants below): C^{-1} = P[3], the slot P[2]
__global__ void window_gemv_p(const long long* P, const double* u, double* x, double* ax,
                              double* dg, int m, int nr)
{ window_gemv_impl(reinterpret_cast<const double*>(P[3]), u, x, ax, dg, m, (int)P[2], nr); }

// rows i = nr * blockIdx.x + r of the new inverse
__device__ __forceinline__ void rank2_rows_impl(const double* __restrict__ Ci, double* __restrict__ out,
                           const double* __restrict__ x, const double* __restrict__ ax,
                           const double* __restrict__ dg, const double* __restrict__ u,
                           double* __restrict__ K, double* __restrict__ oldK,
                           double* __restrict__ z, float* __restrict__ cz,
                           double* __restrict__ status, double shift, int m, int s, int nr) {
    __shared__ double red[32 * REPLACE_ROWS];
    double t = 0.0;                                    // b . x, the same order in every block
    for (int k = threadIdx.x; k < m; k += blockDim.x) t += ax[k];
    const double bx = block_sum_d(t, red);
    __syncthreads();                                   // red is reused below
    const double* c = Ci + (long long)s * m;           // column s = row s
    const double css = c[s], xs = x[s], cnn = shift + u[s];
    const double sigma = cnn - (bx - xs * xs / css);
    const double ics = 1.0 / css, isg = 1.0 / sigma;
    const int i0 = blockIdx.x * nr;
    nr = min(nr, m - i0);                              // block-uniform
    const double* rows[REPLACE_ROWS];
    double* orows[REPLACE_ROWS];
    double pc[REPLACE_ROWS], py[REPLACE_ROWS], acc[REPLACE_ROWS];
#pragma unroll
    for (int r = 0; r < REPLACE_ROWS; ++r) {
        const int i = i0 + (r < nr ? r : 0);
        rows[r] = Ci + (long long)i * m;
        orows[r] = out + (long long)i * m;
        const double ci = rows[r][s], yi = x[i] - ci * (xs * ics);
        pc[r] = ci * ics;
        py[r] = yi * isg;
        acc[r] = 0.0;
    }
    for (int j = threadIdx.x; j < m; j += blockDim.x) {
        const double cj = c[j], xj = x[j], uj = u[j];
#pragma unroll
        for (int r = 0; r < REPLACE_ROWS; ++r) {
            if (r < nr) {
                double v;
                if (i0 + r == s)
                    v = j == s ? isg : -(xj - cj * (xs * ics)) * isg;
                else
                    v = j == s ? -py[r] : rows[r][j] - pc[r] * cj + py[r] * (xj - cj * (xs * ics));
                orows[r][j] = v;
                acc[r] = fma(v, uj, acc[r]);
            }
        }
    }
    double cmax = 0.0, dmax = 0.0;
    if (blockIdx.x == 0) {                             // block-uniform branch
        for (int j = threadIdx.x; j < m; j += blockDim.x) {
            cmax = fmax(cmax, fabs(c[j]));
            dmax = fmax(dmax, dg[j]);
        }
    }
    block_sum_rows(acc, nr, red);
    if (blockIdx.x == 0) {
        cmax = block_max_d(cmax, red);
        dmax = block_max_d(dmax, red);
    }
    if (threadIdx.x == 0) {
#pragma unroll
        for (int r = 0; r < REPLACE_ROWS; ++r) {
            if (r < nr) {
                const int i = i0 + r;
                z[i] = acc[r];
                cz[i] = (float)acc[r];
                const double ui = u[i];
                oldK[i] = K[(long long)s * m + i];
                K[(long long)s * m + i] = ui;
                K[(long long)i * m + s] = ui;
            }
        }
        if (blockIdx.x == 0) {
            const double growth = cmax * cmax / (css * dmax), det = css * sigma;
            const bool ok = css > 0.0 && growth <= 1e3 && sigma > 1e-6 * cnn
                            && isfinite(det) && isfinite(growth) && det > 0.0;
            status[0] = det;
            status[1] = ok ? 1.0 : 0.0;
        }
    }
}

__global__ void rank2_rows(const double* Ci, double* out, const double* x, const double* ax,
                           const double* dg, const double* u, double* K, double* oldK,
                           double* z, float* cz, double* status, double shift, int m, int s,
                           int nr)
{ rank2_rows_impl(Ci, out, x, ax, dg, u, K, oldK, z, cz, status, shift, m, s, nr); }
// the step graph's variant (P: _graph_variants below): C^{-1} = P[3], the new C^{-1} P[4], K P[5], the slot P[2]
__global__ void rank2_rows_p(const long long* P, const double* x, const double* ax,
                             const double* dg, const double* u, double* oldK, double* z,
                             float* cz, double* status, double shift, int m, int nr)
{ rank2_rows_impl(reinterpret_cast<const double*>(P[3]), reinterpret_cast<double*>(P[4]), x, ax,
                  dg, u, reinterpret_cast<double*>(P[5]), oldK, z, cz, status, shift, m,
                  (int)P[2], nr); }

// slot-order coefficients from the arrival-order solution: c[(start+k)%m] = ca[k]
__global__ void scatter_f32(const double* __restrict__ ca, float* __restrict__ c,
                            int m, int start, int n) {
    const int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k < n) c[(start + k) % m] = (float)ca[k];
}
__global__ void scatter_f64(const double* __restrict__ ca, double* __restrict__ c,
                            int m, int start, int n) {
    const int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k < n) c[(start + k) % m] = ca[k];
}
}
"""


def _graph_variants():
    """The ``_p`` variants of the passes for a CUDA graph that serves every call
    (:mod:`mfac_linalg.kernels.step_graph`): what changes from call to call is read from
    the device array P, which the graph's first node fills: P[0] x, P[1] y, P[2] the
    slot (window_gemv_p and rank2_rows_p, in the CUDA source above, read P[3] C^{-1},
    P[4] the new C^{-1} and P[5] K).  Written out per storage type, as the kernels
    above are."""
    out = ['extern "C" {']
    for sfx, T, R in (("f32", "float", 4), ("bf16", "__nv_bfloat16", 8),
                      ("f16", "__half", 8)):
        for w, A in (("", "float"), ("_w", "double")):
            out.append(f"""
__global__ void rows_dot_{sfx}{w}_p(const long long* P, {T}* G, double* u, int m, long long ld,
                                    long long chunk, int groups, {T}* backup, double* flag,
                                    int want_y, float inv_lam)
{{ rows_dot_impl<{T}, {R}, {A}>(reinterpret_cast<const float*>(P[0]), G, u, m, ld, (int)P[2],
                               chunk, groups, backup, flag,
                               want_y ? reinterpret_cast<float*>(P[1]) : nullptr, inv_lam); }}""")
        out.append(f"""
__global__ void combine_{sfx}_p(const long long* P, const {T}* G, const float* c, int m,
                                long long ld, int rows_per, float scale)
{{ combine_impl<{T}>(G, c, reinterpret_cast<float*>(P[1]), m, ld, rows_per, scale); }}
__global__ void combine_{sfx}_w_p(const long long* P, const {T}* G, const double* c,
                                  double* part, unsigned* count, int m, long long ld,
                                  int rows_per, double inv_lam, double cscale, double* flag)
{{ combine_wide_impl<{T}>(G, c, reinterpret_cast<const float*>(P[0]),
                         reinterpret_cast<float*>(P[1]), part, count, m, ld, rows_per,
                         inv_lam, cscale, flag); }}""")
    out.append("}\n")
    return "\n".join(out)


SOURCE += _graph_variants()


@functools.lru_cache(maxsize=None)
def module():
    """The compiled RawModule (NVRTC, cached by CuPy on disk as well)."""
    import cupy as cp
    return cp.RawModule(code=SOURCE, options=("-std=c++17",))


def fn(name):
    """A kernel of the module by name, for the current device (looked up once each)."""
    import cupy as cp
    return _fn(name, cp.cuda.runtime.getDevice())


@functools.lru_cache(maxsize=None)
def _fn(name, device):
    return module().get_function(name)


#: storage dtype name -> kernel suffix
SUFFIX = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
#: storage dtype name -> itemsize
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
PAD = 8


def padded(d):
    """Row length of a buffer for dimension d: a multiple of 8 (16-byte vectors)."""
    return (d + PAD - 1) // PAD * PAD


def _ptr(a):
    """A kernel pointer argument: the array, or a null pointer for None."""
    return np.uintp(0) if a is None else a


#: threads per block of the passes over the buffer
_THREADS = 256


class PinnedRead:
    """A small float64 device array (at most ``n`` values, contiguous, on the current
    device) read on the host through page-locked memory of its own: one copy and one
    synchronisation of the current stream (``.get()``'s copy into pageable memory costs
    the host more).  Other arrays go through ``B.to_host``.  One caller at a time (the
    window's lock)."""

    def __init__(self, n):
        self.n = int(n)
        self._mem = self._host = None

    def __call__(self, a):
        """A NumPy copy of ``a``."""
        import cupy as cp
        if (a.size > self.n or a.dtype != np.float64 or not a.flags.c_contiguous
                or a.device.id != cp.cuda.runtime.getDevice()):
            from .. import _backend as B
            return B.to_host(a)
        if self._mem is None:
            self._mem = cp.cuda.alloc_pinned_memory(8 * self.n)
            self._host = np.frombuffer(self._mem, np.float64, self.n)
        stream = cp.cuda.get_current_stream()
        cp.cuda.runtime.memcpyAsync(self._host.ctypes.data, a.data.ptr, 8 * a.size,
                                    cp.cuda.runtime.memcpyDeviceToHost, stream.ptr)
        stream.synchronize()
        return self._host[:a.size].copy()


def _want(what, a, dtype):
    """The kernels take raw pointers: an array of another dtype would be misread (and was,
    once: float64 coefficients through the float32 pass 2), so every launch checks."""
    if a is not None and a.dtype != dtype:
        raise TypeError(f"{what} must be {np.dtype(dtype).name}, got {a.dtype}")


def rows_dot(G, kind, x, u, slot=-1, rows=None, *, backup=None, flag=None, y=None,
             inv_lam=1.0, wide=False):
    """u[:rows] += G[:rows] @ x (float64 u); writes x into row ``slot`` if slot >= 0.

    G: (m, ld) float32 or uint16 (raw 16-bit) buffer; x: (ld,) float32, zero-padded.
    In the same pass, where given: ``backup`` (ld,) receives row ``slot`` as it was
    before; ``flag[0]`` (float64) is set to 1 if x holds NaN or infinity; ``y`` (ld,)
    float32 is set to ``inv_lam * x``.  ``wide``: float64 accumulators (each product
    exact, the sums rounded in float64: docs/math.md §7) instead of float32 ones.
    """
    _want("rows_dot: x", x, np.float32)
    _want("rows_dot: u", u, np.float64)
    _want("rows_dot: y", y, np.float32)
    _want("rows_dot: flag", flag, np.float64)
    m = G.shape[0] if rows is None else rows
    ld = G.shape[1]
    if m == 0:
        return u
    grid, chunk, groups = rows_dot_grid(m, ld, kind)
    fn("rows_dot_" + SUFFIX[kind] + ("_w" if wide else ""))(grid, (_THREADS,), (
        x, G, u, np.int32(m), np.int64(ld), np.int32(slot), np.int64(chunk), np.int32(groups),
        _ptr(backup), _ptr(flag), _ptr(y), np.float32(inv_lam)))
    return u


def rows_dot_grid(m, ld, kind):
    """(grid, chunk, groups) of pass 1 over m >= 1 rows of length ld: one block per R
    rows (4 for float32, 8 for 16-bit storage: the x chunk is loaded once for R rows) and
    column chunk of ``chunk`` values, the row groups first."""
    vec = 16 // ITEMSIZE[kind]
    chunk = _THREADS * vec * 8
    R = 4 if kind == "float32" else 8
    groups = (m + R - 1) // R
    return (groups * ((ld + chunk - 1) // chunk),), chunk, groups


def _sm_count():
    """Streaming multiprocessors of the current device (looked up once per device)."""
    import cupy as cp
    return _sms(cp.cuda.runtime.getDevice())


@functools.lru_cache(maxsize=None)
def _sms(device):
    import cupy as cp
    return int(cp.cuda.Device(device).attributes["MultiProcessorCount"])


#: blocks per streaming multiprocessor that pass 2 aims at when it splits the rows
BLOCKS_PER_SM = 3
#: fewest rows per split of pass 2
MIN_SPLIT_ROWS = 64


def _splits(m, bx):
    """Row splits of pass 2 over m rows with bx column blocks: enough blocks for about
    ``BLOCKS_PER_SM`` per multiprocessor, at least ``MIN_SPLIT_ROWS`` rows each.  Measured
    on an H100 (docs/benchmarks.md): more splits cost more than they hide (partial sums
    and their atomics or second read); one split where the columns alone fill the GPU."""
    if m <= 0:
        return 1
    return max(1, min(-(-BLOCKS_PER_SM * _sm_count() // bx), -(-m // MIN_SPLIT_ROWS)))


def combine_grid(m, ld, kind):
    """(column blocks, row splits, rows per split) of pass 2 over m rows: the rows are
    split across blocks when the columns alone leave the GPU idle (small d)."""
    vec = 16 // ITEMSIZE[kind]
    bx = (ld // vec + _THREADS - 1) // _THREADS
    if m == 0:
        return bx, 1, 0
    rows_per = -(-m // _splits(m, bx))
    return bx, -(-m // rows_per), rows_per


def combine_max_splits(m, ld, kind):
    """An upper bound of the row splits of pass 2 over any n <= m rows (the scratch size
    of ``combine_wide``: splits x ld values; the splits grow with n)."""
    vec = 16 // ITEMSIZE[kind]
    return _splits(m, (ld // vec + _THREADS - 1) // _THREADS)


def combine(G, kind, c, y, scale, rows=None):
    """y += scale * G[:rows]^T c (float32 c and y, y of length ld)."""
    _want("combine: c", c, np.float32)
    _want("combine: y", y, np.float32)
    m = G.shape[0] if rows is None else rows
    ld = G.shape[1]
    if m == 0:
        return y
    bx, splits, rows_per = combine_grid(m, ld, kind)
    fn("combine_" + SUFFIX[kind])((bx, splits), (_THREADS,),
                                  (G, c, y, np.int32(m), np.int64(ld), np.int32(rows_per),
                                   np.float32(scale)))
    return y


def combine_wide(G, kind, c, x, y, lam, part, count, rows=None, *, cscale=1.0, flag=None,
                 inv_lam=None):
    """y = float32((x - G[:rows]^T (cscale c)) / lam), float64-faithful (docs/math.md §7).

    c: float64 (at least ``rows`` long, slot order); x, y: float32 of length ld;
    ``part``: float64 scratch of at least splits x ld values and ``count``: uint32
    zeros, one per column block (``combine_grid``), left zeroed; both may be None when
    the grid has one split.  ``inv_lam``, where given, is the multiplier instead of
    1 / lam; ``flag[0]`` (float64), where given, is set to 1 when an entry of y is not
    finite.  Deterministic: no atomics in the sums.
    """
    _want("combine_wide: c", c, np.float64)
    _want("combine_wide: x", x, np.float32)
    _want("combine_wide: y", y, np.float32)
    _want("combine_wide: flag", flag, np.float64)
    m = G.shape[0] if rows is None else rows
    ld = G.shape[1]
    bx, splits, rows_per = combine_grid(m, ld, kind)
    if splits > 1 and (part is None or part.size < splits * ld or count.size < bx):
        raise ValueError("combine_wide: scratch too small for the grid")
    fn("combine_" + SUFFIX[kind] + "_w")((bx, splits), (_THREADS,),
                                         (G, c, x, y, _ptr(part), _ptr(count), np.int32(m),
                                          np.int64(ld), np.int32(rows_per),
                                          np.float64(1.0 / lam if inv_lam is None else inv_lam),
                                          np.float64(cscale), _ptr(flag)))
    return y


def round_to(kind, x, out):
    """out = float32(storage(x)): the value a gradient entry has once stored."""
    n = x.shape[0]
    threads = 256
    fn("round_" + SUFFIX[kind])(((n + threads - 1) // threads,), (threads,),
                                (x, out, np.int64(n)))
    return out


def _cublas():
    from cupy.cuda import cublas
    return cublas


_ONE = np.array(1.0, dtype=np.float64)


def trsv(L, b, n, *, transpose, offset=0):
    """In place: solve A x = b[:n] (transpose=False) or A^T x = b[:n] (True).

    A is the n x n lower-triangular block starting at row and column ``offset``
    of the row-major (m, m) float64 buffer L: cuBLAS (column-major) sees it as
    the upper-triangular A^T with leading dimension m, so no block is copied.
    """
    import cupy as cp
    if n <= 0:
        return b
    if b.dtype != np.float64 or not b.flags.c_contiguous:
        raise TypeError("trsv needs a contiguous float64 right-hand side")
    cb = _cublas()
    handle = cp.cuda.device.get_cublas_handle()
    cb.setStream(handle, cp.cuda.get_current_stream().ptr)
    trans = cb.CUBLAS_OP_N if transpose else cb.CUBLAS_OP_T
    m = int(L.shape[0])
    ptr = L.data.ptr + (offset * m + offset) * 8
    # one right-hand side through trsm (this CuPy exposes no trsv); alpha by host pointer
    cb.dtrsm(handle, cb.CUBLAS_SIDE_LEFT, cb.CUBLAS_FILL_MODE_UPPER, trans,
             cb.CUBLAS_DIAG_NON_UNIT, int(n), 1, _ONE.ctypes.data, ptr, m, b.data.ptr,
             max(int(n), 1))
    return b


def to_float32(G, kind):
    """A float32 copy of a raw buffer (float32 buffers are returned as they are)."""
    import cupy as cp
    if kind == "float32":
        return G
    if kind == "bfloat16":
        return (G.astype(cp.uint32) << 16).view(cp.float32)
    return G.view(cp.float16).astype(cp.float32)


def chol_delete(src, dst, p, dj, beta, n):
    """dst[:n-1, :n-1] = factor after deleting the first row/column (rows in parallel)."""
    m = src.shape[0]
    n1 = n - 1
    if n1 <= 0:
        return dst
    fn("chol_delete")((n1,), (256,), (src, dst, p, dj, beta, np.int32(m), np.int32(n1)))
    return dst


def ggms_coeffs(p, dj, beta, n1):
    fn("ggms_coeffs")((1,), (1024,), (p, dj, beta, np.int32(n1)))


def append_row(L, ell, z, r_out, un, n, shift):
    """Row n of L from ell (n,), the new Gram entry un (a 1-element device view) and the shift."""
    m = L.shape[0]
    fn("append_row")((1,), (512,), (L, ell, z, r_out, un, np.int32(m), np.int32(n),
                                    np.float64(shift)))


def gather_f64(u, ua, start, n):
    m = u.shape[0]
    threads = 256
    fn("gather_f64")(((max(n, 1) + threads - 1) // threads,), (threads,),
                     (u, ua, np.int32(m), np.int32(start), np.int32(n)))
    return ua


def gram_update(K, u, oldK, s, ua=None, start=0, n=0):
    """oldK = K[s, :]; K[s, :] = K[:, s] = u; ua[:n] = u in arrival order (if given)."""
    m = K.shape[0]
    threads = 256
    fn("gram_update")(((m + threads - 1) // threads,), (threads,),
                      (K, u, _ptr(ua), oldK, np.int32(m), np.int32(s), np.int32(start),
                       np.int32(n)))


#: most rows of C^{-1} one thread block of ``window_replace`` takes (REPLACE_ROWS in the
#: CUDA source)
REPLACE_ROWS = 4
#: m from which ``window_replace`` gives each thread block REPLACE_ROWS rows (the vectors
#: every row reads loaded a quarter as often).  Measured on an H100 (docs/benchmarks.md):
#: at m = 4096 the replacement took 197 us with two or four rows a block against 230 us
#: with one; at m = 2048 four rows were slower (81 us against 68 us), at m <= 1024 even
REPLACE_ROWS_FROM = 4096


def replace_rows(m):
    """Rows of C^{-1} a thread block of ``window_replace`` takes for an m x m inverse."""
    return REPLACE_ROWS if m >= REPLACE_ROWS_FROM else 1


def window_replace(Ci, out, u, K, oldK, x, ax, dg, z, c, status, s, shift, *, rows=None):
    """The explicit inverse's slot replacement (deletion and insertion, two kernels; see
    the CUDA source): out = C_new^{-1}, z = out @ u (float64), c = float32(z),
    status[0] = det C_new / det C, status[1] = 1.0 when the replacement passed the
    cancellation guards (else 0.0: rebuild exactly); K row/column s = u with the old row
    in oldK.  ``x``, ``ax``, ``dg`` (float64, length m) are scratch.  ``rows``: rows of
    C^{-1} per thread block (default ``replace_rows(m)``); the results are the same bits
    whatever it is.  Deterministic (no atomics)."""
    m = Ci.shape[0]
    nr = replace_rows(m) if rows is None else int(rows)
    if not 1 <= nr <= REPLACE_ROWS:
        raise ValueError(f"window_replace: rows must be in [1, {REPLACE_ROWS}]; got {nr}")
    grid = ((m + nr - 1) // nr,)
    fn("window_gemv")(grid, (128,), (Ci, u, x, ax, dg, np.int32(m), np.int32(s), np.int32(nr)))
    fn("rank2_rows")(grid, (128,), (Ci, out, x, ax, dg, u, K, oldK, z, c, status,
                                    np.float64(shift), np.int32(m), np.int32(s), np.int32(nr)))


# -- the ``_p`` variants (one CUDA graph for every call: ``kernels/step_graph``); P: a
# device int64 array [x, y, slot, C^{-1}, the new C^{-1}, K] (addresses as integers; the
# entries a kernel does not read may be anything)
def graph_kernels(kind, wide, want_y, replace):
    """The names of the ``_p`` kernels the launchers below take for a storage kind: a
    graph loads them (``fn``) before its capture, which must launch only."""
    sfx = SUFFIX[kind]
    names = ["rows_dot_" + sfx + ("_w" if wide else "") + "_p"]
    if replace:
        names += ["window_gemv_p", "rank2_rows_p"]
    if want_y:
        names.append("combine_" + sfx + ("_w" if wide else "") + "_p")
    return names


def rows_dot_p(P, G, kind, u, rows=None, *, backup=None, flag=None, want_y=False,
               inv_lam=1.0, wide=False):
    """:func:`rows_dot` with x = P[0], the slot P[2] and, with ``want_y``, y = P[1]."""
    _want("rows_dot_p: P", P, np.int64)
    _want("rows_dot_p: u", u, np.float64)
    _want("rows_dot_p: flag", flag, np.float64)
    m = G.shape[0] if rows is None else rows
    ld = G.shape[1]
    if m == 0:
        return u
    grid, chunk, groups = rows_dot_grid(m, ld, kind)
    fn("rows_dot_" + SUFFIX[kind] + ("_w" if wide else "") + "_p")(grid, (_THREADS,), (
        P, G, u, np.int32(m), np.int64(ld), np.int64(chunk), np.int32(groups), _ptr(backup),
        _ptr(flag), np.int32(bool(want_y)), np.float32(inv_lam)))
    return u


def combine_p(P, G, kind, c, scale, rows=None):
    """:func:`combine` into y = P[1]."""
    _want("combine_p: P", P, np.int64)
    _want("combine_p: c", c, np.float32)
    m = G.shape[0] if rows is None else rows
    ld = G.shape[1]
    if m == 0:
        return
    bx, splits, rows_per = combine_grid(m, ld, kind)
    fn("combine_" + SUFFIX[kind] + "_p")((bx, splits), (_THREADS,),
                                         (P, G, c, np.int32(m), np.int64(ld),
                                          np.int32(rows_per), np.float32(scale)))


def combine_wide_p(P, G, kind, c, lam, part, count, rows=None, *, cscale=1.0, flag=None,
                   inv_lam=None):
    """:func:`combine_wide` with x = P[0] and y = P[1]."""
    _want("combine_wide_p: P", P, np.int64)
    _want("combine_wide_p: c", c, np.float64)
    _want("combine_wide_p: flag", flag, np.float64)
    m = G.shape[0] if rows is None else rows
    ld = G.shape[1]
    bx, splits, rows_per = combine_grid(m, ld, kind)
    if splits > 1 and (part is None or part.size < splits * ld or count.size < bx):
        raise ValueError("combine_wide_p: scratch too small for the grid")
    fn("combine_" + SUFFIX[kind] + "_w_p")(
        (bx, splits), (_THREADS,),
        (P, G, c, _ptr(part), _ptr(count), np.int32(m), np.int64(ld), np.int32(rows_per),
         np.float64(1.0 / lam if inv_lam is None else inv_lam), np.float64(cscale),
         _ptr(flag)))


def window_replace_p(P, m, u, oldK, x, ax, dg, z, c, status, shift):
    """:func:`window_replace` with C^{-1} = P[3], the new C^{-1} P[4], K P[5] and the
    slot P[2] (m x m, ``replace_rows(m)`` rows a block: the same bits)."""
    _want("window_replace_p: P", P, np.int64)
    nr = replace_rows(m)
    grid = ((m + nr - 1) // nr,)
    fn("window_gemv_p")(grid, (128,), (P, u, x, ax, dg, np.int32(m), np.int32(nr)))
    fn("rank2_rows_p")(grid, (128,), (P, x, ax, dg, u, oldK, z, c, status, np.float64(shift),
                                      np.int32(m), np.int32(nr)))


def scatter(ca, c, start, n):
    """c[(start + k) % m] = ca[k] for k < n: arrival order to slot order, into a float32
    or float64 c of length m."""
    m = c.shape[0]
    threads = 256
    name = "scatter_f32" if c.dtype == np.float32 else "scatter_f64"
    fn(name)(((m + threads - 1) // threads,), (threads,),
             (ca, c, np.int32(m), np.int32(start), np.int32(n)))
