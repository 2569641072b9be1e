# fastbn/_simd.pxd -- the C side of the CPU kernels, as Cython sees it: the declarations of
# _simd.h (the vector loops, _simd_impl.h) and of _coefs.h (the per-channel arithmetic), and the
# dispatch, written once here: each function below picks the _f32, _f64, _h16 (float16) or _b16
# (bfloat16) loop for the fused types `elem` (the elements) and `floating` (the type computed in),
# resolved at compile time, so the choice costs nothing.
#
# Two layouts (see _simd_impl.h): ranges [f0, f1) of an (N, C, S) buffer in memory order, with
# per-channel accumulators and coefficients; and blocks of rows of an (N, W) matrix, W = C*S,
# with per-column ones.
from cython cimport floating

# The element types of the data (x, y, dy, dx) the loops read and write; the coefficients are of
# `floating`, the type computed in: float for float and the half types, double for double.
ctypedef fused elem:
    float
    double
    fbn_f16
    fbn_bf16

cdef extern from "_simd.h" nogil:
    # half-precision elements (see _simd.h): distinct C types, so that the fused type elem tells them apart
    ctypedef struct fbn_f16:
        unsigned short bits
    ctypedef struct fbn_bf16:
        unsigned short bits
    void fbn_sfence()
    int fbn_half_inline(int set)  # _half512.h: half elements converted in the loops (1) or staged (0)
    int fbn_short_inline(int set)  # _short512.h: float32's backward over short rows in its loops (1) or the generic ones (0)
    # _coefs.h (included by _simd.h): the per-channel arithmetic
    void fbn_shift_merge(double *acc, double nb, double kb, double rb, double m2b)
    void fbn_chan_merge(double *n, double *m, double *m2, double nb, double mb, double m2b)
    double fbn_acc_mean(const double *acc)
    double fbn_var(double n, double m2)
    double fbn_invstd(double var, double eps)
    double fbn_batch_invstd(double var, double eps)
    enum: FBN_N, FBN_K, FBN_REL, FBN_M2, FBN_ACC
    # ranges [f0, f1) of an (N, C, S) buffer in memory order
    void fbn_moments_f32(const float *x, Py_ssize_t C, Py_ssize_t S, Py_ssize_t f0, Py_ssize_t f1, double *acc)
    void fbn_moments_f64(const double *x, Py_ssize_t C, Py_ssize_t S, Py_ssize_t f0, Py_ssize_t f1, double *acc)
    void fbn_affine_f32(const float *x, float *y, Py_ssize_t C, Py_ssize_t S, Py_ssize_t f0, Py_ssize_t f1, const float *cf, int stream, int relu)
    void fbn_affine_f64(const double *x, double *y, Py_ssize_t C, Py_ssize_t S, Py_ssize_t f0, Py_ssize_t f1, const double *cf, int stream, int relu)
    void fbn_grad_sums_f32(const float *dy, const float *x, Py_ssize_t C, Py_ssize_t S, Py_ssize_t f0, Py_ssize_t f1, const double *mean, double *acc, const float *zs, const float *fcf)
    void fbn_grad_sums_f64(const double *dy, const double *x, Py_ssize_t C, Py_ssize_t S, Py_ssize_t f0, Py_ssize_t f1, const double *mean, double *acc, const double *zs, const double *fcf)
    void fbn_grad_input_f32(const float *dy, const float *x, float *dx, Py_ssize_t C, Py_ssize_t S, Py_ssize_t f0, Py_ssize_t f1, const float *cf, int stream, const float *zs, const float *fcf, int fixed)
    void fbn_grad_input_f64(const double *dy, const double *x, double *dx, Py_ssize_t C, Py_ssize_t S, Py_ssize_t f0, Py_ssize_t f1, const double *cf, int stream, const double *zs, const double *fcf, int fixed)
    # blocks of rows of an (N, W) matrix
    void fbn_col_moments_f32(const float *x, Py_ssize_t rows, Py_ssize_t ncols, Py_ssize_t W, double *n, double *K, double *rel, double *m2, double *tmp)
    void fbn_col_moments_f64(const double *x, Py_ssize_t rows, Py_ssize_t ncols, Py_ssize_t W, double *n, double *K, double *rel, double *m2, double *tmp)
    void fbn_col_affine_f32(const float *x, float *y, Py_ssize_t rows, Py_ssize_t ncols, Py_ssize_t W, const float *cf, int stream, int relu)
    void fbn_col_affine_f64(const double *x, double *y, Py_ssize_t rows, Py_ssize_t ncols, Py_ssize_t W, const double *cf, int stream, int relu)
    void fbn_col_grad_sums_f32(const float *dy, const float *x, Py_ssize_t rows, Py_ssize_t ncols, Py_ssize_t W, const double *mean, double *sdy, double *sdyx, const float *zs, const float *fcf)
    void fbn_col_grad_sums_f64(const double *dy, const double *x, Py_ssize_t rows, Py_ssize_t ncols, Py_ssize_t W, const double *mean, double *sdy, double *sdyx, const double *zs, const double *fcf)
    void fbn_col_grad_input_f32(const float *dy, const float *x, float *dx, Py_ssize_t rows, Py_ssize_t ncols, Py_ssize_t W, const float *cf, int stream, const float *zs, const float *fcf, int fixed)
    void fbn_col_grad_input_f64(const double *dy, const double *x, double *dx, Py_ssize_t rows, Py_ssize_t ncols, Py_ssize_t W, const double *cf, int stream, const double *zs, const double *fcf, int fixed)
    # the same loops for half-precision elements (computed in float: float coefficients)
    void fbn_moments_h16(const fbn_f16 *x, Py_ssize_t C, Py_ssize_t S, Py_ssize_t f0, Py_ssize_t f1, double *acc)
    void fbn_affine_h16(const fbn_f16 *x, fbn_f16 *y, Py_ssize_t C, Py_ssize_t S, Py_ssize_t f0, Py_ssize_t f1, const float *cf, int stream, int relu)
    void fbn_grad_sums_h16(const fbn_f16 *dy, const fbn_f16 *x, Py_ssize_t C, Py_ssize_t S, Py_ssize_t f0, Py_ssize_t f1, const double *mean, double *acc, const fbn_f16 *zs, const float *fcf)
    void fbn_grad_input_h16(const fbn_f16 *dy, const fbn_f16 *x, fbn_f16 *dx, Py_ssize_t C, Py_ssize_t S, Py_ssize_t f0, Py_ssize_t f1, const float *cf, int stream, const fbn_f16 *zs, const float *fcf, int fixed)
    void fbn_col_moments_h16(const fbn_f16 *x, Py_ssize_t rows, Py_ssize_t ncols, Py_ssize_t W, double *n, double *K, double *rel, double *m2, double *tmp)
    void fbn_col_affine_h16(const fbn_f16 *x, fbn_f16 *y, Py_ssize_t rows, Py_ssize_t ncols, Py_ssize_t W, const float *cf, int stream, int relu)
    void fbn_col_grad_sums_h16(const fbn_f16 *dy, const fbn_f16 *x, Py_ssize_t rows, Py_ssize_t ncols, Py_ssize_t W, const double *mean, double *sdy, double *sdyx, const fbn_f16 *zs, const float *fcf)
    void fbn_col_grad_input_h16(const fbn_f16 *dy, const fbn_f16 *x, fbn_f16 *dx, Py_ssize_t rows, Py_ssize_t ncols, Py_ssize_t W, const float *cf, int stream, const fbn_f16 *zs, const float *fcf, int fixed)
    void fbn_moments_b16(const fbn_bf16 *x, Py_ssize_t C, Py_ssize_t S, Py_ssize_t f0, Py_ssize_t f1, double *acc)
    void fbn_affine_b16(const fbn_bf16 *x, fbn_bf16 *y, Py_ssize_t C, Py_ssize_t S, Py_ssize_t f0, Py_ssize_t f1, const float *cf, int stream, int relu)
    void fbn_grad_sums_b16(const fbn_bf16 *dy, const fbn_bf16 *x, Py_ssize_t C, Py_ssize_t S, Py_ssize_t f0, Py_ssize_t f1, const double *mean, double *acc, const fbn_bf16 *zs, const float *fcf)
    void fbn_grad_input_b16(const fbn_bf16 *dy, const fbn_bf16 *x, fbn_bf16 *dx, Py_ssize_t C, Py_ssize_t S, Py_ssize_t f0, Py_ssize_t f1, const float *cf, int stream, const fbn_bf16 *zs, const float *fcf, int fixed)
    void fbn_col_moments_b16(const fbn_bf16 *x, Py_ssize_t rows, Py_ssize_t ncols, Py_ssize_t W, double *n, double *K, double *rel, double *m2, double *tmp)
    void fbn_col_affine_b16(const fbn_bf16 *x, fbn_bf16 *y, Py_ssize_t rows, Py_ssize_t ncols, Py_ssize_t W, const float *cf, int stream, int relu)
    void fbn_col_grad_sums_b16(const fbn_bf16 *dy, const fbn_bf16 *x, Py_ssize_t rows, Py_ssize_t ncols, Py_ssize_t W, const double *mean, double *sdy, double *sdyx, const fbn_bf16 *zs, const float *fcf)
    void fbn_col_grad_input_b16(const fbn_bf16 *dy, const fbn_bf16 *x, fbn_bf16 *dx, Py_ssize_t rows, Py_ssize_t ncols, Py_ssize_t W, const float *cf, int stream, const fbn_bf16 *zs, const float *fcf, int fixed)
    # a channel's coefficients written into their blocks, and vector loops of them over many channels
    void fbn_affine_coefs_f32(double mean, double invstd, float weight, float bias, float *cf, Py_ssize_t C)
    void fbn_affine_coefs_f64(double mean, double invstd, double weight, double bias, double *cf, Py_ssize_t C)
    void fbn_grad_coefs_f32(double sdy, double sdyx, double count, int training, float weight, double mean, double invstd, double *gw, double *gb, float *cf, Py_ssize_t C)
    void fbn_grad_coefs_f64(double sdy, double sdyx, double count, int training, double weight, double mean, double invstd, double *gw, double *gb, double *cf, Py_ssize_t C)
    void fbn_eval_stats_f32(const float *rm, const float *rv, double eps, double *mean, double *invstd, Py_ssize_t C)
    void fbn_eval_stats_f64(const double *rm, const double *rv, double eps, double *mean, double *invstd, Py_ssize_t C)
    void fbn_eval_coefs_f32(const double *mean, const double *invstd, const float *w, const float *b, float *cf, Py_ssize_t n, Py_ssize_t C)
    void fbn_eval_coefs_f64(const double *mean, const double *invstd, const double *w, const double *b, double *cf, Py_ssize_t n, Py_ssize_t C)
    void fbn_col_finish_stats_f32(double count, const double *K, const double *rel, const double *m2, double eps, const float *w, const float *b, double *mean, double *var, double *invstd, float *cf, Py_ssize_t n, Py_ssize_t C)
    void fbn_col_finish_stats_f64(double count, const double *K, const double *rel, const double *m2, double eps, const double *w, const double *b, double *mean, double *var, double *invstd, double *cf, Py_ssize_t n, Py_ssize_t C)
    void fbn_col_finish_grad_f32(double count, const double *sdy, const double *sdyx, int training, const float *w, const double *mean, const double *invstd, double *gw, double *gb, float *cf, Py_ssize_t n, Py_ssize_t C)
    void fbn_col_finish_grad_f64(double count, const double *sdy, const double *sdyx, int training, const double *w, const double *mean, const double *invstd, double *gw, double *gb, double *cf, Py_ssize_t n, Py_ssize_t C)
    void fbn_relu_bounds_f32(const float *fcf, Py_ssize_t C, float *lo, float *hi)
    void fbn_relu_bounds_f64(const double *fcf, Py_ssize_t C, double *lo, double *hi)


