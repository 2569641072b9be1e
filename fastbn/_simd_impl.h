/* fastbn/_simd_impl.h -- the typed loops of _simd.h; included once per element type with E (the
 * element in memory: float, double, or a half type), T (the type it is computed in: float or
 * double), FBN_LD / FBN_ST (E to T and back, rounding to nearest even), FBN_SUFFIX and FBN_TWO_PASS
 * defined; FBN_DATA_ONLY leaves out the per-channel coefficient functions, which depend on T
 * alone (a half type shares float's).  No include guard.
 *
 * Two layouts:
 *  - ranges: elements [f0, f1) of an (N, C, S) buffer in memory order.  Row r = f / S (S
 *    contiguous elements) belongs to channel r % C.  Threads take consecutive ranges, so every
 *    thread streams through memory front to back.  Per-channel accumulators and coefficients are
 *    indexed by channel.
 *  - blocks: `rows` rows of an (N, W) matrix (W = C*S columns; S is 1 or small), vectorized
 *    across the columns.  Per-column accumulators and coefficients are indexed by column.
 * FBN_FOR_ROWS (_simd.h) visits a range's pieces: flat offset `off`, length `ln`, channel `c`. */

/* Half elements in the ranges loops: each piece is first converted to float in an L1 buffer
 * (FBN_STAGE, the hardware's conversion where there is one), and float's own loops (the _f32 ones,
 * FBN_RUN) run on it; results leave through FBN_FLUSH.  Elsewhere FBN_RUN is this type's loop. */
#undef FBN_RUN
#undef FBN_IN
#if FBN_HALF
#define FBN_RUN(name) FBN_CAT(name, f32)
#define FBN_IN float
#else
#define FBN_RUN(name) FBN_NAME(name)
#define FBN_IN E
#endif

/* Results that leave through a buffer (streaming stores, or a half type's rounding: FBN_FLUSH) are
 * gathered across the runs (rows) of a range, which lie one after another in memory, and moved out
 * a chunk at a time, on whole 64-byte lines after the first (fbn_chunk_cap).  A buffer per run
 * streamed each run of a 7x7 map (196 bytes) with ordinary stores at both of its partial lines:
 * evaluation on (256, 512, 7, 7) float32 took 2.1-2.2 ms streamed against 1.05 ms without
 * streaming stores (2 threads).  fbn_out_at: where the results for out position `at` go (buf + n),
 * *bl clamped to the room left; fbn_out_done: bl of them written; fbn_out_flush: the rest out. */
typedef struct { E *dst; ptrdiff_t n, cap; } FBN_NAME(fbn_out);

FBN_INLINE T *FBN_NAME(fbn_out_at)(FBN_NAME(fbn_out) *o, T *buf, E *at, ptrdiff_t *bl)
{
    if (o->n == 0) {
        o->dst = at;
        o->cap = fbn_chunk_cap(at, sizeof(E));
    }
    if (*bl > o->cap - o->n)
        *bl = o->cap - o->n;
    return buf + o->n;
}

FBN_INLINE void FBN_NAME(fbn_out_flush)(FBN_NAME(fbn_out) *o, T *buf, int stream)
{
    if (o->n) {
        FBN_FLUSH(o->dst, buf, o->n, stream);
        o->n = 0;
    }
}

FBN_INLINE void FBN_NAME(fbn_out_done)(FBN_NAME(fbn_out) *o, T *buf, ptrdiff_t bl, int stream)
{
    o->n += bl;
    if (o->n == o->cap)
        FBN_NAME(fbn_out_flush)(o, buf, stream);
}

/* The reductions over one row.  Rows shorter than FBN_SHORT elements (7x7 and 10x10 feature maps)
 * reduce into 8 explicit lanes and one for the rest (`narrow`, a constant where these are
 * inlined), added as a tree at the end: GCC ends an `omp simd reduction` by storing its lanes and
 * adding them one at a time, a chain of dependent adds that took half the time of a 49-element
 * row (perf: first with 16 lanes, then, after narrowing them to 8 with simdlen(8), still half of
 * the backward's gradient sums on (32, 512, 7, 7)).  Long rows keep the `omp simd` reduction:
 * there the end is rare. */
#ifndef FBN_LANES
#define FBN_LANES 8
FBN_INLINE double fbn_lanes_sum(const double *v)
{
    return (((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]))) + v[FBN_LANES];
}
#endif

/* for (i = 0; i < n; i++) BODY(i, lane), with lane = i % FBN_LANES for the whole groups, then lane
 * FBN_LANES (a ninth accumulator) for the rest.  The rest once went to lane i % FBN_LANES too: that
 * index is not a constant, so the lanes lived on the stack, reloaded one by one for the sum; perf
 * put most of the gradient sums of (32, 512, 7, 7) there. */
#define FBN_BY_LANES(n, BODY)                                                                     \
    do {                                                                                          \
        ptrdiff_t i_ = 0;                                                                         \
        for (; i_ + FBN_LANES <= (n); i_ += FBN_LANES)                                            \
            _Pragma("omp simd") for (int l_ = 0; l_ < FBN_LANES; l_++)                            \
                BODY(i_ + l_, l_);                                                                \
        for (; i_ < (n); i_++)                                                                    \
            BODY(i_, FBN_LANES);                                                                  \
    } while (0)

/* sum(p[0:n]) in double. */
FBN_INLINE double FBN_NAME(fbn_sum)(const E *p, ptrdiff_t n, const int narrow)
{
    double t = 0.0;
    if (narrow) {
        double v[FBN_LANES + 1] = {0};
#define FBN_BODY(i, l) v[l] += (double)FBN_LD(p[i])
        FBN_BY_LANES(n, FBN_BODY);
#undef FBN_BODY
        t = fbn_lanes_sum(v);
    } else {
#pragma omp simd reduction(+:t)
        for (ptrdiff_t i = 0; i < n; i++)
            t += (double)FBN_LD(p[i]);
    }
    return t;
}

/* *s = sum(p - k) and *q = sum((p - k)^2) over p[0:n], in double. */
FBN_INLINE void FBN_NAME(fbn_shifted_sums)(const E *p, ptrdiff_t n, double k, double *s_out, double *q_out,
                                           const int narrow)
{
    double s = 0.0, q = 0.0;
    if (narrow) {
        double vs[FBN_LANES + 1] = {0}, vq[FBN_LANES + 1] = {0};
#define FBN_BODY(i, l)                                                                            \
        do {                                                                                      \
            const double d = (double)FBN_LD(p[i]) - k;                                            \
            vs[l] += d;                                                                           \
            vq[l] += d * d;                                                                       \
        } while (0)
        FBN_BY_LANES(n, FBN_BODY);
#undef FBN_BODY
        s = fbn_lanes_sum(vs);
        q = fbn_lanes_sum(vq);
    } else {
#pragma omp simd reduction(+:s, q)
        for (ptrdiff_t i = 0; i < n; i++) {
            double d = (double)FBN_LD(p[i]) - k;
            s += d;
            q += d * d;
        }
    }
    *s_out = s;
    *q_out = q;
}



/* Merge the moments of p[0:len] into one channel's accumulator (see fbn_shift_merge).  Shifted sums
 * s = sum(x - k) and q = sum((x - k)^2) in double give the block's mean k + s/len and M2
 * q - s^2/len with no cancellation while k is close to the mean: k is the exact mean of the
 * channel's first FBN_CPU_BLOCK elements (a first pass over them, in L1), then the channel's mean so
 * far.  With FBN_TWO_PASS (float64, where there is no conversion to pay for) every block of
 * FBN_CPU_BLOCK gets its own first pass. */
FBN_INLINE void FBN_NAME(fbn_piece_moments)(const E *p, ptrdiff_t len, double *acc)
{
    for (ptrdiff_t j = 0; j < len; ) {
        ptrdiff_t bl = len - j;
        double k = fbn_acc_mean(acc), s = 0.0, q = 0.0;
        if (FBN_TWO_PASS || acc[FBN_N] == 0.0) {
            if (bl > FBN_CPU_BLOCK)
                bl = FBN_CPU_BLOCK;
            k = (bl < FBN_SHORT ? FBN_NAME(fbn_sum)(p + j, bl, 1) : FBN_NAME(fbn_sum)(p + j, bl, 0)) / (double)bl;
        }
        if (bl < FBN_SHORT)
            FBN_NAME(fbn_shifted_sums)(p + j, bl, k, &s, &q, 1);
        else
            FBN_NAME(fbn_shifted_sums)(p + j, bl, k, &s, &q, 0);
        fbn_shift_merge(acc, (double)bl, k, s / (double)bl, q - s * (s / (double)bl));
        j += bl;
    }
}

/* Moments of a range into per-channel accumulators acc[FBN_ACC*c ..] (see fbn_shift_merge). */
FBN_CLONES static void FBN_NAME(fbn_moments)(const E *x, ptrdiff_t C, ptrdiff_t S, ptrdiff_t f0,
                                             ptrdiff_t f1, double *acc)
{
#if FBN_HALF
    float tb[FBN_CPU_BLOCK];
#if FBN_HALF && defined(FBN_HALF_512)
    const int h512 = fbn_half_512_ok();  /* half elements converted in the loops (_half512.h) */
#endif
    FBN_FOR_ROWS(C, S, f0, f1, off, ln, c)
        for (ptrdiff_t j = 0; j < ln; j += FBN_CPU_BLOCK) {
            const ptrdiff_t bl = ln - j < FBN_CPU_BLOCK ? ln - j : FBN_CPU_BLOCK;
#if FBN_HALF && defined(FBN_HALF_512)
            if (h512 && ln >= FBN_HALF_MIN_ROW) {
                fbn_half_block_moments((const uint16_t *)(x + off + j), bl, acc + FBN_ACC * c, FBN_BF);
                continue;
            }
#endif
            FBN_STAGE(tb, x + off + j, bl);
            fbn_piece_moments_f32(tb, bl, acc + FBN_ACC * c);
        }
#else
#ifdef FBN_S512_HERE  /* (float32: _short512.h; rows under 8 elements had no vector to gain from) */
    if (S >= 8 && S < FBN_SHORT && fbn_short_512_ok()) {
        fbn_moments_s512(x, C, S, f0, f1, acc);
        return;
    }
#endif
    FBN_FOR_ROWS(C, S, f0, f1, off, ln, c)
        FBN_NAME(fbn_piece_moments)(x + off, ln, acc + FBN_ACC * c);
#endif
}

