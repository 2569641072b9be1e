/* fastbn/_half512.h -- float16 and bfloat16 rows converted inline (AVX-512F), for the ranges loops
 * of _simd_impl.h's half instantiations (included by _simd.h before them).
 *
 * Why: GCC (12) converts float16 to float one element at a time, so the generic loops stage each
 * piece of a row of either half type through a float buffer (FBN_STAGE: one vcvtph2ps per 16
 * elements, then the float loops).  The staging loop then takes every cache miss of the pass while
 * the compute on the buffer takes none, so memory and arithmetic take turns instead of
 * overlapping: the backward's gradient sums over two float16 streams ran at 6-7 GB/s, a float32
 * pass over the same elements at 23 (1 thread, Zen 4, (64, 64, 56, 56) elements, a C model of both
 * loops).  These loops load 16 halves, convert them in the register (vcvtph2ps; bfloat16: widen
 * and shift) and compute, as the float32 loops do; the same model ran them in 0.55-0.65x the
 * staged loops' time.
 *
 * They cover the hot cases of the ranges loops and of the column loops (at the end): moments, the
 * affine map (the column one also with ReLU), the gradient sums and the grad-input map (no
 * activation, batch statistics), for means that are not wide (FBN_WIDE), in rows of
 * FBN_HALF_MIN_ROW elements or more, or 16 columns or more; the maps also round their results to
 * the half type in the register and store them (through a buffer only to stream it), where the
 * staged loops write floats that a second pass converts.  Every other case keeps the staged
 * loops, as does every machine but x86-64 Linux with GCC or clang and a CPU with AVX-512F and FMA
 * (checked at run time).  The maps are the staged loops' formulas, one FMA where the float32
 * clones contract one (the same bits); the ranges loops' moments sum partials of 16 terms in float
 * lanes, so the statistics carry float's relative precision (about 1e-8, far below a half type's
 * rounding) rather than double's; the column loops' moments stay in double. */
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__) && !defined(FBN_NO_H16_512)
#define FBN_HALF_512 1
#define FBN_H512 __attribute__((target("avx512f,f16c,fma")))

static int fbn_half_512_off; /* tests: 1 takes the staged loops (fbn_half_inline) */

/* Rows shorter than this keep the staged loops: these finish a row with up to 15 elements converted
 * one at a time, which on 7x7 rows made the training forward 3x slower than staging them. */
#define FBN_HALF_MIN_ROW 256

static inline int fbn_half_512_ok(void)
{
    static int fma = -1; /* the loops use FMA too (a hypervisor may hide it beside AVX-512F) */
    int has = __atomic_load_n(&fma, __ATOMIC_RELAXED);
    if (has < 0) {
        has = __builtin_cpu_supports("fma") ? 1 : 0;
        __atomic_store_n(&fma, has, __ATOMIC_RELAXED);
    }
    return !__atomic_load_n(&fbn_half_512_off, __ATOMIC_RELAXED) && fbn_f16_isa() == 2 && has;
}

/* 16 halves at p as floats: bf = 1 for bfloat16 (its bits are float's upper half), 0 for float16. */
FBN_H512 static inline __m512 fbn_half_ld(const uint16_t *p, const int bf)
{
    const __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return bf ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)) : _mm512_cvtph_ps(h);
}

/* One half at p as a float (the tails). */
static inline float fbn_half_ld1(const uint16_t *p, const int bf)
{
    fbn_f16 h;
    fbn_bf16 b;
    h.bits = b.bits = *p;
    return bf ? fbn_bf16_load(b) : fbn_f16_load(h);
}

/* 16 floats rounded to the half type, to nearest even (bfloat16 as fbn_bf16_store: in integer
 * arithmetic, a NaN kept a quiet NaN; float16 by vcvtps2ph). */
FBN_H512 static inline __m256i fbn_half_round(__m512 v, const int bf)
{
    if (!bf)
        return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
    const __m512i u = _mm512_castps_si512(v), one = _mm512_set1_epi32(1);
    const __m512i up = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)),
                                        _mm512_and_si512(_mm512_srli_epi32(u, 16), one));
    const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, _mm512_srli_epi32(up, 16), quiet));
}

