/* fastbn/_simd.h -- the vector loops under fastbn's Cython kernels.
 *
 * Every function here works on one contiguous run of memory and is called from the
 * OpenMP-parallel loops in _kernels.pyx, which decide who works on what.  They live in C for two
 * reasons Cython cannot express:
 *   - `#pragma omp simd reduction(...)` lets the compiler vectorize a floating-point sum
 *     without -ffast-math (which would break NaN propagation and the hi/lo mean split below);
 *   - on x86-64 with GCC, `target_clones` builds each loop for the baseline, AVX2+FMA and AVX-512
 *     and picks one at load time, so a portable wheel still runs wide vectors.
 *
 * Numerics:
 *   - moments: two-pass mean and M2 over blocks of FBN_BLOCK elements (they sit in L1 for the
 *     second pass), in double, merged with Chan et al.'s pairwise update.  Never E[x^2]-E[x]^2.
 *   - normalize: y = ((x - m_hi) - m_lo) * a + b, where m_hi + m_lo is the double mean split
 *     into two values of the input type.  x - m_hi is exact for x near the mean, so a float32
 *     input with mean 1e4 and std 1 keeps float32 precision in y (x * a + (b - m * a) would not).
 */
#ifndef FASTBN_SIMD_H
#define FASTBN_SIMD_H

#include <stddef.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FBN_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define FBN_CLONES
#endif

#define FBN_BLOCK 2048
#define FBN_PRAGMA(x) _Pragma(#x)

/* Merge a block's (count nb, mean mb, M2 m2b) into the accumulator (*n, *m, *m2). */
static inline void fbn_chan_merge(double *n, double *m, double *m2, double nb, double mb, double m2b)
{
    if (nb <= 0.0)
        return;
    double nn = *n + nb;
    double d = mb - *m;
    *m += d * (nb / nn);
    *m2 += m2b + d * d * (*n * (nb / nn));
    *n = nn;
}

#define FBN_DEFINE(T, SUF)                                                                      \
/* (count, mean, M2) of x[0:len], merged into the accumulators. */                            \
FBN_CLONES static void fbn_moments_##SUF(const T *x, ptrdiff_t len, double *n, double *m,      \
                                         double *m2)                                           \
{                                                                                               \
    for (ptrdiff_t i0 = 0; i0 < len; i0 += FBN_BLOCK) {                                         \
        ptrdiff_t bl = len - i0 < FBN_BLOCK ? len - i0 : FBN_BLOCK;                             \
        const T *p = x + i0;                                                                    \
        double s = 0.0, q = 0.0;                                                                \
        FBN_PRAGMA(omp simd reduction(+:s))                                                     \
        for (ptrdiff_t i = 0; i < bl; i++)                                                      \
            s += (double)p[i];                                                                  \
        double bm = s / (double)bl;                                                             \
        FBN_PRAGMA(omp simd reduction(+:q))                                                     \
        for (ptrdiff_t i = 0; i < bl; i++) {                                                    \
            double d = (double)p[i] - bm;                                                       \
            q += d * d;                                                                         \
        }                                                                                       \
        fbn_chan_merge(n, m, m2, (double)bl, bm, q);                                            \
    }                                                                                           \
}                                                                                               \
                                                                                                \
/* Column moments of a rows x C row-major block, merged into per-column accumulators that     \
 * share the count *n.  tmp holds 2*C doubles of scratch. */                                   \
FBN_CLONES static void fbn_col_moments_##SUF(const T *x, ptrdiff_t rows, ptrdiff_t C, double *n, \
                                             double *m, double *m2, double *tmp)               \
{                                                                                               \
    double *bm = tmp, *bq = tmp + C;                                                            \
    for (ptrdiff_t c = 0; c < C; c++)                                                           \
        bm[c] = bq[c] = 0.0;                                                                    \
    for (ptrdiff_t r = 0; r < rows; r++) {                                                      \
        const T *p = x + r * C;                                                                 \
        FBN_PRAGMA(omp simd)                                                                    \
        for (ptrdiff_t c = 0; c < C; c++)                                                       \
            bm[c] += (double)p[c];                                                              \
    }                                                                                           \
    for (ptrdiff_t c = 0; c < C; c++)                                                           \
        bm[c] /= (double)rows;                                                                  \
    for (ptrdiff_t r = 0; r < rows; r++) {                                                      \
        const T *p = x + r * C;                                                                 \
        FBN_PRAGMA(omp simd)                                                                    \
        for (ptrdiff_t c = 0; c < C; c++) {                                                     \
            double d = (double)p[c] - bm[c];                                                    \
            bq[c] += d * d;                                                                     \
        }                                                                                       \
    }                                                                                           \
    double n0 = *n;                                                                             \
    for (ptrdiff_t c = 0; c < C; c++) {                                                         \
        double nc = n0;                                                                         \
        fbn_chan_merge(&nc, &m[c], &m2[c], (double)rows, bm[c], bq[c]);                         \
    }                                                                                           \
    *n = n0 + (double)rows;                                                                     \
}                                                                                               \
                                                                                                \
