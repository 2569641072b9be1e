/* fastbn/_norm_simd.h -- vector loops for layer norm's elementwise affine (fastbn/_norm_kernels.pyx).
 *
 * Group and instance norm reuse _simd.h's loops (fbn_moments, fbn_affine, fbn_grad_sums,
 * fbn_grad_input) on one (n, group) row at a time; layer norm's weight and bias vary along the
 * row, which those loops (one coefficient per run of S elements) would walk one element at a time,
 * so it has its own three loops here, once per type (_norm_impl.h).  Statistics and gradient sums
 * in double; the normalize keeps the mean split into hi + lo parts of the input type, as in
 * _simd.h, so that float32 data with a large offset keeps float32 precision. */
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

#define T float
#define FBN_SUFFIX f32
#include "_norm_impl.h"
#undef T
#undef FBN_SUFFIX

#define T double
#define FBN_SUFFIX f64
#include "_norm_impl.h"
#undef T
#undef FBN_SUFFIX

#endif /* FASTBN_NORM_SIMD_H */
