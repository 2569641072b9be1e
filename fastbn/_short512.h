/* fastbn/_short512.h -- batch norm's float32 backward, training moments and forward map over short
 * rows (S < FBN_SHORT: 7x7 and 10x10 maps) with AVX-512F, VL and FMA, for the ranges loops of
 * _simd_impl.h's float instantiation (included by _simd.h before it; fbn_grad_sums_f32,
 * fbn_grad_input_f32, fbn_moments_f32 and fbn_affine_f32 hand these their ranges).
 *
 * Why: on (32, 512, 7, 7) the fused ReLU's backward took 1.2-1.28x the plain one (target 1.1).
 * Short rows are bound by instructions, not memory.  GCC's loops gate the gradient with a vector
 * AND and keep the 8 double lanes of a row's sums in two 256-bit registers, which they then add
 * with 14 scalar adds a row (perf: a quarter of the sums' time on 49-element rows).  Here the 8
 * lanes are one 512-bit register, the gate is a mask register (an AVX-512VL compare on 8 floats)
 * that the conversion or load applies at no cost (zero-masking), a row's lanes are added with
 * three vector adds for both sums at once, and rows go in pairs (independent chains of adds side
 * by side).  Two lessons from Zen 4: masked stores are slow (grad-input stores full vectors
 * unmasked, only a row's tail masked: 1.5x -> 1.1x the plain backward), and a branch on the mask
 * in a row's scalar tail is mispredicted half the time (the tail gates with a bit mask too).
 * On (32, 512, 7, 7), 1 thread: the plain backward 410 -> 340 us, through ReLU 470 -> 378 us.
 * The forward's map (fbn_affine_s512, normalize + affine, + ReLU) had the same trouble: GCC's row
 * loop cost a quarter of the time around the rows, and its ReLU was a compare and a masked move a
 * vector (+5-10% on 7x7 rows, +17% on 4x4); here a row is full 16- and 8-wide vectors and a scalar
 * tail, and ReLU one MAXPS: (32, 512, 7, 7) in a C harness, 1 thread, 102 -> 77 us, ReLU +1%.
 *
 * The same bits as the generic loops, on purpose (the tests run both: fastbn._kernels.short_inline;
 * NaN payloads aside where two operands of one FMA are NaN, x and a coefficient: GCC's loop itself
 * returns either, by the instruction form its registers get):
 * the gradient sums add into the same 8 lanes plus one for a row's last n % 8 elements, in the
 * same order (FBN_BY_LANES), and add the lanes as fbn_lanes_sum does; the grad-input map contracts
 * the FMAs the float32 clones contract; the mask is the generic one (bounds on x from
 * fbn_relu_bounds where they are finite, else the output recomputed, which gives the same mask).
 * They cover every activation (none, the output's mask, the recomputed one) in the sums, the
 * recomputed mask with batch statistics in the grad-input map, the moments (fbn_piece_moments'
 * shift, lanes, tree and merge), and the forward's map with and without ReLU (also the evaluation
 * backward's map of dy); means that are wide (FBN_WIDE) and
 * streaming stores keep the generic loops, as does every machine without AVX-512F, VL and FMA, and
 * every build without the clones (FBN_CLONES: GCC 12 or later, x86-64 Linux with glibc). */
/* (Only where the generic loops have AVX2 and AVX-512 clones, which contract the same FMAs.) */
#if defined(FBN_HAS_CLONES) && !defined(FBN_NO_SHORT512)
#define FBN_SHORT_512 1
#define FBN_S512 __attribute__((target("avx512f,avx512vl,fma")))
#define FBN_S512_INLINE FBN_S512 static inline __attribute__((always_inline))

static int fbn_short_512_off; /* tests: 1 takes the generic loops (fbn_short_inline) */

static inline int fbn_short_512_ok(void)
{
    static int isa = -1;
    int has = __atomic_load_n(&isa, __ATOMIC_RELAXED);
    if (has < 0) {
        has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
        __atomic_store_n(&isa, has, __ATOMIC_RELAXED);
    }
    return has && !__atomic_load_n(&fbn_short_512_off, __ATOMIC_RELAXED);
}

