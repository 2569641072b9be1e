/* fastbn/_norm_simd.h -- vector loops for group, instance and layer norm (fastbn/_norm_kernels.pyx).
 *
 * float64 group and instance norm reuse _simd.h's loops (fbn_moments, fbn_affine, fbn_grad_sums,
 * fbn_grad_input) on one (n, group) row at a time; float32 takes this file's _fl versions of them,
 * which sum in double and compute elementwise in float32 vectors (see "float32 rows" below).  Layer
 * norm's weight and bias vary along the row, which those loops (one coefficient per run of S
 * elements) would walk one element at a time, so it has its own loops here, once per type
 * (_norm_impl.h), and float32 ones below.  Statistics and gradient sums end in double; the
 * normalize keeps the mean split into hi + lo parts of the input type, as in _simd.h, so that
 * float32 data with a large offset keeps float32 precision. */
#ifndef FASTBN_NORM_SIMD_H
#define FASTBN_NORM_SIMD_H

#include "_simd.h"

/* Row lengths below which the row reductions take 8, then 16 lanes (32 above): see fbn_row_sums. */
#ifndef FBN_NORM_SHORT
#define FBN_NORM_SHORT 256
#endif
#ifndef FBN_NORM_LONG
#define FBN_NORM_LONG 2048
#endif

/* ---- float32 grad_input with streaming stores straight from the registers ------------------------
 * With nt, the loops compute FBN_CHUNK results into an L1 buffer and fbn_stream_store() copies it
 * out: a store, a load and a streaming store for every vector, where the backward's second pass
 * (from cache) is bound by its stores.  On AVX-512 these store each vector of results with
 * _mm512_stream_ps at a 64-byte aligned address: the first and last partial vectors of a run
 * through masks (ordinary stores), every element with the same instructions, so the results are
 * those of the clones' vector loops (sub, then two FMAs).  Elsewhere, and for a dx that is not
 * 4-byte aligned, the buffered loops. */
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__) && !defined(FBN_NO_NT512)
#define FBN_NT512 1

/* Group norm's channel runs shorter than this keep the buffered loop: a run's first and last
 * partial lines take ordinary (masked) stores, next to streamed lines, and with dx 16 bytes past
 * a line (NumPy's large arrays) the (8, 256, 28, 28) GroupNorm(32) backward, runs of 784, took
 * 0.54-0.66 ms against 0.46-0.47 buffered (one thread, interleaved); 64-byte aligned, 0.39-0.46
 * against 0.46-0.48.  Runs of 3136 and 4096 gained either way. */
#define FBN_NT512_RUN 2048

static int fbn_nt512_ok(const void *q)
{
    static int isa = -1; /* as fbn_stream_store's */
    int level = __atomic_load_n(&isa, __ATOMIC_RELAXED);
    if (level < 0) {
        level = __builtin_cpu_supports("avx512f") ? 1 : 0;
        __atomic_store_n(&isa, level, __ATOMIC_RELAXED);
    }
    return level && ((uintptr_t)q & 3) == 0;
}

/* The (head, body, tail) of n floats at q: head masked up to q's first 64-byte boundary, then whole
 * 64-byte vectors, then a masked tail. */
#define FBN_NT512_LOOP(n, q, BODY)                                                                      \
    do {                                                                                                \
        ptrdiff_t i_ = 0, h_ = (ptrdiff_t)((-(uintptr_t)(q) & 63) / 4);                                 \
        if (h_ > (n))                                                                                   \
            h_ = (n);                                                                                   \
        if (h_) {                                                                                       \
            const __mmask16 k_ = (__mmask16)((1u << h_) - 1);                                           \
            BODY(0, k_, 0);                                                                             \
            i_ = h_;                                                                                    \
        }                                                                                               \
        for (; i_ + 16 <= (n); i_ += 16)                                                                \
            BODY(i_, (__mmask16)0xffff, 1);                                                             \
        if (i_ < (n)) {                                                                                 \
            const __mmask16 k_ = (__mmask16)((1u << ((n) - i_)) - 1);                                   \
            BODY(i_, k_, 0);                                                                            \
        }                                                                                               \
    } while (0)

/* Group norm's channel runs at least this long, with ordinary stores, also take the aligned
 * loops below when their output is not 64-byte aligned (NumPy's large arrays start 16 bytes past a
 * line, so every vector store of a run split across two lines): the (8, 256, 28, 28)
 * GroupNorm(32) backward's grad-input, runs of 784, 7-8% faster on 1 and 2 threads (a C harness
 * of the same loops, interleaved); a run's partial head and tail vectors cost more than that on
 * short runs (7x7: 49 elements). */
#define FBN_AL512_RUN 256

/* One vector of results at q, in FBN_NT512_LOOP: a whole one streamed (nt) or stored at its
 * 64-byte aligned address, a partial one through its mask. */
__attribute__((target("avx512f"))) static inline void fbn_st512(float *q, __m512 v, __mmask16 k, int full, int nt)
{
    if (full && nt)
        _mm512_stream_ps(q, v);
    else if (full)
        _mm512_store_ps(q, v);
    else
        _mm512_mask_storeu_ps(q, k, v);
}

/* dx = kd * dy + ((x - mhi) * kx + kc), as fbn_grad_input_fl's loop. */
__attribute__((target("avx512f,fma"))) static void fbn_gi_512(const float *g, const float *p, float *q, ptrdiff_t n,
                                                              float mhi, float kd, float kx, float kc, int nt)
{
    const __m512 M = _mm512_set1_ps(mhi), KD = _mm512_set1_ps(kd), KX = _mm512_set1_ps(kx), KC = _mm512_set1_ps(kc);
#define FBN_GI_BODY(i, k, full)                                                                         \
    do {                                                                                                \
        const __m512 gv = _mm512_maskz_loadu_ps(k, g + (i)), pv = _mm512_maskz_loadu_ps(k, p + (i));    \
        const __m512 v = _mm512_fmadd_ps(KD, gv, _mm512_fmadd_ps(_mm512_sub_ps(pv, M), KX, KC));          \
        fbn_st512(q + (i), v, k, full, nt);                                                             \
    } while (0)
    FBN_NT512_LOOP(n, q, FBN_GI_BODY);
#undef FBN_GI_BODY
}

