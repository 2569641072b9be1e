/* fastbn/_cuda/batch_norm.cu -- fastbn's CUDA kernels (the GPU twin of _kernels.pyx + _simd.h).
 *
 * Compiled at run time by NVRTC through cupy.RawModule (fastbn/_backends/cuda.py), one module per
 * (device, dtype), with the name expressions "bn_xxx<float>" / "bn_xxx<double>" / "bn_xxx<__half>"
 * (and "bn_xxx<float, ACT>" for each activation mode of the backward kernels that gate dy).
 * T is the element type; weight, bias and the coefficients are FBN_K (T, float for __half: loads
 * are widened to float, statistics accumulate in double, stores round to nearest even).  NVRTC has no
 * host headers: everything used here is built in, but for the two #includes, ../_coefs.h and
 * batch_norm_device.cuh, which _cupy_backend splices into the source it compiles.
 *
 * Buffers are C-contiguous (N, C, S): channel c is N runs of S contiguous elements, element e of
 * the channel (0 <= e < N*S) lives at ((e / S) * C + c) * S + e % S.  Every index is 64-bit.
 *
 * Every operation is "reduce per channel, derive per-channel coefficients, apply elementwise",
 * with the same three work splits as the CPU kernels (the Python layer picks one):
 *   channels  one block per channel: reduce, coefficients in shared memory, apply -- one launch,
 *             the apply pass re-reads the channel while it may still sit in L2.
 *   units     each channel cut into units of U elements, one block per unit writes a partial
 *             (count, mean, M2) or (sum dy, sum dy*(x-mean)); a merge kernel (one warp per
 *             channel, fixed order) finishes the statistics and the coefficients; an
 *             elementwise kernel applies them.  For few channels and many elements (C = 1, 3).
 *   columns   spatial size 1, an (N, C) matrix: 32x8 blocks read 32 adjacent columns per warp
 *             (coalesced), partials per row range, then the same merge + apply kernels.
 *
 * Numerics (the same as the CPU's):
 *   - moments in double for both dtypes: each thread takes its elements FBN_GPU_CHUNK at a time into
 *     registers, computes the chunk's exact two-pass mean and M2, and merges it into its running
 *     (count, mean, M2) with Chan et al.'s update; threads, warps, blocks and units are merged
 *     with the same update (warp shuffles, then shared memory).  Never E[x^2] - E[x]^2.
 *     Every value is shifted by its channel's first element (fbn_shift) as it is loaded, and the
 *     shift is added back to the merged mean: the means merged are then of the order of the
 *     spread, not of the mean, whose rounding (1e-16 * |mean| in each merge's d * d term) made a
 *     float64 variance with mean/std = 1e8 lose 9 digits.
 *   - normalize: y = ((x - m_hi) - m_lo) * a + b in the input type, m_hi + m_lo the double mean
 *     split into two input-type values, a = (T)(weight * invstd).
 *   - backward from the saved mean/invstd: sums of dy and dy * (x - mean) in double;
 *     dx = kdy * dy + (((x - m_hi) - m_lo) * kx + kc), grad_bias = sum dy,
 *     grad_weight = sum dy * (x - mean) * invstd.
 *   - explicit fused multiply-adds (fbn_fma) where the CPU writes a * b + c, so the result does
 *     not depend on the compiler's contraction flags.
 *   - all reductions run in a fixed order: results are bitwise reproducible run to run.
 * Fused ReLU (batch_norm_device.cuh, "the activation"): the forward kernels take `relu` and write
 * max-like `v < 0 ? 0 : v` of the rounded output in the same pass; the backward kernels take `act`
 * and gate dy by the activation's input z (z <= 0: no gradient) inside the reduction and the
 * grad_input pass: z recomputed from x with the forward's coefficients (act 1, from mean, invstd,
 * weight, bias: the same bits as the forward's output) or read from the forward's output (act 2).
 * CuPy appends -ftz=true to the NVRTC options, so float32 subnormals flush to zero on the GPU
 * (the CPU keeps them); float64 is unaffected.
 */