/* One float rounded to the half type (the tails). */
static inline uint16_t fbn_half_round1(float v, const int bf)
{
    return bf ? fbn_bf16_store(v).bits : fbn_f16_store(v).bits;
}

FBN_H512 static inline __m512d fbn_lo8(__m512 v) { return _mm512_cvtps_pd(_mm512_castps512_ps256(v)); }

FBN_H512 static inline __m512d fbn_hi8(__m512 v)
{
    return _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

#define FBN_HLD(p) fbn_half_ld((p), bf) /* in the loops below, which take bf */

/* The sum of four vectors' 32 lanes, in a fixed order. */
FBN_H512 static inline double fbn_half_hsum(__m512d a, __m512d b, __m512d c, __m512d d)
{
    return _mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(a, b), _mm512_add_pd(c, d)));
}

/* One step of 16 elements v of the shifted sums: d = v - K (K0, K1: the shift for the low and high
 * 8), s += d, and with q, q += d * d, in double lanes (two vectors each). */
FBN_H512 static inline void fbn_half_sq16(__m512 v, __m512d K0, __m512d K1, __m512d *s0, __m512d *s1, __m512d *q0,
                                          __m512d *q1, const int with_q)
{
    const __m512d d0 = _mm512_sub_pd(fbn_lo8(v), K0), d1 = _mm512_sub_pd(fbn_hi8(v), K1);
    *s0 = _mm512_add_pd(*s0, d0), *s1 = _mm512_add_pd(*s1, d1);
    if (with_q)
        *q0 = _mm512_fmadd_pd(d0, d0, *q0), *q1 = _mm512_fmadd_pd(d1, d1, *q1);
}

/* One step of 16 elements of the gradient sums: a += g, b += g * (p - M) (M0, M1: the mean for the
 * low and high 8), in double lanes. */
FBN_H512 static inline void fbn_half_gs16(__m512 g, __m512 p, __m512d M0, __m512d M1, __m512d *a0, __m512d *a1,
                                          __m512d *b0, __m512d *b1)
{
    const __m512d g0 = fbn_lo8(g), g1 = fbn_hi8(g);
    *a0 = _mm512_add_pd(*a0, g0), *a1 = _mm512_add_pd(*a1, g1);
    *b0 = _mm512_fmadd_pd(g0, _mm512_sub_pd(fbn_lo8(p), M0), *b0);
    *b1 = _mm512_fmadd_pd(g1, _mm512_sub_pd(fbn_hi8(p), M1), *b1);
}

/* *s_out = sum(p - k), *q_out = sum((p - k)^2) over [0, n) in double lanes. */
FBN_H512 static void fbn_half_shifted_sums(const uint16_t *p, ptrdiff_t n, double k, double *s_out, double *q_out,
                                           const int bf)
{
    const __m512d Z = _mm512_setzero_pd(), K = _mm512_set1_pd(k);
    __m512d s0 = Z, s1 = Z, s2 = Z, s3 = Z, q0 = Z, q1 = Z, q2 = Z, q3 = Z;
    ptrdiff_t i = 0;
    for (; i + 32 <= n; i += 32) {
        fbn_half_sq16(FBN_HLD(p + i), K, K, &s0, &s1, &q0, &q1, 1);
        fbn_half_sq16(FBN_HLD(p + i + 16), K, K, &s2, &s3, &q2, &q3, 1);
    }
    if (i + 16 <= n) {
        fbn_half_sq16(FBN_HLD(p + i), K, K, &s0, &s1, &q0, &q1, 1);
        i += 16;
    }
    double s = fbn_half_hsum(s0, s1, s2, s3), q = fbn_half_hsum(q0, q1, q2, q3);
    for (; i < n; i++) {
        const double d = (double)fbn_half_ld1(p + i, bf) - k;
        s += d;
        q += d * d;
    }
    *s_out = s;
    *q_out = q;
}

