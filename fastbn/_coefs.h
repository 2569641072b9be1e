/* fastbn/_coefs.h -- batch norm's per-channel arithmetic, written once for the CPU and the GPU.
 *
 * Every operation reduces each channel to a few numbers, derives per-channel coefficients from
 * them, and applies those elementwise.  This header is the middle step, on doubles: the merge of
 * partial moments, the statistics, and the coefficients of the forward and the backward.
 *   CPU: _simd.h includes it, for its vector loops (_simd_impl.h) and for the Cython drivers
 *        (_kernels.pyx, through _simd.pxd), which call these functions to finish each channel.
 *   GPU: _cuda/batch_norm.cu includes it; nvcc reads the file, and fastbn._cupy_backend splices it
 *        into the source it hands NVRTC (which compiles a string, with no host headers).
 * So everything here is plain arithmetic on doubles: static inline functions (`__device__` ones
 * under a CUDA compiler), no library calls but sqrt, and no includes there.
 *
 * The elementwise formulas that use these coefficients live in the loops (_simd_impl.h for the
 * CPU, the apply kernels of batch_norm.cu): y = ((x - mhi) - mlo) * a + b and
 * dx = kdy * dy + (((x - mhi) - mlo) * kx + kc), with the wide-mean form of FBN_WIDE below. */
#ifndef FASTBN_COEFS_H
#define FASTBN_COEFS_H

#if defined(__CUDACC__)
#define FBN_COEF static __device__ __forceinline__
FBN_COEF unsigned long long fbn_bits(double v) { return (unsigned long long)__double_as_longlong(v); }
FBN_COEF double fbn_from_bits(unsigned long long b) { return __longlong_as_double((long long)b); }
#else
#include <math.h>
#include <string.h>
#if defined(__GNUC__)
/* always inlined: a function that a target_clones loop calls must take on its instruction set */
#define FBN_COEF static inline __attribute__((always_inline))
#else
#define FBN_COEF static inline
#endif
FBN_COEF unsigned long long fbn_bits(double v)
{
    unsigned long long b;
    memcpy(&b, &v, sizeof b);
    return b;
}
FBN_COEF double fbn_from_bits(unsigned long long b)
{
    double v;
    memcpy(&v, &b, sizeof v);
    return v;
}
#endif

/* ---- Chan et al.'s merge of partial moments ---------------------------------------------------
 * An accumulator holds a count n, a mean m and M2 (the sum of squared deviations from m).  A part
 * of nb elements with mean m + d and M2 m2b merges in as m += d f, M2 += m2b + d^2 n f, with
 * f = nb / (n + nb).  Never E[x^2] - E[x]^2. */

/* The merge's update of the mean and M2, given d, f and nf = n * f (the vectorized merge of the
 * CPU's column loops computes f and nf once for all columns). */
FBN_COEF void fbn_chan_add(double *m, double *m2, double d, double f, double nf, double m2b)
{
    *m += d * f;
    *m2 += m2b + d * d * nf;
}

/* Merge a part (nb, mb, m2b) into (n, m, m2), both means on one scale (absolute, or relative to
 * one shift).  An empty part changes nothing; the first part is taken as it is (d * d * 0 would be
 * NaN for |d| > 1e154). */
FBN_COEF void fbn_chan_merge(double *n, double *m, double *m2, double nb, double mb, double m2b)
{
    if (nb <= 0.0)
        return;
    if (*n == 0.0) {
        *n = nb;
        *m = mb;
        *m2 = m2b;
        return;
    }
    const double nn = *n + nb, f = nb / nn;
    fbn_chan_add(m, m2, mb - *m, f, *n * f, m2b);
    *n = nn;
}

/* The CPU's accumulators hold (count, shift K, mean - K, M2): the mean relative to a shift fixed by
 * the first merge, near the data.  Merging a part (count nb, mean kb + rb, M2 m2b) takes the
 * difference of the means as (kb - K - rel) + rb: kb - K is exact when the two are within a
 * factor 2 (Sterbenz), so it carries no rounding of the means' magnitude.  Holding absolute
 * means instead, each merge's d*d term took an error of about 1e-16 * |mean| * d, which made a
 * float64 variance with mean/std = 1e8 lose 9 digits (d is of the order of std).  With the shift
 * far from the data (an outlier first), it is as good as absolute means, no worse.  (The GPU
 * shifts the data itself, by each channel's first element, and merges with fbn_chan_merge.) */
enum { FBN_N = 0, FBN_K = 1, FBN_REL = 2, FBN_M2 = 3, FBN_ACC = 4 };

FBN_COEF void fbn_shift_merge(double *acc, double nb, double kb, double rb, double m2b)
{
    if (nb <= 0.0)
        return;
    if (acc[FBN_N] == 0.0) {
        acc[FBN_N] = nb;
        acc[FBN_K] = kb;
        acc[FBN_REL] = rb;
        acc[FBN_M2] = m2b;
        return;
    }
    const double n = acc[FBN_N], nn = n + nb, f = nb / nn;
    fbn_chan_add(&acc[FBN_REL], &acc[FBN_M2], ((kb - acc[FBN_K]) - acc[FBN_REL]) + rb, f, n * f, m2b);
    acc[FBN_N] = nn;
}