/* Whether a channel's mean is so large that x - mhi could overflow T (see FBN_WIDE in _coefs.h). */
FBN_INLINE int FBN_NAME(fbn_wide)(T mhi) { return (mhi >= FBN_WIDE) | (mhi <= -FBN_WIDE); }

/* Whether any of n means is wide, in one vector pass. */
FBN_INLINE int FBN_NAME(fbn_any_wide)(const T *mhi, ptrdiff_t n)
{
    int wide = 0;
#pragma omp simd reduction(|:wide)
    for (ptrdiff_t c = 0; c < n; c++)
        wide |= (mhi[c] >= FBN_WIDE) | (mhi[c] <= -FBN_WIDE);
    return wide;
}

/* Whether a channel that the rows of the range [f0, f1) belong to has a wide mean: checked once
 * per range, so that the loop over its rows tests wide means only when there is one (a test per
 * row cost 5% of an evaluation call on (1, 512, 7, 7), whose rows are 49 elements). */
FBN_INLINE int FBN_NAME(fbn_range_wide)(const T *mhi, ptrdiff_t C, ptrdiff_t S, ptrdiff_t f0, ptrdiff_t f1)
{
    if (f1 <= f0)
        return 0;
    const ptrdiff_t r0 = f0 / S, rows = (f1 - 1) / S - r0 + 1, c0 = r0 % C;
    if (rows >= C)
        return FBN_NAME(fbn_any_wide)(mhi, C);
    if (c0 + rows <= C)
        return FBN_NAME(fbn_any_wide)(mhi + c0, rows);
    return FBN_NAME(fbn_any_wide)(mhi + c0, C - c0) | FBN_NAME(fbn_any_wide)(mhi, c0 + rows - C);
}

/* ---- the fused activation (activation="relu") ----
 * The forward writes relu(v) = v < 0 ? 0 : v in the same pass, which keeps NaN and -0 as torch.relu
 * does; for float16 and bfloat16 elements, v < -FBN_ZERO ? 0 : v, since torch.relu sees v rounded
 * to the element type, and a v in [-FBN_ZERO, 0) rounds to -0, which it keeps.  The backward
 * passes the gradient through it as PyTorch's threshold_backward: g where the forward's output z
 * was > 0 or NaN, 0 where z <= 0.  z is read from the forward's output (act 2), or
 * recomputed from x with the forward's coefficients (act 1), the same arithmetic as the forward's, so
 * the mask has the forward's bits, in the backward's passes: no saved mask, no extra pass. */
FBN_INLINE T FBN_NAME(fbn_relu)(T v) { return v < -(T)FBN_ZERO ? (T)0 : v; }
/* g, or +0 where z <= zero, as a bit mask rather than `z <= zero ? 0 : g`: GCC turned that into a
 * branch in the gradient sums (it will not execute their conversions speculatively), which left the
 * loop scalar and the backward 6x slower.  zero: 0 for an output read from memory; for one
 * recomputed in T, FBN_ZERO, the largest value that the element type stores as +0 (0 for float and
 * double; a tiny positive float16 or bfloat16 output is stored as +0, which stops the gradient). */
FBN_INLINE T FBN_NAME(fbn_gate_if)(T g, const int keep)
{
    FBN_UINT bits;
    memcpy(&bits, &g, sizeof bits);
    bits &= (FBN_UINT)0 - (FBN_UINT)keep;
    memcpy(&g, &bits, sizeof bits);
    return g;
}

FBN_INLINE T FBN_NAME(fbn_gate_at)(T g, T z, T zero) { return FBN_NAME(fbn_gate_if)(g, !(z <= zero)); }

FBN_INLINE T FBN_NAME(fbn_gate)(T g, T z) { return FBN_NAME(fbn_gate_at)(g, z, (T)0); }

/* The forward's output recomputed from p (half: for a wide mean, mhi and mlo halved, a doubled). */
FBN_INLINE T FBN_NAME(fbn_fwd_out)(T p, T mhi, T mlo, T a, T b, const int half)
{
    return (((half ? p * (T)0.5 : p) - mhi) - mlo) * a + b;
}

/* One channel's (or column's) forward coefficients, for act 1; its bounds on x for acts 3 and 4. */
typedef struct { T mhi, mlo, a, b, zero, lo, hi; } FBN_NAME(fbn_fwd);

/* The gradient of element i through the activation: g[i] (act 0), or gated by the forward's output,
 * zs[i] (act 2) or ((p[i] - mhi) - mlo) * a + b recomputed (act 1; half for a wide mean, with f's
 * mhi, mlo halved and a doubled, as fbn_affine_run). */
FBN_INLINE T FBN_NAME(fbn_gated)(const E *g, const E *p, const E *zs, ptrdiff_t i, T mhi, T mlo, T a, T b,
                                 T zero, const int act, const int half)
{
    if (act == 0)
        return FBN_LD(g[i]);
    if (act == 2)
        return FBN_NAME(fbn_gate)(FBN_LD(g[i]), FBN_LD(zs[i]));
    return FBN_NAME(fbn_gate_at)(FBN_LD(g[i]), FBN_NAME(fbn_fwd_out)(FBN_LD(p[i]), mhi, mlo, a, b, half), zero);
}

/* fbn_gated with the coefficients of f, or act 1's mask from bounds on p (fbn_relu_bounds), one
 * compare instead of the output's arithmetic: g where p >= lo (act 3) or p <= hi (act 4), or p is
 * NaN; else +0. */
FBN_INLINE T FBN_NAME(fbn_gated_by)(const E *g, const E *p, const E *zs, ptrdiff_t i, FBN_NAME(fbn_fwd) f,
                                    const int act, const int half)
{
    if (act == 3)
        return FBN_NAME(fbn_gate_if)(FBN_LD(g[i]), !(FBN_LD(p[i]) < f.lo));
    if (act == 4)
        return FBN_NAME(fbn_gate_if)(FBN_LD(g[i]), !(FBN_LD(p[i]) > f.hi));
    return FBN_NAME(fbn_gated)(g, p, zs, i, f.mhi, f.mlo, f.a, f.b, f.zero, act, half);
}

/* Act 1's mask for channel c from its bounds on x, where blocks 4 and 5 of the ranges' fcf hold them
 * (not NaN, see fbn_relu_bounds): 3 (keep x >= lo) or 4 (keep x <= hi), with f->lo, f->hi set;
 * else act itself. */
FBN_INLINE int FBN_NAME(fbn_bounded)(const T *fcf, ptrdiff_t C, ptrdiff_t c, FBN_NAME(fbn_fwd) *f, const int act)
{
    if (act != 1 || isnan(fcf[4 * C + c]))
        return act;
    f->lo = fcf[4 * C + c];
    f->hi = fcf[5 * C + c];
    return f->hi == (T)INFINITY ? 3 : 4;
}

/* Channel c's forward coefficients from fcf = [mhi | mlo | a | b] (blocks C apart), prepared for
 * fbn_gated: halved for a wide mean when half. */
FBN_INLINE FBN_NAME(fbn_fwd) FBN_NAME(fbn_fwd_at)(const T *fcf, ptrdiff_t C, ptrdiff_t c, const int half)
{
    FBN_NAME(fbn_fwd) f;
    f.mhi = half ? fcf[c] * (T)0.5 : fcf[c];
    f.mlo = half ? fcf[C + c] * (T)0.5 : fcf[C + c];
    f.a = half ? fcf[2 * C + c] * 2 : fcf[2 * C + c];
    f.b = fcf[3 * C + c];
    f.zero = (T)0;
    return f;
}

/* q = ((p - mhi) - mlo) * a + b over n elements; lo and half are constants where this is inlined.
 * With lo = 0 the `- mlo` (which is then 0) folds away: the same result to the bit.  half: p is
 * halved first, for a wide mean (the caller passes mhi, mlo halved and a doubled). */
FBN_INLINE void FBN_NAME(fbn_affine_run)(const E *p, T *q, ptrdiff_t n, T mhi, T mlo, T a, T b, const int lo,
                                         const int half, const int relu)
{
#pragma omp simd
    for (ptrdiff_t i = 0; i < n; i++) {
        const T v = FBN_NAME(fbn_fwd_out)(FBN_LD(p[i]), mhi, lo ? mlo : (T)0, a, b, half);
        q[i] = relu ? FBN_NAME(fbn_relu)(v) : v;
    }
}

/* One element of either form, for the column loops' rare wide blocks: h = 1/2 for a wide mean
 * (see FBN_WIDE), else 1, which is the direct form exactly (x * 1 = x, a / 1 = a). */
FBN_INLINE T FBN_NAME(fbn_norm_wide)(T x, T mhi, T mlo, T a, T b)
{
    const T h = FBN_NAME(fbn_wide)(mhi) ? (T)0.5 : (T)1;
    return ((x * h - mhi * h) - mlo * h) * (a / h) + b;
}

/* y = ((x - mhi) - mlo) * a + b over a range; cf = [mhi | mlo | a | b], C values each; y may be
 * x.  stream: streaming stores, through an L1 buffer of FBN_CHUNK elements (fbn_out). */