/* y = (x - mhi) * a + b, as fbn_affine_fl's loop. */
__attribute__((target("avx512f,fma"))) static void fbn_affine_512(const float *p, float *q, ptrdiff_t n, float mhi,
                                                                  float a, float b, int nt)
{
    const __m512 M = _mm512_set1_ps(mhi), A = _mm512_set1_ps(a), B = _mm512_set1_ps(b);
#define FBN_AF_BODY(i, k, full) \
    fbn_st512(q + (i), _mm512_fmadd_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, p + (i)), M), A, B), k, full, nt)
    FBN_NT512_LOOP(n, q, FBN_AF_BODY);
#undef FBN_AF_BODY
}

/* The step helpers below are inlined into both loops that use them (these sums and the paired
 * rows' loop further down), so that both add the same terms in the same order. */
#define FBN_SUM512 __attribute__((target("avx512f,fma"))) static inline __attribute__((always_inline))

/* fbn_row_sums_512's lanes: four accumulators of sum(x - k) and four of sum((x - k)^2). */
typedef struct { __m512d s0, s1, s2, s3, q0, q1, q2, q3; } fbn_rs512;

/* One step: the 32 elements at p, the k of K subtracted, into the lanes of *a. */
FBN_SUM512 void fbn_rs512_step(fbn_rs512 *a, const float *p, __m512d K)
{
    const __m512d ONE = _mm512_set1_pd(1.0);
    const __m512d d0 = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(p)), K);
    const __m512d d1 = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(p + 8)), K);
    const __m512d d2 = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(p + 16)), K);
    const __m512d d3 = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(p + 24)), K);
    a->s0 = _mm512_fmadd_pd(d0, ONE, a->s0), a->s1 = _mm512_fmadd_pd(d1, ONE, a->s1);
    a->s2 = _mm512_fmadd_pd(d2, ONE, a->s2), a->s3 = _mm512_fmadd_pd(d3, ONE, a->s3);
    a->q0 = _mm512_fmadd_pd(d0, d0, a->q0), a->q1 = _mm512_fmadd_pd(d1, d1, a->q1);
    a->q2 = _mm512_fmadd_pd(d2, d2, a->q2), a->q3 = _mm512_fmadd_pd(d3, d3, a->q3);
}

/* The lanes added up, then elements [i, n) of p one at a time. */
FBN_SUM512 void fbn_rs512_end(const fbn_rs512 *a, const float *p, ptrdiff_t i, ptrdiff_t n, double k, double *s_out,
                              double *q_out)
{
    double s = _mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(a->s0, a->s1), _mm512_add_pd(a->s2, a->s3)));
    double q = _mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(a->q0, a->q1), _mm512_add_pd(a->q2, a->q3)));
    for (; i < n; i++) {
        const double d = (double)p[i] - k;
        s += d;
        q += d * d;
    }
    *s_out = s;
    *q_out = q;
}

/* *s = sum(x - k) and *q = sum((x - k)^2) over p[0:n] in double lanes, 32 elements a step: x
 * converted, k subtracted, and both sums as multiply-adds (s += d * 1), which moves half the adds
 * from the FP add pipes (where the conversions and subtractions run) to the FMA pipes. */
__attribute__((target("avx512f,fma"))) static void fbn_row_sums_512(const float *p, ptrdiff_t n, double k,
                                                                    double *s_out, double *q_out)
{
    const __m512d K = _mm512_set1_pd(k), z = _mm512_setzero_pd();
    fbn_rs512 a = {z, z, z, z, z, z, z, z};
    ptrdiff_t i = 0;
    for (; i + 32 <= n; i += 32)
        fbn_rs512_step(&a, p + i, K);
    fbn_rs512_end(&a, p, i, n, k, s_out, q_out);
}

/* fbn_grad_run_512's lanes: two accumulators of sum(g) and two of sum(g * (x - m)). */
typedef struct { __m512d a0, a1, b0, b1; } fbn_gr512;

/* One step: the 16 elements at g and p, m in M, into the lanes of *s (both sums as multiply-adds,
 * a += g * 1, as fbn_row_sums_512's). */
FBN_SUM512 void fbn_gr512_step(fbn_gr512 *s, const float *g, const float *p, __m512d M)
{
    const __m512d ONE = _mm512_set1_pd(1.0);
    const __m512d g0 = _mm512_cvtps_pd(_mm256_loadu_ps(g)), g1 = _mm512_cvtps_pd(_mm256_loadu_ps(g + 8));
    const __m512d d0 = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(p)), M);
    const __m512d d1 = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(p + 8)), M);
    s->a0 = _mm512_fmadd_pd(g0, ONE, s->a0), s->a1 = _mm512_fmadd_pd(g1, ONE, s->a1);
    s->b0 = _mm512_fmadd_pd(g0, d0, s->b0), s->b1 = _mm512_fmadd_pd(g1, d1, s->b1);
}

/* The lanes added up, then elements [i, n) one at a time. */
FBN_SUM512 void fbn_gr512_end(const fbn_gr512 *s, const float *g, const float *p, ptrdiff_t i, ptrdiff_t n,
                              double m, double *a_out, double *b_out)
{
    double a = _mm512_reduce_add_pd(_mm512_add_pd(s->a0, s->a1)), b = _mm512_reduce_add_pd(_mm512_add_pd(s->b0, s->b1));
    for (; i < n; i++) {
        const double gi = (double)g[i];
        a += gi;
        b += gi * ((double)p[i] - m);
    }
    *a_out = a;
    *b_out = b;
}

/* *a = sum(g) and *b = sum(g * (x - m)) over [0, n) in double lanes, 16 elements a step. */
__attribute__((target("avx512f,fma"))) static void fbn_grad_run_512(const float *g, const float *p, ptrdiff_t n,
                                                                    double m, double *a_out, double *b_out)
{
    const __m512d M = _mm512_set1_pd(m), z = _mm512_setzero_pd();
    fbn_gr512 s = {z, z, z, z};
    ptrdiff_t i = 0;
    for (; i + 16 <= n; i += 16)
        fbn_gr512_step(&s, g + i, p + i, M);
    fbn_gr512_end(&s, g, p, i, n, m, a_out, b_out);
}