/* The accumulator's mean. */
FBN_COEF double fbn_acc_mean(const double *acc) { return acc[FBN_K] + acc[FBN_REL]; }

/* ---- statistics ------------------------------------------------------------------------------ */

/* The biased variance of n elements with M2 m2. */
FBN_COEF double fbn_var(double n, double m2) { return m2 / n; }

/* 1 / sqrt(var + eps): what the forward normalizes with, and the backward reuses. */
FBN_COEF double fbn_invstd(double var, double eps) { return 1.0 / sqrt(var + eps); }

/* A batch's invstd, fbn_invstd, or NaN where its variance overflowed double (finite float64 data
 * with a spread past 1.3e154: an infinite input makes the variance NaN, not inf).  1 / sqrt(inf)
 * = 0 would turn every output into the bias, silently; NaN says it, as PyTorch's group and layer
 * norm do there.  var - var is +0 for a finite variance (the sum is exact), NaN for inf: no
 * branch, so the per-channel loops still vectorize. */
FBN_COEF double fbn_batch_invstd(double var, double eps) { return fbn_invstd(var, eps) + (var - var); }

/* ---- the forward's coefficients: y = ((x - mhi) - mlo) * a + b ---------------------------------
 * mhi + mlo is the double mean split into two values of the input type: mhi = (T)mean, and
 * mlo = (T)fbn_split_lo(mean, mhi).  x - mhi is exact for x near the mean, so a float32 input with
 * mean 1e4 and std 1 keeps float32 precision in y (x * a + (b - mean * a) would not).
 * a = (T)fbn_scale(weight, invstd), b = bias. */

/* The low part of the split: mean - hi, where hi is the mean rounded to the input type (passed as a
 * double).  A hi that is not finite (an infinite mean, or one beyond float's range) has no low
 * part: inf - inf would make every output NaN, where x - inf is the answer (PyTorch's too); a NaN
 * hi gets none either, its outputs are NaN anyway.  The zero comes from an integer mask on hi's
 * exponent: GCC vectorizes no floating-point select in the coefficient loops (-ftrapping-math). */
FBN_COEF double fbn_split_lo(double mean, double hi)
{
    const unsigned long long exponent = 0x7ff0000000000000ull;
    const unsigned long long finite = (fbn_bits(hi) & exponent) != exponent;
    return fbn_from_bits(fbn_bits(mean - hi) & (0ull - finite));
}

/* The affine's scale, weight * invstd (rounded to the input type by the caller). */
FBN_COEF double fbn_scale(double weight, double invstd) { return weight * invstd; }

/* Past these magnitudes of mhi, x - mhi can overflow the input type although the result does not
 * (half an ulp of FLT_MAX, DBL_MAX: below it, |x| + |mhi| rounds to at most the largest finite
 * value).  The loops then normalize as ((x/2 - mhi/2) - mlo/2) * 2a + b: halving and doubling are
 * exact there (no subnormals near such a mean), so it gives the same bits wherever the direct form
 * does not overflow, and a finite y where only x - mhi did: a float32 channel [3.4e38, -3.4e38,
 * -3.4e38, -3.4e38] has y[0] = 1.732, not inf. */
#define FBN_WIDE_F32 0x1p103f
#define FBN_WIDE_F64 0x1p970

/* ---- the backward's terms --------------------------------------------------------------------
 * From the channel's sums sdy = sum dy and sdyx = sum dy * (x - mean) over count elements:
 * grad_bias = sdy, grad_weight = sdyx * invstd, and grad_input
 * dx = kdy * dy + (((x - mhi) - mlo) * kx + kc) with kdy = weight * invstd,
 * kx = -kdy * invstd^2 * sdyx / count (fbn_x_coef), kc = -kdy * sdy / count (the mean split as the
 * forward's).  With fixed statistics (evaluation mode) dx = kdy * dy alone. */

/* -k * invstd^2 * s / count, the coefficient of x - mean in grad_input (k: weight * invstd, or
 * invstd where s has the weight folded in), in an order that keeps every product in range: s is
 * about count * std * |dy|, so s * invstd / count is about |dy| and k * invstd about weight / std^2.
 * k * invstd * invstd * s, first, underflowed past std 1e103 (invstd^3 below double's normal
 * range), and grad_input lost its x term: 45% off at std 1e110, where PyTorch's stays exact. */
FBN_COEF double fbn_x_coef(double k, double invstd, double s, double count) { return -(k * invstd) * (s * invstd / count); }

FBN_COEF void fbn_grad_terms(double weight, double invstd, double sdy, double sdyx, double count, double *gw,
                             double *gb, double *kdy, double *kx, double *kc)
{
    const double k = weight * invstd;
    *gb = sdy;
    *gw = sdyx * invstd;
    *kdy = k;
    *kx = fbn_x_coef(k, invstd, sdyx, count);
    *kc = -k * sdy / count;
}

#endif /* FASTBN_COEFS_H */
