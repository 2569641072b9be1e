/* fastbn/_cuda/batch_norm_device.cuh -- the device functions under batch_norm.cu's kernels: warp and
 * block merges, the walkers over an (N, C, S) buffer, the per-thread reductions, the per-channel
 * coefficients (on _coefs.h's arithmetic) and the elementwise loops of one channel.
 *
 * Not compiled alone: batch_norm.cu includes it after its constants (FBN_GPU_CHUNK, FBN_APPLY,
 * FBN_FULL_MASK, ...), the i64 type and ../_coefs.h; _cupy_backend splices it in for NVRTC. */

/* ------------------------------------------------------------------ small helpers */
__device__ __forceinline__ float fbn_fma(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fbn_fma(double a, double b, double c) { return __fma_rn(a, b, c); }

__device__ __forceinline__ i64 fbn_min(i64 a, i64 b) { return a < b ? a : b; }

/* Chan-merge the (count, mean, M2) of all 32 lanes into lane 0 (shuffle tree, fixed order). */
/* Two-pass moments of the first cnt of a thread's FBN_GPU_CHUNK loaded values, merged into (n, m, m2). */
__device__ __forceinline__ void fbn_chunk_merge(const double *v, int cnt, double &n, double &m, double &m2)
{
    double s = 0.0;
#pragma unroll
    for (int j = 0; j < FBN_GPU_CHUNK; j++)
        if (j < cnt)
            s += v[j];
    const double bm = s / (double)cnt;
    double q = 0.0;
#pragma unroll
    for (int j = 0; j < FBN_GPU_CHUNK; j++) {
        if (j < cnt) {
            const double d = v[j] - bm;
            q = fbn_fma(d, d, q);
        }
    }
    fbn_chan_merge(&n, &m, &m2, (double)cnt, bm, q);
}

__device__ __forceinline__ void fbn_warp_merge(double &n, double &m, double &m2)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        double nb = __shfl_down_sync(FBN_FULL_MASK, n, o);
        double mb = __shfl_down_sync(FBN_FULL_MASK, m, o);
        double m2b = __shfl_down_sync(FBN_FULL_MASK, m2, o);
        fbn_chan_merge(&n, &m, &m2, nb, mb, m2b);
    }
}

/* Sum two values over the 32 lanes into lane 0. */
__device__ __forceinline__ void fbn_warp_sum2(double &a, double &b)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        a += __shfl_down_sync(FBN_FULL_MASK, a, o);
        b += __shfl_down_sync(FBN_FULL_MASK, b, o);
    }
}

/* Merge every thread's (n, m, m2) of a 1-D block into thread 0's.  Ends with a barrier, so the
 * shared scratch can be reused right away.  blockDim.x must be a multiple of 32. */