FBN_INLINE void FBN_NAME(fbn_affine_rows)(const E *x, E *y, ptrdiff_t C, ptrdiff_t S, ptrdiff_t f0, ptrdiff_t f1,
                                          const T *cf, int stream, const int check_wide, const int relu)
{
    T buf[FBN_CHUNK];  /* results in T, for streaming stores and half elements (fbn_out, FBN_FLUSH) */
    FBN_NAME(fbn_out) o = {y, 0, 0};
    const int buffered = stream || FBN_HALF;
#if FBN_HALF
    float pb[FBN_CHUNK];
#endif
#if FBN_HALF && defined(FBN_HALF_512)
    const int h512 = fbn_half_512_ok();
#endif
    FBN_FOR_ROWS(C, S, f0, f1, off, ln, c) {
        const T mhi = cf[c], mlo = cf[C + c], a = cf[2 * C + c], b = cf[3 * C + c];
        for (ptrdiff_t j = 0, bl; j < ln; j += bl) {
            bl = ln - j < FBN_CHUNK ? ln - j : FBN_CHUNK;
#if FBN_HALF && defined(FBN_HALF_512)
            if (h512 && ln >= FBN_HALF_MIN_ROW && !relu && !(check_wide && FBN_NAME(fbn_wide)(mhi))) {
                /* rounded to the half type in the register: into y, or into buf to stream from */
                FBN_NAME(fbn_out_flush)(&o, buf, stream);  /* (a range's first, partial row's results) */
                uint16_t *h = stream ? (uint16_t *)buf : (uint16_t *)(y + off + j);
                fbn_half_affine((const uint16_t *)(x + off + j), h, bl, mhi, mlo, a, b, FBN_BF);
                if (stream)
                    fbn_stream_store(y + off + j, buf, (size_t)bl * sizeof(E));
                continue;
            }
#endif
            T *q = buffered ? FBN_NAME(fbn_out_at)(&o, buf, y + off + j, &bl) : (T *)(y + off + j);
#if FBN_HALF
            const FBN_IN *p = pb;
            FBN_STAGE(pb, x + off + j, bl);
#else
            const FBN_IN *p = x + off + j;
#endif
            if (check_wide && FBN_NAME(fbn_wide)(mhi))
                FBN_RUN(fbn_affine_run)(p, q, bl, mhi * (T)0.5, mlo * (T)0.5, a * 2, b, 1, 1, relu);
            else if (mlo != 0)  /* 0 for float64, and for a float32 mean (evaluation) */
                FBN_RUN(fbn_affine_run)(p, q, bl, mhi, mlo, a, b, 1, 0, relu);
            else
                FBN_RUN(fbn_affine_run)(p, q, bl, mhi, mlo, a, b, 0, 0, relu);
            if (buffered)
                FBN_NAME(fbn_out_done)(&o, buf, bl, stream);
        }
    }
    FBN_NAME(fbn_out_flush)(&o, buf, stream);
}

/* relu: the fused activation. */
FBN_CLONES static void FBN_NAME(fbn_affine)(const E *x, E *y, ptrdiff_t C, ptrdiff_t S, ptrdiff_t f0,
                                            ptrdiff_t f1, const T *cf, int stream, int relu)
{
    const int wide = FBN_NAME(fbn_range_wide)(cf, C, S, f0, f1);
#ifdef FBN_S512_HERE  /* (float32: _short512.h) */
    if (!wide && !stream && S < FBN_SHORT && fbn_short_512_ok()) {
        fbn_affine_s512(x, y, C, S, f0, f1, cf, relu);
        return;
    }
#endif
    if (relu && wide)
        FBN_NAME(fbn_affine_rows)(x, y, C, S, f0, f1, cf, stream, 1, 1);
    else if (relu)
        FBN_NAME(fbn_affine_rows)(x, y, C, S, f0, f1, cf, stream, 0, 1);
    else if (wide)
        FBN_NAME(fbn_affine_rows)(x, y, C, S, f0, f1, cf, stream, 1, 0);
    else
        FBN_NAME(fbn_affine_rows)(x, y, C, S, f0, f1, cf, stream, 0, 0);
}

/* *a = sum(g') and *b = sum(g' * (p - m)) over n elements, in double, where g' is g through the
 * activation (fbn_gated; act, half and narrow are constants where this is inlined). */
FBN_INLINE void FBN_NAME(fbn_grad_run)(const E *g, const E *p, const E *zs, ptrdiff_t n, double m,
                                       FBN_NAME(fbn_fwd) f, double *a_out, double *b_out, const int act,
                                       const int half, const int narrow)
{
    double a = 0.0, b = 0.0;
    if (narrow) {
        double va[FBN_LANES + 1] = {0}, vb[FBN_LANES + 1] = {0};
#define FBN_BODY(i, l)                                                                            \
        do {                                                                                      \
            const double gi = (double)FBN_NAME(fbn_gated_by)(g, p, zs, i, f, act, half);          \
            va[l] += gi;                                                                          \
            vb[l] += gi * ((double)FBN_LD(p[i]) - m);                                             \
        } while (0)
        FBN_BY_LANES(n, FBN_BODY);
#undef FBN_BODY
        a = fbn_lanes_sum(va);
        b = fbn_lanes_sum(vb);
    } else {
#pragma omp simd reduction(+:a, b)
        for (ptrdiff_t i = 0; i < n; i++) {
            double gi = (double)FBN_NAME(fbn_gated_by)(g, p, zs, i, f, act, half);
            a += gi;
            b += gi * ((double)FBN_LD(p[i]) - m);
        }
    }
    *a_out = a;
    *b_out = b;
}

FBN_INLINE void FBN_NAME(fbn_grad_sums_rows)(const E *dy, const E *x, ptrdiff_t C, ptrdiff_t S, ptrdiff_t f0,
                                             ptrdiff_t f1, const double *mean, double *acc, const E *zs,
                                             const T *fcf, const int act, const int check_wide)
{
    FBN_RUN(fbn_fwd) f = {0, 0, 0, 0, 0, 0, 0};
#if FBN_HALF
    float gb[FBN_CHUNK], pb[FBN_CHUNK], zb[FBN_CHUNK];
#endif
#if FBN_HALF && defined(FBN_HALF_512)
    const int h512 = act == 0 && fbn_half_512_ok();
#endif
    FBN_FOR_ROWS(C, S, f0, f1, off, ln, c) {
        double a, b;
        const int half = check_wide && FBN_NAME(fbn_wide)(fcf[c]);
#if FBN_HALF && defined(FBN_HALF_512)
        if (h512 && ln >= FBN_HALF_MIN_ROW && !half) {
            fbn_half_grad_sums((const uint16_t *)(dy + off), (const uint16_t *)(x + off), ln, mean[c], &a, &b, FBN_BF);
            acc[2 * c] += a;
            acc[2 * c + 1] += b;
            continue;
        }
#endif
        if (act == 1) {
            f = FBN_RUN(fbn_fwd_at)(fcf, C, c, half);
            f.zero = (T)FBN_ZERO;
        }
#if FBN_HALF
        const int by = act;
#else
        const int by = half ? act : FBN_NAME(fbn_bounded)(fcf, C, c, &f, act);
#endif
#if FBN_HALF  /* the row in pieces of FBN_CHUNK, staged */
        double sa = 0.0, sb = 0.0;
        for (ptrdiff_t j = 0; j < ln; j += FBN_CHUNK) {
            const ptrdiff_t n = ln - j < FBN_CHUNK ? ln - j : FBN_CHUNK;
            const FBN_IN *g = gb, *p = pb, *z = act == 2 ? zb : NULL;
            FBN_STAGE(gb, dy + off + j, n);
            FBN_STAGE(pb, x + off + j, n);
            if (act == 2)
                FBN_STAGE(zb, zs + off + j, n);
#else
        {
            const ptrdiff_t n = ln;
            const FBN_IN *g = dy + off, *p = x + off, *z = act == 2 ? zs + off : zs;
#endif
            if (half && n < FBN_SHORT)  /* (in the order of the other masks' sums, narrow or not) */
                FBN_RUN(fbn_grad_run)(g, p, z, n, mean[c], f, &a, &b, act, 1, 1);
            else if (half)
                FBN_RUN(fbn_grad_run)(g, p, z, n, mean[c], f, &a, &b, act, 1, 0);
            else if (by == 3 && n < FBN_SHORT)
                FBN_RUN(fbn_grad_run)(g, p, z, n, mean[c], f, &a, &b, 3, 0, 1);
            else if (by == 3)
                FBN_RUN(fbn_grad_run)(g, p, z, n, mean[c], f, &a, &b, 3, 0, 0);
            else if (by == 4 && n < FBN_SHORT)
                FBN_RUN(fbn_grad_run)(g, p, z, n, mean[c], f, &a, &b, 4, 0, 1);
            else if (by == 4)
                FBN_RUN(fbn_grad_run)(g, p, z, n, mean[c], f, &a, &b, 4, 0, 0);
            else if (n < FBN_SHORT)
                FBN_RUN(fbn_grad_run)(g, p, z, n, mean[c], f, &a, &b, act, 0, 1);
            else
                FBN_RUN(fbn_grad_run)(g, p, z, n, mean[c], f, &a, &b, act, 0, 0);
#if FBN_HALF
            sa += a;
            sb += b;
        }
        a = sa;
        b = sb;
#else
        }
#endif
        acc[2 * c] += a;
        acc[2 * c + 1] += b;
    }
}

/* sum(dy') and sum(dy' * (x - mean[c])) of a range, in double, added to acc[2*c], acc[2*c+1], where
 * dy' is dy through the activation: gated by the forward's output zs (indexed as x) when zs is not
 * NULL, else by the output recomputed with the forward's coefficients fcf = [mhi | mlo | a | b]
 * (blocks C apart) when fcf is not NULL, else dy itself. */
FBN_CLONES static void FBN_NAME(fbn_grad_sums)(const E *dy, const E *x, ptrdiff_t C, ptrdiff_t S,
                                               ptrdiff_t f0, ptrdiff_t f1, const double *mean, double *acc,
                                               const E *zs, const T *fcf)
{
#ifdef FBN_S512_HERE  /* (float32: _short512.h) */
    if (S < FBN_SHORT && fbn_short_512_ok() && !(fcf && !zs && FBN_NAME(fbn_range_wide)(fcf, C, S, f0, f1))) {
        fbn_grad_sums_s512(dy, x, C, S, f0, f1, mean, acc, zs, fcf);
        return;
    }
#endif
    if (zs)
        FBN_NAME(fbn_grad_sums_rows)(dy, x, C, S, f0, f1, mean, acc, zs, fcf, 2, 0);
    else if (!fcf)
        FBN_NAME(fbn_grad_sums_rows)(dy, x, C, S, f0, f1, mean, acc, zs, fcf, 0, 0);
    else if (FBN_NAME(fbn_range_wide)(fcf, C, S, f0, f1))
        FBN_NAME(fbn_grad_sums_rows)(dy, x, C, S, f0, f1, mean, acc, zs, fcf, 1, 1);
    else
        FBN_NAME(fbn_grad_sums_rows)(dy, x, C, S, f0, f1, mean, acc, zs, fcf, 1, 0);
}

