"""fastbn's CPU kernels: OpenMP-parallel batch norm over C-contiguous (N, C, S) buffers.

Every operation is "reduce per channel, derive per-channel coefficients, apply elementwise", and
batch norm is memory-bound, so what matters is how threads walk memory.  Two ways (``path``):

RANGES   the buffer is cut into equal consecutive ranges in memory order, one per thread; each
         thread streams through its range front to back, accumulating per-channel partial sums
         (row r of S elements is channel r % C), the partials are merged in a fixed order, and
         the apply pass walks the same ranges, back to front in pieces of PIECE_BYTES so that it
         starts with what the cache still holds.  Any shape splits evenly whatever C is (C=1 and
         C=3 included).
COLUMNS  spatial size below SMALL_S, e.g. an (N, C) matrix: the buffer is an (N, C*S) matrix and
         threads take blocks of rows, reducing down the columns with vector loads across them
         (per-thread accumulators merged afterwards; the S columns of a channel merged last); the
         apply pass takes each thread's blocks in reverse order.
SLICES   the same (N, C*S) matrix when it is much wider than tall (a small batch of many features): each
         thread takes a slice of the channels, i.e. of the columns, over all the rows, and does
         everything for them alone (reduce, statistics, apply), so nothing is merged across
         threads and no thread reads what another wrote: with blocks of rows instead, on
         (16, 8192) float32 two threads took 117 us for an evaluation forward and one thread 25,
         from reading the coefficients the other thread had just written.

``unit`` (0: choose) forces the range size in elements (RANGES) or the rows per block (COLUMNS,
SLICES); tests set it small so small inputs run many ranges and blocks.  ``stream`` (-1: choose by output
size, 0 off, 1 on) switches the non-temporal stores of _simd.h.

The entry points check what memory safety needs of their arrays (see "arguments" below);
fastbn.functional validated the rest.  Statistics are accumulated in double for float32 and
float64 alike.  The GIL is released for all the work.
"""
import numpy as np
cimport numpy as cnp
from cython cimport floating
from cython.parallel cimport parallel, prange
from libc.math cimport sqrt

cnp.import_array()

# ---- build identity (issue 17): setup.py defines FASTBN_BUILD_FLAGS for every extension; `fastbn info`
# prints this module's next to _openmp's and warns when they differ (a mixed build).
cdef extern from *:
    """
    #ifndef FASTBN_BUILD_FLAGS
    #define FASTBN_BUILD_FLAGS "unknown (built without fastbn's setup.py)"
    #endif
    static const char *fastbn_kernels_build_flags = FASTBN_BUILD_FLAGS;
    """
    const char *fastbn_kernels_build_flags
BUILD_FLAGS = fastbn_kernels_build_flags.decode()
# ---- end of build identity

cdef extern from "_simd.h" nogil:
    void fbn_sfence()
    void fbn_shift_merge(double *acc, double nb, double kb, double rb, double m2b)
    double fbn_acc_mean(const double *acc)
    enum: FBN_N, FBN_K, FBN_REL, FBN_M2, FBN_ACC
    # ranges [f0, f1) of an (N, C, S) buffer in memory order
    void fbn_moments_f32(const float *x, Py_ssize_t C, Py_ssize_t S, Py_ssize_t f0, Py_ssize_t f1, double *acc)
    void fbn_moments_f64(const double *x, Py_ssize_t C, Py_ssize_t S, Py_ssize_t f0, Py_ssize_t f1, double *acc)
    void fbn_affine_f32(const float *x, float *y, Py_ssize_t C, Py_ssize_t S, Py_ssize_t f0, Py_ssize_t f1, const float *cf, int nt)
    void fbn_affine_f64(const double *x, double *y, Py_ssize_t C, Py_ssize_t S, Py_ssize_t f0, Py_ssize_t f1, const double *cf, int nt)
    void fbn_grad_sums_f32(const float *dy, const float *x, Py_ssize_t C, Py_ssize_t S, Py_ssize_t f0, Py_ssize_t f1, const double *mean, double *acc)
    void fbn_grad_sums_f64(const double *dy, const double *x, Py_ssize_t C, Py_ssize_t S, Py_ssize_t f0, Py_ssize_t f1, const double *mean, double *acc)
    void fbn_grad_input_f32(const float *dy, const float *x, float *dx, Py_ssize_t C, Py_ssize_t S, Py_ssize_t f0, Py_ssize_t f1, const float *cf, int nt)
    void fbn_grad_input_f64(const double *dy, const double *x, double *dx, Py_ssize_t C, Py_ssize_t S, Py_ssize_t f0, Py_ssize_t f1, const double *cf, int nt)
    # blocks of rows of an (N, W) matrix
    void fbn_col_moments_f32(const float *x, Py_ssize_t rows, Py_ssize_t w, Py_ssize_t W, double *n, double *K, double *rel, double *m2, double *tmp)
    void fbn_col_moments_f64(const double *x, Py_ssize_t rows, Py_ssize_t w, Py_ssize_t W, double *n, double *K, double *rel, double *m2, double *tmp)
    void fbn_col_affine_f32(const float *x, float *y, Py_ssize_t rows, Py_ssize_t w, Py_ssize_t W, const float *cf, int nt)
    void fbn_col_affine_f64(const double *x, double *y, Py_ssize_t rows, Py_ssize_t w, Py_ssize_t W, const double *cf, int nt)
    void fbn_col_grad_sums_f32(const float *dy, const float *x, Py_ssize_t rows, Py_ssize_t w, Py_ssize_t W, const double *mean, double *sdy, double *sdyx)
    void fbn_col_grad_sums_f64(const double *dy, const double *x, Py_ssize_t rows, Py_ssize_t w, Py_ssize_t W, const double *mean, double *sdy, double *sdyx)
    void fbn_col_grad_input_f32(const float *dy, const float *x, float *dx, Py_ssize_t rows, Py_ssize_t w, Py_ssize_t W, const float *cf, int nt)
    void fbn_col_grad_input_f64(const double *dy, const double *x, double *dx, Py_ssize_t rows, Py_ssize_t w, Py_ssize_t W, const double *cf, int nt)
    # the low part of a split mean, and evaluation mode's statistics and coefficients
    float fbn_mean_lo_f32(double m, float hi)
    double fbn_mean_lo_f64(double m, double hi)
    void fbn_eval_stats_f32(const float *rm, const float *rv, double eps, double *mean, double *invstd, Py_ssize_t C)
    void fbn_eval_stats_f64(const double *rm, const double *rv, double eps, double *mean, double *invstd, Py_ssize_t C)
    void fbn_eval_coefs_f32(const double *mean, const double *invstd, const float *w, const float *b, float *cf, Py_ssize_t n, Py_ssize_t C)
    void fbn_eval_coefs_f64(const double *mean, const double *invstd, const double *w, const double *b, double *cf, Py_ssize_t n, Py_ssize_t C)
    void fbn_col_finish_stats_f32(double count, const double *K, const double *rel, const double *m2, double eps, const float *w, const float *b, double *mean, double *var, double *invstd, float *cf, Py_ssize_t n, Py_ssize_t C)
    void fbn_col_finish_stats_f64(double count, const double *K, const double *rel, const double *m2, double eps, const double *w, const double *b, double *mean, double *var, double *invstd, double *cf, Py_ssize_t n, Py_ssize_t C)
    void fbn_col_finish_grad_f32(double count, const double *sdy, const double *sdyx, int training, const float *w, const double *mean, const double *invstd, double *gw, double *gb, float *cf, Py_ssize_t n, Py_ssize_t C)
    void fbn_col_finish_grad_f64(double count, const double *sdy, const double *sdyx, int training, const double *w, const double *mean, const double *invstd, double *gw, double *gb, double *cf, Py_ssize_t n, Py_ssize_t C)
    # the benchmark's floor
    double fbn_traffic_f32(const float *a, const float *b, float *y, Py_ssize_t n, int nt)
    double fbn_traffic_f64(const double *a, const double *b, double *y, Py_ssize_t n, int nt)