__device__ __forceinline__ void fbn_block_merge(double &n, double &m, double &m2)
{
    __shared__ double sh[3][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    fbn_warp_merge(n, m, m2);
    if (lane == 0) {
        sh[0][warp] = n;
        sh[1][warp] = m;
        sh[2][warp] = m2;
    }
    __syncthreads();
    if (warp == 0) {
        n = lane < nwarps ? sh[0][lane] : 0.0;
        m = lane < nwarps ? sh[1][lane] : 0.0;
        m2 = lane < nwarps ? sh[2][lane] : 0.0;
        fbn_warp_merge(n, m, m2);
    }
    __syncthreads();
}

/* Sum two values over a 1-D block into thread 0.  Ends with a barrier. */
__device__ __forceinline__ void fbn_block_sum2(double &a, double &b)
{
    __shared__ double sh[2][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    fbn_warp_sum2(a, b);
    if (lane == 0) {
        sh[0][warp] = a;
        sh[1][warp] = b;
    }
    __syncthreads();
    if (warp == 0) {
        a = lane < nwarps ? sh[0][lane] : 0.0;
        b = lane < nwarps ? sh[1][lane] : 0.0;
        fbn_warp_sum2(a, b);
    }
    __syncthreads();
}

/* ------------------------------------------------------------------ walking the elements */
/* Walks elements e, e + step, e + 2 step, ... of channel c of an (N, C, S) buffer, keeping the
 * buffer offset up to date with adds and one compare (no division per element). */
struct FbnChannelWalker {
    i64 e, off, s, S, step, step_off, step_s, wrap;

    __device__ __forceinline__ FbnChannelWalker(i64 e0, i64 C, i64 S_, i64 c, i64 step_)
    {
        S = S_;
        step = step_;
        e = e0;
        i64 n = e0 / S;
        s = e0 - n * S;
        off = (n * C + c) * S + s;
        step_s = step % S;
        step_off = (step / S) * C * S + step_s;
        wrap = C * S - S; /* crossing a row boundary skips the other channels' runs */
    }

    __device__ __forceinline__ void next()
    {
        e += step;
        off += step_off;
        s += step_s;
        if (s >= S) {
            s -= S;
            off += wrap;
        }
    }
};

/* Walks the flat indices i, i + step, ... of an (N, C, S) buffer, keeping the channel of i. */
struct FbnFlatWalker {
    i64 i, s, c, S, C, step, step_s, step_c;

    __device__ __forceinline__ FbnFlatWalker(i64 i0, i64 C_, i64 S_, i64 step_)
    {
        C = C_;
        S = S_;
        step = step_;
        i = i0;
        i64 row = i0 / S;
        s = i0 - row * S;
        c = row % C;
        step_s = step % S;
        step_c = (step / S) % C;
    }

    __device__ __forceinline__ void next()
    {
        i += step;
        s += step_s;
        i64 carry = 0;
        if (s >= S) {
            s -= S;
            carry = 1;
        }
        c += step_c + carry; /* < 2C: one conditional subtraction keeps it in [0, C) */
        if (c >= C)
            c -= C;
    }
};

/* ------------------------------------------------------------------ per-thread reductions */
/* The shift of channel c's moments: its first element, a value of the data (see Numerics). */
template <typename T>
__device__ __forceinline__ double fbn_shift(const T *x, i64 S, i64 c)
{
    return (double)x[c * S];
}

/* (count, mean - shift, M2) of this thread's share of channel c's elements [e0, e1) (thread t
 * takes e0 + t, e0 + t + blockDim.x, ...), merged into (n, m, m2); shift = fbn_shift(x, S, c). */
template <typename T>
__device__ __forceinline__ void fbn_thread_moments(const T *x, i64 C, i64 S, i64 c, i64 e0, i64 e1,
                                                   double &n, double &m, double &m2)
{
    const double shift = fbn_shift(x, S, c);
    FbnChannelWalker w(e0 + threadIdx.x, C, S, c, blockDim.x);
    while (w.e < e1) {
        double v[FBN_GPU_CHUNK];
        int cnt = 0;
#pragma unroll
        for (int j = 0; j < FBN_GPU_CHUNK; j++) { /* all loads first: FBN_GPU_CHUNK in flight */
            if (w.e < e1) {
                v[j] = (double)x[w.off] - shift;
                cnt = j + 1;
            }
            w.next();
        }
        fbn_chunk_merge(v, cnt, n, m, m2);
    }
}

/* sum(dy) and sum(dy * (x - mean)) of this thread's share of channel c's elements [e0, e1). */
template <typename T>
__device__ __forceinline__ void fbn_thread_grad_sums(const T *dy, const T *x, i64 C, i64 S, i64 c, i64 e0, i64 e1,
                                                     double mean, double &a, double &b)
{
    FbnChannelWalker w(e0 + threadIdx.x, C, S, c, blockDim.x);
    while (w.e < e1) {
        double g[FBN_GPU_CHUNK], v[FBN_GPU_CHUNK];
        int cnt = 0;
#pragma unroll
        for (int j = 0; j < FBN_GPU_CHUNK; j++) { /* all loads first: 2 FBN_GPU_CHUNK in flight */
            if (w.e < e1) {
                g[j] = (double)dy[w.off];
                v[j] = (double)x[w.off];
                cnt = j + 1;
            }
            w.next();
        }
#pragma unroll
        for (int j = 0; j < FBN_GPU_CHUNK; j++) {
            if (j < cnt) {
                a += g[j];
                b = fbn_fma(g[j], v[j] - mean, b);
            }
        }
    }
}

/* ------------------------------------------------------------------ per-channel coefficients */
template <typename T>
__device__ __forceinline__ void fbn_split_mean(double m, T &hi, T &lo)
{
    hi = (T)m;
    lo = (T)fbn_split_lo(m, (double)hi);
}

/* Batch statistics of channel c from its merged moments; the affine coefficients into cf[0..3]
 * = (m_hi, m_lo, a, b). */
template <typename T>
__device__ __forceinline__ void fbn_finish_stats(i64 c, double n, double m, double m2, double eps, const T *weight,
                                                 const T *bias, double *mean, double *var, double *invstd, T *cf)
{
    const double v = fbn_var(n, m2);
    const double istd = fbn_invstd(v, eps);
    mean[c] = m;
    var[c] = v;
    invstd[c] = istd;
    fbn_split_mean(m, cf[0], cf[1]);
    cf[2] = (T)fbn_scale((double)weight[c], istd);
    cf[3] = bias[c];
}

/* Parameter gradients of channel c from its sums; grad_input coefficients into cf[0..4] =
 * (m_hi, m_lo, kdy, kx, kc).  Evaluation mode: (0, 0, kdy, 0, 0), whose first four are the
 * affine's coefficients for dx = dy * kdy: that pass must not read x or the mean, where a NaN
 * would make dx NaN (NaN * 0), while PyTorch's dx is finite. */
template <typename T>
__device__ __forceinline__ void fbn_finish_grad(i64 c, double sdy, double sdyx, double count, int training,
                                                const T *weight, const double *mean, const double *invstd,
                                                double *grad_weight, double *grad_bias, T *cf)
{
    double kdy, kx, kc;
    fbn_grad_terms((double)weight[c], invstd[c], sdy, sdyx, count, &grad_weight[c], &grad_bias[c], &kdy, &kx, &kc);
    cf[2] = (T)kdy;
    if (training) {
        fbn_split_mean(mean[c], cf[0], cf[1]);
        cf[3] = (T)kx;
        cf[4] = (T)kc;
    } else {
        cf[0] = cf[1] = cf[3] = cf[4] = (T)0;
    }
}

/* ((x - mhi) - mlo) * a + b; past FBN_WIDE (_coefs.h), where x - mhi could overflow, as
 * ((x/2 - mhi/2) - mlo/2) * 2a + b: the same bits wherever the direct form does not overflow. */
__device__ __forceinline__ float fbn_wide(float) { return FBN_WIDE_F32; }
__device__ __forceinline__ double fbn_wide(double) { return FBN_WIDE_F64; }

template <typename T>
__device__ __forceinline__ T fbn_normalize(T x, T mhi, T mlo, T a, T b)
{
    if (mhi >= fbn_wide(mhi) || mhi <= -fbn_wide(mhi))
        return fbn_fma((x * (T)0.5 - mhi * (T)0.5) - mlo * (T)0.5, a * (T)2, b);
    return fbn_fma((x - mhi) - mlo, a, b);
}

/* ------------------------------------------------------------------ elementwise, one channel */
template <typename T>
__device__ __forceinline__ void fbn_channel_affine(const T *x, T *y, i64 C, i64 S, i64 c, i64 NS, T mhi, T mlo,
                                                   T a, T b)
{
    FbnChannelWalker w(threadIdx.x, C, S, c, blockDim.x);
    while (w.e < NS) {
        i64 off[FBN_APPLY];
        T v[FBN_APPLY];
#pragma unroll
        for (int j = 0; j < FBN_APPLY; j++) { /* y may be x: each element is read, then written */
            off[j] = w.e < NS ? w.off : -1;
            if (off[j] >= 0)
                v[j] = x[off[j]];
            w.next();
        }
#pragma unroll
        for (int j = 0; j < FBN_APPLY; j++)
            if (off[j] >= 0)
                y[off[j]] = fbn_normalize(v[j], mhi, mlo, a, b);
    }
}

template <typename T>
__device__ __forceinline__ void fbn_channel_grad_input(const T *dy, const T *x, T *dx, i64 C, i64 S, i64 c, i64 NS,
                                                       const T *cf)
{
    const T mhi = cf[0], mlo = cf[1], kdy = cf[2], kx = cf[3], kc = cf[4];
    FbnChannelWalker w(threadIdx.x, C, S, c, blockDim.x);
    while (w.e < NS) {
        i64 off[FBN_APPLY];
        T g[FBN_APPLY], v[FBN_APPLY];
#pragma unroll
        for (int j = 0; j < FBN_APPLY; j++) {
            off[j] = w.e < NS ? w.off : -1;
            if (off[j] >= 0) {
                g[j] = dy[off[j]];
                v[j] = x[off[j]];
            }
            w.next();
        }
#pragma unroll
        for (int j = 0; j < FBN_APPLY; j++)
            if (off[j] >= 0)
                dx[off[j]] = fbn_fma(kdy, g[j], fbn_normalize(v[j], mhi, mlo, kx, kc));
    }
}