/* One channel's mask rule, as fbn_gated_by's acts: 0 keep all, 1 the output ((x - mhi) - mlo) * a + b
 * recomputed (kept where not <= 0), 2 the forward's output zs (the same), 3 keep x >= lo, 4 keep
 * x <= hi (NaN x kept by every rule). */
typedef struct { int act; float mhi, mlo, a, b, lo, hi; } fbn_s512_gate;

/* Channel c's rule: act 1's bounds from fcf's blocks 4 and 5 where they are not NaN (fbn_bounded).
 * The coefficients only where the bounds are NaN: loading all six for every row of (32, 512, 7, 7)
 * took 7 us of the ReLU's gradient sums and 15 of its grad input (1 thread, 190 and 130 us). */
static inline fbn_s512_gate fbn_s512_gate_at(const float *fcf, const float *zs, ptrdiff_t C, ptrdiff_t c)
{
    fbn_s512_gate r = {zs ? 2 : fcf ? 1 : 0, 0, 0, 0, 0, 0, 0};
    if (r.act != 1)
        return r;
    if (!isnan(fcf[4 * C + c])) {
        r.lo = fcf[4 * C + c], r.hi = fcf[5 * C + c];
        r.act = r.hi == INFINITY ? 3 : 4;
        return r;
    }
    r.mhi = fcf[c], r.mlo = fcf[C + c], r.a = fcf[2 * C + c], r.b = fcf[3 * C + c];
    return r;
}

/* The mask of the 8 (keep8) or 16 (keep16) elements at i (p: x there, as floats). */
#define FBN_S512_KEEP(name, mask, V, pre)                                                          \
    FBN_S512_INLINE mask name(V p, const float *zs, ptrdiff_t i, fbn_s512_gate q, const int act)  \
    {                                                                                              \
        if (act == 0)                                                                              \
            return (mask)~0u;                                                                      \
        if (act == 3)                                                                              \
            return pre##_cmp_ps_mask(p, pre##_set1_ps(q.lo), _CMP_NLT_UQ);                         \
        if (act == 4)                                                                              \
            return pre##_cmp_ps_mask(p, pre##_set1_ps(q.hi), _CMP_NGT_UQ);                         \
        const V d = pre##_sub_ps(pre##_sub_ps(p, pre##_set1_ps(q.mhi)), pre##_set1_ps(q.mlo));     \
        const V z = act == 2 ? pre##_loadu_ps(zs + i) : pre##_fmadd_ps(d, pre##_set1_ps(q.a), pre##_set1_ps(q.b)); \
        return pre##_cmp_ps_mask(z, pre##_setzero_ps(), _CMP_NLE_UQ);                              \
    }
FBN_S512_KEEP(fbn_s512_keep8, __mmask8, __m256, _mm256)
FBN_S512_KEEP(fbn_s512_keep16, __mmask16, __m512, _mm512)
#undef FBN_S512_KEEP

/* The same for one element (the row's last n % 8). */
static inline int fbn_s512_keep1(float p, const float *zs, ptrdiff_t i, fbn_s512_gate q, const int act)
{
    if (act == 0)
        return 1;
    if (act == 3)
        return !(p < q.lo);
    if (act == 4)
        return !(p > q.hi);
    return !((act == 2 ? zs[i] : __builtin_fmaf((p - q.mhi) - q.mlo, q.a, q.b)) <= 0.0f);
}

/* The sums of one row of a range, as fbn_grad_run: sum(g') and sum(g' * (p - m)), g' = g through
 * the mask. */
typedef struct { const float *g, *p, *z; double m; fbn_s512_gate q; double *a, *b; } fbn_s512_row;

/* Lanes i % 8 of a row's sums, for its whole groups of 8 elements. */
FBN_S512_INLINE void fbn_s512_lanes(fbn_s512_row r, ptrdiff_t i, __m512d *va, __m512d *vb, const int act)
{
    const __m256 pv = _mm256_loadu_ps(r.p + i);
    const __m512d gd = _mm512_maskz_cvtps_pd(fbn_s512_keep8(pv, r.z, i, r.q, act), _mm256_loadu_ps(r.g + i));
    *va = _mm512_add_pd(*va, gd);
    *vb = _mm512_fmadd_pd(gd, _mm512_sub_pd(_mm512_cvtps_pd(pv), _mm512_set1_pd(r.m)), *vb);
}