/* The same with the shift kf in float32 lanes for 4 steps of 64 elements, then folded into double
 * lanes (a half element is exact in float, and float's 1e-8 lies far below a half type's
 * rounding; float32 input sums in double lanes throughout).  Not finite
 * where a float lane overflowed (bfloat16 reaches float's range) or the input is not finite. */
FBN_H512 static void fbn_half_shifted_sums_fl(const uint16_t *p, ptrdiff_t n, float kf, double *s_out,
                                              double *q_out, const int bf)
{
    const __m512d Z = _mm512_setzero_pd();
    const __m512 K = _mm512_set1_ps(kf), ZF = _mm512_setzero_ps();
    __m512d s0 = Z, s1 = Z, q0 = Z, q1 = Z;
    ptrdiff_t i = 0;
    while (i + 64 <= n) {
        __m512 sa = ZF, sb = ZF, sc = ZF, sd = ZF, qa = ZF, qb = ZF, qc = ZF, qd = ZF;
        for (int t = 0; t < 4 && i + 64 <= n; t++, i += 64) {
            const __m512 da = _mm512_sub_ps(FBN_HLD(p + i), K), db = _mm512_sub_ps(FBN_HLD(p + i + 16), K);
            const __m512 dc = _mm512_sub_ps(FBN_HLD(p + i + 32), K), dd = _mm512_sub_ps(FBN_HLD(p + i + 48), K);
            sa = _mm512_add_ps(sa, da), sb = _mm512_add_ps(sb, db), sc = _mm512_add_ps(sc, dc), sd = _mm512_add_ps(sd, dd);
            qa = _mm512_fmadd_ps(da, da, qa), qb = _mm512_fmadd_ps(db, db, qb);
            qc = _mm512_fmadd_ps(dc, dc, qc), qd = _mm512_fmadd_ps(dd, dd, qd);
        }
        const __m512 sv = _mm512_add_ps(_mm512_add_ps(sa, sb), _mm512_add_ps(sc, sd));
        const __m512 qv = _mm512_add_ps(_mm512_add_ps(qa, qb), _mm512_add_ps(qc, qd));
        s0 = _mm512_add_pd(s0, fbn_lo8(sv)), s1 = _mm512_add_pd(s1, fbn_hi8(sv));
        q0 = _mm512_add_pd(q0, fbn_lo8(qv)), q1 = _mm512_add_pd(q1, fbn_hi8(qv));
    }
    if (i + 16 <= n) {  /* up to 3 steps of 16 (a 28x28 row's 784 = 12 * 64 + 16) */
        __m512 sa = ZF, qa = ZF;
        for (; i + 16 <= n; i += 16) {
            const __m512 da = _mm512_sub_ps(FBN_HLD(p + i), K);
            sa = _mm512_add_ps(sa, da), qa = _mm512_fmadd_ps(da, da, qa);
        }
        s0 = _mm512_add_pd(s0, fbn_lo8(sa)), s1 = _mm512_add_pd(s1, fbn_hi8(sa));
        q0 = _mm512_add_pd(q0, fbn_lo8(qa)), q1 = _mm512_add_pd(q1, fbn_hi8(qa));
    }
    double s = fbn_half_hsum(s0, s1, Z, Z), q = fbn_half_hsum(q0, q1, Z, Z);
    for (; i < n; i++) {
        const double d = (double)fbn_half_ld1(p + i, bf) - (double)kf;
        s += d;
        q += d * d;
    }
    *s_out = s;
    *q_out = q;
}

/* Moments of one block p[0:n] (n <= FBN_CPU_BLOCK) merged into acc, as fbn_piece_moments_f32 on
 * the staged block: the shift is the block's exact mean for a channel's first block, else the
 * channel's mean so far; the shifted sums in float lanes (the shift rounded to float), or in double
 * where those are not finite.  With double lanes throughout, the training forward stayed at
 * float32's time on (64, 64, 56, 56) at 2 threads (bound by the conversions to double); with the
 * float lanes, 0.6x it. */