/* q = kdy * g' + (((p - mhi) - mlo) * kx + kc) over n elements, g' = g through the activation
 * (fbn_gated); fixed (statistics that were constants): q = kdy * g', x's terms left out rather than
 * multiplied by 0 (an infinite x would give NaN).  half as in fbn_affine_run, for both. */
FBN_INLINE void FBN_NAME(fbn_grad_input_run)(const E *g, const E *p, const E *zs, T *q, ptrdiff_t n, T mhi, T mlo,
                                             T kdy, T kx, T kc, FBN_NAME(fbn_fwd) f, const int act,
                                             const int half, const int fixed)
{
#pragma omp simd
    for (ptrdiff_t i = 0; i < n; i++) {
        const T d = ((half ? FBN_LD(p[i]) * (T)0.5 : FBN_LD(p[i])) - mhi) - mlo;
        /* in training the forward's mean is the backward's (f.mhi, f.mlo are mhi, mlo): its output is
         * d * a + b, sharing d with dx's terms */
        const T gi = act == 1 && !fixed ? FBN_NAME(fbn_gate_at)(FBN_LD(g[i]), d * f.a + f.b, f.zero)
                                        : FBN_NAME(fbn_gated_by)(g, p, zs, i, f, act, half);
        q[i] = fixed ? kdy * gi : kdy * gi + (d * kx + kc);
    }
}

FBN_INLINE void FBN_NAME(fbn_grad_input_rows)(const E *dy, const E *x, E *dx, ptrdiff_t C, ptrdiff_t S,
                                              ptrdiff_t f0, ptrdiff_t f1, const T *cf, int stream, const E *zs,
                                              const T *fcf, const int act, const int fixed, const int check_wide)
{
    T buf[FBN_CHUNK];  /* results in T, for streaming stores and half elements (fbn_out, FBN_FLUSH) */
    FBN_NAME(fbn_out) o = {dx, 0, 0};
    const int buffered = stream || FBN_HALF;
    FBN_RUN(fbn_fwd) f = {0, 0, 0, 0, 0, 0, 0};
#if FBN_HALF
    float gb[FBN_CHUNK], pb[FBN_CHUNK], zb[FBN_CHUNK];
#endif
#if FBN_HALF && defined(FBN_HALF_512)
    const int h512 = act == 0 && !fixed && fbn_half_512_ok();
#endif
    FBN_FOR_ROWS(C, S, f0, f1, off, ln, c) {
        const T mhi = cf[c], mlo = cf[C + c], kdy = cf[2 * C + c], kx = cf[3 * C + c], kc = cf[4 * C + c];
        /* a wide mean: the forward's mean where the mask is recomputed (the backward's is 0 when
         * fixed), else the backward's; in training the two are the same value */
        const int half = check_wide && FBN_NAME(fbn_wide)(act == 1 ? fcf[c] : mhi);
        if (act == 1) {
            f = FBN_RUN(fbn_fwd_at)(fcf, C, c, half);
            f.zero = (T)FBN_ZERO;
        }
        /* bounds on x only for the evaluation-mode backward: in training the mask shares d with
         * dx's terms, and with bounds the pass was 6% slower on (32, 512, 7, 7) float32 */
#if FBN_HALF
        const int by = act;
#else
        const int by = half || !fixed ? act : FBN_NAME(fbn_bounded)(fcf, C, c, &f, act);
#endif
        for (ptrdiff_t j = 0, bl; j < ln; j += bl) {
            bl = ln - j < FBN_CHUNK ? ln - j : FBN_CHUNK;
#if FBN_HALF && defined(FBN_HALF_512)
            if (h512 && ln >= FBN_HALF_MIN_ROW && !half) {  /* as in fbn_affine_rows */
                FBN_NAME(fbn_out_flush)(&o, buf, stream);
                uint16_t *h = stream ? (uint16_t *)buf : (uint16_t *)(dx + off + j);
                fbn_half_grad_input((const uint16_t *)(dy + off + j), (const uint16_t *)(x + off + j), h, bl, mhi, mlo,
                                    kdy, kx, kc, FBN_BF);
                if (stream)
                    fbn_stream_store(dx + off + j, buf, (size_t)bl * sizeof(E));
                continue;
            }
#endif
            T *q = buffered ? FBN_NAME(fbn_out_at)(&o, buf, dx + off + j, &bl) : (T *)(dx + off + j);
#if FBN_HALF
            const FBN_IN *g = gb, *p = pb, *z = act == 2 ? zb : NULL;
            FBN_STAGE(gb, dy + off + j, bl);
            if (!fixed || act == 1)
                FBN_STAGE(pb, x + off + j, bl);
            if (act == 2)
                FBN_STAGE(zb, zs + off + j, bl);
#else
            const FBN_IN *g = dy + off + j, *p = x + off + j, *z = act == 2 ? zs + off + j : zs;
#endif
            if (half)
                FBN_RUN(fbn_grad_input_run)(g, p, z, q, bl, mhi * (T)0.5, mlo * (T)0.5, kdy, kx * 2, kc, f, act, 1,
                                            fixed);
            else if (by == 3)
                FBN_RUN(fbn_grad_input_run)(g, p, z, q, bl, mhi, mlo, kdy, kx, kc, f, 3, 0, fixed);
            else if (by == 4)
                FBN_RUN(fbn_grad_input_run)(g, p, z, q, bl, mhi, mlo, kdy, kx, kc, f, 4, 0, fixed);
            else
                FBN_RUN(fbn_grad_input_run)(g, p, z, q, bl, mhi, mlo, kdy, kx, kc, f, act, 0, fixed);
            if (buffered)
                FBN_NAME(fbn_out_done)(&o, buf, bl, stream);
        }
    }
    FBN_NAME(fbn_out_flush)(&o, buf, stream);
}

/* dx = kdy * dy' + ((x - mhi) - mlo) * kx + kc over a range; cf = [mhi | mlo | kdy | kx | kc]; dy' as
 * in fbn_grad_sums (zs, fcf).  fixed: dx = kdy * dy' (the activation's evaluation-mode backward;
 * without the activation that is fbn_affine on dy). */
FBN_CLONES static void FBN_NAME(fbn_grad_input)(const E *dy, const E *x, E *dx, ptrdiff_t C, ptrdiff_t S,
                                                ptrdiff_t f0, ptrdiff_t f1, const T *cf, int stream, const E *zs,
                                                const T *fcf, int fixed)
{
#define FBN_GRAD_INPUT_ROWS(act, fixed, wide) FBN_NAME(fbn_grad_input_rows)(dy, x, dx, C, S, f0, f1, cf, stream, zs, fcf, act, fixed, wide)
    const int act = zs ? 2 : fcf ? 1 : 0;
    const int wide = (act != 2 || !fixed) && FBN_NAME(fbn_range_wide)(act == 1 ? fcf : cf, C, S, f0, f1);
#ifdef FBN_S512_HERE  /* (float32: _short512.h) */
    if (act == 1 && !fixed && !wide && !stream && S < FBN_SHORT && fbn_short_512_ok()) {
        fbn_grad_input_s512(dy, x, dx, C, S, f0, f1, cf, fcf);
        return;
    }
#endif
    if (act == 0 && fixed)  /* (the drivers run fbn_affine on dy for this) */
        FBN_GRAD_INPUT_ROWS(0, 1, 0);
    else if (act == 0)
        wide ? FBN_GRAD_INPUT_ROWS(0, 0, 1) : FBN_GRAD_INPUT_ROWS(0, 0, 0);
    else if (act == 2 && fixed)
        FBN_GRAD_INPUT_ROWS(2, 1, 0);
    else if (act == 2)
        wide ? FBN_GRAD_INPUT_ROWS(2, 0, 1) : FBN_GRAD_INPUT_ROWS(2, 0, 0);
    else if (fixed)
        wide ? FBN_GRAD_INPUT_ROWS(1, 1, 1) : FBN_GRAD_INPUT_ROWS(1, 1, 0);
    else
        wide ? FBN_GRAD_INPUT_ROWS(1, 0, 1) : FBN_GRAD_INPUT_ROWS(1, 0, 0);
#undef FBN_GRAD_INPUT_ROWS
}

/* ---- blocks of rows of an (N, W) matrix, vectors across the W columns ----
 * The reductions take several rows at a time, so the per-column accumulators are loaded and
 * stored once per several rows instead of once per row.  FBN_ROWS8: the moments are bound by the
 * float32-to-double conversions and adds, not by memory, so they take eight rows and write the
 * sum of squares as one chain of multiply-adds (contracted to FMA in the AVX2 and AVX-512
 * clones), which moves half the adds to the FMA units: on (4096, 1024) float32 the training
 * forward got 13% faster than with four rows and a tree of adds (the sums stay in double, only
 * their order changed).  The backward's sums measured 30% slower that way and keep four rows.
 * Every loop takes columns [0, ncols) of rows W elements apart, with the per-column coefficients in
 * blocks W apart as well: a block of whole rows has ncols = W; a thread's slice of the columns (the
 * SLICES split of _kernels.pyx) passes pointers to its first column and its own width ncols. */

/* Narrow float32 rows (FBN_COL_REG: the float instantiation, GCC and clang).  The loops of
 * fbn_col_moments below walk eight (or four) rows at once, a vector of columns across all of them.
 * With rows of 256 bytes (channels-last (64, 56, 56, 64) float32, C = 64) that read memory at 60%
 * of the speed of a pass front to back: the moments took 3.5 ms against 2.2 ms on the same data in
 * NCHW order (one thread, perf), and in a C model 3.2-7.2 ms against 2.6-2.9 for a front-to-back
 * sum (a noisy hour).  Where the columns fit in registers -- up to 8 * FBN_REG_VECTORS, in double
 * -- this takes the block a row at a time, front to back, with the per-column sums (shifted by k,
 * or by 0 without k) and sums of squares in double vector registers: 2.6-3.1 ms in the model.  The
 * same double arithmetic, in another order.  nv (vectors of 8 columns) and sq (sum the squares
 * too) are constants where inlined. */