/* The ninth lane: the row's last elements, from i on, one at a time. */
FBN_S512_INLINE void fbn_s512_rest(fbn_s512_row r, ptrdiff_t i, ptrdiff_t n, double *ta, double *tb, const int act)
{
    for (; i < n; i++) {  /* (the gate as a bit mask: a branch on it would be mispredicted) */
        float gf = r.g[i];
        uint32_t bits;
        memcpy(&bits, &gf, sizeof bits);
        bits &= 0u - (uint32_t)fbn_s512_keep1(r.p[i], r.z, i, r.q, act);
        memcpy(&gf, &bits, sizeof bits);
        const double gi = (double)gf;
        *ta += gi;
        *tb = __builtin_fma(gi, (double)r.p[i] - r.m, *tb);
    }
}

/* *s = ((v0 + v1) + (v2 + v3)) + ((v4 + v5) + (v6 + v7)) + t of va and ta, *q the same of vb and tb
 * (fbn_lanes_sum's tree): lanes [a01 b01 a23 b23 ...], [a0123 b0123 . . a4567 b4567 . .], then the
 * halves. */
FBN_S512_INLINE void fbn_s512_totals(__m512d va, __m512d vb, double ta, double tb, double *s, double *q)
{
    const __m512d s1 = _mm512_add_pd(_mm512_unpacklo_pd(va, vb), _mm512_unpackhi_pd(va, vb));
    const __m512d s2 = _mm512_add_pd(s1, _mm512_permutex_pd(s1, 0x4e));
    const __m256d h = _mm256_add_pd(_mm512_castpd512_pd256(s2), _mm512_extractf64x4_pd(s2, 1));
    *s = h[0] + ta;
    *q = h[1] + tb;
}

/* Adds a row's two totals to *r.a and *r.b (fbn_lanes_sum, then acc += ...). */
FBN_S512_INLINE void fbn_s512_finish(fbn_s512_row r, __m512d va, __m512d vb, double ta, double tb)
{
    double s, q;
    fbn_s512_totals(va, vb, ta, tb, &s, &q);
    *r.a += s;
    *r.b += q;
}

/* One row of n elements. */
FBN_S512_INLINE void fbn_s512_row_sums(fbn_s512_row r, ptrdiff_t n, const int act)
{
    __m512d va = _mm512_setzero_pd(), vb = va;
    double ta = 0.0, tb = 0.0;
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8)
        fbn_s512_lanes(r, i, &va, &vb, act);
    fbn_s512_rest(r, i, n, &ta, &tb, act);
    fbn_s512_finish(r, va, vb, ta, tb);
}

/* Two rows of n elements with the same mask rule, in one loop: a row's sums are chains of
 * dependent adds, and two rows side by side give the core twice the independent work. */
FBN_S512_INLINE void fbn_s512_pair_sums(fbn_s512_row r, fbn_s512_row u, ptrdiff_t n, const int act)
{
    __m512d va = _mm512_setzero_pd(), vb = va, wa = va, wb = va;
    double ta = 0.0, tb = 0.0, sa = 0.0, sb = 0.0;
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8) {
        fbn_s512_lanes(r, i, &va, &vb, act);
        fbn_s512_lanes(u, i, &wa, &wb, act);
    }
    fbn_s512_rest(r, i, n, &ta, &tb, act);
    fbn_s512_rest(u, i, n, &sa, &sb, act);
    fbn_s512_finish(r, va, vb, ta, tb);
    fbn_s512_finish(u, wa, wb, sa, sb);
}

/* fbn_grad_sums_f32 over a range whose rows are short, whatever the activation, for means that are
 * not wide where the mask is recomputed (the caller checks): rows in pairs where two in a row have
 * the same length and mask rule. */