FBN_H512 static void fbn_half_block_moments(const uint16_t *p, ptrdiff_t n, double *acc, const int bf)
{
    const __m512d Z = _mm512_setzero_pd();
    double k = fbn_acc_mean(acc), s, q;
    if (acc[FBN_N] == 0.0) {
        __m512d a0 = Z, a1 = Z, a2 = Z, a3 = Z;
        ptrdiff_t i = 0;
        for (; i + 32 <= n; i += 32) {
            const __m512 u = FBN_HLD(p + i), v = FBN_HLD(p + i + 16);
            a0 = _mm512_add_pd(a0, fbn_lo8(u)), a1 = _mm512_add_pd(a1, fbn_hi8(u));
            a2 = _mm512_add_pd(a2, fbn_lo8(v)), a3 = _mm512_add_pd(a3, fbn_hi8(v));
        }
        if (i + 16 <= n) {
            const __m512 u = FBN_HLD(p + i);
            a0 = _mm512_add_pd(a0, fbn_lo8(u)), a1 = _mm512_add_pd(a1, fbn_hi8(u));
            i += 16;
        }
        double t = fbn_half_hsum(a0, a1, a2, a3);
        for (; i < n; i++)
            t += (double)fbn_half_ld1(p + i, bf);
        k = t / (double)n;
    }
    const float kf = (float)k;
    fbn_half_shifted_sums_fl(p, n, kf, &s, &q, bf);
    /* In double where a float lane overflowed (or the block holds NaN or Inf, which this keeps), and
     * where the squares are so small that float's subnormals or zero could have taken some (bfloat16
     * values 1e-19 apart; a constant block, q = 0, lands here too): there the mean square is below
     * 2^-100, and any square lost below 2^-126 is at most 2^-26 of the sum. */
    if (isfinite(s) && isfinite(q) && q >= (double)n * 0x1p-100)
        k = (double)kf;
    else
        fbn_half_shifted_sums(p, n, k, &s, &q, bf);
    fbn_shift_merge(acc, (double)n, k, s / (double)n, q - s * (s / (double)n));
}

/* h[0:n] = ((p - mhi) - mlo) * a + b (fbn_affine_run's formula) in float, rounded to the half type. */
FBN_H512 static void fbn_half_affine(const uint16_t *p, uint16_t *h, ptrdiff_t n, float mhi, float mlo, float a,
                                     float b, const int bf)
{
    const __m512 M = _mm512_set1_ps(mhi), L = _mm512_set1_ps(mlo), A = _mm512_set1_ps(a), B = _mm512_set1_ps(b);
    ptrdiff_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_sub_ps(FBN_HLD(p + i), M), L), A, B);
        _mm256_storeu_si256((__m256i *)(h + i), fbn_half_round(v, bf));
    }
    for (; i < n; i++)
        h[i] = fbn_half_round1(__builtin_fmaf((fbn_half_ld1(p + i, bf) - mhi) - mlo, a, b), bf);
}

/* *a_out = sum(g), *b_out = sum(g * (p - m)) over [0, n), in double (fbn_grad_run's sums). */
FBN_H512 static void fbn_half_grad_sums(const uint16_t *g, const uint16_t *p, ptrdiff_t n, double m, double *a_out,
                                        double *b_out, const int bf)
{
    const __m512d Z = _mm512_setzero_pd(), M = _mm512_set1_pd(m);
    __m512d a0 = Z, a1 = Z, a2 = Z, a3 = Z, b0 = Z, b1 = Z, b2 = Z, b3 = Z;
    ptrdiff_t i = 0;
    for (; i + 32 <= n; i += 32) {
        fbn_half_gs16(FBN_HLD(g + i), FBN_HLD(p + i), M, M, &a0, &a1, &b0, &b1);
        fbn_half_gs16(FBN_HLD(g + i + 16), FBN_HLD(p + i + 16), M, M, &a2, &a3, &b2, &b3);
    }
    if (i + 16 <= n) {
        fbn_half_gs16(FBN_HLD(g + i), FBN_HLD(p + i), M, M, &a0, &a1, &b0, &b1);
        i += 16;
    }
    double a = fbn_half_hsum(a0, a1, a2, a3), b = fbn_half_hsum(b0, b1, b2, b3);
    for (; i < n; i++) {
        const double gi = (double)fbn_half_ld1(g + i, bf);
        a += gi;
        b += gi * ((double)fbn_half_ld1(p + i, bf) - m);
    }
    *a_out = a;
    *b_out = b;
}