/* y = ((x - mhi) - mlo) * a + b over a contiguous run (y may be x). */                       \
FBN_CLONES static void fbn_affine_##SUF(const T *x, T *y, ptrdiff_t len, T mhi, T mlo, T a, T b) \
{                                                                                               \
    FBN_PRAGMA(omp simd)                                                                        \
    for (ptrdiff_t i = 0; i < len; i++)                                                         \
        y[i] = ((x[i] - mhi) - mlo) * a + b;                                                    \
}                                                                                               \
                                                                                                \
/* The same per column of a rows x C block, coefficients per column. */                       \
FBN_CLONES static void fbn_col_affine_##SUF(const T *x, T *y, ptrdiff_t rows, ptrdiff_t C,      \
                                            const T *mhi, const T *mlo, const T *a, const T *b) \
{                                                                                               \
    for (ptrdiff_t r = 0; r < rows; r++) {                                                      \
        const T *p = x + r * C;                                                                 \
        T *q = y + r * C;                                                                       \
        FBN_PRAGMA(omp simd)                                                                    \
        for (ptrdiff_t c = 0; c < C; c++)                                                       \
            q[c] = ((p[c] - mhi[c]) - mlo[c]) * a[c] + b[c];                                    \
    }                                                                                           \
}                                                                                               \
                                                                                                \
/* sum(dy) and sum(dy * (x - mean)) over a contiguous run, in double, added to *sdy, *sdyx. */ \
FBN_CLONES static void fbn_grad_sums_##SUF(const T *dy, const T *x, ptrdiff_t len, double mean, \
                                           double *sdy, double *sdyx)                          \
{                                                                                               \
    double a = 0.0, b = 0.0;                                                                    \
    FBN_PRAGMA(omp simd reduction(+:a, b))                                                      \
    for (ptrdiff_t i = 0; i < len; i++) {                                                       \
        double g = (double)dy[i];                                                               \
        a += g;                                                                                 \
        b += g * ((double)x[i] - mean);                                                         \
    }                                                                                           \
    *sdy += a;                                                                                  \
    *sdyx += b;                                                                                 \
}                                                                                               \
                                                                                                \
FBN_CLONES static void fbn_col_grad_sums_##SUF(const T *dy, const T *x, ptrdiff_t rows,         \
                                               ptrdiff_t C, const double *mean, double *sdy,    \
                                               double *sdyx)                                    \
{                                                                                               \
    for (ptrdiff_t r = 0; r < rows; r++) {                                                      \
        const T *g = dy + r * C;                                                                \
        const T *p = x + r * C;                                                                 \
        FBN_PRAGMA(omp simd)                                                                    \
        for (ptrdiff_t c = 0; c < C; c++) {                                                     \
            sdy[c] += (double)g[c];                                                             \
            sdyx[c] += (double)g[c] * ((double)p[c] - mean[c]);                                 \
        }                                                                                       \
    }                                                                                           \
}                                                                                               \
                                                                                                \
/* dx = kdy * dy + ((x - mhi) - mlo) * kx + kc over a contiguous run. */                      \
FBN_CLONES static void fbn_grad_input_##SUF(const T *dy, const T *x, T *dx, ptrdiff_t len,      \
                                            T mhi, T mlo, T kdy, T kx, T kc)                    \
{                                                                                               \
    FBN_PRAGMA(omp simd)                                                                        \
    for (ptrdiff_t i = 0; i < len; i++)                                                         \
        dx[i] = kdy * dy[i] + (((x[i] - mhi) - mlo) * kx + kc);                                 \
}                                                                                               \
                                                                                                \
FBN_CLONES static void fbn_col_grad_input_##SUF(const T *dy, const T *x, T *dx, ptrdiff_t rows, \
                                                ptrdiff_t C, const T *mhi, const T *mlo,        \
                                                const T *kdy, const T *kx, const T *kc)         \
{                                                                                               \
    for (ptrdiff_t r = 0; r < rows; r++) {                                                      \
        const T *g = dy + r * C;                                                                \
        const T *p = x + r * C;                                                                 \
        T *q = dx + r * C;                                                                      \
        FBN_PRAGMA(omp simd)                                                                    \
        for (ptrdiff_t c = 0; c < C; c++)                                                       \
            q[c] = kdy[c] * g[c] + (((p[c] - mhi[c]) - mlo[c]) * kx[c] + kc[c]);                \
    }                                                                                           \
}

FBN_DEFINE(float, f32)
FBN_DEFINE(double, f64)

#endif /* FASTBN_SIMD_H */