FBN_S512 static void fbn_grad_sums_s512(const float *dy, const float *x, ptrdiff_t C, ptrdiff_t S, ptrdiff_t f0,
                                        ptrdiff_t f1, const double *mean, double *acc, const float *zs,
                                        const float *fcf)
{
#define FBN_S512_ACTS(call) \
    switch (r.q.act) {      \
    case 0: call(0); break; \
    case 1: call(1); break; \
    case 2: call(2); break; \
    case 3: call(3); break; \
    default: call(4); break;\
    }
#define FBN_S512_ONE(act) fbn_s512_row_sums(r, rn, act)
#define FBN_S512_TWO(act) fbn_s512_pair_sums(r, u, ln, act)
    fbn_s512_row r = {0};
    ptrdiff_t rn = 0;  /* a row waiting for its pair: rn elements (0: none) */
    FBN_FOR_ROWS(C, S, f0, f1, off, ln, c) {
        const fbn_s512_row u = {dy + off, x + off, zs ? zs + off : zs, mean[c], fbn_s512_gate_at(fcf, zs, C, c),
                                acc + 2 * c, acc + 2 * c + 1};
        if (rn == ln && r.q.act == u.q.act) {
            FBN_S512_ACTS(FBN_S512_TWO);
            rn = 0;
            continue;
        }
        if (rn)
            FBN_S512_ACTS(FBN_S512_ONE);
        r = u;
        rn = ln;
    }
    if (rn)
        FBN_S512_ACTS(FBN_S512_ONE);
#undef FBN_S512_ONE
#undef FBN_S512_TWO
#undef FBN_S512_ACTS
}

/* dx = kdy * g' + (((p - mhi) - mlo) * kx + kc) for the 8 elements at i of which `in` are in the
 * row, g' = g through the mask (act 1, 3 or 4; act 1's recomputed output uses the forward's mean,
 * which in training is this one, as in the generic loop).  Full vectors store unmasked. */
FBN_S512_INLINE void fbn_s512_grad_input8(const float *g, const float *p, float *out, ptrdiff_t i, __mmask8 in,
                                          __m256 mhi, __m256 mlo, __m256 kdy, __m256 kx, __m256 kc, fbn_s512_gate q,
                                          const int act)
{
    const __m256 pv = _mm256_maskz_loadu_ps(in, p + i), d = _mm256_sub_ps(_mm256_sub_ps(pv, mhi), mlo);
    const __m256 gv = _mm256_maskz_loadu_ps(fbn_s512_keep8(pv, NULL, i, q, act) & in, g + i);
    const __m256 r = _mm256_fmadd_ps(kdy, gv, _mm256_fmadd_ps(d, kx, kc));
    if (in == 0xff)
        _mm256_storeu_ps(out + i, r);
    else
        _mm256_mask_storeu_ps(out + i, in, r);
}

/* fbn_s512_grad_input8 for 16 elements, all in the row. */
FBN_S512_INLINE void fbn_s512_grad_input16(const float *g, const float *p, float *out, ptrdiff_t i,
                                           __m512 mhi, __m512 mlo, __m512 kdy, __m512 kx, __m512 kc, fbn_s512_gate q,
                                           const int act)
{
    const __m512 pv = _mm512_loadu_ps(p + i), d = _mm512_sub_ps(_mm512_sub_ps(pv, mhi), mlo);
    const __m512 gv = _mm512_maskz_loadu_ps(fbn_s512_keep16(pv, NULL, i, q, act), g + i);
    _mm512_storeu_ps(out + i, _mm512_fmadd_ps(kdy, gv, _mm512_fmadd_ps(d, kx, kc)));
}

/* A row of n, 16 elements at a time, then 8, the last ones masked.  (Only 8 at a time wasted no
 * lanes either, but on (32, 512, 7, 7), 1 thread, the grad-input pass took 150 us against 142.) */