#ifndef FBN_GPU_THREADS
#define FBN_GPU_THREADS 256 /* threads per block of the 1-D kernels; _cupy_backend.BLOCK must match */
#endif
#define FBN_GPU_CHUNK 8   /* elements per thread per two-pass chunk / loads in flight per thread */
#define FBN_APPLY 4   /* elements per thread per iteration of the elementwise loops */
#define FBN_COL_X 32  /* columns kernels: 32 adjacent columns per warp ... */
#define FBN_COL_Y 8   /* ... and 8 warps striding the rows; _cupy_backend.COLUMN_BLOCK = (32, 8) */
#define FBN_MERGE_WARPS 4 /* merge kernels: one warp per channel, 4 channels per block */
#define FBN_FULL_MASK 0xffffffffu

/* The per-channel arithmetic, shared with the CPU kernels: Chan's merge (fbn_chan_merge), the
 * statistics, the mean split and the coefficients.  nvcc reads the file; _cupy_backend splices it
 * in here for NVRTC, which compiles a string and is given no include path. */
#include "../_coefs.h"

typedef long long i64;

/* __half, __half2float and __float2half_rn for float16 storage: cuda_fp16.h under nvcc and NVRTC
 * (CuPy's RawModule puts the toolkit's include folder, or the copy of cuda_fp16.h that CuPy ships,
 * on NVRTC's include path, as for CuPy's own float16 kernels); the CPU emulator defines them in
 * its cuda_builtins.h. */
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#include <cuda_fp16.h>
#endif

/* The device functions: merges, walkers, reductions, coefficients, elementwise loops. */
#include "batch_norm_device.cuh"

/* ================================================================== kernels: forward */

/* channels path, training: batch statistics and the normalize + affine (+ relu) of each channel in
 * one block.  y may be x.  Grid: any number of blocks (they stride over the channels). */
template <typename T>
__global__ void __launch_bounds__(FBN_GPU_THREADS)
bn_forward_channels(const T *x, T *y, const FBN_K *weight, const FBN_K *bias, double eps, int relu, i64 N, i64 C,
                    i64 S, double *mean, double *var, double *invstd)
{
    typedef FBN_K K;
    __shared__ K cf[4];
    const i64 NS = N * S;
    for (i64 c = blockIdx.x; c < C; c += gridDim.x) {
        double n = 0.0, m = 0.0, m2 = 0.0;
        fbn_thread_moments(x, C, S, c, 0, NS, n, m, m2);
        fbn_block_merge(n, m, m2);
        if (threadIdx.x == 0)
            fbn_finish_stats(c, n, m + fbn_shift(x, S, c), m2, eps, weight, bias, mean, var, invstd, cf);
        __syncthreads();
        const K mhi = cf[0], mlo = cf[1], a = cf[2], b = cf[3];
        fbn_channel_affine(x, y, C, S, c, NS, mhi, mlo, a, b, relu);
        __syncthreads(); /* cf is rewritten for the next channel */
    }
}

/* units path, stage 1: unit u = (channel u / k, elements [(u % k) * U, min(NS, (u % k + 1) * U)))
 * writes its (count, mean - shift, M2) to part[3u .. 3u + 2]. */
template <typename T>
__global__ void __launch_bounds__(FBN_GPU_THREADS)
bn_moments_units(const T *__restrict__ x, i64 N, i64 C, i64 S, i64 k, i64 U, double *__restrict__ part)
{
    const i64 NS = N * S;
    for (i64 u = blockIdx.x; u < C * k; u += gridDim.x) {
        const i64 c = u / k, e0 = (u - c * k) * U;
        double n = 0.0, m = 0.0, m2 = 0.0;
        fbn_thread_moments(x, C, S, c, e0, fbn_min(NS, e0 + U), n, m, m2);
        fbn_block_merge(n, m, m2);
        if (threadIdx.x == 0) {
            part[3 * u] = n;
            part[3 * u + 1] = m;
            part[3 * u + 2] = m2;
        }
    }
}