/* Layer norm: dx = (dy * w) * istd + (((x - mhi) - mlo) * kx + kc), as fbn_ln_grad_input_f32's. */
__attribute__((target("avx512f,fma"))) static void fbn_ln_gi_nt512(const float *g, const float *p, float *q, ptrdiff_t n,
                                                                   const float *w, float istd, float mhi, float mlo,
                                                                   float kx, float kc)
{
    const __m512 M = _mm512_set1_ps(mhi), ML = _mm512_set1_ps(mlo), IS = _mm512_set1_ps(istd);
    const __m512 KX = _mm512_set1_ps(kx), KC = _mm512_set1_ps(kc);
#define FBN_LN_BODY(i, k, full)                                                                         \
    do {                                                                                                \
        const __m512 gv = _mm512_maskz_loadu_ps(k, g + (i)), pv = _mm512_maskz_loadu_ps(k, p + (i));    \
        const __m512 wv = _mm512_maskz_loadu_ps(k, w + (i));                                            \
        const __m512 t = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_sub_ps(pv, M), ML), KX, KC);              \
        fbn_st512(q + (i), _mm512_fmadd_ps(_mm512_mul_ps(gv, wv), IS, t), k, full, 1);                  \
    } while (0)
    FBN_NT512_LOOP(n, q, FBN_LN_BODY);
#undef FBN_LN_BODY
}
#endif

#define T float
#define FBN_SUFFIX f32
#define FBN_IS_F32 1
#include "_norm_impl.h"
#undef T
#undef FBN_SUFFIX
#undef FBN_IS_F32

#define T double
#define FBN_SUFFIX f64
#define FBN_IS_F32 0
#include "_norm_impl.h"
#undef FBN_IS_F32
#undef T
#undef FBN_SUFFIX

/* Layer norm's float32 grad_input: with nt on AVX-512, fbn_ln_gi_nt512 (streaming stores from the
 * registers), else fbn_ln_grad_input_f32. */
static void fbn_ln_grad_input_fl(const float *dy, const float *x, float *dx, ptrdiff_t n, const float *w, float istd,
                                 float mhi, float mlo, float kx, float kc, int nt)
{
#ifdef FBN_NT512
    if (nt && fbn_nt512_ok(dx)) {
        fbn_ln_gi_nt512(dy, x, dx, n, w, istd, mhi, mlo, kx, kc);
        return;
    }
#endif
    fbn_ln_grad_input_f32(dy, x, dx, n, w, istd, mhi, mlo, kx, kc, nt);
}

/* ---- float32 rows: sums in double, arithmetic in float32 vectors --------------------------------
 * Every reduction over a float32 row (the moments, the backward's sums) adds its terms in double
 * lanes, as batch norm's loops do (_simd_impl.h's fbn_row_moments_f32, fbn_grad_sums_f32): the
 * statistics of float32 input are float64's.  Earlier, these loops added 16 terms in float32 lanes
 * before each fold into double, which took 30-40% off a cache-resident (8, 256, 28, 28) GroupNorm,
 * but left the statistics float32-accurate: layer_norm's mean of a (1, 500000) row was off by
 * 2e-9 where PyTorch's float32 is off by 2e-10, and a row whose first 256 values (the shift) sat
 * 1000 above the rest gave outputs 70,000 ulps off where PyTorch's were 2,100 off; in double, 2
 * ulps.  With AVX-512, rows of FBN_NORM_LONG or more and channel runs of FBN_AL512_RUN or more
 * take fbn_row_sums_512 and fbn_grad_run_512 above (double lanes, the adds as multiply-adds): the
 * (8, 256, 28, 28) GroupNorm forward 171 -> 159 us and backward 289 -> 266 us of the double
 * version's cost back.  The element-wise passes (normalize, grad_input) below are float32 arithmetic either way,
 * written with GCC and clang vector extensions (one source for every target_clones clone); other
 * compilers take _simd.h's loops for them. */
#if defined(__GNUC__) && !defined(FBN_NO_FLANES) /* FBN_NO_FLANES: test the others */
#define FBN_FLANES 1
#endif

/* One element of layer norm's gradient sums (fbn_ln_grad_sums_fl): a += dy*w and
 * s += dy*w*(x - mean) in double, the column partials gbf, gwf in float32. */
#define FBN_LN_GRAD_TERM(i)                                                                       \
    do {                                                                                          \
        const float e = dy[i], d = (x[i] - mhi) - mlo;                                            \
        const double h = (double)e * (double)w[i];                                                \
        a += h;                                                                                   \
        s += h * (double)d;                                                                       \
        gbf[i] += e;                                                                              \
        gwf[i] += e * (d * istd);                                                                 \
    } while (0)

#ifdef FBN_FLANES
/* The helpers are always inlined: no 64-byte vector crosses a call.  GCC warns of the ABI anyway,
 * at the end of the translation unit (so the warning stays off after this header). */
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float fbn_vf16 __attribute__((vector_size(64)));