FBN_S512_INLINE void fbn_s512_row_grad_input(const float *g, const float *p, float *out, ptrdiff_t n, float mhi,
                                             float mlo, float kdy, float kx, float kc, fbn_s512_gate q,
                                             const int act)
{
    const __m256 MHI = _mm256_set1_ps(mhi), MLO = _mm256_set1_ps(mlo), KDY = _mm256_set1_ps(kdy);
    const __m256 KX = _mm256_set1_ps(kx), KC = _mm256_set1_ps(kc);
    ptrdiff_t i = 0;
    for (; i + 16 <= n; i += 16)
        fbn_s512_grad_input16(g, p, out, i, _mm512_set1_ps(mhi), _mm512_set1_ps(mlo), _mm512_set1_ps(kdy),
                              _mm512_set1_ps(kx), _mm512_set1_ps(kc), q, act);
    for (; i + 8 <= n; i += 8)
        fbn_s512_grad_input8(g, p, out, i, 0xff, MHI, MLO, KDY, KX, KC, q, act);
    if (i < n)
        fbn_s512_grad_input8(g, p, out, i, (__mmask8)((1u << (n - i)) - 1), MHI, MLO, KDY, KX, KC, q, act);
}

/* fbn_grad_input_f32 over a range whose rows are short, for the recomputed mask with batch
 * statistics (act 1, not fixed), means that are not wide, results stored directly (the caller
 * checks); cf = [mhi | mlo | kdy | kx | kc], fcf as in fbn_grad_sums. */
FBN_S512 static void fbn_grad_input_s512(const float *dy, const float *x, float *dx, ptrdiff_t C, ptrdiff_t S,
                                         ptrdiff_t f0, ptrdiff_t f1, const float *cf, const float *fcf)
{
    FBN_FOR_ROWS(C, S, f0, f1, off, ln, c) {
        const fbn_s512_gate q = fbn_s512_gate_at(fcf, NULL, C, c);
        const float mhi = cf[c], mlo = cf[C + c], kdy = cf[2 * C + c], kx = cf[3 * C + c], kc = cf[4 * C + c];
        if (q.act == 3)
            fbn_s512_row_grad_input(dy + off, x + off, dx + off, ln, mhi, mlo, kdy, kx, kc, q, 3);
        else if (q.act == 4)
            fbn_s512_row_grad_input(dy + off, x + off, dx + off, ln, mhi, mlo, kdy, kx, kc, q, 4);
        else
            fbn_s512_row_grad_input(dy + off, x + off, dx + off, ln, mhi, mlo, kdy, kx, kc, q, 1);
    }
}

/* The training forward's moments of a short row, fbn_piece_moments' arithmetic for one block:
 * shifted sums s = sum(p - k), q = sum((p - k)^2) in 8 double lanes and a ninth for the rest, k
 * the channel's mean so far, or for its first row in the range the row's own mean from a first
 * pass, then Chan's merge (fbn_shift_merge).  GCC's loop kept the lanes in arrays and added them
 * one by one: the moments took 370 of a 600 us training forward on (32, 512, 7, 7), 1 thread. */
FBN_S512_INLINE void fbn_s512_row_moments(const float *p, ptrdiff_t n, double *acc)
{
    double k = fbn_acc_mean(acc), s, q, ts = 0.0, tq = 0.0;
    __m512d vs = _mm512_setzero_pd(), vq = vs;
    ptrdiff_t i;
    if (acc[FBN_N] == 0.0) {
        for (i = 0; i + 8 <= n; i += 8)
            vs = _mm512_add_pd(vs, _mm512_cvtps_pd(_mm256_loadu_ps(p + i)));
        for (; i < n; i++)
            ts += (double)p[i];
        fbn_s512_totals(vs, vs, ts, ts, &s, &q);
        k = s / (double)n;
        vs = _mm512_setzero_pd(), ts = 0.0;
    }
    const __m512d K = _mm512_set1_pd(k);
    for (i = 0; i + 8 <= n; i += 8) {
        const __m512d d = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(p + i)), K);
        vs = _mm512_add_pd(vs, d);
        vq = _mm512_fmadd_pd(d, d, vq);
    }
    for (; i < n; i++) {
        const double d = (double)p[i] - k;
        ts += d;
        tq = __builtin_fma(d, d, tq);
    }
    fbn_s512_totals(vs, vq, ts, tq, &s, &q);
    fbn_shift_merge(acc, (double)n, k, s / (double)n, q - s * (s / (double)n));
}