# ---------------------------------------------------------------- ranges of an (N, C, S) buffer
# Each picks the loop of its element type (elem) and computed type (floating) at compile time; the
# pairs that do not exist (a half type with double) do nothing, and no caller makes them.
cdef inline void _moments(const elem *x, Py_ssize_t C, Py_ssize_t S, Py_ssize_t f0, Py_ssize_t f1,
                          double *acc) noexcept nogil:
    if elem is float:
        fbn_moments_f32(x, C, S, f0, f1, acc)
    elif elem is double:
        fbn_moments_f64(x, C, S, f0, f1, acc)
    elif elem is fbn_f16:
        fbn_moments_h16(x, C, S, f0, f1, acc)
    else:
        fbn_moments_b16(x, C, S, f0, f1, acc)


cdef inline void _affine(const elem *x, elem *y, Py_ssize_t C, Py_ssize_t S, Py_ssize_t f0,
                         Py_ssize_t f1, const floating *cf, int stream, bint relu) noexcept nogil:
    if elem is float and floating is float:
        fbn_affine_f32(x, y, C, S, f0, f1, cf, stream, relu)
    elif elem is double and floating is double:
        fbn_affine_f64(x, y, C, S, f0, f1, cf, stream, relu)
    elif elem is fbn_f16 and floating is float:
        fbn_affine_h16(x, y, C, S, f0, f1, cf, stream, relu)
    elif elem is fbn_bf16 and floating is float:
        fbn_affine_b16(x, y, C, S, f0, f1, cf, stream, relu)
    if stream:
        fbn_sfence()