cdef enum:
    AUTO = 0
    RANGES = 1
    COLUMNS = 2
    SLICES = 3
PATHS = {"auto": AUTO, "ranges": RANGES, "columns": COLUMNS, "slices": SLICES}

cdef enum:
    # Below this many elements per thread, another thread costs more than it saves.
    MIN_PER_THREAD = 16384
    # Spatial sizes below this take the COLUMNS path (rows that short would each cost a call) ...
    SMALL_S = 32
    # ... as blocks of rows (COLUMNS), unless the matrix is wider than this many columns (per-thread
    # accumulators get large) or more than SLICE_RATIO times as wide as it is tall: then in SLICES.
    # Measured at kernel level on 2 threads, float32 (N, W), blocks of rows -> SLICES: (8, 16384)
    # train forward 180 -> 51 us, eval 55 -> 20, backward 159 -> 58; (32, 4096) 64 -> 36, 27 -> 20,
    # 65 -> 39; at W = 32 N about even; below it SLICES loses, most in eval, e.g. (64, 1024) eval
    # 9 -> 19 us, (128, 1024) 13 -> 40 (two threads writing the two halves of every 4 KiB row).
    MAX_COLUMNS = 1 << 16
    SLICE_RATIO = 32
    # Channels per thread, at least, for eval_stats' square roots to be shared between threads.
    EVAL_STATS_SHARE = 4096
    # Elements per COLUMNS row block (~512 KiB of float32: still in L2 for the first block's
    # second pass; larger blocks mean fewer merges).
    COLUMN_BLOCK = 131072

# A call whose arrays (inputs and output) take more than this (1.5x this machine's 32 MiB L3)
# writes its output with streaming stores: it would not stay in cache anyway, and skipping the
# read-for-ownership saves a pass over memory.  Below it, normal stores keep the output in L3 for
# whoever reads it next (measured: eval (32, 3, 224, 224) 0.56x copy with, 0.91x without).
cdef Py_ssize_t STREAM_BYTES = 48 * 1024 * 1024

# A two-pass operation (training forward, backward) makes its second pass over each thread's share
# from the share's end back to its start, in pieces of about this many bytes (each piece front to
# back).  The first pass went front to back, so the cache (L2, then L3) holds the end of the share:
# walking back meets those bytes first, while front to back would start with bytes long evicted and
# push out the cached ones before reaching them.  See "two passes" in bench/RESULTS.md.
cdef Py_ssize_t PIECE_BYTES = 512 * 1024