FBN_INLINE fbn_vf16 fbn_ld16(const float *p)
{
    fbn_vf16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

FBN_INLINE void fbn_st16(float *p, fbn_vf16 v) { memcpy(p, &v, sizeof v); }

FBN_INLINE fbn_vf16 fbn_splat16(float a)
{
    fbn_vf16 v = {0};
    return v + a;
}

/* FBN_S1: group norm with one element a channel (GroupNorm on (N, C) input, or 1x1 maps) walked
 * the row a channel at a time, each a run of one element with a run's whole setup: on (256, 1024)
 * GroupNorm(32) the forward took 1.0 ms and the backward 5.0-5.4 ms against PyTorch's 0.39 and
 * 0.69-1.3 (2 threads).  With S = 1 the loops below take the row as one vector loop whose
 * coefficients vary along it, the same arithmetic an element.
 *
 * fbn_affine_f32 (y = ((x - mhi) - mlo) * a + b, cf = [mhi | mlo | a | b]) as (x - mhi) * a + c
 * with c = b - mlo * a: one subtraction and one FMA an element. */
/* c - mlo * k in double, rounded once: the constant term of (x - mhi) * k + c that takes the place
 * of ((x - mhi) - mlo) * k + c (fbn_affine_fl's b, fbn_grad_input_fl's kc). */
FBN_INLINE float fbn_fold_lo(float c, float mlo, float k) { return (float)((double)c - (double)mlo * (double)k); }

/* ---- group norm rows of short channel runs, with AVX-512 -----------------------------------------
 * A row of group norm is Cg channel runs of S elements.  With S of 2 to 12 (maps of 2x2 to 3x4),
 * the loops below (FBN_FOR_ROWS) paid a run's setup and scalar tail for every few elements: perf
 * put 57% of GroupNorm(32)'s forward on (64, 512, 2, 2) in the normalize, at 8 ns a 4-element
 * run.  Here a whole row (Cg <= 32 channels, at most FBN_GS_MAX_L elements) is one vector loop:
 * each vector's per-channel coefficients are picked from the row's (at most 32, in one or two
 * registers) by a permute with the lanes' channel indices, which depend on (S, L) alone and are
 * kept per thread (fbn_gs_index).  One thread, min of 6-10 alternating processes against the
 * runs' loops: (64, 512, 2, 2) forward 0.65-0.69x, backward 0.90-0.93x; (64, 256, 3, 3) forward
 * 0.78-0.83x, backward 0.89-0.91x; but (16, 512, 4, 4) 1.0x forward and 1.08-1.13x backward, 7x7
 * maps 1.17-1.25x and 1.3-1.4x (a vector's permutes cost more than a run's setup shared by
 * whole vectors), hence runs of at most 12.  The arithmetic of each element is the loops' own (the
 * same subtraction, FMAs and folded constant, fbn_fold_lo), so the results are the same values
 * (tests/test_norms.py compares both; fastbn._norm_kernels.short_inline switches), but for the
 * sign of a zero gradient where a weight is 0 (both signs occur: -0 here where the generic loop
 * gives +0, for some elements of such a channel).  Whole rows only, ordinary stores only (no
 * streaming), and rows whose channels share the coefficients these loops broadcast (fbn_gs_ok;
 * every group-norm row does). */
#if defined(FBN_SHORT_512)
#define FBN_GS_MAX_S 13 /* runs of 2 to 12 (above) */
#define FBN_GS_MAX_L 1024
#define FBN_GS_MAX_C 32

/* The channel index of each element of a row of L elements in runs of S (padded to whole
 * vectors with the last channel), computed for the thread's last (S, L). */
static const int32_t *fbn_gs_index(ptrdiff_t S, ptrdiff_t L)
{
    static __thread int32_t idx[FBN_GS_MAX_L + 16] __attribute__((aligned(64)));
    static __thread ptrdiff_t have_s, have_l;
    if (have_s != S || have_l != L) {
        for (ptrdiff_t e = 0; e < L + 16; e++)
            idx[e] = (int32_t)((e < L ? e : L - 1) / S);
        have_s = S, have_l = L;
    }
    return idx;
}

/* Whether the C values at p are one value (bit for bit). */
static inline int fbn_gs_same(const float *p, ptrdiff_t C)
{
    for (ptrdiff_t c = 1; c < C; c++)
        if (memcmp(p + c, p, sizeof *p))
            return 0;
    return 1;
}

/* Whether a row of C runs of S, from f0 to f1, takes these loops: whole rows of short runs, and
 * coefficient blocks of cf (which has nblk of them) that are one value across the channels where
 * these loops broadcast them (every group-norm row's are): the mean's hi and lo parts (blocks 0
 * and 1), and for grad_input kx and kc (blocks 3 and 4). */
static inline int fbn_gs_ok(ptrdiff_t C, ptrdiff_t S, ptrdiff_t f0, ptrdiff_t f1, const float *cf, int nt, int nblk)
{
    if (nt || f0 != 0 || f1 != C * S || S < 2 || S >= FBN_GS_MAX_S || C > FBN_GS_MAX_C || C * S > FBN_GS_MAX_L
        || !fbn_short_512_ok())
        return 0;
    return fbn_gs_same(cf, C) && fbn_gs_same(cf + C, C) && (nblk < 5 || (fbn_gs_same(cf + 3 * C, C) && fbn_gs_same(cf + 4 * C, C)));
}

/* k[0:C] as two vectors of 16, zero beyond C. */
FBN_S512_INLINE void fbn_gs_load(const float *k, ptrdiff_t C, __m512 *lo, __m512 *hi)
{
    *lo = _mm512_maskz_loadu_ps(C >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << C) - 1), k);
    *hi = C > 16 ? _mm512_maskz_loadu_ps((__mmask16)((1u << (C - 16)) - 1), k + 16) : _mm512_setzero_ps();
}

/* The row's loop: BODY(i, k, m, full) for each vector at element i, k its lanes' channel indices
 * and m its mask (all lanes, full, but in the row's last, partial vector).  Two copies of it, for
 * C <= 16 and above, so that FBN_GS_PICK's kind of permute is fixed in each. */
#define FBN_GS_ROW(L, idx, BODY)                                                                   \
    do {                                                                                           \
        ptrdiff_t i_ = 0;                                                                          \
        for (; i_ + 16 <= (L); i_ += 16)                                                           \
            BODY(i_, _mm512_load_si512((const void *)((idx) + i_)), (__mmask16)0xffff, 1);         \
        if (i_ < (L))                                                                              \
            BODY(i_, _mm512_load_si512((const void *)((idx) + i_)),                                \
                 (__mmask16)((1u << ((L) - i_)) - 1), 0);                                          \
    } while (0)
#define FBN_GS_LOOP(C, L, idx, BODY)     \
    do {                                 \
        if ((C) <= 16)                   \
            FBN_GS_ROW(L, idx, BODY);    \
        else                             \
            FBN_GS_ROW(L, idx, BODY);    \
    } while (0)

/* The lanes' coefficients, v[k[lane]], from one register for 16 channels or fewer, else two. */
#define FBN_GS_PICK(k, lo, hi, C) ((C) <= 16 ? _mm512_permutexvar_ps(k, lo) : _mm512_permutex2var_ps(lo, k, hi))

/* A result vector: stored whole, or through the mask at the row's end (Zen 4's masked stores
 * are slow, so only there). */
#define FBN_GS_STORE(q, v, m, full)         \
    do {                                    \
        if (full)                           \
            _mm512_storeu_ps(q, v);         \
        else                                \
            _mm512_mask_storeu_ps(q, m, v); \
    } while (0)

/* y = (x - mhi) * a[c] + b'[c] over the row, b' = fbn_fold_lo(b, mlo, a): fbn_affine_fl's. */
FBN_S512 static void fbn_gs_affine(const float *x, float *y, ptrdiff_t C, ptrdiff_t S, const float *cf)
{
    const ptrdiff_t L = C * S;
    const int32_t *idx = fbn_gs_index(S, L);
    float b[FBN_GS_MAX_C];
    for (ptrdiff_t c = 0; c < C; c++)
        b[c] = fbn_fold_lo(cf[3 * C + c], cf[C + c], cf[2 * C + c]);
    __m512 a0, a1, b0, b1;
    fbn_gs_load(cf + 2 * C, C, &a0, &a1);
    fbn_gs_load(b, C, &b0, &b1);
    const __m512 M = _mm512_set1_ps(cf[0]);
#define FBN_GS_AF(i, k, m, full)                                                                        \
    FBN_GS_STORE(y + (i),                                                                               \
                 _mm512_fmadd_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + (i)), M), FBN_GS_PICK(k, a0, a1, C), \
                                 FBN_GS_PICK(k, b0, b1, C)),                                            \
                 m, full)
    FBN_GS_LOOP(C, L, idx, FBN_GS_AF);
