/* fastbn/_cuda/batch_norm_device.cuh -- the device functions under batch_norm.cu's kernels: warp and
 * block merges, the walkers over an (N, C, S) buffer, the per-thread reductions, the per-channel
 * coefficients (on _coefs.h's arithmetic) and the elementwise loops of one channel.
 *
 * Not compiled alone: batch_norm.cu includes it after its constants (FBN_GPU_CHUNK, FBN_APPLY,
 * FBN_FULL_MASK, ...), the i64 type, __half (cuda_fp16.h) and ../_coefs.h; _cupy_backend splices it
 * in for NVRTC.
 *
 * Types: T is the element type of x, y, dy, dx (float, double or __half); K = FBN_K is the type the
 * elements are computed in, and the type of weight, bias and the per-channel coefficients (T, but
 * float for __half: PyTorch's mixed batch norm).  Elements go through fbn_ld (T -> K) and fbn_st
 * (K -> T, round to nearest even). */

/* ------------------------------------------------------------------ small helpers */
__device__ __forceinline__ float fbn_fma(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fbn_fma(double a, double b, double c) { return __fma_rn(a, b, c); }

__device__ __forceinline__ i64 fbn_min(i64 a, i64 b) { return a < b ? a : b; }

/* ------------------------------------------------------------------ storage and compute types */
template <typename T> struct FbnCompute {
    typedef T type;
};
template <> struct FbnCompute<__half> {
    typedef float type;
};
#define FBN_K typename FbnCompute<T>::type

__device__ __forceinline__ float fbn_ld(float v) { return v; }
__device__ __forceinline__ double fbn_ld(double v) { return v; }
__device__ __forceinline__ float fbn_ld(__half v) { return __half2float(v); }

__device__ __forceinline__ void fbn_st(float &o, float v) { o = v; }
__device__ __forceinline__ void fbn_st(double &o, double v) { o = v; }
__device__ __forceinline__ void fbn_st(__half &o, float v) { o = __float2half_rn(v); }

/* v as an element of type T holds it (v itself for float and double). */
template <typename T>
__device__ __forceinline__ FBN_K fbn_stored(FBN_K v)
{
    T o;
    fbn_st(o, v);
    return fbn_ld(o);
}

/* ------------------------------------------------------------------ the elementwise arithmetic */
template <typename T>
__device__ __forceinline__ void fbn_split_mean(double m, T &hi, T &lo)
{
    hi = (T)m;
    lo = (T)fbn_split_lo(m, (double)hi);
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

/* ------------------------------------------------------------------ the activation (ReLU)
 * Forward: the element is rounded to T first, then set to 0 where it is < 0, so NaN stays NaN and
 * -0 stays -0 (torch.relu on the rounded batch norm output).  Backward (PyTorch's
 * threshold_backward): the gradient reaching the normalization is 0 where the activation's input
 * z, as stored, is <= 0 (a NaN z passes dy).  act: 0 no activation, 1 z recomputed from x with the
 * forward's coefficients, 2 z read from the forward's output. */
enum { FBN_ACT_NONE = 0, FBN_ACT_RECOMPUTE = 1, FBN_ACT_OUTPUT = 2 };

template <typename T>
__device__ __forceinline__ void fbn_put(T &o, FBN_K v, int relu)
{
    T s;
    fbn_st(s, v);
    if (relu && fbn_ld(s) < (FBN_K)0)
        fbn_st(s, (FBN_K)0);
    o = s;
}

template <typename K>
__device__ __forceinline__ K fbn_gate(K g, K z)
{
    return z <= (K)0 ? (K)0 : g;
}

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
    return (double)fbn_ld(x[c * S]);
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
                v[j] = (double)fbn_ld(x[w.off]) - shift;
                cnt = j + 1;
            }
            w.next();
        }
        fbn_chunk_merge(v, cnt, n, m, m2);
    }
}

/* The forward's affine coefficients of one channel (y = fbn_normalize(x, mhi, mlo, a, b)), from its
 * mean and invstd (double) and its weight and bias: what the forward kernels apply, and what the
 * backward recomputes the activation's input with, bit for bit. */
template <typename K> struct FbnAffine {
    K mhi, mlo, a, b;
};