#if defined(FBN_COL_REG) && FBN_COL_REG
#define FBN_REG_VECTORS 8
#pragma GCC diagnostic ignored "-Wpsabi" /* (64-byte vectors never cross a call: all inlined) */
typedef double fbn_rd8 __attribute__((vector_size(64)));
typedef float fbn_rf8 __attribute__((vector_size(32)));

FBN_INLINE void fbn_col_reg_run(const float *x, ptrdiff_t rows, ptrdiff_t W, const double *k, double *s, double *q,
                                fbn_rd8 *S, fbn_rd8 *Q, fbn_rd8 *K, const int nv, const int sq)
{
    for (int j = 0; j < nv; j++) {
        const fbn_rd8 z = {0};
        S[j] = Q[j] = K[j] = z;
        if (k)
            memcpy(&K[j], k + 8 * j, sizeof K[j]);
    }
    for (ptrdiff_t r = 0; r < rows; r++) {
        const float *p = x + r * W;
        for (int j = 0; j < nv; j++) {
            fbn_rf8 v;
            memcpy(&v, p + 8 * j, sizeof v);
            const fbn_rd8 d = __builtin_convertvector(v, fbn_rd8) - K[j];
            S[j] += d;
            if (sq)
                Q[j] += d * d;
        }
    }
    for (int j = 0; j < nv; j++)
        for (int l = 0; l < 8; l++) {
            s[8 * j + l] += S[j][l];
            if (sq)
                q[8 * j + l] += Q[j][l];
        }
}

/* fbn_col_reg_run on columns [0, 8 nv): s += sum(x - k) (k NULL: sum(x)), q += sum((x - k)^2) (q
 * NULL: not summed).  The vectors are this function's, once for every case: with a set in each
 * inlined case, an unoptimized (sanitizer) build overflowed a 48 KiB thread stack; optimized, they
 * stay in registers either way. */
FBN_INLINE void fbn_col_reg_sums(const float *x, ptrdiff_t rows, ptrdiff_t W, const double *k, double *s, double *q,
                                 ptrdiff_t nv)
{
    fbn_rd8 S[FBN_REG_VECTORS], Q[FBN_REG_VECTORS], K[FBN_REG_VECTORS];
#define FBN_REG_CASE(v) case v: q ? fbn_col_reg_run(x, rows, W, k, s, q, S, Q, K, v, 1) \
                                  : fbn_col_reg_run(x, rows, W, k, s, q, S, Q, K, v, 0); break
    switch (nv) {
        FBN_REG_CASE(1); FBN_REG_CASE(2); FBN_REG_CASE(3); FBN_REG_CASE(4);
        FBN_REG_CASE(5); FBN_REG_CASE(6); FBN_REG_CASE(7); FBN_REG_CASE(8);
        default: break;
    }
#undef FBN_REG_CASE
}
#endif

/* Column moments of the block merged into per-column accumulators that share the count *n: the
 * shift K, the mean relative to it rel, and M2 (one value per column each; see fbn_shift_merge).
 * Shifted sums per column as in fbn_piece_moments: the shift is the block's exact column means
 * (a first pass; the block is sized to stay in L2) for a thread's first block, which become K,
 * then the means merged so far (K + rel, rounded: any shift near the mean will do, as long as the
 * merge knows which).  K, rel, m2: ncols values each; tmp: 3*ncols doubles of scratch. */
FBN_CLONES static void FBN_NAME(fbn_col_moments)(const E *x, ptrdiff_t rows, ptrdiff_t ncols, ptrdiff_t W,
                                                 double *n, double *K, double *rel, double *m2, double *tmp)
{
    double *s = tmp, *q = tmp + ncols, *k = tmp + 2 * ncols;
    const double b = (double)rows;
    const int first = *n == 0.0;
    ptrdiff_t r = 0;
    int h512 = 0;  /* half elements converted in the loops (_half512.h) */
#if FBN_HALF && defined(FBN_HALF_512)
    h512 = ncols >= 16 && fbn_half_512_ok();
#endif
    ptrdiff_t c0 = 0;  /* columns [0, c0) in registers (fbn_col_reg_sums), the rest below */
#if defined(FBN_COL_REG) && FBN_COL_REG
    c0 = ncols <= 8 * FBN_REG_VECTORS ? ncols / 8 * 8 : 0;
#endif
    for (ptrdiff_t c = 0; c < ncols; c++)
        s[c] = q[c] = 0.0;
    if (first) {  /* k = the block's column means */
#if FBN_HALF && defined(FBN_HALF_512)
        if (h512)
            fbn_half_col_sums((const uint16_t *)x, rows, ncols, W, NULL, s, NULL, FBN_BF);
#endif
#if defined(FBN_COL_REG) && FBN_COL_REG
        fbn_col_reg_sums(x, rows, W, NULL, s, NULL, c0 / 8);
#endif
        for (r = h512 ? rows : 0; r + 4 <= rows; r += 4) {
            const E *p0 = x + r * W, *p1 = p0 + W, *p2 = p1 + W, *p3 = p2 + W;
#pragma omp simd
            for (ptrdiff_t c = c0; c < ncols; c++)
                s[c] += ((double)FBN_LD(p0[c]) + (double)FBN_LD(p1[c])) + ((double)FBN_LD(p2[c]) + (double)FBN_LD(p3[c]));
        }
        for (; r < rows; r++) {
            const E *p = x + r * W;
#pragma omp simd
            for (ptrdiff_t c = c0; c < ncols; c++)
                s[c] += (double)FBN_LD(p[c]);
        }
        for (ptrdiff_t c = 0; c < ncols; c++) {
            k[c] = K[c] = s[c] / b;
            s[c] = 0.0;
        }
    } else {
#pragma omp simd
        for (ptrdiff_t c = 0; c < ncols; c++)
            k[c] = K[c] + rel[c];
    }
#if FBN_HALF && defined(FBN_HALF_512)
    if (h512)
        fbn_half_col_sums((const uint16_t *)x, rows, ncols, W, k, s, q, FBN_BF);
#endif
#if defined(FBN_COL_REG) && FBN_COL_REG
    fbn_col_reg_sums(x, rows, W, k, s, q, c0 / 8);
#endif
    for (r = h512 ? rows : 0; r + 8 <= rows; r += 8) {  /* q as a chain of multiply-adds: see FBN_ROWS8 */
        const E *p = x + r * W;
#pragma omp simd
        for (ptrdiff_t c = c0; c < ncols; c++) {
            const double kc = k[c];
            double d0 = (double)FBN_LD(p[c]) - kc, d1 = (double)FBN_LD(p[W + c]) - kc;
            double d2 = (double)FBN_LD(p[2 * W + c]) - kc, d3 = (double)FBN_LD(p[3 * W + c]) - kc;
            double d4 = (double)FBN_LD(p[4 * W + c]) - kc, d5 = (double)FBN_LD(p[5 * W + c]) - kc;
            double d6 = (double)FBN_LD(p[6 * W + c]) - kc, d7 = (double)FBN_LD(p[7 * W + c]) - kc;
            s[c] += ((d0 + d1) + (d2 + d3)) + ((d4 + d5) + (d6 + d7));
            q[c] = q[c] + d0 * d0 + d1 * d1 + d2 * d2 + d3 * d3 + d4 * d4 + d5 * d5 + d6 * d6 + d7 * d7;
        }
    }
    for (; r < rows; r++) {
        const E *p = x + r * W;
#pragma omp simd
        for (ptrdiff_t c = c0; c < ncols; c++) {
            double d = (double)FBN_LD(p[c]) - k[c];
            s[c] += d;
            q[c] += d * d;
        }
    }
    /* fbn_shift_merge, vectorized: every column has the same count n0 before */
    const double n0 = *n, nn = n0 + b, wb = b / nn, wn = n0 * wb;
#pragma omp simd
    for (ptrdiff_t c = 0; c < ncols; c++) {
        const double sb = s[c] / b, bq = q[c] - s[c] * sb;
        if (first) {
            rel[c] = sb;
            m2[c] = bq;
        } else {
            fbn_chan_add(&rel[c], &m2[c], ((k[c] - K[c]) - rel[c]) + sb, wb, wn, bq);
        }
    }
    *n = nn;
}

/* Whether any of ncols columns has a mean with a low part (lo), or a wide mean (see FBN_WIDE), in
 * one vector pass: a scalar one took a third of an evaluation call on (8, 16384) float32 (SLICES). */
FBN_INLINE void FBN_NAME(fbn_col_flags)(const T *mhi, const T *mlo, ptrdiff_t ncols, int *lo_out, int *wide_out)
{
    int lo = 0, wide = 0;
#pragma omp simd reduction(|:lo, wide)
    for (ptrdiff_t c = 0; c < ncols; c++) {
        lo |= mlo[c] != 0;
        wide |= (mhi[c] >= FBN_WIDE) | (mhi[c] <= -FBN_WIDE);
    }
    *lo_out = lo;
    *wide_out = wide;
}

/* Rows in fours with normal stores (the body of fbn_col_affine); returns the rows done.  lo is a
 * constant where this is inlined: with lo = 0 the low part of the mean is not loaded and
 * `- 0` folds away (x - 0 is x for every x), so the result is the same to the bit. */