#undef FBN_GS_AF
}

/* dx = kdy[c] * dy + ((x - mhi) * kx + kc'), kc' = fbn_fold_lo(kc, mlo, kx): fbn_grad_input_fl's,
 * with kx and kc the row's (fbn_gs_ok). */
FBN_S512 static void fbn_gs_grad_input(const float *dy, const float *x, float *dx, ptrdiff_t C, ptrdiff_t S,
                                       const float *cf)
{
    const ptrdiff_t L = C * S;
    const int32_t *idx = fbn_gs_index(S, L);
    __m512 d0, d1;
    fbn_gs_load(cf + 2 * C, C, &d0, &d1);
    const __m512 M = _mm512_set1_ps(cf[0]), KX = _mm512_set1_ps(cf[3 * C]);
    const __m512 KC = _mm512_set1_ps(fbn_fold_lo(cf[4 * C], cf[C], cf[3 * C]));
#define FBN_GS_GI(i, k, m, full)                                                                        \
    FBN_GS_STORE(dx + (i),                                                                              \
                 _mm512_fmadd_ps(FBN_GS_PICK(k, d0, d1, C), _mm512_maskz_loadu_ps(m, dy + (i)),          \
                                 _mm512_fmadd_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + (i)), M), KX, KC)), \
                 m, full)
    FBN_GS_LOOP(C, L, idx, FBN_GS_GI);
#undef FBN_GS_GI
}

/* The gradient sums of a row of C runs of S (2 to 7) elements, a channel a lane: acc[2c] +=
 * sum(dy), acc[2c + 1] += sum(dy * (x - mean[c])), in double, 8 channels at a time from gathers
 * of each run's element s.  _short512.h's row loops (fbn_s512_row_sums, activation none), which
 * take a run at a time, walk runs shorter than their 8 lanes in their scalar tail, with a run's
 * setup and lane sum each; these are the same additions in the same order (the tail's, then 0 +
 * the tail as fbn_s512_finish adds it).  GroupNorm(32)'s backward on (64, 512, 2, 2), 2 threads,
 * 455 -> 382 us.  On runs of 9 (one lane group and a tail) the gathers cost more than the lanes:
 * 291 -> 323 us on (64, 256, 3, 3), so runs of 8 or more keep those loops. */
FBN_S512 static void fbn_gs_grad_sums(const float *dy, const float *x, ptrdiff_t C, ptrdiff_t S, const double *mean,
                                      double *acc)
{
    const __m256i step = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32((int)S));
    const __m512d zero = _mm512_setzero_pd();
    for (ptrdiff_t c0 = 0; c0 < C; c0 += 8) {
        const __mmask8 in = C - c0 >= 8 ? (__mmask8)0xff : (__mmask8)((1u << (C - c0)) - 1);
        const float *g = dy + c0 * S, *p = x + c0 * S;
        const __m512d m = _mm512_maskz_loadu_pd(in, mean + c0);
        __m512d ta = zero, tb = zero;
        for (ptrdiff_t s = 0; s < S; s++) {
            const __m512d gs = _mm512_cvtps_pd(_mm256_mmask_i32gather_ps(_mm256_setzero_ps(), in, step, g + s, 4));
            const __m512d ds = _mm512_sub_pd(
                _mm512_cvtps_pd(_mm256_mmask_i32gather_ps(_mm256_setzero_ps(), in, step, p + s, 4)), m);
            ta = _mm512_add_pd(ta, gs);
            tb = _mm512_fmadd_pd(gs, ds, tb);
        }
        double va[8], vb[8];
        _mm512_storeu_pd(va, _mm512_add_pd(zero, ta));
        _mm512_storeu_pd(vb, _mm512_add_pd(zero, tb));
        for (ptrdiff_t c = 0; c < 8 && c0 + c < C; c++) {
            acc[2 * (c0 + c)] += va[c];
            acc[2 * (c0 + c) + 1] += vb[c];
        }
    }
}
#endif


FBN_CLONES static void fbn_affine_fl(const float *x, float *y, ptrdiff_t C, ptrdiff_t S, ptrdiff_t f0,
                                     ptrdiff_t f1, const float *cf, int nt)
{
    float buf[FBN_CHUNK];
    fbn_out_f32 o = {y, 0, 0};  /* streamed results gathered across channel runs (_simd_impl.h) */
    if (S == 1 && f1 <= C) {  /* a channel an element (FBN_S1): element f is channel f */
        for (ptrdiff_t j = f0, bl; j < f1; j += bl) {
            bl = f1 - j < FBN_CHUNK ? f1 - j : FBN_CHUNK;
            float *q = nt ? fbn_out_at_f32(&o, buf, y + j, &bl) : y + j;
#pragma omp simd
            for (ptrdiff_t i = 0; i < bl; i++) {
                const ptrdiff_t f = j + i;
                const float a = cf[2 * C + f];
                q[i] = (x[f] - cf[f]) * a + fbn_fold_lo(cf[3 * C + f], cf[C + f], a);
            }
            if (nt)
                fbn_out_done_f32(&o, buf, bl, nt);
        }
        fbn_out_flush_f32(&o, buf, nt);
        return;
    }
#if defined(FBN_SHORT_512)
    if (fbn_gs_ok(C, S, f0, f1, cf, nt, 4)) {
        fbn_gs_affine(x, y, C, S, cf);
        return;
    }
#endif
#ifdef FBN_NT512
    const int al512 = !nt && ((uintptr_t)y & 63) && fbn_nt512_ok(y);
#endif
    FBN_FOR_ROWS(C, S, f0, f1, off, ln, c) {
        const float mhi = cf[c], a = cf[2 * C + c];
        const float b = fbn_fold_lo(cf[3 * C + c], cf[C + c], a);
#ifdef FBN_NT512
        if (al512 && ln >= FBN_AL512_RUN) {
            fbn_affine_512(x + off, y + off, ln, mhi, a, b, 0);
            continue;
        }
#endif
        const fbn_vf16 M = fbn_splat16(mhi), A = fbn_splat16(a), B = fbn_splat16(b);
        for (ptrdiff_t j = 0, bl; j < ln; j += bl) {
            bl = ln - j < FBN_CHUNK ? ln - j : FBN_CHUNK;
            float *q = nt ? fbn_out_at_f32(&o, buf, y + off + j, &bl) : y + off + j;
            const float *p = x + off + j;
            ptrdiff_t i = 0;
            for (; i + 16 <= bl; i += 16)
                fbn_st16(q + i, (fbn_ld16(p + i) - M) * A + B);
            for (; i < bl; i++)
                q[i] = (p[i] - mhi) * a + b;
            if (nt)
                fbn_out_done_f32(&o, buf, bl, nt);
        }
    }
    fbn_out_flush_f32(&o, buf, nt);
}