/* columns path (S == 1, x is an (N, C) matrix), stage 1: block (bx, by) takes columns
 * [32 bx, 32 bx + 32) and row ranges j = by, by + gridDim.y, ... of R rows each; column c's
 * (count, mean - shift, M2) over row range j goes to part[3 (c k + j) .. + 2].  Block: (32, 8). */
template <typename T>
__global__ void __launch_bounds__(FBN_COL_X *FBN_COL_Y)
bn_moments_columns(const T *__restrict__ x, i64 N, i64 C, i64 R, i64 k, double *__restrict__ part)
{
    __shared__ double sh[3][FBN_COL_Y][FBN_COL_X];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const i64 c = (i64)blockIdx.x * FBN_COL_X + tx;
    for (i64 j = blockIdx.y; j < k; j += gridDim.y) {
        const i64 r1 = fbn_min(N, (j + 1) * R);
        double n = 0.0, m = 0.0, m2 = 0.0;
        if (c < C) {
            const double shift = fbn_shift(x, (i64)1, c);
            for (i64 r = j * R + ty; r < r1; r += FBN_GPU_CHUNK * FBN_COL_Y) {
                double v[FBN_GPU_CHUNK];
                int cnt = 0;
#pragma unroll
                for (int t = 0; t < FBN_GPU_CHUNK; t++) {
                    const i64 rr = r + (i64)t * FBN_COL_Y;
                    if (rr < r1) {
                        v[t] = (double)fbn_ld(x[rr * C + c]) - shift;
                        cnt = t + 1;
                    }
                }
                fbn_chunk_merge(v, cnt, n, m, m2);
            }
        }
        sh[0][ty][tx] = n;
        sh[1][ty][tx] = m;
        sh[2][ty][tx] = m2;
        __syncthreads();
        if (ty == 0 && c < C) {
            for (int t = 1; t < FBN_COL_Y; t++)
                fbn_chan_merge(&n, &m, &m2, sh[0][t][tx], sh[1][t][tx], sh[2][t][tx]);
            const i64 p = 3 * (c * k + j);
            part[p] = n;
            part[p + 1] = m;
            part[p + 2] = m2;
        }
        __syncthreads();
    }
}

/* units/columns path, stage 2: merge channel c's k partials (in a fixed order), write the
 * statistics and the affine coefficients coef = [m_hi (C) | m_lo (C) | a (C) | b (C)].  x and S:
 * for the shift the partials' means are relative to.  One warp per channel: block
 * (FBN_MERGE_WARPS * 32). */
template <typename T>
__global__ void __launch_bounds__(FBN_MERGE_WARPS * 32)
bn_merge_moments(const double *part, const T *x, i64 C, i64 S, i64 k, double eps, const FBN_K *weight,
                 const FBN_K *bias, double *mean, double *var, double *invstd, FBN_K *coef)
{
    typedef FBN_K K;
    const int lane = threadIdx.x & 31;
    const i64 warps = (i64)gridDim.x * FBN_MERGE_WARPS;
    for (i64 c = (i64)blockIdx.x * FBN_MERGE_WARPS + (threadIdx.x >> 5); c < C; c += warps) {
        double n = 0.0, m = 0.0, m2 = 0.0;
        for (i64 j = lane; j < k; j += 32) {
            const double *p = part + 3 * (c * k + j);
            fbn_chan_merge(&n, &m, &m2, p[0], p[1], p[2]);
        }
        fbn_warp_merge(n, m, m2);
        if (lane == 0) {
            K cf[4];
            fbn_finish_stats(c, n, m + fbn_shift(x, S, c), m2, eps, weight, bias, mean, var, invstd, cf);
            coef[c] = cf[0];
            coef[C + c] = cf[1];
            coef[2 * C + c] = cf[2];
            coef[3 * C + c] = cf[3];
        }
    }
}