/* fbn_moments_f32 over a range whose rows are short (shorter than a block: one block a row). */
FBN_S512 static void fbn_moments_s512(const float *x, ptrdiff_t C, ptrdiff_t S, ptrdiff_t f0, ptrdiff_t f1,
                                      double *acc)
{
    FBN_FOR_ROWS(C, S, f0, f1, off, ln, c)
        fbn_s512_row_moments(x + off, ln, acc + FBN_ACC * c);
}

/* The forward's map over a row of n: q = ((p - mhi) - mlo) * a + b, the float32 clones' contraction
 * (lo = 0: mlo is 0 and its subtraction folds away, as in fbn_affine_run), then with relu
 * max(0, v), which is relu's v < 0 ? 0 : v to the bit (NaN and -0 kept: MAXPS returns its second
 * operand unless the first is greater).  16 elements at a time, then 8, then one by one: no masked
 * stores (slow on Zen 4, see above). */
FBN_S512_INLINE void fbn_s512_row_affine(const float *p, float *q, ptrdiff_t n, float mhi, float mlo, float a,
                                         float b, const int lo, const int relu)
{
    const __m512 MHI = _mm512_set1_ps(mhi), MLO = _mm512_set1_ps(mlo), A = _mm512_set1_ps(a), B = _mm512_set1_ps(b);
    ptrdiff_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 d = _mm512_sub_ps(_mm512_loadu_ps(p + i), MHI);
        __m512 v = _mm512_fmadd_ps(lo ? _mm512_sub_ps(d, MLO) : d, A, B);
        _mm512_storeu_ps(q + i, relu ? _mm512_max_ps(_mm512_setzero_ps(), v) : v);
    }
    if (i + 8 <= n) {
        __m256 d = _mm256_sub_ps(_mm256_loadu_ps(p + i), _mm512_castps512_ps256(MHI));
        __m256 v = _mm256_fmadd_ps(lo ? _mm256_sub_ps(d, _mm512_castps512_ps256(MLO)) : d,
                                   _mm512_castps512_ps256(A), _mm512_castps512_ps256(B));
        _mm256_storeu_ps(q + i, relu ? _mm256_max_ps(_mm256_setzero_ps(), v) : v);
        i += 8;
    }
    for (; i < n; i++) {
        __m128 d = _mm_sub_ss(_mm_load_ss(p + i), _mm512_castps512_ps128(MHI));
        __m128 v = _mm_fmadd_ss(lo ? _mm_sub_ss(d, _mm512_castps512_ps128(MLO)) : d, _mm512_castps512_ps128(A),
                                _mm512_castps512_ps128(B));
        _mm_store_ss(q + i, relu ? _mm_max_ss(_mm_setzero_ps(), v) : v);
    }
}

/* fbn_affine_f32 over a range whose rows are short, for means that are not wide, results stored
 * directly (the caller checks); cf = [mhi | mlo | a | b].  GCC's loop spent a quarter of the time
 * of (32, 512, 7, 7) around the rows, and gated with a compare and a masked move per vector. */
FBN_S512 static void fbn_affine_s512(const float *x, float *y, ptrdiff_t C, ptrdiff_t S, ptrdiff_t f0,
                                     ptrdiff_t f1, const float *cf, int relu)
{
#define FBN_S512_ROW(lo, relu) fbn_s512_row_affine(x + off, y + off, ln, mhi, mlo, a, b, lo, relu)
    FBN_FOR_ROWS(C, S, f0, f1, off, ln, c) {
        const float mhi = cf[c], mlo = cf[C + c], a = cf[2 * C + c], b = cf[3 * C + c];
        if (mlo != 0)
            relu ? FBN_S512_ROW(1, 1) : FBN_S512_ROW(1, 0);
        else
            relu ? FBN_S512_ROW(0, 1) : FBN_S512_ROW(0, 0);
    }
#undef FBN_S512_ROW
}
#endif

/* Whether float32's backward over short rows takes this file's loops; set >= 0 sets it
 * (fastbn._kernels.short_inline, for the tests). */
static inline int fbn_short_inline(int set)
{
#ifdef FBN_SHORT_512
    if (set >= 0)
        __atomic_store_n(&fbn_short_512_off, !set, __ATOMIC_RELAXED);
    return fbn_short_512_ok();
#else
    (void)set;
    return 0;
#endif
}