cdef inline void _grad_sums(const elem *dy, const elem *x, Py_ssize_t C, Py_ssize_t S,
                            Py_ssize_t f0, Py_ssize_t f1, const double *mean, double *acc, const elem *zs,
                            const floating *fcf) noexcept nogil:
    if elem is float and floating is float:
        fbn_grad_sums_f32(dy, x, C, S, f0, f1, mean, acc, zs, fcf)
    elif elem is double and floating is double:
        fbn_grad_sums_f64(dy, x, C, S, f0, f1, mean, acc, zs, fcf)
    elif elem is fbn_f16 and floating is float:
        fbn_grad_sums_h16(dy, x, C, S, f0, f1, mean, acc, zs, fcf)
    elif elem is fbn_bf16 and floating is float:
        fbn_grad_sums_b16(dy, x, C, S, f0, f1, mean, acc, zs, fcf)


cdef inline void _grad_input(const elem *dy, const elem *x, elem *dx, Py_ssize_t C, Py_ssize_t S,
                             Py_ssize_t f0, Py_ssize_t f1, const floating *cf, int stream, const elem *zs,
                             const floating *fcf, bint fixed) noexcept nogil:
    if elem is float and floating is float:
        fbn_grad_input_f32(dy, x, dx, C, S, f0, f1, cf, stream, zs, fcf, fixed)
    elif elem is double and floating is double:
        fbn_grad_input_f64(dy, x, dx, C, S, f0, f1, cf, stream, zs, fcf, fixed)
    elif elem is fbn_f16 and floating is float:
        fbn_grad_input_h16(dy, x, dx, C, S, f0, f1, cf, stream, zs, fcf, fixed)
    elif elem is fbn_bf16 and floating is float:
        fbn_grad_input_b16(dy, x, dx, C, S, f0, f1, cf, stream, zs, fcf, fixed)
    if stream:
        fbn_sfence()