/* h[0:n] = kdy * g + (((p - mhi) - mlo) * kx + kc) (fbn_grad_input_run's formula) in float,
 * rounded to the half type. */
FBN_H512 static void fbn_half_grad_input(const uint16_t *g, const uint16_t *p, uint16_t *h, ptrdiff_t n, float mhi,
                                         float mlo, float kdy, float kx, float kc, const int bf)
{
    const __m512 M = _mm512_set1_ps(mhi), L = _mm512_set1_ps(mlo), KD = _mm512_set1_ps(kdy);
    const __m512 KX = _mm512_set1_ps(kx), KC = _mm512_set1_ps(kc);
    ptrdiff_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 d = _mm512_sub_ps(_mm512_sub_ps(FBN_HLD(p + i), M), L);
        const __m512 v = _mm512_fmadd_ps(KD, FBN_HLD(g + i), _mm512_fmadd_ps(d, KX, KC));
        _mm256_storeu_si256((__m256i *)(h + i), fbn_half_round(v, bf));
    }
    for (; i < n; i++) {
        const float v = __builtin_fmaf(kdy, fbn_half_ld1(g + i, bf),
                                       __builtin_fmaf((fbn_half_ld1(p + i, bf) - mhi) - mlo, kx, kc));
        h[i] = fbn_half_round1(v, bf);
    }
}

/* ---- the column loops (blocks of rows of an (N, W) matrix, vectors across the columns) ----
 * The same conversions for the column loops of _simd_impl.h (channels-last, (N, C), small spatial
 * sizes), which otherwise convert element by element: a channels-last (64, 56, 56, 64) float16
 * call took 1.2x (evaluation) to 1.9x (backward) the float32 one's time at 2 threads.  Columns in
 * vectors of 16 (the rest one at a time), rows W apart; results as the generic loops' (sums in
 * double, in another order; the maps' formulas, one FMA where the float32 clones contract one). */

/* s[c] += sum over the rows of (x - k[c]) (k NULL: 0) and, with q, q[c] += sum of (x - k[c])^2. */
FBN_H512 static void fbn_half_col_sums(const uint16_t *x, ptrdiff_t rows, ptrdiff_t ncols, ptrdiff_t W,
                                       const double *k, double *s, double *q, const int bf)
{
    const __m512d Z = _mm512_setzero_pd();
    ptrdiff_t c = 0;
    for (; c + 16 <= ncols; c += 16) {
        const __m512d K0 = k ? _mm512_loadu_pd(k + c) : Z, K1 = k ? _mm512_loadu_pd(k + c + 8) : Z;
        __m512d s0 = Z, s1 = Z, s2 = Z, s3 = Z, q0 = Z, q1 = Z, q2 = Z, q3 = Z;
        ptrdiff_t r = 0;
        for (; r + 2 <= rows; r += 2) {
            fbn_half_sq16(FBN_HLD(x + r * W + c), K0, K1, &s0, &s1, &q0, &q1, q != NULL);
            fbn_half_sq16(FBN_HLD(x + (r + 1) * W + c), K0, K1, &s2, &s3, &q2, &q3, q != NULL);
        }
        if (r < rows)
            fbn_half_sq16(FBN_HLD(x + r * W + c), K0, K1, &s0, &s1, &q0, &q1, q != NULL);
        _mm512_storeu_pd(s + c, _mm512_add_pd(_mm512_loadu_pd(s + c), _mm512_add_pd(s0, s2)));
        _mm512_storeu_pd(s + c + 8, _mm512_add_pd(_mm512_loadu_pd(s + c + 8), _mm512_add_pd(s1, s3)));
        if (q) {
            _mm512_storeu_pd(q + c, _mm512_add_pd(_mm512_loadu_pd(q + c), _mm512_add_pd(q0, q2)));
            _mm512_storeu_pd(q + c + 8, _mm512_add_pd(_mm512_loadu_pd(q + c + 8), _mm512_add_pd(q1, q3)));
        }
    }
    for (; c < ncols; c++)
        for (ptrdiff_t r = 0; r < rows; r++) {
            const double d = (double)fbn_half_ld1(x + r * W + c, bf) - (k ? k[c] : 0.0);
            s[c] += d;
            if (q)
                q[c] += d * d;
        }
}