/* Evaluation mode: the affine coefficients from the given mean and invstd (one thread per channel). */
template <typename T>
__global__ void bn_eval_coefs(const double *mean, const double *invstd, const FBN_K *weight, const FBN_K *bias, i64 C,
                              FBN_K *coef)
{
    typedef FBN_K K;
    for (i64 c = (i64)blockIdx.x * blockDim.x + threadIdx.x; c < C; c += (i64)gridDim.x * blockDim.x) {
        const FbnAffine<K> f = fbn_affine(mean[c], invstd[c], weight[c], bias[c]);
        coef[c] = f.mhi;
        coef[C + c] = f.mlo;
        coef[2 * C + c] = f.a;
        coef[3 * C + c] = f.b;
    }
}

/* y = ((x - m_hi) - m_lo) * a + b (then relu) over the whole buffer (total = N * C * S elements),
 * with the per-channel coefficients of bn_merge_moments / bn_eval_coefs.  y may be x.  Grid-stride. */
template <typename T>
__global__ void __launch_bounds__(FBN_GPU_THREADS)
bn_apply(const T *x, T *y, const FBN_K *coef, int relu, i64 C, i64 S, i64 total)
{
    typedef FBN_K K;
    const i64 step = (i64)gridDim.x * blockDim.x;
    FbnFlatWalker w((i64)blockIdx.x * blockDim.x + threadIdx.x, C, S, step);
    while (w.i < total) {
        i64 idx[FBN_APPLY], ch[FBN_APPLY];
        K v[FBN_APPLY];
#pragma unroll
        for (int j = 0; j < FBN_APPLY; j++) {
            idx[j] = w.i < total ? w.i : -1;
            ch[j] = w.c;
            if (idx[j] >= 0)
                v[j] = fbn_ld(x[idx[j]]);
            w.next();
        }
#pragma unroll
        for (int j = 0; j < FBN_APPLY; j++) {
            if (idx[j] >= 0) {
                const i64 c = ch[j];
                fbn_put(y[idx[j]], fbn_normalize(v[j], coef[c], coef[C + c], coef[2 * C + c], coef[3 * C + c]), relu);
            }
        }
    }
}

/* ================================================================== kernels: backward
 * ACT (FBN_ACT_*): the activation's gate on dy, a template parameter of the kernels that gate
 * elements ("bn_grad_input<float, 1>"), so that each mode gets its own registers: a kernel's
 * register count is the most any of its branches needs, and the gated modes' extra loads would
 * cost the plain backward occupancy (float64: 77 -> 128 registers).  out (ACT 2) is the forward's
 * output, bias (ACT 1) the forward's bias; where they are not used the caller passes stand-ins of
 * the right types (x, weight), which are never read. */

/* channels path: sums, parameter gradients and grad_input of each channel in one block.
 * dx must not overlap dy, x or out. */
template <typename T, int ACT>
__global__ void __launch_bounds__(FBN_GPU_THREADS)
bn_backward_channels(const T *dy, const T *x, const T *out, T *dx, const FBN_K *weight, const FBN_K *bias,
                     const double *mean, const double *invstd, int training, i64 N, i64 C, i64 S,
                     double *grad_weight, double *grad_bias)
{
    typedef FBN_K K;
    __shared__ K cf[6];
    const i64 NS = N * S;
    for (i64 c = blockIdx.x; c < C; c += gridDim.x) {
        const FbnAffine<K> f = fbn_act_affine(ACT, c, mean, invstd, weight, bias);
        double a = 0.0, b = 0.0;
        fbn_thread_grad_sums(dy, x, out, ACT, f, C, S, c, 0, NS, mean[c], a, b);
        fbn_block_sum2(a, b);
        if (threadIdx.x == 0)
            fbn_finish_grad(c, a, b, (double)NS, training, ACT, weight, bias, mean, invstd, grad_weight, grad_bias,
                            cf);
        __syncthreads();
        K cr[6];
#pragma unroll
        for (int j = 0; j < 6; j++)
            cr[j] = cf[j];
        fbn_channel_grad_input(dy, x, out, dx, C, S, c, NS, cr, training, ACT);
        __syncthreads();
    }
}