# ---------------------------------------------------------------- blocks of rows of an (N, W) matrix
# The column loops take columns [0, ncols) of rows W apart (per-column coefficients in blocks W apart):
# ncols = W for the COLUMNS blocks of whole rows; a SLICES task passes its first column and width.
cdef enum:
    # one COLUMNS task's moments: [count | shift K (W) | mean - K (W) | M2 (W) | scratch (3W)]
    COL_MOMENTS = 6


cdef inline void _col_moments(const elem *x, Py_ssize_t rows, Py_ssize_t ncols, Py_ssize_t W,
                              double *th) noexcept nogil:
    # th: one share's moments, [count | shift K (ncols) | mean - K (ncols) | M2 (ncols) | scratch (3 ncols)]
    if elem is float:
        fbn_col_moments_f32(x, rows, ncols, W, th, th + 1, th + 1 + ncols, th + 1 + 2 * ncols, th + 1 + 3 * ncols)
    elif elem is double:
        fbn_col_moments_f64(x, rows, ncols, W, th, th + 1, th + 1 + ncols, th + 1 + 2 * ncols, th + 1 + 3 * ncols)
    elif elem is fbn_f16:
        fbn_col_moments_h16(x, rows, ncols, W, th, th + 1, th + 1 + ncols, th + 1 + 2 * ncols, th + 1 + 3 * ncols)
    else:
        fbn_col_moments_b16(x, rows, ncols, W, th, th + 1, th + 1 + ncols, th + 1 + 2 * ncols, th + 1 + 3 * ncols)