/* y = ((x - mhi) - mlo) * a + b (then relu: v < 0 ? 0 : v, as fbn_relu), rounded to the half type,
 * cf = [mhi | mlo | a | b] blocks W apart; stream: each piece of a row through buf, streamed. */
FBN_H512 static void fbn_half_col_affine(const uint16_t *x, uint16_t *y, ptrdiff_t rows, ptrdiff_t ncols, ptrdiff_t W,
                                         const float *cf, int stream, int relu, const int bf)
{
    const float *mhi = cf, *mlo = cf + W, *a = cf + 2 * W, *b = cf + 3 * W;
    const __m512 ZF = _mm512_setzero_ps();
    uint16_t buf[FBN_CHUNK];
    for (ptrdiff_t r = 0; r < rows; r++)
        for (ptrdiff_t c0 = 0; c0 < ncols; c0 += FBN_CHUNK) {
            const ptrdiff_t bl = ncols - c0 < FBN_CHUNK ? ncols - c0 : FBN_CHUNK;
            const uint16_t *p = x + r * W + c0;
            uint16_t *h = stream ? buf : y + r * W + c0;
            ptrdiff_t c = 0;
            for (; c + 16 <= bl; c += 16) {
                const ptrdiff_t j = c0 + c;
                __m512 v = _mm512_sub_ps(_mm512_sub_ps(FBN_HLD(p + c), _mm512_loadu_ps(mhi + j)), _mm512_loadu_ps(mlo + j));
                v = _mm512_fmadd_ps(v, _mm512_loadu_ps(a + j), _mm512_loadu_ps(b + j));
                if (relu)
                    v = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, ZF, _CMP_LT_OQ), v, ZF);
                _mm256_storeu_si256((__m256i *)(h + c), fbn_half_round(v, bf));
            }
            for (; c < bl; c++) {
                const ptrdiff_t j = c0 + c;
                const float v = __builtin_fmaf((fbn_half_ld1(p + c, bf) - mhi[j]) - mlo[j], a[j], b[j]);
                h[c] = fbn_half_round1(relu && v < 0.0f ? 0.0f : v, bf);
            }
            if (stream)
                fbn_stream_store(y + r * W + c0, buf, (size_t)bl * sizeof(uint16_t));
        }
}

/* sdy[c] += sum over the rows of dy, sdyx[c] += sum of dy * (x - mean[c]), in double. */
FBN_H512 static void fbn_half_col_grad_sums(const uint16_t *dy, const uint16_t *x, ptrdiff_t rows, ptrdiff_t ncols,
                                            ptrdiff_t W, const double *mean, double *sdy, double *sdyx, const int bf)
{
    const __m512d Z = _mm512_setzero_pd();
    ptrdiff_t c = 0;
    for (; c + 16 <= ncols; c += 16) {
        const __m512d M0 = _mm512_loadu_pd(mean + c), M1 = _mm512_loadu_pd(mean + c + 8);
        __m512d a0 = Z, a1 = Z, a2 = Z, a3 = Z, b0 = Z, b1 = Z, b2 = Z, b3 = Z;
        ptrdiff_t r = 0;
        for (; r + 2 <= rows; r += 2) {
            fbn_half_gs16(FBN_HLD(dy + r * W + c), FBN_HLD(x + r * W + c), M0, M1, &a0, &a1, &b0, &b1);
            fbn_half_gs16(FBN_HLD(dy + (r + 1) * W + c), FBN_HLD(x + (r + 1) * W + c), M0, M1, &a2, &a3, &b2, &b3);
        }
        if (r < rows)
            fbn_half_gs16(FBN_HLD(dy + r * W + c), FBN_HLD(x + r * W + c), M0, M1, &a0, &a1, &b0, &b1);
        _mm512_storeu_pd(sdy + c, _mm512_add_pd(_mm512_loadu_pd(sdy + c), _mm512_add_pd(a0, a2)));
        _mm512_storeu_pd(sdy + c + 8, _mm512_add_pd(_mm512_loadu_pd(sdy + c + 8), _mm512_add_pd(a1, a3)));
        _mm512_storeu_pd(sdyx + c, _mm512_add_pd(_mm512_loadu_pd(sdyx + c), _mm512_add_pd(b0, b2)));
        _mm512_storeu_pd(sdyx + c + 8, _mm512_add_pd(_mm512_loadu_pd(sdyx + c + 8), _mm512_add_pd(b1, b3)));
    }
    for (; c < ncols; c++)
        for (ptrdiff_t r = 0; r < rows; r++) {
            const double gi = (double)fbn_half_ld1(dy + r * W + c, bf);
            sdy[c] += gi;
            sdyx[c] += gi * ((double)fbn_half_ld1(x + r * W + c, bf) - mean[c]);
        }
}