template <typename K>
__device__ __forceinline__ FbnAffine<K> fbn_affine(double mean, double invstd, K weight, K bias)
{
    FbnAffine<K> f;
    fbn_split_mean(mean, f.mhi, f.mlo);
    f.a = (K)fbn_scale((double)weight, invstd);
    f.b = bias;
    return f;
}

/* Channel c's forward coefficients where the backward recomputes the activation's input (act ==
 * FBN_ACT_RECOMPUTE; zeros otherwise, where bias may be a stand-in). */
template <typename K>
__device__ __forceinline__ FbnAffine<K> fbn_act_affine(int act, i64 c, const double *mean, const double *invstd,
                                                       const K *weight, const K *bias)
{
    if (act == FBN_ACT_RECOMPUTE)
        return fbn_affine(mean[c], invstd[c], weight[c], bias[c]);
    FbnAffine<K> f = {(K)0, (K)0, (K)0, (K)0};
    return f;
}

/* dy gated by the activation (see fbn_gate): v is x, o the forward's output (act 2), f the
 * forward's coefficients (act 1). */
template <typename T>
__device__ __forceinline__ FBN_K fbn_gated(FBN_K g, FBN_K v, FBN_K o, int act, const FbnAffine<FBN_K> &f)
{
    if (act == FBN_ACT_RECOMPUTE)
        return fbn_gate(g, fbn_stored<T>(fbn_normalize(v, f.mhi, f.mlo, f.a, f.b)));
    if (act == FBN_ACT_OUTPUT)
        return fbn_gate(g, o);
    return g;
}

/* sum(g) and sum(g * (x - mean)) of this thread's share of channel c's elements [e0, e1), g = dy
 * gated by the activation (fbn_gated; out is read for act 2 only). */
template <typename T>
__device__ __forceinline__ void fbn_thread_grad_sums(const T *dy, const T *x, const T *out, int act,
                                                     const FbnAffine<FBN_K> &f, i64 C, i64 S, i64 c, i64 e0, i64 e1,
                                                     double mean, double &a, double &b)
{
    typedef FBN_K K;
    FbnChannelWalker w(e0 + threadIdx.x, C, S, c, blockDim.x);
    while (w.e < e1) {
        K g[FBN_GPU_CHUNK], v[FBN_GPU_CHUNK], o[FBN_GPU_CHUNK];
        int cnt = 0;
#pragma unroll
        for (int j = 0; j < FBN_GPU_CHUNK; j++) { /* all loads first: 2 or 3 FBN_GPU_CHUNK in flight */
            if (w.e < e1) {
                g[j] = fbn_ld(dy[w.off]);
                v[j] = fbn_ld(x[w.off]);
                o[j] = act == FBN_ACT_OUTPUT ? fbn_ld(out[w.off]) : (K)0;
                cnt = j + 1;
            }
            w.next();
        }
#pragma unroll
        for (int j = 0; j < FBN_GPU_CHUNK; j++) {
            if (j < cnt) {
                const double gj = (double)fbn_gated<T>(g[j], v[j], o[j], act, f);
                a += gj;
                b = fbn_fma(gj, (double)v[j] - mean, b);
            }
        }
    }
}

/* ------------------------------------------------------------------ per-channel coefficients */
/* Batch statistics of channel c from its merged moments; the affine coefficients into cf[0..3]
 * = (m_hi, m_lo, a, b). */
template <typename K>
__device__ __forceinline__ void fbn_finish_stats(i64 c, double n, double m, double m2, double eps, const K *weight,
                                                 const K *bias, double *mean, double *var, double *invstd, K *cf)
{
    const double v = fbn_var(n, m2);
    const double istd = fbn_batch_invstd(v, eps);
    mean[c] = m;
    var[c] = v;
    invstd[c] = istd;
    const FbnAffine<K> f = fbn_affine(m, istd, weight[c], bias[c]);
    cf[0] = f.mhi;
    cf[1] = f.mlo;
    cf[2] = f.a;
    cf[3] = f.b;
}

/* Parameter gradients of channel c from its sums (of the gated gradient); grad_input coefficients
 * into cf[0..5] = (m_hi, m_lo, kdy, kx, kc, b).  kdy = weight * invstd is also the forward's scale a,
 * so (m_hi, m_lo, kdy, b) are the forward's coefficients (b = bias[c] for act 1, else 0: bias may be
 * a stand-in).  Evaluation mode: kx = kc = 0, and the grad_input pass computes dx = g * kdy without
 * reading x for it, where a NaN or an infinity would make dx NaN (NaN * 0), while PyTorch's dx is
 * finite. */