/* fbn_grad_input_f32 (dx = kdy * dy + ((x - mhi) - mlo) * kx + kc, cf = [mhi | mlo | kdy | kx | kc])
 * as kdy * dy + ((x - mhi) * kx + (kc - mlo * kx)). */
FBN_CLONES static void fbn_grad_input_fl(const float *dy, const float *x, float *dx, ptrdiff_t C, ptrdiff_t S,
                                         ptrdiff_t f0, ptrdiff_t f1, const float *cf, int nt)
{
    float buf[FBN_CHUNK];
    fbn_out_f32 o = {dx, 0, 0};  /* streamed results gathered across channel runs (_simd_impl.h) */
#ifdef FBN_NT512
    const int nt512 = nt && fbn_nt512_ok(dx), al512 = !nt && ((uintptr_t)dx & 63) && fbn_nt512_ok(dx);
#endif
    if (S == 1 && f1 <= C) {  /* FBN_S1: element f is channel f */
        for (ptrdiff_t j = f0, bl; j < f1; j += bl) {
            bl = f1 - j < FBN_CHUNK ? f1 - j : FBN_CHUNK;
            float *q = nt ? fbn_out_at_f32(&o, buf, dx + j, &bl) : dx + j;
#pragma omp simd
            for (ptrdiff_t i = 0; i < bl; i++) {
                const ptrdiff_t f = j + i;
                const float kx = cf[3 * C + f];
                const float kc = fbn_fold_lo(cf[4 * C + f], cf[C + f], kx);
                q[i] = cf[2 * C + f] * dy[f] + ((x[f] - cf[f]) * kx + kc);
            }
            if (nt)
                fbn_out_done_f32(&o, buf, bl, nt);
        }
        fbn_out_flush_f32(&o, buf, nt);
        return;
    }
#if defined(FBN_SHORT_512)
    if (fbn_gs_ok(C, S, f0, f1, cf, nt, 5)) {
        fbn_gs_grad_input(dy, x, dx, C, S, cf);
        return;
    }
#endif
    FBN_FOR_ROWS(C, S, f0, f1, off, ln, c) {
        const float mhi = cf[c], kdy = cf[2 * C + c], kx = cf[3 * C + c];
        const float kc = fbn_fold_lo(cf[4 * C + c], cf[C + c], kx);
#ifdef FBN_NT512
        if (nt512 && ln >= FBN_NT512_RUN) {
            fbn_out_flush_f32(&o, buf, nt);
            fbn_gi_512(dy + off, x + off, dx + off, ln, mhi, kdy, kx, kc, 1);
            continue;
        }
        if (al512 && ln >= FBN_AL512_RUN) {
            fbn_gi_512(dy + off, x + off, dx + off, ln, mhi, kdy, kx, kc, 0);
            continue;
        }
#endif
        const fbn_vf16 M = fbn_splat16(mhi), KD = fbn_splat16(kdy), KX = fbn_splat16(kx), KC = fbn_splat16(kc);
        for (ptrdiff_t j = 0, bl; j < ln; j += bl) {
            bl = ln - j < FBN_CHUNK ? ln - j : FBN_CHUNK;
            float *q = nt ? fbn_out_at_f32(&o, buf, dx + off + j, &bl) : dx + off + j;
            const float *g = dy + off + j, *p = x + off + j;
            ptrdiff_t i = 0;
            for (; i + 16 <= bl; i += 16)
                fbn_st16(q + i, KD * fbn_ld16(g + i) + ((fbn_ld16(p + i) - M) * KX + KC));
            for (; i < bl; i++)
                q[i] = kdy * g[i] + ((p[i] - mhi) * kx + kc);
            if (nt)
                fbn_out_done_f32(&o, buf, bl, nt);
        }
    }
    fbn_out_flush_f32(&o, buf, nt);
}

#else
/* _simd.h's loops, without the batch-norm activation */
static void fbn_affine_fl(const float *x, float *y, ptrdiff_t C, ptrdiff_t S, ptrdiff_t f0, ptrdiff_t f1,
                          const float *cf, int nt)
{
    fbn_affine_f32(x, y, C, S, f0, f1, cf, nt, 0);
}
static void fbn_grad_input_fl(const float *dy, const float *x, float *dx, ptrdiff_t C, ptrdiff_t S, ptrdiff_t f0,
                              ptrdiff_t f1, const float *cf, int nt)
{
    fbn_grad_input_f32(dy, x, dx, C, S, f0, f1, cf, nt, NULL, NULL, 0);
}

#endif

/* fbn_grad_sums_f32's sum(dy) and sum(dy * (x - mean[c])) added to acc[2c], acc[2c + 1], in double;
 * with one element a channel (FBN_S1) as one loop over the range. */
FBN_CLONES static void fbn_grad_sums_fl(const float *dy, const float *x, ptrdiff_t C, ptrdiff_t S, ptrdiff_t f0,
                                        ptrdiff_t f1, const double *mean, double *acc)
{
    if (S == 1 && f1 <= C) {  /* FBN_S1: a term a channel */
#pragma omp simd
        for (ptrdiff_t f = f0; f < f1; f++) {
            const double g = (double)dy[f];
            acc[2 * f] += g;
            acc[2 * f + 1] += g * ((double)x[f] - mean[f]);
        }
        return;
    }
#if defined(FBN_SHORT_512) && defined(FBN_FLANES)  /* (fbn_gs_grad_sums is in the FBN_FLANES part) */
    if (f0 == 0 && f1 == C * S && S >= 2 && S < 8 && fbn_short_512_ok()) {  /* runs of 2 to 7 */
        fbn_gs_grad_sums(dy, x, C, S, mean, acc);
        return;
    }
#endif
#ifdef FBN_NT512
    if (S >= FBN_AL512_RUN && fbn_nt512_ok(dy)) {  /* runs of 256 or more, as fbn_row_sums_512 */
        FBN_FOR_ROWS(C, S, f0, f1, off, ln, c) {
            double a, b;
            fbn_grad_run_512(dy + off, x + off, ln, mean[c], &a, &b);
            acc[2 * c] += a;
            acc[2 * c + 1] += b;
        }
        return;
    }
#endif
    fbn_grad_sums_f32(dy, x, C, S, f0, f1, mean, acc, NULL, NULL);
}