cdef inline void _col_affine(const elem *x, elem *y, Py_ssize_t rows, Py_ssize_t ncols, Py_ssize_t W,
                             const floating *cf, int stream, bint relu) noexcept nogil:
    if elem is float and floating is float:
        fbn_col_affine_f32(x, y, rows, ncols, W, cf, stream, relu)
    elif elem is double and floating is double:
        fbn_col_affine_f64(x, y, rows, ncols, W, cf, stream, relu)
    elif elem is fbn_f16 and floating is float:
        fbn_col_affine_h16(x, y, rows, ncols, W, cf, stream, relu)
    elif elem is fbn_bf16 and floating is float:
        fbn_col_affine_b16(x, y, rows, ncols, W, cf, stream, relu)
    if stream:
        fbn_sfence()


cdef inline void _col_grad_sums(const elem *dy, const elem *x, Py_ssize_t rows, Py_ssize_t ncols,
                                Py_ssize_t W, const double *mean, double *th, const elem *zs,
                                const floating *fcf) noexcept nogil:
    # th: one share's sums, [sum dy (ncols) | sum dy*(x-mean) (ncols)]
    if elem is float and floating is float:
        fbn_col_grad_sums_f32(dy, x, rows, ncols, W, mean, th, th + ncols, zs, fcf)
    elif elem is double and floating is double:
        fbn_col_grad_sums_f64(dy, x, rows, ncols, W, mean, th, th + ncols, zs, fcf)
    elif elem is fbn_f16 and floating is float:
        fbn_col_grad_sums_h16(dy, x, rows, ncols, W, mean, th, th + ncols, zs, fcf)
    elif elem is fbn_bf16 and floating is float:
        fbn_col_grad_sums_b16(dy, x, rows, ncols, W, mean, th, th + ncols, zs, fcf)


cdef inline void _col_grad_input(const elem *dy, const elem *x, elem *dx, Py_ssize_t rows,
                                 Py_ssize_t ncols, Py_ssize_t W, const floating *cf, int stream, const elem *zs,
                                 const floating *fcf, bint fixed) noexcept nogil:
    if elem is float and floating is float:
        fbn_col_grad_input_f32(dy, x, dx, rows, ncols, W, cf, stream, zs, fcf, fixed)
    elif elem is double and floating is double:
        fbn_col_grad_input_f64(dy, x, dx, rows, ncols, W, cf, stream, zs, fcf, fixed)
    elif elem is fbn_f16 and floating is float:
        fbn_col_grad_input_h16(dy, x, dx, rows, ncols, W, cf, stream, zs, fcf, fixed)
    elif elem is fbn_bf16 and floating is float:
        fbn_col_grad_input_b16(dy, x, dx, rows, ncols, W, cf, stream, zs, fcf, fixed)
    if stream:
        fbn_sfence()


cdef inline void _col_finish_stats(const double *th, Py_ssize_t ncols, double eps, const floating *w, const floating *b,
                                   double *mean, double *var, double *invstd, floating *cf, Py_ssize_t C) noexcept nogil:
    # th: one share's moments of ncols columns that are channels (S = 1), see _col_moments
    if floating is float:
        fbn_col_finish_stats_f32(th[0], th + 1, th + 1 + ncols, th + 1 + 2 * ncols, eps, w, b, mean, var, invstd, cf, ncols, C)
    else:
        fbn_col_finish_stats_f64(th[0], th + 1, th + 1 + ncols, th + 1 + 2 * ncols, eps, w, b, mean, var, invstd, cf, ncols, C)