FBN_INLINE ptrdiff_t FBN_NAME(fbn_col_affine_rows4)(const E *x, E *y, ptrdiff_t rows, ptrdiff_t ncols,
                                                    ptrdiff_t W, const T *cf, const int lo, const int relu)
{
    const T *mhi = cf, *mlo = cf + W, *a = cf + 2 * W, *b = cf + 3 * W;
    ptrdiff_t r = 0;
#define FBN_ACT(v) (relu ? FBN_NAME(fbn_relu)(v) : (v))
    for (; r + 4 <= rows; r += 4) {
        const E *p = x + r * W;
        E *q = y + r * W;
#pragma omp simd
        for (ptrdiff_t c = 0; c < ncols; c++) {  /* all loads before the stores: FBN_4K */
            const T m1 = mhi[c], m2 = lo ? mlo[c] : (T)0, ac = a[c], bc = b[c];
            const T x0 = FBN_LD(p[c]), x1 = FBN_LD(p[W + c]), x2 = FBN_LD(p[2 * W + c]), x3 = FBN_LD(p[3 * W + c]);
            q[c] = FBN_ST(FBN_ACT(((x0 - m1) - m2) * ac + bc));
            q[W + c] = FBN_ST(FBN_ACT(((x1 - m1) - m2) * ac + bc));
            q[2 * W + c] = FBN_ST(FBN_ACT(((x2 - m1) - m2) * ac + bc));
            q[3 * W + c] = FBN_ST(FBN_ACT(((x3 - m1) - m2) * ac + bc));
        }
    }
#undef FBN_ACT
    return r;
}

/* cf = [mhi | mlo | a | b], one value per column each, blocks W apart.  Normal stores take rows four
 * at a time, so the four coefficient vectors are loaded once per four rows: the loop is bound by L1
 * loads, and this measured 9% faster on (4096, 1024) than one row at a time.
 * FBN_4K: the four rows' loads all come before their stores.  NumPy's large arrays start at the
 * same offset within a 4 KiB page, so with W*sizeof(T) a multiple of 4 KiB, a load of x's row
 * r+1 has the same low 12 address bits as the store just made to y's row r, and the core takes it
 * for a dependency on that store until the full addresses are compared (4K aliasing).  Measured
 * on (4096, 1024) float32: the eval forward ran 1.5x faster with y 2 KiB off x's alignment than
 * with y aligned as NumPy allocates it; loading first removes that difference. */
FBN_INLINE void FBN_NAME(fbn_col_affine_act)(const E *x, E *y, ptrdiff_t rows, ptrdiff_t ncols, ptrdiff_t W,
                                             const T *cf, int stream, const int relu)
{
    const T *mhi = cf, *mlo = cf + W, *a = cf + 2 * W, *b = cf + 3 * W;
    T buf[FBN_CHUNK];  /* results in T, for streaming stores and half elements (FBN_FLUSH) */
    ptrdiff_t r = 0;
    int lo, wide;  /* the mean's low part is 0 for float64, and for a float32 mean (evaluation) */
    FBN_NAME(fbn_col_flags)(mhi, mlo, ncols, &lo, &wide);
#if FBN_HALF && defined(FBN_HALF_512)
    if (!wide && ncols >= 16 && fbn_half_512_ok()) {
        fbn_half_col_affine((const uint16_t *)x, (uint16_t *)y, rows, ncols, W, cf, stream, relu, FBN_BF);
        return;
    }
#endif
    if (!stream && !wide && !FBN_HALF)  /* half elements: rows one at a time, through buf */
        r = lo ? FBN_NAME(fbn_col_affine_rows4)(x, y, rows, ncols, W, cf, 1, relu)
               : FBN_NAME(fbn_col_affine_rows4)(x, y, rows, ncols, W, cf, 0, relu);
    for (; r < rows; r++) {
        for (ptrdiff_t c0 = 0; c0 < ncols; c0 += FBN_CHUNK) {
            ptrdiff_t bl = ncols - c0 < FBN_CHUNK ? ncols - c0 : FBN_CHUNK;
            const E *p = x + r * W + c0;
            T *q = stream || FBN_HALF ? buf : (T *)(y + r * W + c0);
            if (wide) {
                for (ptrdiff_t c = 0; c < bl; c++) {
                    const T v = FBN_NAME(fbn_norm_wide)(FBN_LD(p[c]), mhi[c0 + c], mlo[c0 + c], a[c0 + c], b[c0 + c]);
                    q[c] = relu ? FBN_NAME(fbn_relu)(v) : v;
                }
            } else {
#pragma omp simd
                for (ptrdiff_t c = 0; c < bl; c++) {
                    const T v = ((FBN_LD(p[c]) - mhi[c0 + c]) - mlo[c0 + c]) * a[c0 + c] + b[c0 + c];
                    q[c] = relu ? FBN_NAME(fbn_relu)(v) : v;
                }
            }
            if (stream || FBN_HALF)
                FBN_FLUSH(y + r * W + c0, buf, bl, stream);
        }
    }
}

/* relu: the fused activation. */
FBN_CLONES static void FBN_NAME(fbn_col_affine)(const E *x, E *y, ptrdiff_t rows, ptrdiff_t ncols,
                                                ptrdiff_t W, const T *cf, int stream, int relu)
{
    if (relu)
        FBN_NAME(fbn_col_affine_act)(x, y, rows, ncols, W, cf, stream, 1);
    else
        FBN_NAME(fbn_col_affine_act)(x, y, rows, ncols, W, cf, stream, 0);
}

/* Column c's forward coefficients for fbn_gated (act 1), from fcf = [mhi | mlo | a | b] (blocks W
 * apart): scalars, not an fbn_fwd, which GCC would not vectorize the column loops with. */
#define FBN_COL_FWD(fcf, W, c, act)                                                                 \
    const T fm1 = (act) == 1 ? (fcf)[c] : (T)0, fm2 = (act) == 1 ? (fcf)[(W) + (c)] : (T)0,           \
            fa = (act) == 1 ? (fcf)[2 * (W) + (c)] : (T)0, fb = (act) == 1 ? (fcf)[3 * (W) + (c)] : (T)0

/* Whether the gate of fbn_col_grad_sums / fbn_col_grad_input recomputes outputs of a wide mean. */
FBN_INLINE int FBN_NAME(fbn_col_fwd_wide)(const T *fcf, ptrdiff_t ncols, ptrdiff_t W)
{
    int lo, wide;
    FBN_NAME(fbn_col_flags)(fcf, fcf + W, ncols, &lo, &wide);
    return wide;
}

/* Element c of row r through the activation, for the column loops' rare wide blocks (fbn_norm_wide). */
FBN_INLINE T FBN_NAME(fbn_col_gated_wide)(const E *g, const E *p, const E *zs, ptrdiff_t i, const T *fcf,
                                          ptrdiff_t W, ptrdiff_t c, int act)
{
    if (act == 0)
        return FBN_LD(g[i]);
    if (act == 2)
        return FBN_NAME(fbn_gate)(FBN_LD(g[i]), FBN_LD(zs[i]));
    return FBN_NAME(fbn_gate_at)(FBN_LD(g[i]), FBN_NAME(fbn_norm_wide)(FBN_LD(p[i]), fcf[c], fcf[W + c], fcf[2 * W + c],
                                                                         fcf[3 * W + c]), (T)FBN_ZERO);
}

FBN_INLINE void FBN_NAME(fbn_col_grad_sums_act)(const E *dy, const E *x, ptrdiff_t rows, ptrdiff_t ncols,
                                                ptrdiff_t W, const double *mean, double *sdy, double *sdyx,
                                                const E *zs, const T *fcf, const int act)
{
    ptrdiff_t r = 0;
#if FBN_HALF && defined(FBN_HALF_512)
    if (act == 0 && ncols >= 16 && fbn_half_512_ok()) {
        fbn_half_col_grad_sums((const uint16_t *)dy, (const uint16_t *)x, rows, ncols, W, mean, sdy, sdyx, FBN_BF);
        return;
    }
#endif
#define FBN_G(k) ((double)FBN_NAME(fbn_gated)(g, p, z, (k) * W + c, fm1, fm2, fa, fb, (T)FBN_ZERO, act, 0))
    for (r = 0; r + 4 <= rows; r += 4) {
        const E *g = dy + r * W, *p = x + r * W, *z = act == 2 ? zs + r * W : zs;
#pragma omp simd
        for (ptrdiff_t c = 0; c < ncols; c++) {
            FBN_COL_FWD(fcf, W, c, act);
            double g0 = FBN_G(0), g1 = FBN_G(1), g2 = FBN_G(2), g3 = FBN_G(3);
            double m = mean[c];
            sdy[c] += (g0 + g1) + (g2 + g3);
            sdyx[c] += (g0 * ((double)FBN_LD(p[c]) - m) + g1 * ((double)FBN_LD(p[W + c]) - m))
                       + (g2 * ((double)FBN_LD(p[2 * W + c]) - m) + g3 * ((double)FBN_LD(p[3 * W + c]) - m));
        }
    }
    for (; r < rows; r++) {
        const E *g = dy + r * W, *p = x + r * W, *z = act == 2 ? zs + r * W : zs;
#pragma omp simd
        for (ptrdiff_t c = 0; c < ncols; c++) {
            FBN_COL_FWD(fcf, W, c, act);
            const double gi = FBN_G(0);
            sdy[c] += gi;
            sdyx[c] += gi * ((double)FBN_LD(p[c]) - mean[c]);
        }
    }
#undef FBN_G
}

/* sdy += sum dy' and sdyx += sum dy' * (x - mean), per column (ncols values each); dy' is dy through
 * the activation as in fbn_grad_sums, zs indexed as x, fcf per column (blocks W apart). */