# ---------------------------------------------------------------- planning
cdef int _plan_threads(int n_threads, Py_ssize_t total) noexcept nogil:
    return <int>max(1, min(<Py_ssize_t>n_threads, total // MIN_PER_THREAD))


cdef int _plan_path(Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, int path) noexcept nogil:
    if path == SLICES and S > SLICE_CHUNK:  # a channel must fit a SLICES chunk (only when forced)
        return COLUMNS
    if path != AUTO:
        return path
    if S >= SMALL_S:
        return RANGES
    if C * S > MAX_COLUMNS or C * S > SLICE_RATIO * N:
        return SLICES
    return COLUMNS


cdef int _plan_stream(Py_ssize_t touched_bytes, int stream) noexcept nogil:
    """Streaming stores when the call's arrays (inputs and output) overflow the cache."""
    return stream if stream >= 0 else touched_bytes > STREAM_BYTES


cdef Py_ssize_t _plan_ranges(Py_ssize_t L, int T, Py_ssize_t unit) noexcept nogil:
    """How many ranges RANGES cuts L elements into: one per thread, or L / unit when forced."""
    return T if unit <= 0 else max(<Py_ssize_t>1, (L + unit - 1) // unit)


cdef Py_ssize_t _plan_rows(Py_ssize_t N, Py_ssize_t W, int T, Py_ssize_t unit) noexcept nogil:
    """Rows per COLUMNS block: COLUMN_BLOCK elements, but no more than a T-th of the N rows, so that
    a matrix of fewer blocks than threads still splits across all T (W = 0, no channels: any)."""
    if unit > 0:
        return unit
    return max(<Py_ssize_t>1, min(COLUMN_BLOCK // max(W, <Py_ssize_t>1), (N + T - 1) // T))


cdef Py_ssize_t _slice_start(Py_ssize_t C, Py_ssize_t S, int T, int k) noexcept nogil:
    """First channel of SLICES thread k's share of the C channels: equal shares; with S = 1, inner
    boundaries on multiples of 16 channels (64 bytes of float32), so that neighbouring threads share
    at most one cache line per row (none where rows start on a line).  Channels of S > 1 columns are
    split evenly as they are: rounding there cost balance ((34, 31) went 32 / 2)."""
    if k >= T:
        return C
    if S > 1:
        return (C * k) // T
    return min(C, ((C * k) // T + 15) & ~(<Py_ssize_t>15))


cdef inline Py_ssize_t _slice_rows(Py_ssize_t w, Py_ssize_t unit) noexcept nogil:
    """Rows per block of a SLICES thread's w columns: COLUMN_BLOCK elements, at least 8 rows."""
    return unit if unit > 0 else max(<Py_ssize_t>8, COLUMN_BLOCK // max(w, <Py_ssize_t>1))


cdef inline Py_ssize_t _share(Py_ssize_t n, Py_ssize_t K, Py_ssize_t k) noexcept nogil:
    """Start of share k of n COLUMNS blocks over K threads, dealt as OpenMP's static schedule would."""
    return k * (n // K) + min(k, n % K)


cdef inline Py_ssize_t _piece_start(Py_ssize_t f0, Py_ssize_t e, Py_ssize_t piece) noexcept nogil:
    """Start of the last piece of [f0, e) in a backwards walk: about ``piece`` elements before e, on
    a multiple of 16 elements."""
    return max(f0, (e - piece) & ~(<Py_ssize_t>15))


cdef inline Py_ssize_t _split(Py_ssize_t L, Py_ssize_t K, Py_ssize_t k) noexcept nogil:
    """Start of range k of K over L elements: equal shares, inner boundaries on multiples of 16
    elements (64 bytes of float32), so that neighbouring threads do not write the same line."""
    if k >= K:
        return L
    return min(L, ((L * k) // K + 15) & ~(<Py_ssize_t>15))


# ---------------------------------------------------------------- fused-type dispatch
cdef inline void _moments(const floating *x, Py_ssize_t C, Py_ssize_t S, Py_ssize_t f0, Py_ssize_t f1,
                          double *acc) noexcept nogil:
    if floating is float:
        fbn_moments_f32(x, C, S, f0, f1, acc)
    else:
        fbn_moments_f64(x, C, S, f0, f1, acc)


cdef inline void _affine(const floating *x, floating *y, Py_ssize_t C, Py_ssize_t S, Py_ssize_t f0,
                         Py_ssize_t f1, const floating *cf, int nt) noexcept nogil:
    if floating is float:
        fbn_affine_f32(x, y, C, S, f0, f1, cf, nt)
    else:
        fbn_affine_f64(x, y, C, S, f0, f1, cf, nt)
    if nt:
        fbn_sfence()


cdef void _affine_backwards(const floating *x, floating *y, Py_ssize_t C, Py_ssize_t S, Py_ssize_t f0,
                            Py_ssize_t f1, const floating *cf, int nt) noexcept nogil:
    """_affine over [f0, f1) piece by piece, last piece first (PIECE_BYTES)."""
    cdef Py_ssize_t s, piece = PIECE_BYTES // sizeof(floating)
    while f1 > f0:
        s = _piece_start(f0, f1, piece)
        _affine(x, y, C, S, s, f1, cf, nt)
        f1 = s


cdef inline void _grad_sums(const floating *dy, const floating *x, Py_ssize_t C, Py_ssize_t S,
                            Py_ssize_t f0, Py_ssize_t f1, const double *mean, double *acc) noexcept nogil:
    if floating is float:
        fbn_grad_sums_f32(dy, x, C, S, f0, f1, mean, acc)
    else:
        fbn_grad_sums_f64(dy, x, C, S, f0, f1, mean, acc)


cdef inline void _grad_input(const floating *dy, const floating *x, floating *dx, Py_ssize_t C, Py_ssize_t S,
                             Py_ssize_t f0, Py_ssize_t f1, const floating *cf, int nt) noexcept nogil:
    if floating is float:
        fbn_grad_input_f32(dy, x, dx, C, S, f0, f1, cf, nt)
    else:
        fbn_grad_input_f64(dy, x, dx, C, S, f0, f1, cf, nt)
    if nt:
        fbn_sfence()


cdef void _grad_input_backwards(const floating *dy, const floating *x, floating *dx, Py_ssize_t C,
                                Py_ssize_t S, Py_ssize_t f0, Py_ssize_t f1, const floating *cf, int nt) noexcept nogil:
    """_grad_input over [f0, f1) piece by piece, last piece first (PIECE_BYTES)."""
    cdef Py_ssize_t s, piece = PIECE_BYTES // sizeof(floating)
    while f1 > f0:
        s = _piece_start(f0, f1, piece)
        _grad_input(dy, x, dx, C, S, s, f1, cf, nt)
        f1 = s


cdef enum:
    # one COLUMNS thread's moments: [count | shift K (W) | mean - K (W) | M2 (W) | scratch (3W)]
    COL_MOMENTS = 6

# The column loops take columns [0, w) of rows W apart (per-column coefficients in blocks W apart):
# w = W for the COLUMNS blocks of whole rows; a SLICES thread passes its first column and width.
cdef inline void _col_moments(const floating *x, Py_ssize_t rows, Py_ssize_t w, Py_ssize_t W,
                              double *th) noexcept nogil:
    # th: one share's moments, [count | shift K (w) | mean - K (w) | M2 (w) | scratch (3w)]
    if floating is float:
        fbn_col_moments_f32(x, rows, w, W, th, th + 1, th + 1 + w, th + 1 + 2 * w, th + 1 + 3 * w)
    else:
        fbn_col_moments_f64(x, rows, w, W, th, th + 1, th + 1 + w, th + 1 + 2 * w, th + 1 + 3 * w)


cdef inline void _col_affine(const floating *x, floating *y, Py_ssize_t rows, Py_ssize_t w, Py_ssize_t W,
                             const floating *cf, int nt) noexcept nogil:
    if floating is float:
        fbn_col_affine_f32(x, y, rows, w, W, cf, nt)
    else:
        fbn_col_affine_f64(x, y, rows, w, W, cf, nt)
    if nt:
        fbn_sfence()


cdef inline void _col_grad_sums(const floating *dy, const floating *x, Py_ssize_t rows, Py_ssize_t w,
                                Py_ssize_t W, const double *mean, double *th) noexcept nogil:
    # th: one share's sums, [sum dy (w) | sum dy*(x-mean) (w)]
    if floating is float:
        fbn_col_grad_sums_f32(dy, x, rows, w, W, mean, th, th + w)
    else:
        fbn_col_grad_sums_f64(dy, x, rows, w, W, mean, th, th + w)


cdef inline void _col_grad_input(const floating *dy, const floating *x, floating *dx, Py_ssize_t rows,
                                 Py_ssize_t w, Py_ssize_t W, const floating *cf, int nt) noexcept nogil:
    if floating is float:
        fbn_col_grad_input_f32(dy, x, dx, rows, w, W, cf, nt)
    else:
        fbn_col_grad_input_f64(dy, x, dx, rows, w, W, cf, nt)
    if nt:
        fbn_sfence()


cdef inline void _eval_coefs(const double *mean, const double *invstd, const floating *w, const floating *b,
                             floating *cf, Py_ssize_t n, Py_ssize_t C) noexcept nogil:
    # channels [0, n) of cf's blocks C apart (the pointers at the first channel)
    if floating is float:
        fbn_eval_coefs_f32(mean, invstd, w, b, cf, n, C)
    else:
        fbn_eval_coefs_f64(mean, invstd, w, b, cf, n, C)


cdef inline void _col_finish_stats(const double *th, Py_ssize_t w, double eps, const floating *wt, const floating *b,
                                   double *mean, double *var, double *invstd, floating *cf, Py_ssize_t C) noexcept nogil:
    # th: one share's moments of w columns that are channels (S = 1), see _col_moments
    if floating is float:
        fbn_col_finish_stats_f32(th[0], th + 1, th + 1 + w, th + 1 + 2 * w, eps, wt, b, mean, var, invstd, cf, w, C)
    else:
        fbn_col_finish_stats_f64(th[0], th + 1, th + 1 + w, th + 1 + 2 * w, eps, wt, b, mean, var, invstd, cf, w, C)


cdef inline void _col_finish_grad(const double *th, Py_ssize_t w, double count, bint training, const floating *wt,
                                  const double *mean, const double *invstd, double *gw, double *gb, floating *cf,
                                  Py_ssize_t C) noexcept nogil:
    # th: one share's [sum dy (w) | sum dy*(x-mean) (w)] of w columns that are channels (S = 1)
    if floating is float:
        fbn_col_finish_grad_f32(count, th, th + w, training, wt, mean, invstd, gw, gb, cf, w, C)
    else:
        fbn_col_finish_grad_f64(count, th, th + w, training, wt, mean, invstd, gw, gb, cf, w, C)


# ---------------------------------------------------------------- per-channel coefficients
# cf arrays hold one block of C values per coefficient: [mhi | mlo | a | b] for the forward,
# [mhi | mlo | kdy | kx | kc] for the training backward, where mhi + mlo is the float64 mean split
# into two values of the input type (mlo is 0 for float64).  The evaluation-mode backward,
# dx = dy * kdy, is the forward's affine applied to dy with [0 | 0 | kdy | 0]: it must not touch
# x or the mean, or a NaN there would turn dx into NaN (x * 0 is NaN), where PyTorch's is finite.

cdef inline void _mean_coefs(Py_ssize_t c, Py_ssize_t C, double mean, floating *cf) noexcept nogil:
    cf[c] = <floating>mean
    if floating is float:
        cf[C + c] = fbn_mean_lo_f32(mean, cf[c])
    else:
        cf[C + c] = fbn_mean_lo_f64(mean, cf[c])


cdef inline void _affine_coefs(Py_ssize_t c, Py_ssize_t C, double mean, double istd, const floating *w,
                               const floating *b, floating *cf) noexcept nogil:
    _mean_coefs(c, C, mean, cf)
    cf[2 * C + c] = <floating>(<double>w[c] * istd)
    cf[3 * C + c] = b[c]


cdef inline void _finish_stats(Py_ssize_t c, Py_ssize_t C, const double *acc, double eps, const floating *w,
                               const floating *b, double *mean, double *var, double *invstd,
                               floating *cf) noexcept nogil:
    # acc: the channel's merged moments (fbn_shift_merge)
    cdef double v = acc[<int>FBN_M2] / acc[<int>FBN_N]
    mean[c] = fbn_acc_mean(acc)
    var[c] = v
    invstd[c] = 1.0 / sqrt(v + eps)
    _affine_coefs(c, C, mean[c], invstd[c], w, b, cf)


cdef inline void _finish_grad(Py_ssize_t c, Py_ssize_t C, double sdy, double sdyx, double count, bint training,
                              const floating *w, const double *mean, const double *invstd, double *gw,
                              double *gb, floating *cf) noexcept nogil:
    cdef double istd = invstd[c], k = <double>w[c] * istd
    gb[c] = sdy
    gw[c] = sdyx * istd
    cf[2 * C + c] = <floating>k
    if training:
        _mean_coefs(c, C, mean[c], cf)
        cf[3 * C + c] = <floating>(-k * istd * istd * sdyx / count)
        cf[4 * C + c] = <floating>(-k * sdy / count)
    else:  # the affine's [0 | 0 | kdy | 0]
        cf[c] = 0
        cf[C + c] = 0
        cf[3 * C + c] = 0
        cf[4 * C + c] = 0


cdef inline object _columns_coefs(object coef, Py_ssize_t S, int typenum):
    """The per-column coefficients of the COLUMNS path: the per-channel ones (blocks of C) themselves
    when S = 1, an (N, C) matrix with the same layout; else a new array of blocks of C*S."""
    return coef if S == 1 else _new(cnp.PyArray_SIZE(<cnp.ndarray>coef) * S, typenum, False)


cdef inline void _expand(const floating *cf, Py_ssize_t C, Py_ssize_t S, Py_ssize_t ncoef, Py_ssize_t c,
                         floating *cfw) noexcept nogil:
    """Channel c's coefficients (ncoef blocks of C) copied to its S columns of the per-column
    ones (ncoef blocks of C*S), for the COLUMNS path.  With S = 1 the two are one array (see
    _columns_coefs), and there is nothing to copy."""
    cdef Py_ssize_t i, s, W = C * S
    if cfw == cf:
        return
    for i in range(ncoef):
        for s in range(S):
            cfw[i * W + c * S + s] = cf[i * C + c]


# ---------------------------------------------------------------- merging the partials of one channel
# Each runs inside the parallel region, one channel per iteration, between the reduce and the
# apply loops (so a whole call is one fork/join of the thread team).

cdef void _merge_range_stats(Py_ssize_t c, Py_ssize_t C, Py_ssize_t K, const double *pp, double eps,
                             const floating *w, const floating *b, double *mean, double *var,
                             double *invstd, floating *cf) noexcept nogil:
    # pp: K ranges x C channels x FBN_ACC moments, merged in range order
    cdef double acc[4]
    cdef const double *r
    cdef Py_ssize_t k
    acc[0] = acc[1] = acc[2] = acc[3] = 0
    for k in range(K):
        r = pp + (k * C + c) * FBN_ACC
        fbn_shift_merge(acc, r[<int>FBN_N], r[<int>FBN_K], r[<int>FBN_REL], r[<int>FBN_M2])
    _finish_stats(c, C, acc, eps, w, b, mean, var, invstd, cf)


cdef void _merge_column_stats(Py_ssize_t c, Py_ssize_t C, Py_ssize_t S, int T, const double *pp, Py_ssize_t w,
                              Py_ssize_t col0, double eps, const floating *wt, const floating *b, double *mean,
                              double *var, double *invstd, floating *cf, floating *cfw) noexcept nogil:
    # pp: T shares of COL_MOMENTS * w + 1 (see _col_moments) over columns col0 .. col0 + w - 1 (all
    # W columns for COLUMNS, a thread's own for SLICES); channel c owns columns c*S .. c*S+S-1
    cdef double acc[4]
    cdef Py_ssize_t t, s, j, col
    acc[0] = acc[1] = acc[2] = acc[3] = 0
    for t in range(T):
        j = t * (COL_MOMENTS * w + 1)
        for s in range(S):
            col = j + 1 + c * S + s - col0
            fbn_shift_merge(acc, pp[j], pp[col], pp[col + w], pp[col + 2 * w])
    _finish_stats(c, C, acc, eps, wt, b, mean, var, invstd, cf)
    _expand(cf, C, S, 4, c, cfw)


cdef void _merge_range_grad(Py_ssize_t c, Py_ssize_t C, Py_ssize_t K, const double *pp, double count, bint training,
                            const floating *w, const double *mean, const double *invstd, double *gw, double *gb,
                            floating *cf) noexcept nogil:
    # pp: K ranges x C channels x (sum dy, sum dy*(x-mean))
    cdef double sdy = 0, sdyx = 0
    cdef Py_ssize_t k
    for k in range(K):
        sdy += pp[(k * C + c) * 2]
        sdyx += pp[(k * C + c) * 2 + 1]
    _finish_grad(c, C, sdy, sdyx, count, training, w, mean, invstd, gw, gb, cf)


cdef void _merge_column_grad(Py_ssize_t c, Py_ssize_t C, Py_ssize_t S, int T, const double *pp, Py_ssize_t w,
                             Py_ssize_t col0, double count, bint training, const floating *wt, const double *mean,
                             const double *invstd, double *gw, double *gb, floating *cf, floating *cfw) noexcept nogil:
    # pp: T shares of [sum dy (w) | sum dy*(x-mean) (w)] over columns col0 .. col0 + w - 1
    cdef double sdy = 0, sdyx = 0
    cdef Py_ssize_t t, s, col
    for t in range(T):
        for s in range(S):
            col = t * 2 * w + c * S + s - col0
            sdy += pp[col]
            sdyx += pp[col + w]
    _finish_grad(c, C, sdy, sdyx, count, training, wt, mean, invstd, gw, gb, cf)
    _expand(cf, C, S, 5, c, cfw)


# ---------------------------------------------------------------- SLICES: one thread's columns
# Thread k of T takes channels _slice_start(k) .. _slice_start(k + 1) and does the whole operation for
# them alone, SLICE_CHUNK columns (whole channels) at a time: reduce over all the rows in blocks front
# to back, the chunk's statistics and coefficients, apply in blocks back to front (see "two passes";
# a chunk of a small batch is still in L1/L2 for the apply).  Its scratch is its own share of one
# array per call, SLICE_SCRATCH doubles a thread (on the stack it took 49 KiB, which crashed threads
# given small stacks on purpose: threading.stack_size(48 KiB), OMP_STACKSIZE=56K).

cdef enum:
    SLICE_CHUNK = 1024  # columns; spatial sizes up to this (auto takes SLICES below SMALL_S)
    # doubles a thread: a training chunk's moments (the count, then 6 per column), a backward's sums and
    # column means (3 per column); rounded up to whole 64-byte lines
    SLICE_SCRATCH = COL_MOMENTS * SLICE_CHUNK + 8


cdef struct _Chunk:  # channels c0 .. end - 1 of a slice: columns col0 .. col0 + w - 1, nb blocks of R rows
    Py_ssize_t end, col0, w, R, nb


cdef inline _Chunk _slice_chunk(Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t N, Py_ssize_t S,
                                Py_ssize_t unit) noexcept nogil:
    """The chunk of a slice's channels c0 .. c1 - 1 that starts at c0."""
    cdef _Chunk ch
    ch.end = min(c1, c0 + max(<Py_ssize_t>1, SLICE_CHUNK // S))
    ch.col0 = c0 * S
    ch.w = (ch.end - c0) * S
    ch.R = _slice_rows(ch.w, unit)
    ch.nb = (N + ch.R - 1) // ch.R
    return ch


cdef void _slice_train(int k, int T, const floating *xp, floating *yp, const floating *wp, const floating *bp,
                       double eps, double *mp, double *vp, double *ip, floating *cf, floating *cw, double *scratch,
                       Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, Py_ssize_t unit, int nt) noexcept nogil:
    cdef double *th = scratch + k * SLICE_SCRATCH  # [count | K | rel | M2 | scratch], see _col_moments
    cdef Py_ssize_t W = C * S, c0 = _slice_start(C, S, T, k), c1 = _slice_start(C, S, T, k + 1), j, c, o
    cdef _Chunk ch
    while c0 < c1:
        ch = _slice_chunk(c0, c1, N, S, unit)
        th[0] = 0
        for j in range(ch.nb):
            o = j * ch.R * W + ch.col0
            _col_moments(xp + o, min(ch.R, N - j * ch.R), ch.w, W, th)
        if S == 1:
            _col_finish_stats(th, ch.w, eps, wp + c0, bp + c0, mp + c0, vp + c0, ip + c0, cf + c0, C)
        else:
            for c in range(c0, ch.end):
                _merge_column_stats(c, C, S, 1, th, ch.w, ch.col0, eps, wp, bp, mp, vp, ip, cf, cw)
        for j in range(ch.nb - 1, -1, -1):
            o = j * ch.R * W + ch.col0
            _col_affine(xp + o, yp + o, min(ch.R, N - j * ch.R), ch.w, W, cw + ch.col0, nt)
        c0 = ch.end


cdef void _slice_eval(int k, int T, const floating *xp, floating *yp, const floating *wp, const floating *bp,
                      double *mp, double *ip, const void *rm, const void *rv, double eps, bint rsingle, floating *cf,
                      floating *cw, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, Py_ssize_t unit, int nt) noexcept nogil:
    # rm != NULL: first mp, ip of the slice's channels from the running buffers (see _forward_eval)
    cdef Py_ssize_t W = C * S, c0 = _slice_start(C, S, T, k), c1 = _slice_start(C, S, T, k + 1)
    cdef Py_ssize_t col0 = c0 * S, w = (c1 - c0) * S, R = _slice_rows(w, unit), nb = (N + R - 1) // R, j, c
    if w == 0:
        return
    if rm != NULL:
        _eval_stats(rm, rv, eps, mp, ip, c0, c1, rsingle)
    _eval_coefs(mp + c0, ip + c0, wp + c0, bp + c0, cf + c0, c1 - c0, C)
    for c in range(c0, c1):
        _expand(cf, C, S, 4, c, cw)
    for j in range(nb):
        _col_affine(xp + j * R * W + col0, yp + j * R * W + col0, min(R, N - j * R), w, W, cw + col0, nt)


cdef void _slice_backward(int k, int T, const floating *gp, const floating *xp, floating *dp, const floating *wp,
                          const double *mp, const double *ip, bint training, double *gwp, double *gbp,
                          floating *cf, floating *cw, double *scratch, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                          Py_ssize_t unit, int nt) noexcept nogil:
    cdef double *th = scratch + k * SLICE_SCRATCH  # [sum dy (w) | sum dy*(x-mean) (w)]
    cdef double *wm = th + 2 * SLICE_CHUNK  # each column's channel mean
    cdef const double *m
    cdef Py_ssize_t W = C * S, c0 = _slice_start(C, S, T, k), c1 = _slice_start(C, S, T, k + 1), j, c, o
    cdef _Chunk ch
    while c0 < c1:
        ch = _slice_chunk(c0, c1, N, S, unit)
        for j in range(2 * ch.w):
            th[j] = 0
        m = mp + c0  # one column per channel: the channel means themselves
        if S > 1:
            for j in range(ch.w):
                wm[j] = mp[c0 + j // S]
            m = wm
        for j in range(ch.nb):
            o = j * ch.R * W + ch.col0
            _col_grad_sums(gp + o, xp + o, min(ch.R, N - j * ch.R), ch.w, W, m, th)
        if S == 1:
            _col_finish_grad(th, ch.w, <double>N, training, wp + c0, mp + c0, ip + c0, gwp + c0, gbp + c0, cf + c0, C)
        else:
            for c in range(c0, ch.end):
                _merge_column_grad(c, C, S, 1, th, ch.w, ch.col0, <double>(N * S), training, wp, mp, ip, gwp, gbp,
                                   cf, cw)
        for j in range(ch.nb - 1, -1, -1):
            o = j * ch.R * W + ch.col0
            if training:
                _col_grad_input(gp + o, xp + o, dp + o, min(ch.R, N - j * ch.R), ch.w, W, cw + ch.col0, nt)
            else:
                _col_affine(gp + o, dp + o, min(ch.R, N - j * ch.R), ch.w, W, cw + ch.col0, nt)
        c0 = ch.end


# ---------------------------------------------------------------- arguments
# The entry points below take NumPy arrays and check, cheaply, what memory safety needs: element
# type, native byte order, alignment, C order, element count, and writability for outputs.  Typed
# memoryviews check the same but cost about 1 us per call for six arguments, which showed in the
# per-call time of small inputs; fastbn.functional has validated everything else.

cdef int _float_type(object a, int ndim, str name) except -1:
    """NPY_FLOAT or NPY_DOUBLE: the element type of ``a``, which must be a float32 or float64
    numpy array of ``ndim`` dimensions (the (N, C, S) input, or a (C,) running buffer)."""
    if not cnp.PyArray_Check(a) or cnp.PyArray_NDIM(<cnp.ndarray>a) != ndim:
        raise TypeError(f"{name} must be a {ndim}-D numpy array, got {type(a).__name__} of shape {getattr(a, 'shape', None)}")
    cdef int t = cnp.PyArray_TYPE(<cnp.ndarray>a)
    if t != cnp.NPY_FLOAT and t != cnp.NPY_DOUBLE:
        raise TypeError(f"{name} must be float32 or float64, got {a.dtype}")
    return t


cdef void *_data(object a, int typenum, Py_ssize_t n, bint out, str name) except NULL:
    """The buffer of ``a``: an aligned, native-order, C-contiguous numpy array of ``n`` elements
    of ``typenum`` (writable if ``out``); anything else raises instead of becoming a wild pointer."""
    cdef cnp.ndarray arr
    if not cnp.PyArray_Check(a):
        raise TypeError(f"{name} must be a numpy array, got {type(a).__name__}")
    arr = <cnp.ndarray>a
    if (cnp.PyArray_TYPE(arr) != typenum or cnp.PyArray_SIZE(arr) != n or not cnp.PyArray_ISNOTSWAPPED(arr)
            or not cnp.PyArray_CHKFLAGS(arr, cnp.NPY_ARRAY_CARRAY if out else cnp.NPY_ARRAY_CARRAY_RO)):
        want = "float32" if typenum == cnp.NPY_FLOAT else "float64"
        raise ValueError(f"{name} must be an aligned, C-contiguous, native-order{', writable' if out else ''} "
                         f"{want} array of {n} elements, got {a.dtype} of shape {a.shape}")
    return cnp.PyArray_DATA(arr)


cdef inline object _new(Py_ssize_t n, int typenum, bint zero):
    """A new 1-D array of n elements (zeros, or uninitialized) for a kernel's scratch."""
    cdef cnp.npy_intp d = n
    return cnp.PyArray_ZEROS(1, &d, typenum, 0) if zero else cnp.PyArray_EMPTY(1, &d, typenum, 0)


cdef inline void *_ptr(object a) noexcept:
    return cnp.PyArray_DATA(<cnp.ndarray>a)


# ---------------------------------------------------------------- forward, training mode
def forward_train(x, y, weight, bias, double eps, mean, var, invstd,
                  int n_threads, int path=AUTO, Py_ssize_t unit=0, int stream=-1):
    """Batch statistics and the fused normalize + affine.

    x: (N, C, S) float32 or float64; y: its output, the same size and dtype (may be x itself);
    weight, bias: (C,) of x's dtype; mean, var (biased), invstd: (C,) float64 outputs."""
    cdef int t = _float_type(x, 3, "x")
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], S = x.shape[2], L = N * C * S
    cdef void *xp = _data(x, t, L, False, "x")
    cdef void *yp = _data(y, t, L, True, "y")
    cdef void *wp = _data(weight, t, C, False, "weight")
    cdef void *bp = _data(bias, t, C, False, "bias")
    cdef double *mp = <double *>_data(mean, cnp.NPY_DOUBLE, C, True, "mean")
    cdef double *vp = <double *>_data(var, cnp.NPY_DOUBLE, C, True, "var")
    cdef double *ip = <double *>_data(invstd, cnp.NPY_DOUBLE, C, True, "invstd")
    if t == cnp.NPY_FLOAT:
        _forward_train(<float>0, xp, yp, wp, bp, eps, mp, vp, ip, N, C, S, n_threads, path, unit, stream)
    else:
        _forward_train(<double>0, xp, yp, wp, bp, eps, mp, vp, ip, N, C, S, n_threads, path, unit, stream)


cdef int _forward_train(floating tag, void *xv, void *yv, void *wv, void *bv, double eps, double *mp, double *vp,
                        double *ip, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, int n_threads, int path,
                        Py_ssize_t unit, int stream) except -1:
    cdef Py_ssize_t L = N * C * S, W = C * S
    cdef int tn = cnp.NPY_FLOAT if floating is float else cnp.NPY_DOUBLE
    cdef int T = _plan_threads(n_threads, L)
    cdef int nt = _plan_stream(2 * L * sizeof(floating), stream)
    cdef const floating *xp = <const floating *>xv
    cdef floating *yp = <floating *>yv
    cdef const floating *wp = <const floating *>wv
    cdef const floating *bp = <const floating *>bv
    cdef object coef = _new(4 * C, tn, False), part, wide
    cdef floating *cf = <floating *>_ptr(coef)
    cdef floating *cw
    cdef double *pp
    cdef Py_ssize_t K, k, c, R, nb, j
    cdef int how = _plan_path(N, C, S, path)

    if how == RANGES:
        K = _plan_ranges(L, T, unit)
        part = _new(K * FBN_ACC * C, cnp.NPY_DOUBLE, True)  # per range: moments per channel (fbn_shift_merge)
        pp = <double *>_ptr(part)
        with nogil, parallel(num_threads=T):
            for k in prange(K, schedule="static"):
                _moments(xp, C, S, _split(L, K, k), _split(L, K, k + 1), pp + k * FBN_ACC * C)
            for c in prange(C, schedule="static"):
                _merge_range_stats(c, C, K, pp, eps, wp, bp, mp, vp, ip, cf)
            for k in prange(K, schedule="static"):  # the same thread per k as above; backwards
                _affine_backwards(xp, yp, C, S, _split(L, K, k), _split(L, K, k + 1), cf, nt)
        return 0

    wide = _columns_coefs(coef, S, tn)
    cw = <floating *>_ptr(wide)
    if how == SLICES:
        part = _new(T * SLICE_SCRATCH, cnp.NPY_DOUBLE, False)
        pp = <double *>_ptr(part)
        with nogil:
            for k in prange(T, num_threads=T, schedule="static"):
                _slice_train(k, T, xp, yp, wp, bp, eps, mp, vp, ip, cf, cw, pp, N, C, S, unit, nt)
        return 0

    # COLUMNS: an (N, W) matrix
    R = _plan_rows(N, W, T, unit)
    nb = (N + R - 1) // R
    T = <int>min(<Py_ssize_t>T, nb)
    part = _new(T * (COL_MOMENTS * W + 1), cnp.NPY_DOUBLE, True)  # per share: see _col_moments
    pp = <double *>_ptr(part)
    with nogil, parallel(num_threads=T):
        for k in prange(T, schedule="static"):  # share k of the blocks, front to back
            for j in range(_share(nb, T, k), _share(nb, T, k + 1)):
                _col_moments(xp + j * R * W, min(R, N - j * R), W, W, pp + k * (COL_MOMENTS * W + 1))
        for c in prange(C, schedule="static"):
            _merge_column_stats(c, C, S, T, pp, W, 0, eps, wp, bp, mp, vp, ip, cf, cw)
        for k in prange(T, schedule="static"):  # the same shares on the same threads, back to front
            j = _share(nb, T, k + 1)
            while j > _share(nb, T, k):
                j = j - 1
                _col_affine(xp + j * R * W, yp + j * R * W, min(R, N - j * R), W, W, cw, nt)
    return 0


def update_running(running_mean, running_var, mean, var, double momentum, Py_ssize_t n):
    """running = (1 - momentum) * running + momentum * batch, unbiased variance n / (n - 1).

    running_mean, running_var: (C,) float32 or float64, updated in place; mean, var: (C,) float64."""
    cdef int t = _float_type(running_mean, 1, "running_mean")
    cdef Py_ssize_t C = running_mean.shape[0]
    cdef void *rm = _data(running_mean, t, C, True, "running_mean")
    cdef void *rv = _data(running_var, t, C, True, "running_var")
    cdef const double *mp = <const double *>_data(mean, cnp.NPY_DOUBLE, C, False, "mean")
    cdef const double *vp = <const double *>_data(var, cnp.NPY_DOUBLE, C, False, "var")
    if t == cnp.NPY_FLOAT:
        _update_running(<float *>rm, <float *>rv, mp, vp, momentum, n, C)
    else:
        _update_running(<double *>rm, <double *>rv, mp, vp, momentum, n, C)


cdef void _update_running(floating *rm, floating *rv, const double *mean, const double *var, double momentum,
                          Py_ssize_t n, Py_ssize_t C) noexcept:
    cdef Py_ssize_t c
    cdef double unbias = <double>n / <double>(n - 1)
    for c in range(C):
        rm[c] = <floating>((1.0 - momentum) * rm[c] + momentum * mean[c])
        rv[c] = <floating>((1.0 - momentum) * rv[c] + momentum * unbias * var[c])


# ---------------------------------------------------------------- forward with given statistics
def eval_stats(running_mean, running_var, double eps, mean, invstd, int n_threads=1):
    """The statistics an evaluation-mode forward normalizes with (one call, not four ufuncs):
    mean = running_mean and invstd = 1 / sqrt(running_var + eps), (C,) float64 outputs, from
    running buffers of one float dtype."""
    cdef int t = _float_type(running_mean, 1, "running_mean")
    cdef Py_ssize_t C = running_mean.shape[0]
    cdef void *rm = _data(running_mean, t, C, False, "running_mean")
    cdef void *rv = _data(running_var, t, C, False, "running_var")
    cdef double *mp = <double *>_data(mean, cnp.NPY_DOUBLE, C, True, "mean")
    cdef double *ip = <double *>_data(invstd, cnp.NPY_DOUBLE, C, True, "invstd")
    with nogil:
        _eval_stats_all(rm, rv, eps, mp, ip, C, n_threads, t == cnp.NPY_FLOAT)


cdef void _eval_stats_all(const void *rm, const void *rv, double eps, double *mp, double *ip, Py_ssize_t C,
                          int n_threads, bint single) noexcept nogil:
    """eval_stats of C channels: a square root and a division each, 15 us for 16384 channels on one
    thread here, so from 2 * EVAL_STATS_SHARE channels on the threads share them (7-8 us on two)."""
    cdef int T = <int>max(1, min(<Py_ssize_t>n_threads, C // EVAL_STATS_SHARE))
    cdef Py_ssize_t k
    for k in prange(T, num_threads=T, schedule="static"):
        _eval_stats(rm, rv, eps, mp, ip, _split(C, T, k), _split(C, T, k + 1), single)


cdef inline void _eval_stats(const void *rm, const void *rv, double eps, double *mp, double *ip, Py_ssize_t c0,
                             Py_ssize_t c1, bint single) noexcept nogil:
    # channels c0 .. c1 - 1 of eval_stats (running buffers of float32 if single, else float64)
    if single:
        fbn_eval_stats_f32(<const float *>rm + c0, <const float *>rv + c0, eps, mp + c0, ip + c0, c1 - c0)
    else:
        fbn_eval_stats_f64(<const double *>rm + c0, <const double *>rv + c0, eps, mp + c0, ip + c0, c1 - c0)


def forward_eval(x, y, weight, bias, mean, invstd, int n_threads, int path=AUTO, Py_ssize_t unit=0, int stream=-1):
    """y = (x - mean) * invstd * weight + bias: one read of x, one write of y.

    x: (N, C, S) float32 or float64; y: its output (may be x itself); weight, bias: (C,) of x's
    dtype; mean (the running mean), invstd (1 / sqrt(running_var + eps)): (C,) float64."""
    cdef int t = _float_type(x, 3, "x")
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], S = x.shape[2], L = N * C * S
    cdef void *xp = _data(x, t, L, False, "x")
    cdef void *yp = _data(y, t, L, True, "y")
    cdef void *wp = _data(weight, t, C, False, "weight")
    cdef void *bp = _data(bias, t, C, False, "bias")
    cdef double *mp = <double *>_data(mean, cnp.NPY_DOUBLE, C, False, "mean")
    cdef double *ip = <double *>_data(invstd, cnp.NPY_DOUBLE, C, False, "invstd")
    cdef object coef = _new(4 * C, t, False)  # [mhi | mlo | a | b], see _eval_coefs
    if t == cnp.NPY_FLOAT:
        _forward_eval(<float *>_ptr(coef), xp, yp, wp, bp, mp, ip, NULL, NULL, 0, False, N, C, S, n_threads, path,
                      unit, stream)
    else:
        _forward_eval(<double *>_ptr(coef), xp, yp, wp, bp, mp, ip, NULL, NULL, 0, False, N, C, S, n_threads, path,
                      unit, stream)


def forward_eval_running(x, y, weight, bias, running_mean, running_var, double eps, int n_threads, int path=AUTO,
                         Py_ssize_t unit=0, int stream=-1):
    """eval_stats and forward_eval in one call: y from x and the running buffers (of one float dtype,
    x's or the other); returns (mean, invstd), (C,) float64, as eval_stats.  Everything the call
    makes is one array (the statistics and the coefficients): with three, a wide small batch
    ((1, 16384) float32) added more than twice the size of the largest to the heap in every call,
    which made glibc give the memory back and the next call fault it in again (33 -> 90 us); and a
    SLICES thread computes its own channels' statistics."""
    cdef int t = _float_type(x, 3, "x"), rt = _float_type(running_mean, 1, "running_mean")
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], S = x.shape[2], L = N * C * S
    cdef void *xp = _data(x, t, L, False, "x")
    cdef void *yp = _data(y, t, L, True, "y")
    cdef void *wp = _data(weight, t, C, False, "weight")
    cdef void *bp = _data(bias, t, C, False, "bias")
    cdef void *rm = _data(running_mean, rt, C, False, "running_mean")
    cdef void *rv = _data(running_var, rt, C, False, "running_var")
    cdef object block = _new(6 * C, cnp.NPY_DOUBLE, False)  # [mean | invstd | coefficients (4C of x's type)]
    cdef double *mp = <double *>_ptr(block)
    if t == cnp.NPY_FLOAT:
        _forward_eval(<float *>(mp + 2 * C), xp, yp, wp, bp, mp, mp + C, rm, rv, eps, rt == cnp.NPY_FLOAT, N, C, S,
                      n_threads, path, unit, stream)
    else:
        _forward_eval(<double *>(mp + 2 * C), xp, yp, wp, bp, mp, mp + C, rm, rv, eps, rt == cnp.NPY_FLOAT, N, C, S,
                      n_threads, path, unit, stream)
    return block[:C], block[C:2 * C]


cdef int _forward_eval(floating *cf, void *xv, void *yv, void *wv, void *bv, double *mp, double *ip,
                       const void *rm, const void *rv, double eps, bint rsingle, Py_ssize_t N, Py_ssize_t C,
                       Py_ssize_t S, int n_threads, int path, Py_ssize_t unit, int stream) except -1:
    # cf: room for the 4C coefficients; rm != NULL: mp, ip are outputs, the statistics of the running
    # buffers rm, rv (float32 if rsingle), else inputs
    cdef Py_ssize_t L = N * C * S, W = C * S
    cdef int tn = cnp.NPY_FLOAT if floating is float else cnp.NPY_DOUBLE
    cdef int T = _plan_threads(n_threads, L)
    cdef int nt = _plan_stream(2 * L * sizeof(floating), stream)
    cdef const floating *xp = <const floating *>xv
    cdef floating *yp = <floating *>yv
    cdef object wide = None
    cdef floating *cw = cf
    cdef Py_ssize_t K, k, c, R, nb, j
    cdef int how = _plan_path(N, C, S, path)
    if S > 1 and how != RANGES:  # per-column coefficients: see _columns_coefs
        wide = _new(4 * W, tn, False)
        cw = <floating *>_ptr(wide)
    if how == SLICES:  # each thread makes its own channels' statistics and coefficients
        if rm != NULL:  # the square roots alone are worth threads (_eval_stats_all), however small x is
            T = <int>max(<Py_ssize_t>T, min(<Py_ssize_t>n_threads, C // EVAL_STATS_SHARE))
        with nogil:
            for k in prange(T, num_threads=T, schedule="static"):
                _slice_eval(k, T, xp, yp, <const floating *>wv, <const floating *>bv, mp, ip, rm, rv, eps, rsingle,
                            cf, cw, N, C, S, unit, nt)
        return 0
    if rm != NULL:
        with nogil:
            _eval_stats_all(rm, rv, eps, mp, ip, C, n_threads, rsingle)
    _eval_coefs(mp, ip, <const floating *>wv, <const floating *>bv, cf, C, C)
    if how == RANGES:
        K = _plan_ranges(L, T, unit)
        with nogil:
            for k in prange(K, num_threads=T, schedule="static"):
                _affine(xp, yp, C, S, _split(L, K, k), _split(L, K, k + 1), cf, nt)
        return 0
    R = _plan_rows(N, W, T, unit)
    nb = (N + R - 1) // R
    with nogil:
        if cw != cf:
            for c in range(C):
                _expand(cf, C, S, 4, c, cw)
        for j in prange(nb, num_threads=min(<Py_ssize_t>T, nb), schedule="static"):
            _col_affine(xp + j * R * W, yp + j * R * W, min(R, N - j * R), W, W, cw, nt)
    return 0


# ---------------------------------------------------------------- backward
def backward(dy, x, dx, weight, mean, invstd, bint training, grad_weight, grad_bias,
             int n_threads, int path=AUTO, Py_ssize_t unit=0, int stream=-1):
    """grad_input, grad_weight, grad_bias from the saved mean/invstd (no recomputation).

    dy (grad_output), x (the forward's input): (N, C, S) float32 or float64; dx: grad_input, an
    output of the same size and dtype; weight: (C,) of x's dtype; mean, invstd: (C,) float64, the
    statistics the forward used; training: they were the batch's (True) or fixed (False);
    grad_weight, grad_bias: (C,) float64 outputs."""
    cdef int t = _float_type(x, 3, "x")
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], S = x.shape[2], L = N * C * S
    cdef void *gp = _data(dy, t, L, False, "dy")
    cdef void *xp = _data(x, t, L, False, "x")
    cdef void *dp = _data(dx, t, L, True, "dx")
    cdef void *wp = _data(weight, t, C, False, "weight")
    cdef const double *mp = <const double *>_data(mean, cnp.NPY_DOUBLE, C, False, "mean")
    cdef const double *ip = <const double *>_data(invstd, cnp.NPY_DOUBLE, C, False, "invstd")
    cdef double *gwp = <double *>_data(grad_weight, cnp.NPY_DOUBLE, C, True, "grad_weight")
    cdef double *gbp = <double *>_data(grad_bias, cnp.NPY_DOUBLE, C, True, "grad_bias")
    if t == cnp.NPY_FLOAT:
        _backward(<float>0, gp, xp, dp, wp, mp, ip, training, gwp, gbp, N, C, S, n_threads, path, unit, stream)
    else:
        _backward(<double>0, gp, xp, dp, wp, mp, ip, training, gwp, gbp, N, C, S, n_threads, path, unit, stream)


cdef int _backward(floating tag, void *gv, void *xv, void *dv, void *wv, const double *mp, const double *ip,
                   bint training, double *gwp, double *gbp, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                   int n_threads, int path, Py_ssize_t unit, int stream) except -1:
    cdef Py_ssize_t L = N * C * S, W = C * S
    cdef int tn = cnp.NPY_FLOAT if floating is float else cnp.NPY_DOUBLE
    cdef int T = _plan_threads(n_threads, L)
    cdef int nt = _plan_stream(3 * L * sizeof(floating), stream)
    cdef const floating *gp = <const floating *>gv
    cdef const floating *xp = <const floating *>xv
    cdef floating *dp = <floating *>dv
    cdef const floating *wp = <const floating *>wv
    cdef object coef = _new(5 * C, tn, False), part, wide, wide_mean
    cdef floating *cf = <floating *>_ptr(coef)
    cdef floating *cw
    cdef double *wm
    cdef double count = <double>(N * S)
    cdef double *pp
    cdef Py_ssize_t K, k, c, R, nb, j
    cdef int how = _plan_path(N, C, S, path)

    if how == RANGES:
        K = _plan_ranges(L, T, unit)
        part = _new(K * 2 * C, cnp.NPY_DOUBLE, True)  # per range: (sum dy, sum dy*(x-mean)) per channel
        pp = <double *>_ptr(part)
        with nogil, parallel(num_threads=T):
            for k in prange(K, schedule="static"):
                _grad_sums(gp, xp, C, S, _split(L, K, k), _split(L, K, k + 1), mp, pp + k * 2 * C)
            for c in prange(C, schedule="static"):
                _merge_range_grad(c, C, K, pp, count, training, wp, mp, ip, gwp, gbp, cf)
            for k in prange(K, schedule="static"):  # the same thread per k as above; backwards
                if training:
                    _grad_input_backwards(gp, xp, dp, C, S, _split(L, K, k), _split(L, K, k + 1), cf, nt)
                else:
                    _affine_backwards(gp, dp, C, S, _split(L, K, k), _split(L, K, k + 1), cf, nt)
        return 0

    wide = _columns_coefs(coef, S, tn)
    cw = <floating *>_ptr(wide)
    if how == SLICES:
        part = _new(T * SLICE_SCRATCH, cnp.NPY_DOUBLE, False)
        pp = <double *>_ptr(part)
        with nogil:
            for k in prange(T, num_threads=T, schedule="static"):
                _slice_backward(k, T, gp, xp, dp, wp, mp, ip, training, gwp, gbp, cf, cw, pp, N, C, S, unit, nt)
        return 0
    wide_mean = _new(W, cnp.NPY_DOUBLE, False)  # the mean of each column's channel
    wm = <double *>_ptr(wide_mean)

    # COLUMNS
    R = _plan_rows(N, W, T, unit)
    nb = (N + R - 1) // R
    T = <int>min(<Py_ssize_t>T, nb)
    part = _new(T * 2 * W, cnp.NPY_DOUBLE, True)  # per share: [sum dy (W) | sum dy*(x-mean) (W)]
    pp = <double *>_ptr(part)
    with nogil:
        for j in range(W):
            wm[j] = mp[j // S]
    with nogil, parallel(num_threads=T):
        for k in prange(T, schedule="static"):  # share k of the blocks, front to back
            for j in range(_share(nb, T, k), _share(nb, T, k + 1)):
                _col_grad_sums(gp + j * R * W, xp + j * R * W, min(R, N - j * R), W, W, wm, pp + k * 2 * W)
        for c in prange(C, schedule="static"):
            _merge_column_grad(c, C, S, T, pp, W, 0, count, training, wp, mp, ip, gwp, gbp, cf, cw)
        for k in prange(T, schedule="static"):  # the same shares on the same threads, back to front
            j = _share(nb, T, k + 1)
            while j > _share(nb, T, k):
                j = j - 1
                if training:
                    _col_grad_input(gp + j * R * W, xp + j * R * W, dp + j * R * W, min(R, N - j * R), W, W, cw, nt)
                else:
                    _col_affine(gp + j * R * W, dp + j * R * W, min(R, N - j * R), W, W, cw, nt)
    return 0


# ---------------------------------------------------------------- the benchmark's floor
cdef double _traffic(const floating *a, const floating *b, floating *y, Py_ssize_t f0, Py_ssize_t f1,
                     int nt) noexcept nogil:
    """fbn_traffic over elements [f0, f1) of a (and b, and y, where not NULL)."""
    cdef const floating *bq = NULL
    cdef floating *yq = NULL
    if b != NULL:
        bq = b + f0
    if y != NULL:
        yq = y + f0
    if floating is float:
        return fbn_traffic_f32(a + f0, bq, yq, f1 - f0, nt)
    else:
        return fbn_traffic_f64(a + f0, bq, yq, f1 - f0, nt)


def traffic(const floating[::1] a, const floating[::1] b=None, floating[::1] y=None, int n_threads=1,
            int stream=-1, bint backwards=False):
    """The least memory traffic of one pass of batch norm, for ``python -m fastbn bench``: reads a
    (and b), writes y = a (+ b) when y is given, on n_threads threads with the kernels' split of
    work (equal consecutive ranges) and their rule for streaming stores (``stream`` as in the
    kernels: -1 by the bytes the pass touches).  ``backwards``: each thread walks its range back to
    front in pieces, as the kernels' second passes do (PIECE_BYTES).  Returns a sum of what it read
    when y is None.  Not part of fastbn's API."""
    cdef Py_ssize_t n = a.shape[0], k, f0, f1, s
    cdef Py_ssize_t piece = PIECE_BYTES // sizeof(floating)
    cdef int T = _plan_threads(n_threads, n)
    cdef int arrays = 1 + (b is not None) + (y is not None)
    cdef int nt = (y is not None) and _plan_stream(arrays * n * sizeof(floating), stream)
    cdef const floating *ap = &a[0] if n else NULL
    cdef const floating *bp = NULL
    cdef floating *yp = NULL
    cdef double total = 0
    if (b is not None and b.shape[0] != n) or (y is not None and y.shape[0] != n):
        raise ValueError("traffic: the arrays must have the same length")
    if n == 0:
        return 0.0
    if b is not None:
        bp = &b[0]
    if y is not None:
        yp = &y[0]
    with nogil:
        for k in prange(T, num_threads=T, schedule="static"):
            f0 = _split(n, T, k)
            f1 = _split(n, T, k + 1)
            while f1 > f0:
                s = _piece_start(f0, f1, piece) if backwards else f0
                total += _traffic(ap, bp, yp, s, f1, nt)
                f1 = s
            if nt:
                fbn_sfence()
    return total