/* units path, stage 1: unit u writes (sum g, sum g * (x - mean)) to part[2u], part[2u + 1]. */
template <typename T, int ACT>
__global__ void __launch_bounds__(FBN_GPU_THREADS)
bn_grad_sums_units(const T *__restrict__ dy, const T *__restrict__ x, const T *__restrict__ out,
                   const FBN_K *__restrict__ weight, const FBN_K *__restrict__ bias,
                   const double *__restrict__ mean, const double *__restrict__ invstd, i64 N, i64 C, i64 S, i64 k,
                   i64 U, double *__restrict__ part)
{
    typedef FBN_K K;
    const i64 NS = N * S;
    for (i64 u = blockIdx.x; u < C * k; u += gridDim.x) {
        const i64 c = u / k, e0 = (u - c * k) * U;
        const FbnAffine<K> f = fbn_act_affine(ACT, c, mean, invstd, weight, bias);
        double a = 0.0, b = 0.0;
        fbn_thread_grad_sums(dy, x, out, ACT, f, C, S, c, e0, fbn_min(NS, e0 + U), mean[c], a, b);
        fbn_block_sum2(a, b);
        if (threadIdx.x == 0) {
            part[2 * u] = a;
            part[2 * u + 1] = b;
        }
    }
}

/* columns path (S == 1), stage 1: like bn_moments_columns, partial sums to part[2 (c k + j)]. */
template <typename T, int ACT>
__global__ void __launch_bounds__(FBN_COL_X *FBN_COL_Y)
bn_grad_sums_columns(const T *__restrict__ dy, const T *__restrict__ x, const T *__restrict__ out,
                     const FBN_K *__restrict__ weight, const FBN_K *__restrict__ bias,
                     const double *__restrict__ mean, const double *__restrict__ invstd, i64 N, i64 C, i64 R, i64 k,
                     double *__restrict__ part)
{
    typedef FBN_K K;
    __shared__ double sh[2][FBN_COL_Y][FBN_COL_X];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const i64 c = (i64)blockIdx.x * FBN_COL_X + tx;
    const double mc = c < C ? mean[c] : 0.0;
    const FbnAffine<K> f = fbn_act_affine(c < C ? ACT : FBN_ACT_NONE, c, mean, invstd, weight, bias);
    for (i64 j = blockIdx.y; j < k; j += gridDim.y) {
        const i64 r1 = fbn_min(N, (j + 1) * R);
        double a = 0.0, b = 0.0;
        if (c < C) {
            for (i64 r = j * R + ty; r < r1; r += FBN_GPU_CHUNK * FBN_COL_Y) {
                K g[FBN_GPU_CHUNK], v[FBN_GPU_CHUNK], o[FBN_GPU_CHUNK];
                int cnt = 0;
#pragma unroll
                for (int t = 0; t < FBN_GPU_CHUNK; t++) {
                    const i64 rr = r + (i64)t * FBN_COL_Y;
                    if (rr < r1) {
                        g[t] = fbn_ld(dy[rr * C + c]);
                        v[t] = fbn_ld(x[rr * C + c]);
                        o[t] = ACT == FBN_ACT_OUTPUT ? fbn_ld(out[rr * C + c]) : (K)0;
                        cnt = t + 1;
                    }
                }
#pragma unroll
                for (int t = 0; t < FBN_GPU_CHUNK; t++) {
                    if (t < cnt) {
                        const double gt = (double)fbn_gated<T>(g[t], v[t], o[t], ACT, f);
                        a += gt;
                        b = fbn_fma(gt, (double)v[t] - mc, b);
                    }
                }
            }
        }
        sh[0][ty][tx] = a;
        sh[1][ty][tx] = b;
        __syncthreads();
        if (ty == 0 && c < C) {
            for (int t = 1; t < FBN_COL_Y; t++) {
                a += sh[0][t][tx];
                b += sh[1][t][tx];
            }
            const i64 p = 2 * (c * k + j);
            part[p] = a;
            part[p + 1] = b;
        }
        __syncthreads();
    }
}