FBN_CLONES static void FBN_NAME(fbn_col_grad_sums)(const E *dy, const E *x, ptrdiff_t rows, ptrdiff_t ncols, ptrdiff_t W,
                                                   const double *mean, double *sdy, double *sdyx, const E *zs,
                                                   const T *fcf)
{
    if (zs) {
        FBN_NAME(fbn_col_grad_sums_act)(dy, x, rows, ncols, W, mean, sdy, sdyx, zs, fcf, 2);
    } else if (!fcf) {
        FBN_NAME(fbn_col_grad_sums_act)(dy, x, rows, ncols, W, mean, sdy, sdyx, zs, fcf, 0);
    } else if (!FBN_NAME(fbn_col_fwd_wide)(fcf, ncols, W)) {
        FBN_NAME(fbn_col_grad_sums_act)(dy, x, rows, ncols, W, mean, sdy, sdyx, zs, fcf, 1);
    } else {  /* a wide mean: element by element (see fbn_norm_wide), summed in fbn_col_grad_sums_act's order */
        ptrdiff_t r = 0;
#define FBN_GW(k) ((double)FBN_NAME(fbn_col_gated_wide)(dy + (r + (k)) * W, x + (r + (k)) * W, zs, c, fcf, W, c, 1))
#define FBN_XM(k) ((double)FBN_LD(x[(r + (k)) * W + c]) - mean[c])
        for (; r + 4 <= rows; r += 4)
            for (ptrdiff_t c = 0; c < ncols; c++) {
                const double g0 = FBN_GW(0), g1 = FBN_GW(1), g2 = FBN_GW(2), g3 = FBN_GW(3);
                sdy[c] += (g0 + g1) + (g2 + g3);
                sdyx[c] += (g0 * FBN_XM(0) + g1 * FBN_XM(1)) + (g2 * FBN_XM(2) + g3 * FBN_XM(3));
            }
        for (; r < rows; r++)
            for (ptrdiff_t c = 0; c < ncols; c++) {
                const double gi = FBN_GW(0);
                sdy[c] += gi;
                sdyx[c] += gi * FBN_XM(0);
            }
#undef FBN_GW
#undef FBN_XM
    }
}

/* One element of grad_input from the gated gradient gi: kdy * gi + ((x - mhi) - mlo) * kx + kc, or
 * kdy * gi alone when fixed (see fbn_grad_input_run). */
FBN_INLINE T FBN_NAME(fbn_dx)(T gi, T x, T mhi, T mlo, T kdy, T kx, T kc, const int fixed)
{
    return fixed ? kdy * gi : kdy * gi + (((x - mhi) - mlo) * kx + kc);
}

FBN_INLINE void FBN_NAME(fbn_col_grad_input_act)(const E *dy, const E *x, E *dx, ptrdiff_t rows, ptrdiff_t ncols,
                                                 ptrdiff_t W, const T *cf, int stream, const E *zs, const T *fcf,
                                                 const int act, const int fixed)
{
    const T *mhi = cf, *mlo = cf + W, *kdy = cf + 2 * W, *kx = cf + 3 * W, *kc = cf + 4 * W;
    T buf[FBN_CHUNK];  /* results in T, for streaming stores and half elements (FBN_FLUSH) */
    ptrdiff_t r = 0;
    int lo, wide;
    FBN_NAME(fbn_col_flags)(mhi, mlo, ncols, &lo, &wide);
    if (act == 1)
        wide |= FBN_NAME(fbn_col_fwd_wide)(fcf, ncols, W);
#if FBN_HALF && defined(FBN_HALF_512)
    if (act == 0 && !fixed && !wide && ncols >= 16 && fbn_half_512_ok()) {
        fbn_half_col_grad_input((const uint16_t *)dy, (const uint16_t *)x, (uint16_t *)dx, rows, ncols, W, cf, stream,
                                FBN_BF);
        return;
    }
#endif
    /* in training the forward's mean is the backward's: m1, m2 for fm1, fm2 share (x - m1) - m2 with dx */
#define FBN_DX(k) FBN_NAME(fbn_dx)(FBN_NAME(fbn_gated)(g, p, z, (k) * W + c, fixed ? fm1 : m1, fixed ? fm2 : m2, fa, fb, \
                                                   (T)FBN_ZERO, act, 0), FBN_LD(p[(k) * W + c]), m1, m2, k1, k2, k3, fixed)
    for (; !stream && !wide && !FBN_HALF && r + 4 <= rows; r += 4) {
        const E *g = dy + r * W, *p = x + r * W, *z = act == 2 ? zs + r * W : zs;
        E *q = dx + r * W;
#pragma omp simd
        for (ptrdiff_t c = 0; c < ncols; c++) {  /* all loads before the stores: FBN_4K */
            const T m1 = mhi[c], m2 = mlo[c], k1 = kdy[c], k2 = kx[c], k3 = kc[c];
            FBN_COL_FWD(fcf, W, c, act);
            const T d0 = FBN_DX(0), d1 = FBN_DX(1), d2 = FBN_DX(2), d3 = FBN_DX(3);
            q[c] = FBN_ST(d0);
            q[W + c] = FBN_ST(d1);
            q[2 * W + c] = FBN_ST(d2);
            q[3 * W + c] = FBN_ST(d3);
        }
    }
#undef FBN_DX
    for (; r < rows; r++) {
        for (ptrdiff_t c0 = 0; c0 < ncols; c0 += FBN_CHUNK) {
            ptrdiff_t bl = ncols - c0 < FBN_CHUNK ? ncols - c0 : FBN_CHUNK;
            const E *g = dy + r * W + c0, *p = x + r * W + c0, *z = act == 2 ? zs + r * W + c0 : zs;
            const T *fc = act == 1 ? fcf + c0 : fcf;
            T *q = stream || FBN_HALF ? buf : (T *)(dx + r * W + c0);
            if (wide) {  /* the last two terms as fbn_norm_wide: kc + ((x - mhi) - mlo) * kx */
                for (ptrdiff_t c = 0; c < bl; c++) {
                    const T gi = FBN_NAME(fbn_col_gated_wide)(g, p, z, c, fc, W, c, act);
                    q[c] = fixed ? kdy[c0 + c] * gi
                                 : kdy[c0 + c] * gi + FBN_NAME(fbn_norm_wide)(FBN_LD(p[c]), mhi[c0 + c], mlo[c0 + c],
                                                                              kx[c0 + c], kc[c0 + c]);
                }
            } else {
#pragma omp simd
                for (ptrdiff_t c = 0; c < bl; c++) {
                    FBN_COL_FWD(fc, W, c, act);
                    const T m1 = mhi[c0 + c], m2 = mlo[c0 + c];
                    q[c] = FBN_NAME(fbn_dx)(FBN_NAME(fbn_gated)(g, p, z, c, fixed ? fm1 : m1, fixed ? fm2 : m2, fa, fb,
                                                                (T)FBN_ZERO, act, 0),
                                            FBN_LD(p[c]), m1, m2, kdy[c0 + c], kx[c0 + c], kc[c0 + c], fixed);
                }
            }
            if (stream || FBN_HALF)
                FBN_FLUSH(dx + r * W + c0, buf, bl, stream);
        }
    }
}

/* cf = [mhi | mlo | kdy | kx | kc], blocks W apart; four rows at a time, as fbn_col_affine; dy' as in
 * fbn_col_grad_sums; fixed as in fbn_grad_input. */
FBN_CLONES static void FBN_NAME(fbn_col_grad_input)(const E *dy, const E *x, E *dx, ptrdiff_t rows,
                                                    ptrdiff_t ncols, ptrdiff_t W, const T *cf, int stream,
                                                    const E *zs, const T *fcf, int fixed)
{
    if (zs && fixed)
        FBN_NAME(fbn_col_grad_input_act)(dy, x, dx, rows, ncols, W, cf, stream, zs, fcf, 2, 1);
    else if (zs)
        FBN_NAME(fbn_col_grad_input_act)(dy, x, dx, rows, ncols, W, cf, stream, zs, fcf, 2, 0);
    else if (fcf && fixed)
        FBN_NAME(fbn_col_grad_input_act)(dy, x, dx, rows, ncols, W, cf, stream, zs, fcf, 1, 1);
    else if (fcf)
        FBN_NAME(fbn_col_grad_input_act)(dy, x, dx, rows, ncols, W, cf, stream, zs, fcf, 1, 0);
    else if (fixed)  /* (the drivers run fbn_col_affine on dy for this) */
        FBN_NAME(fbn_col_grad_input_act)(dy, x, dx, rows, ncols, W, cf, stream, zs, fcf, 0, 1);
    else
        FBN_NAME(fbn_col_grad_input_act)(dy, x, dx, rows, ncols, W, cf, stream, zs, fcf, 0, 0);
}

#ifndef FBN_DATA_ONLY
/* ---- per-channel statistics and coefficients ----
 * The formulas are _coefs.h's; these write them for one channel into the blocks of a coefficient
 * array (blocks C apart), in the type computed in (T), and are called both from the vector loops below and,
 * channel by channel, from the Cython drivers (_kernels.pyx), so that every path gives the same
 * bits.  The vector loops exist because a scalar loop whose division and square root per channel
 * took 2 ns was 8 us of a 20 us evaluation call on a (1, 4096) input, and half of a (8, 16384)
 * training call on the SLICES path. */

/* The low part of the double mean m split into hi = (T)m and lo (see fbn_split_lo). */
FBN_INLINE T FBN_NAME(fbn_mean_lo)(double m, T hi) { return (T)fbn_split_lo(m, (double)hi); }

/* The forward's cf[0], cf[C], cf[2C], cf[3C] = [mhi | mlo | a | b] of a channel. */
FBN_INLINE void FBN_NAME(fbn_affine_coefs)(double mean, double invstd, T weight, T bias, T *cf, ptrdiff_t C)
{
    const T hi = (T)mean;
    cf[0] = hi;
    cf[C] = FBN_NAME(fbn_mean_lo)(mean, hi);
    cf[2 * C] = (T)fbn_scale((double)weight, invstd);
    cf[3 * C] = bias;
}

/* The backward's cf[0], cf[C], ... cf[4C] = [mhi | mlo | kdy | kx | kc] of a channel, and its
 * grad_weight and grad_bias, from sum dy and sum dy * (x - mean) over count elements (fbn_grad_terms).
 * training = 0 (fixed statistics): [0 | 0 | kdy | 0 | 0], the affine's coefficients for
 * dx = dy * kdy, which must not touch x or the mean: a NaN there would turn dx into NaN (x * 0 is
 * NaN), where PyTorch's is finite. */