template <typename K>
__device__ __forceinline__ void fbn_finish_grad(i64 c, double sdy, double sdyx, double count, int training, int act,
                                                const K *weight, const K *bias, const double *mean,
                                                const double *invstd, double *grad_weight, double *grad_bias, K *cf)
{
    double kdy, kx, kc;
    fbn_grad_terms((double)weight[c], invstd[c], sdy, sdyx, count, &grad_weight[c], &grad_bias[c], &kdy, &kx, &kc);
    fbn_split_mean(mean[c], cf[0], cf[1]);
    cf[2] = (K)kdy;
    cf[3] = training ? (K)kx : (K)0;
    cf[4] = training ? (K)kc : (K)0;
    cf[5] = act == FBN_ACT_RECOMPUTE ? bias[c] : (K)0;
}

/* ------------------------------------------------------------------ elementwise, one channel */
/* y = fbn_put(fbn_normalize(x, mhi, mlo, a, b), relu) over channel c. */
template <typename T>
__device__ __forceinline__ void fbn_channel_affine(const T *x, T *y, i64 C, i64 S, i64 c, i64 NS, FBN_K mhi,
                                                   FBN_K mlo, FBN_K a, FBN_K b, int relu)
{
    FbnChannelWalker w(threadIdx.x, C, S, c, blockDim.x);
    while (w.e < NS) {
        i64 off[FBN_APPLY];
        FBN_K v[FBN_APPLY];
#pragma unroll
        for (int j = 0; j < FBN_APPLY; j++) { /* y may be x: each element is read, then written */
            off[j] = w.e < NS ? w.off : -1;
            if (off[j] >= 0)
                v[j] = fbn_ld(x[off[j]]);
            w.next();
        }
#pragma unroll
        for (int j = 0; j < FBN_APPLY; j++)
            if (off[j] >= 0)
                fbn_put(y[off[j]], fbn_normalize(v[j], mhi, mlo, a, b), relu);
    }
}

/* One element of grad_input from g (dy gated by the activation), x and cf = (m_hi, m_lo, kdy, kx,
 * kc): kdy * g + (((x - m_hi) - m_lo) * kx + kc) in training, g * kdy (x not used) in evaluation. */
template <typename K>
__device__ __forceinline__ K fbn_dx(K g, K v, const K *cf, int training)
{
    if (training)
        return fbn_fma(cf[2], g, fbn_normalize(v, cf[0], cf[1], cf[3], cf[4]));
    return fbn_fma(g, cf[2], (K)0);
}

/* grad_input of channel c with the coefficients cf = (m_hi, m_lo, kdy, kx, kc, b) of
 * fbn_finish_grad; x is read where training or act 1 needs it, out for act 2 only. */
template <typename T>
__device__ __forceinline__ void fbn_channel_grad_input(const T *dy, const T *x, const T *out, T *dx, i64 C, i64 S,
                                                       i64 c, i64 NS, const FBN_K *cf, int training, int act)
{
    typedef FBN_K K;
    const FbnAffine<K> f = {cf[0], cf[1], cf[2], cf[5]};
    const bool read_x = training || act == FBN_ACT_RECOMPUTE;
    FbnChannelWalker w(threadIdx.x, C, S, c, blockDim.x);
    while (w.e < NS) {
        i64 off[FBN_APPLY];
        K g[FBN_APPLY], v[FBN_APPLY], o[FBN_APPLY];
#pragma unroll
        for (int j = 0; j < FBN_APPLY; j++) {
            off[j] = w.e < NS ? w.off : -1;
            if (off[j] >= 0) {
                g[j] = fbn_ld(dy[off[j]]);
                v[j] = read_x ? fbn_ld(x[off[j]]) : (K)0;
                o[j] = act == FBN_ACT_OUTPUT ? fbn_ld(out[off[j]]) : (K)0;
            }
            w.next();
        }
#pragma unroll
        for (int j = 0; j < FBN_APPLY; j++)
            if (off[j] >= 0)
                fbn_st(dx[off[j]], fbn_dx(fbn_gated<T>(g[j], v[j], o[j], act, f), v[j], cf, training));
    }
}