cdef inline void _col_finish_grad(const double *th, Py_ssize_t ncols, double count, bint training, const floating *w,
                                  const double *mean, const double *invstd, double *gw, double *gb, floating *cf,
                                  Py_ssize_t C) noexcept nogil:
    # th: one share's [sum dy (ncols) | sum dy*(x-mean) (ncols)] of ncols columns that are channels (S = 1)
    if floating is float:
        fbn_col_finish_grad_f32(count, th, th + ncols, training, w, mean, invstd, gw, gb, cf, ncols, C)
    else:
        fbn_col_finish_grad_f64(count, th, th + ncols, training, w, mean, invstd, gw, gb, cf, ncols, C)


# ---------------------------------------------------------------- per-channel statistics and coefficients
# cf arrays hold one block of C values per coefficient: [mhi | mlo | a | b] for the forward,
# [mhi | mlo | kdy | kx | kc] for the training backward, where mhi + mlo is the float64 mean split
# into two values of the input type (mlo is 0 for float64).  The evaluation-mode backward,
# dx = dy * kdy, is the forward's affine applied to dy with [0 | 0 | kdy | 0].  The arithmetic is
# _coefs.h's, written into the blocks by _simd_impl.h's fbn_affine_coefs and fbn_grad_coefs (which
# the vector loops of the SLICES and evaluation paths use too): these pick the element type.

cdef inline void _eval_stats(const void *rm, const void *rv, double eps, double *mp, double *ip, Py_ssize_t c0,
                             Py_ssize_t c1, bint single) noexcept nogil:
    # channels c0 .. c1 - 1 of eval_stats (running buffers of float32 if single, else float64)
    if single:
        fbn_eval_stats_f32(<const float *>rm + c0, <const float *>rv + c0, eps, mp + c0, ip + c0, c1 - c0)
    else:
        fbn_eval_stats_f64(<const double *>rm + c0, <const double *>rv + c0, eps, mp + c0, ip + c0, c1 - c0)


cdef inline void _eval_coefs(const double *mean, const double *invstd, const floating *w, const floating *b,
                             floating *cf, Py_ssize_t n, Py_ssize_t C) noexcept nogil:
    # channels [0, n) of cf's blocks C apart (the pointers at the first channel)
    if floating is float:
        fbn_eval_coefs_f32(mean, invstd, w, b, cf, n, C)
    else:
        fbn_eval_coefs_f64(mean, invstd, w, b, cf, n, C)


cdef inline void _affine_coefs(Py_ssize_t c, Py_ssize_t C, double mean, double istd, const floating *w,
                               const floating *b, floating *cf) noexcept nogil:
    if floating is float:
        fbn_affine_coefs_f32(mean, istd, w[c], b[c], cf + c, C)
    else:
        fbn_affine_coefs_f64(mean, istd, w[c], b[c], cf + c, C)


cdef inline void _finish_stats(Py_ssize_t c, Py_ssize_t C, const double *acc, double eps, const floating *w,
                               const floating *b, double *mean, double *var, double *invstd,
                               floating *cf) noexcept nogil:
    # acc: the channel's merged moments (fbn_shift_merge)
    mean[c] = fbn_acc_mean(acc)
    var[c] = fbn_var(acc[<int>FBN_N], acc[<int>FBN_M2])
    invstd[c] = fbn_batch_invstd(var[c], eps)
    _affine_coefs(c, C, mean[c], invstd[c], w, b, cf)


cdef inline void _finish_grad(Py_ssize_t c, Py_ssize_t C, double sdy, double sdyx, double count, bint training,
                              const floating *w, const double *mean, const double *invstd, double *gw,
                              double *gb, floating *cf) noexcept nogil:
    if floating is float:
        fbn_grad_coefs_f32(sdy, sdyx, count, training, w[c], mean[c], invstd[c], gw + c, gb + c, cf + c, C)
    else:
        fbn_grad_coefs_f64(sdy, sdyx, count, training, w[c], mean[c], invstd[c], gw + c, gb + c, cf + c, C)