/* units/columns path, stage 2: add channel c's k partial sums (fixed order), write the parameter
 * gradients and coef = [m_hi | m_lo | kdy | kx | kc | b] (C values each, fbn_finish_grad).  One
 * warp per channel. */
template <typename T>
__global__ void __launch_bounds__(FBN_MERGE_WARPS * 32)
bn_merge_grad(const double *part, i64 C, i64 k, double count, int training, int act, const FBN_K *weight,
              const FBN_K *bias, const double *mean, const double *invstd, double *grad_weight, double *grad_bias,
              FBN_K *coef)
{
    typedef FBN_K K;
    const int lane = threadIdx.x & 31;
    const i64 warps = (i64)gridDim.x * FBN_MERGE_WARPS;
    for (i64 c = (i64)blockIdx.x * FBN_MERGE_WARPS + (threadIdx.x >> 5); c < C; c += warps) {
        double a = 0.0, b = 0.0;
        for (i64 j = lane; j < k; j += 32) {
            a += part[2 * (c * k + j)];
            b += part[2 * (c * k + j) + 1];
        }
        fbn_warp_sum2(a, b);
        if (lane == 0) {
            K cf[6];
            fbn_finish_grad(c, a, b, count, training, act, weight, bias, mean, invstd, grad_weight, grad_bias, cf);
#pragma unroll
            for (int t = 0; t < 6; t++)
                coef[t * C + c] = cf[t];
        }
    }
}

/* grad_input over the whole buffer from bn_merge_grad's coefficients (fbn_dx, with dy gated by the
 * activation).  Grid-stride. */
template <typename T, int ACT>
__global__ void __launch_bounds__(FBN_GPU_THREADS)
bn_grad_input(const T *dy, const T *x, const T *out, T *dx, const FBN_K *coef, int training, i64 C, i64 S, i64 total)
{
    typedef FBN_K K;
    const bool read_x = training || ACT == FBN_ACT_RECOMPUTE;
    const i64 step = (i64)gridDim.x * blockDim.x;
    FbnFlatWalker w((i64)blockIdx.x * blockDim.x + threadIdx.x, C, S, step);
    while (w.i < total) {
        i64 idx[FBN_APPLY], ch[FBN_APPLY];
        K g[FBN_APPLY], v[FBN_APPLY], o[FBN_APPLY];
#pragma unroll
        for (int j = 0; j < FBN_APPLY; j++) {
            idx[j] = w.i < total ? w.i : -1;
            ch[j] = w.c;
            if (idx[j] >= 0) {
                g[j] = fbn_ld(dy[idx[j]]);
                v[j] = read_x ? fbn_ld(x[idx[j]]) : (K)0;
                o[j] = ACT == FBN_ACT_OUTPUT ? fbn_ld(out[idx[j]]) : (K)0;
            }
            w.next();
        }
#pragma unroll
        for (int j = 0; j < FBN_APPLY; j++) {
            if (idx[j] >= 0) {
                const i64 c = ch[j];
                const K cf[6] = {coef[c], coef[C + c], coef[2 * C + c], coef[3 * C + c], coef[4 * C + c],
                                 ACT == FBN_ACT_RECOMPUTE ? coef[5 * C + c] : (K)0};
                const FbnAffine<K> f = {cf[0], cf[1], cf[2], cf[5]};
                fbn_st(dx[idx[j]], fbn_dx(fbn_gated<T>(g[j], v[j], o[j], ACT, f), v[j], cf, training));
            }
        }
    }
}