/* Layer norm's backward sums of one row: *a = sum(dy * w), *s = sum(dy * w * d) in double, with
 * d = (x - mhi) - mlo, and the column partials of the row's block, float32: gbf[j] += dy[j],
 * gwf[j] += dy[j] * d[j] * istd.  The caller folds the column partials into double every
 * FBN_LN_FOLD rows (fbn_ln_fold): 16-term partials across rows, whose grad_weight and grad_bias
 * stay far closer to float64's than PyTorch's float32 ones (tests/test_norms.py).  With double
 * column partials (loaded, converted and stored for every element) perf put 46% of a
 * (64, 197, 768) backward's samples in this loop, at a third of the grad-input pass's speed. */
FBN_CLONES static void fbn_ln_grad_sums_fl(const float *dy, const float *x, const float *w, ptrdiff_t n,
                                           float mhi, float mlo, float istd, double *a_out, double *s_out,
                                           float *gwf, float *gbf)
{
    double a = 0.0, s = 0.0;
#pragma omp simd reduction(+:a, s)
    for (ptrdiff_t i = 0; i < n; i++)
        FBN_LN_GRAD_TERM(i);
    *a_out = a;
    *s_out = s;
}

/* Rows between two folds of layer norm's float32 column partials into double. */
#define FBN_LN_FOLD 16

/* g[j] += gf[j] in double, gf[j] = 0, for j in [0, n). */
FBN_CLONES static void fbn_ln_fold(float *gf, double *g, ptrdiff_t n)
{
#pragma omp simd
    for (ptrdiff_t j = 0; j < n; j++) {
        g[j] += (double)gf[j];
        gf[j] = 0.0f;
    }
}

/* ---- paired rows: a row's normalize while the next row's moments are read ---------------------
 * Group norm's fused forward tasks (whole rows) read a row for its moments, then write it out
 * normalized.  One after the other, a core's reads and writes took turns: the (8, 256, 28, 28)
 * GroupNorm(32) forward ran at 1.7-1.9x a copy, where a C harness with one loop doing both, the
 * sums of row r + 1 step by step with the normalize of row r, ran at 1.3-1.5x (2 threads; the
 * same two loops chunk by chunk gained a third of that).  fbn_pair_affine is that loop: row r +
 * 1's sums are fbn_row_sums_512's steps in their order, and row r's elements take fbn_affine_fl's
 * arithmetic, so the results are the same bits (tests/test_norms.py compares both:
 * fastbn._norm_kernels.row_pairs).  Stores as fbn_affine_512's: 64-byte aligned whole vectors,
 * streamed with nt.  Measured, min of 8 alternating rounds in one process, paired / a row at a time,
 * on 2 and 1 threads: (8, 256, 28, 28) 0.87, 0.85; (32, 64, 56, 56) 0.91, 0.97; (16, 64, 64, 64)
 * (one channel a group) 0.96, 0.96.  The backward's version (fbn_pair_grad below: row r's
 * grad_input with row r + 1's gradient sums, channel run by channel run) gains less, its sums being
 * bound by their float-to-double conversions (two an element), and only in the cache: with streaming
 * stores a first version measured 1.03-1.25, so those rows keep a row at a time. */
#if defined(FBN_NT512) && defined(FBN_FLANES)
static int fbn_pairs_off; /* tests: 1 takes a row at a time (fbn_row_pairs) */

/* y = the normalize of row x (C runs of S, cf = [mhi | mlo | a | b] as fbn_affine_fl's) while
 * summing the next row xn (C * S elements) as fbn_row_moments_f32 does, into acc (zeroed first).
 * Each run: a masked head up to y's next 64-byte line, 32 elements at a time with one step of the
 * sums each (while the sums have whole steps left), then 16 at a time, then a masked tail; the
 * sums' remaining steps and elements after the last run. */
__attribute__((target("avx512f,fma"))) static void fbn_pair_affine_512(const float *x, float *y, ptrdiff_t C,
                                                                       ptrdiff_t S, const float *cf, int nt,
                                                                       const float *xn, double *acc)
{
    const ptrdiff_t n = C * S, body = n - n % 32;
    const double k = fbn_row_shift_f32(xn, n);
    const __m512d K = _mm512_set1_pd(k), z = _mm512_setzero_pd();
    fbn_rs512 sums = {z, z, z, z, z, z, z, z};
    ptrdiff_t i = 0; /* the sums' next step */
    double s, q2;
    for (ptrdiff_t c = 0; c < C; c++) {
        const float a = cf[2 * C + c], b = fbn_fold_lo(cf[3 * C + c], cf[C + c], a);
        const __m512 M = _mm512_set1_ps(cf[c]), A = _mm512_set1_ps(a), B = _mm512_set1_ps(b);
        const float *p = x + c * S;
        float *q = y + c * S;
#define FBN_PA_VEC(j, k, full) \
    fbn_st512(q + (j), _mm512_fmadd_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, p + (j)), M), A, B), k, full, nt)
        ptrdiff_t j = (ptrdiff_t)((-(uintptr_t)q & 63) / 4);
        if (j)
            FBN_PA_VEC(0, (__mmask16)((1u << j) - 1), 0);
        for (; j + 32 <= S; j += 32) {
            FBN_PA_VEC(j, (__mmask16)0xffff, 1);
            FBN_PA_VEC(j + 16, (__mmask16)0xffff, 1);
            if (i < body) {
                fbn_rs512_step(&sums, xn + i, K);
                i += 32;
            }
        }
        for (; j + 16 <= S; j += 16)
            FBN_PA_VEC(j, (__mmask16)0xffff, 1);
        if (j < S)
            FBN_PA_VEC(j, (__mmask16)((1u << (S - j)) - 1), 0);
#undef FBN_PA_VEC
    }
    for (; i < body; i += 32)
        fbn_rs512_step(&sums, xn + i, K);
    fbn_rs512_end(&sums, xn, body, n, k, &s, &q2);
    acc[0] = acc[1] = acc[2] = acc[3] = 0.0;
    fbn_shift_merge(acc, (double)n, k, s / (double)n, q2 - s * (s / (double)n));
}