/* dx = kdy * dy + (((x - mhi) - mlo) * kx + kc), rounded to the half type, cf = [mhi | mlo | kdy |
 * kx | kc] blocks W apart; stream as in fbn_half_col_affine. */
FBN_H512 static void fbn_half_col_grad_input(const uint16_t *dy, const uint16_t *x, uint16_t *dx, ptrdiff_t rows,
                                             ptrdiff_t ncols, ptrdiff_t W, const float *cf, int stream, const int bf)
{
    const float *mhi = cf, *mlo = cf + W, *kdy = cf + 2 * W, *kx = cf + 3 * W, *kc = cf + 4 * W;
    uint16_t buf[FBN_CHUNK];
    for (ptrdiff_t r = 0; r < rows; r++)
        for (ptrdiff_t c0 = 0; c0 < ncols; c0 += FBN_CHUNK) {
            const ptrdiff_t bl = ncols - c0 < FBN_CHUNK ? ncols - c0 : FBN_CHUNK;
            const uint16_t *g = dy + r * W + c0, *p = x + r * W + c0;
            uint16_t *h = stream ? buf : dx + r * W + c0;
            ptrdiff_t c = 0;
            for (; c + 16 <= bl; c += 16) {
                const ptrdiff_t j = c0 + c;
                const __m512 d = _mm512_sub_ps(_mm512_sub_ps(FBN_HLD(p + c), _mm512_loadu_ps(mhi + j)), _mm512_loadu_ps(mlo + j));
                const __m512 v = _mm512_fmadd_ps(_mm512_loadu_ps(kdy + j), FBN_HLD(g + c),
                                                 _mm512_fmadd_ps(d, _mm512_loadu_ps(kx + j), _mm512_loadu_ps(kc + j)));
                _mm256_storeu_si256((__m256i *)(h + c), fbn_half_round(v, bf));
            }
            for (; c < bl; c++) {
                const ptrdiff_t j = c0 + c;
                const float v = __builtin_fmaf(kdy[j], fbn_half_ld1(g + c, bf),
                                               __builtin_fmaf((fbn_half_ld1(p + c, bf) - mhi[j]) - mlo[j], kx[j], kc[j]));
                h[c] = fbn_half_round1(v, bf);
            }
            if (stream)
                fbn_stream_store(dx + r * W + c0, buf, (size_t)bl * sizeof(uint16_t));
        }
}
#undef FBN_HLD
#endif

/* Whether the half loops convert inline (this file's loops) rather than stage; set >= 0 sets it
 * (fastbn._kernels.half_inline, for the tests). */
static inline int fbn_half_inline(int set)
{
#ifdef FBN_HALF_512
    if (set >= 0)
        __atomic_store_n(&fbn_half_512_off, !set, __ATOMIC_RELAXED);
    return fbn_half_512_ok();
#else
    (void)set;
    return 0;
#endif
}