FBN_INLINE void FBN_NAME(fbn_grad_coefs)(double sdy, double sdyx, double count, int training, T weight, double mean,
                                         double invstd, double *gw, double *gb, T *cf, ptrdiff_t C)
{
    double kdy, kx, kc;
    fbn_grad_terms((double)weight, invstd, sdy, sdyx, count, gw, gb, &kdy, &kx, &kc);
    const T hi = (T)mean;
    cf[2 * C] = (T)kdy;
    if (training) {
        cf[0] = hi;
        cf[C] = FBN_NAME(fbn_mean_lo)(mean, hi);
        cf[3 * C] = (T)kx;
        cf[4 * C] = (T)kc;
    } else {
        cf[0] = cf[C] = cf[3 * C] = cf[4 * C] = 0;
    }
}

/* mean = running_mean and invstd = 1 / sqrt(running_var + eps), in double. */
FBN_CLONES static void FBN_NAME(fbn_eval_stats)(const T *rm, const T *rv, double eps, double *restrict mean,
                                                double *restrict invstd, ptrdiff_t C)
{
#pragma omp simd
    for (ptrdiff_t c = 0; c < C; c++) {
        mean[c] = (double)rm[c];
        invstd[c] = fbn_invstd((double)rv[c], eps);
    }
}

/* The forward's coefficients (blocks C apart) of n channels from their mean and invstd. */
FBN_CLONES static void FBN_NAME(fbn_eval_coefs)(const double *mean, const double *invstd, const T *weight, const T *b,
                                                T *restrict cf, ptrdiff_t n, ptrdiff_t C)
{
#pragma omp simd
    for (ptrdiff_t c = 0; c < n; c++)
        FBN_NAME(fbn_affine_coefs)(mean[c], invstd[c], weight[c], b[c], cf + c, C);
}

/* ---- channels of one column each (spatial size 1): statistics and coefficients, vectorized ----
 * The SLICES split of _kernels.pyx ends a thread's slice of an (N, C) matrix with the statistics of
 * its columns: n channels whose moments it holds alone (no merge). */

/* mean, var, invstd and the forward's coefficients (blocks C apart) of n columns from their
 * moments (count, shift K, mean - K, M2: see fbn_shift_merge). */
FBN_CLONES static void FBN_NAME(fbn_col_finish_stats)(double count, const double *K, const double *rel,
                                                      const double *m2, double eps, const T *weight, const T *b,
                                                      double *restrict mean, double *restrict var,
                                                      double *restrict invstd, T *restrict cf, ptrdiff_t n,
                                                      ptrdiff_t C)
{
#pragma omp simd
    for (ptrdiff_t c = 0; c < n; c++) {
        const double m = K[c] + rel[c], v = fbn_var(count, m2[c]), is = fbn_batch_invstd(v, eps);
        mean[c] = m;
        var[c] = v;
        invstd[c] = is;
        FBN_NAME(fbn_affine_coefs)(m, is, weight[c], b[c], cf + c, C);
    }
}

/* grad_weight, grad_bias and the backward's coefficients (blocks C apart) of n columns from
 * sum dy and sum dy * (x - mean). */
FBN_CLONES static void FBN_NAME(fbn_col_finish_grad)(double count, const double *sdy, const double *sdyx,
                                                     int training, const T *weight, const double *mean,
                                                     const double *invstd, double *restrict gw,
                                                     double *restrict gb, T *restrict cf, ptrdiff_t n, ptrdiff_t C)
{
    /* 0 + s: a sum of -0 gives +0, as the merges' sums that start at 0 */
    if (training) {
#pragma omp simd
        for (ptrdiff_t c = 0; c < n; c++)
            FBN_NAME(fbn_grad_coefs)(0.0 + sdy[c], 0.0 + sdyx[c], count, 1, weight[c], mean[c], invstd[c], gw + c,
                                     gb + c, cf + c, C);
    } else {
#pragma omp simd
        for (ptrdiff_t c = 0; c < n; c++)
            FBN_NAME(fbn_grad_coefs)(0.0 + sdy[c], 0.0 + sdyx[c], count, 0, weight[c], mean[c], invstd[c], gw + c,
                                     gb + c, cf + c, C);
    }
}

/* ---- the ReLU mask as bounds on x ----
 * With finite coefficients and a != 0, the recomputed output z(x) = ((x - mhi) - mlo) * a + b is a
 * monotone function of x (every rounded operation is, an FMA included, and so is the overflow to
 * an infinity), so the gradient's mask z > 0 is lo <= x (a > 0) or x <= hi (a < 0), and a NaN x
 * keeps its gradient either way, as its NaN z does.  fbn_relu_bounds finds the bounds of each
 * channel from fcf = [mhi | mlo | a | b] (blocks C apart), evaluating z with the kernels' own
 * arithmetic (fbn_fwd_out, in a clone of the same instruction set: the same FMA contraction), so
 * the mask keeps the forward's bits; the gradient sums then gate on one compare (acts 3 and 4)
 * instead of the output's arithmetic.  Bounds NaN where z is not monotone or the mean is wide: a
 * non-finite coefficient, or a = 0 with b <= 0 (z = b, but NaN for an infinite x - mhi); the
 * kernels then recompute z.  a = 0 with b > 0 keeps every gradient: bounds -inf, +inf. */
FBN_INLINE FBN_UINT FBN_NAME(fbn_order_key)(T v)  /* keys in the order of the values (-0 before +0) */
{
    FBN_UINT u, sign = (FBN_UINT)1 << (sizeof(T) * 8 - 1);
    memcpy(&u, &v, sizeof u);
    return u & sign ? ~u : u | sign;
}

FBN_INLINE T FBN_NAME(fbn_order_value)(FBN_UINT k)
{
    FBN_UINT sign = (FBN_UINT)1 << (sizeof(T) * 8 - 1), u = k & sign ? k & ~sign : ~k;
    T v;
    memcpy(&v, &u, sizeof v);
    return v;
}

/* Whether the mask at key k is the other one than at -inf (x is not NaN there, nor z for finite
 * coefficients): keep (z > 0) for a > 0, drop (z <= 0) for a < 0; false up to some key, true
 * from there on. */
#define FBN_FLIPPED(k) ((FBN_NAME(fbn_fwd_out)(FBN_NAME(fbn_order_value)(k), mhi, mlo, a, b, 0) <= (T)0) != up)

FBN_CLONES static void FBN_NAME(fbn_relu_bounds)(const T *fcf, ptrdiff_t C, T *lo, T *hi)
{
    const FBN_UINT kmin = FBN_NAME(fbn_order_key)(-(T)INFINITY), kmax = FBN_NAME(fbn_order_key)((T)INFINITY);
    /* First every channel in vector lanes, without branches: the root rounded in T is mostly
     * within a key of the flip, so the flip is at its key k or at k + 1 when z's mask at k - 1 and
     * k + 1 differ.  Where they do not (and for the special cases below), lo = NaN sends the
     * channel to the search after.  (The search alone, with its branches, took 6 ns a channel:
     * 3 us of a 512-channel backward on the calling thread.)  b / a runs for every channel, so a
     * zero scale raises the divide-by-zero flag, which nothing here or in NumPy's calls reads. */
#pragma omp simd
    for (ptrdiff_t c = 0; c < C; c++) {
        const T mhi = fcf[c], mlo = fcf[C + c], a = fcf[2 * C + c], b = fcf[3 * C + c];
        const int up = a > 0, ok = isfinite(mhi) & isfinite(mlo) & isfinite(a) & isfinite(b) & (a != 0) &
                                   !FBN_NAME(fbn_wide)(mhi);
        const FBN_UINT k = FBN_NAME(fbn_order_key)(mhi + (mlo - b / a));
        const int found = ok & (k > kmin) & (kmax - k > 1) & !FBN_FLIPPED(k - 1) & FBN_FLIPPED(k + 1);
        const FBN_UINT h = FBN_FLIPPED(k) ? k : k + 1;
        lo[c] = !found ? (T)NAN : up ? FBN_NAME(fbn_order_value)(h) : -(T)INFINITY;
        hi[c] = !found ? (T)NAN : up ? (T)INFINITY : FBN_NAME(fbn_order_value)(h - 1);
    }
    for (ptrdiff_t c = 0; c < C; c++) {
        if (!isnan(lo[c]))
            continue;
        const T mhi = fcf[c], mlo = fcf[C + c], a = fcf[2 * C + c], b = fcf[3 * C + c];
        lo[c] = -(T)INFINITY;
        hi[c] = (T)INFINITY;
        if (!(isfinite(mhi) && isfinite(mlo) && isfinite(a) && isfinite(b)) || FBN_NAME(fbn_wide)(mhi) ||
            (a == 0 && !(b > 0))) {
            lo[c] = hi[c] = (T)NAN;
            continue;
        }
        if (a == 0)
            continue;
        /* h, the first key where the mask flips (kmin, -inf's, does not: z = -inf * a; kmax,
         * +inf's, does), and l = h - 1: from the root of the exact z, widening a bracket by powers
         * of 2, then halving it.  The bound: x >= value(h) keeps (a > 0), x <= value(l) (a < 0). */
        const int up = a > 0;
        const double root = (double)mhi + (double)mlo - (double)b / (double)a;
        const double big = sizeof(T) == 4 ? FLT_MAX : DBL_MAX;  /* (a double past T's range converts
                                                                   to T with undefined behaviour) */
        const T guess = root > big ? (T)INFINITY : root < -big ? -(T)INFINITY : (T)root;
        FBN_UINT l = kmin, h = kmax, k = FBN_NAME(fbn_order_key)(guess), step = 1;
        if (FBN_FLIPPED(k)) {
            for (h = k; h - kmin > step && FBN_FLIPPED(h - step); step *= 2)
                h -= step;
            l = h - kmin > step ? h - step : kmin;
        } else {
            for (l = k; kmax - l > step && !FBN_FLIPPED(l + step); step *= 2)
                l += step;
            h = kmax - l > step ? l + step : kmax;
        }
        while (h - l > 1) {
            const FBN_UINT mid = l + (h - l) / 2;
            if (FBN_FLIPPED(mid))
                h = mid;
            else
                l = mid;
        }
        if (up)
            lo[c] = FBN_NAME(fbn_order_value)(h);
        else
            hi[c] = FBN_NAME(fbn_order_value)(l);
    }
}
#undef FBN_FLIPPED
#endif /* FBN_DATA_ONLY */