/* The backward's pairing: row r's grad_input (dy, x -> dx, cf = [mhi | mlo | kdy | kx | kc] as
 * fbn_grad_input_fl's) while summing the next row's gradient sums (dyn, xn, its channels' means
 * meann) as fbn_grad_sums_fl does with fbn_grad_run_512, into acc[2c], acc[2c + 1] (added): channel
 * run c of one with channel run c of the other, a step of the sums (16 elements, the same adds in
 * the same order) with each whole vector of results.  Stores as fbn_gi_512's with ordinary stores
 * (masked head up to dx's next 64-byte line, aligned whole vectors, masked tail).  Measured in a C
 * harness of these loops on (8, 256, 28, 28) GroupNorm(32) rows, 2 threads: 190-222 us paired
 * against 222-246 a row at a time (sums alone 124-128, grad_input alone 114-139); group_norm_backward
 * on that shape, paired / a row at a time in alternating rounds: 0.89-0.93 on 2 threads, 0.92 on 1. */
__attribute__((target("avx512f,fma"))) static void fbn_pair_grad_512(const float *dy, const float *x, float *dx,
                                                                     ptrdiff_t C, ptrdiff_t S, const float *cf,
                                                                     const float *dyn, const float *xn,
                                                                     const double *meann, double *acc)
{
    const __m512d z = _mm512_setzero_pd();
    for (ptrdiff_t c = 0; c < C; c++) {
        const float kx = cf[3 * C + c], kc = fbn_fold_lo(cf[4 * C + c], cf[C + c], kx);
        const __m512 M = _mm512_set1_ps(cf[c]), KD = _mm512_set1_ps(cf[2 * C + c]), KX = _mm512_set1_ps(kx);
        const __m512 KC = _mm512_set1_ps(kc);
        const __m512d MN = _mm512_set1_pd(meann[c]);
        const float *g = dy + c * S, *p = x + c * S, *gn = dyn + c * S, *pn = xn + c * S;
        float *q = dx + c * S;
        fbn_gr512 sums = {z, z, z, z};
        ptrdiff_t i = 0; /* the sums' next step */
        double a, b;
#define FBN_PG_VEC(j, k, full)                                                                          \
    fbn_st512(q + (j),                                                                                  \
              _mm512_fmadd_ps(KD, _mm512_maskz_loadu_ps(k, g + (j)),                                    \
                              _mm512_fmadd_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, p + (j)), M), KX, KC)), \
              k, full, 0)
        ptrdiff_t j = (ptrdiff_t)((-(uintptr_t)q & 63) / 4);
        if (j > S)
            j = S;
        if (j)
            FBN_PG_VEC(0, (__mmask16)((1u << j) - 1), 0);
        for (; j + 16 <= S; j += 16) {
            FBN_PG_VEC(j, (__mmask16)0xffff, 1);
            if (i + 16 <= S) {
                fbn_gr512_step(&sums, gn + i, pn + i, MN);
                i += 16;
            }
        }
        if (j < S)
            FBN_PG_VEC(j, (__mmask16)((1u << (S - j)) - 1), 0);
#undef FBN_PG_VEC
        for (; i + 16 <= S; i += 16) /* the step the head left over */
            fbn_gr512_step(&sums, gn + i, pn + i, MN);
        fbn_gr512_end(&sums, gn, pn, i, S, meann[c], &a, &b);
        acc[2 * c] += a;
        acc[2 * c + 1] += b;
    }
}

/* Row r's grad_input with row r + 1's gradient sums (acc, added to); 0 where the rows do not pair,
 * and nothing was done: they pair where the unpaired loops take the AVX-512 sums (fbn_grad_sums_fl:
 * runs of FBN_AL512_RUN or more) and no streaming stores. */
static int fbn_pair_grad(const float *dy, const float *x, float *dx, ptrdiff_t C, ptrdiff_t S, const float *cf,
                         int nt, const float *dyn, const float *xn, const double *meann, double *acc)
{
    if (__atomic_load_n(&fbn_pairs_off, __ATOMIC_RELAXED) || nt || S < FBN_AL512_RUN || !fbn_nt512_ok(dx) ||
        !fbn_nt512_ok(dyn))
        return 0;
    fbn_pair_grad_512(dy, x, dx, C, S, cf, dyn, xn, meann, acc);
    return 1;
}

/* Row r's normalize (x, y) with row r + 1's moments (xn) into acc; 0 where the rows do not pair,
 * and nothing was done: they pair where the unpaired loops take the AVX-512 sums (rows of
 * FBN_NORM_LONG or more) and vector loops (runs of FBN_AL512_RUN or more; with nt, of
 * FBN_NT512_RUN, below which streaming goes through a buffer). */
static int fbn_pair_affine(const float *x, float *y, ptrdiff_t C, ptrdiff_t S, const float *cf, int nt,
                           const float *xn, double *acc)
{
    if (__atomic_load_n(&fbn_pairs_off, __ATOMIC_RELAXED) || C * S < FBN_NORM_LONG ||
        S < (nt ? FBN_NT512_RUN : FBN_AL512_RUN) || !fbn_nt512_ok(x) || !fbn_nt512_ok(y) || !fbn_nt512_ok(xn))
        return 0;
    fbn_pair_affine_512(x, y, C, S, cf, nt, xn, acc);
    return 1;
}
#else
static int fbn_pair_affine(const float *x, float *y, ptrdiff_t C, ptrdiff_t S, const float *cf, int nt,
                           const float *xn, double *acc)
{
    (void)x, (void)y, (void)C, (void)S, (void)cf, (void)nt, (void)xn, (void)acc;
    return 0;
}
static int fbn_pair_grad(const float *dy, const float *x, float *dx, ptrdiff_t C, ptrdiff_t S, const float *cf,
                         int nt, const float *dyn, const float *xn, const double *meann, double *acc)
{
    (void)dy, (void)x, (void)dx, (void)C, (void)S, (void)cf, (void)nt, (void)dyn, (void)xn, (void)meann, (void)acc;
    return 0;
}
#endif

/* Whether group norm's fused forward tasks pair rows (above); set >= 0 sets it
 * (fastbn._norm_kernels.row_pairs). */
static inline int fbn_row_pairs(int set)
{
#if defined(FBN_NT512) && defined(FBN_FLANES)
    if (set >= 0)
        __atomic_store_n(&fbn_pairs_off, !set, __ATOMIC_RELAXED);
    return !__atomic_load_n(&fbn_pairs_off, __ATOMIC_RELAXED) && fbn_nt512_ok(&fbn_pairs_off); /* (AVX-512F here) */
#else
    (void)set;
    return 0;
#endif
}

#endif /* FASTBN_NORM_SIMD_H */
