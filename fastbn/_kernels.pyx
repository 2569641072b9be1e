"""fastbn's CPU kernels: OpenMP-parallel batch norm over C-contiguous (N, C, S) buffers.

Every operation is "reduce per channel, derive per-channel coefficients, apply elementwise", and
batch norm is memory-bound, so what matters is how threads walk memory.  Two ways (``path``):

RANGES   the buffer is cut into equal consecutive ranges in memory order, one per thread; each
         thread streams through its range front to back, accumulating per-channel partial sums
         (row r of S elements is channel r % C), the partials are merged in a fixed order, and
         the apply pass walks the same ranges.  Streaming in memory order is what the hardware
         prefetchers and the page-fault path of a fresh output like best; any shape splits evenly
         whatever C is (C=1 and C=3 included).
COLUMNS  spatial size below SMALL_S, e.g. an (N, C) matrix: the buffer is an (N, C*S) matrix and
         threads take blocks of rows, reducing down the columns with vector loads across them
         (per-thread accumulators merged afterwards; the S columns of a channel merged last).

``unit`` (0: choose) forces the range size in elements (RANGES) or the rows per block (COLUMNS);
tests set it small so small inputs run many ranges and blocks.  ``stream`` (-1: choose by output
size, 0 off, 1 on) switches the non-temporal stores of _simd.h.

The kernels trust their arguments: fastbn.functional validated them.  Statistics are
accumulated in double for float32 and float64 alike.  The GIL is released for all the work.
"""
import numpy as np
from cython cimport floating
from cython.parallel cimport parallel, prange
from libc.math cimport sqrt

cdef extern from "_simd.h" nogil:
    void fbn_sfence()
    void fbn_chan_merge(double *n, double *m, double *m2, double nb, double mb, double m2b)
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
    void fbn_col_moments_f32(const float *x, Py_ssize_t rows, Py_ssize_t W, double *n, double *m, double *m2, double *tmp)
    void fbn_col_moments_f64(const double *x, Py_ssize_t rows, Py_ssize_t W, double *n, double *m, double *m2, double *tmp)
    void fbn_col_affine_f32(const float *x, float *y, Py_ssize_t rows, Py_ssize_t W, const float *cf, int nt)
    void fbn_col_affine_f64(const double *x, double *y, Py_ssize_t rows, Py_ssize_t W, const double *cf, int nt)
    void fbn_col_grad_sums_f32(const float *dy, const float *x, Py_ssize_t rows, Py_ssize_t W, const double *mean, double *acc)
    void fbn_col_grad_sums_f64(const double *dy, const double *x, Py_ssize_t rows, Py_ssize_t W, const double *mean, double *acc)
    void fbn_col_grad_input_f32(const float *dy, const float *x, float *dx, Py_ssize_t rows, Py_ssize_t W, const float *cf, int nt)
    void fbn_col_grad_input_f64(const double *dy, const double *x, double *dx, Py_ssize_t rows, Py_ssize_t W, const double *cf, int nt)
    # the benchmark's floor
    double fbn_traffic_f32(const float *a, const float *b, float *y, Py_ssize_t n, int nt)
    double fbn_traffic_f64(const double *a, const double *b, double *y, Py_ssize_t n, int nt)

cdef enum:
    AUTO = 0
    RANGES = 1
    COLUMNS = 2
PATHS = {"auto": AUTO, "ranges": RANGES, "columns": COLUMNS}

cdef enum:
    # Below this many elements per thread, another thread costs more than it saves.
    MIN_PER_THREAD = 16384
    # Spatial sizes below this take the COLUMNS path (rows that short would each cost a call) ...
    SMALL_S = 32
    # ... unless the matrix is wider than this many columns (per-thread accumulators get large).
    MAX_COLUMNS = 1 << 16
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


cdef int _plan_path(Py_ssize_t C, Py_ssize_t S, int path) noexcept nogil:
    if path != AUTO:
        return path
    return COLUMNS if S < SMALL_S and C * S <= MAX_COLUMNS else RANGES


cdef int _plan_stream(Py_ssize_t touched_bytes, int stream) noexcept nogil:
    """Streaming stores when the call's arrays (inputs and output) overflow the cache."""
    return stream if stream >= 0 else touched_bytes > STREAM_BYTES


cdef Py_ssize_t _plan_ranges(Py_ssize_t L, int T, Py_ssize_t unit) noexcept nogil:
    """How many ranges RANGES cuts L elements into: one per thread, or L / unit when forced."""
    return T if unit <= 0 else max(<Py_ssize_t>1, (L + unit - 1) // unit)


cdef Py_ssize_t _plan_rows(Py_ssize_t W, Py_ssize_t unit) noexcept nogil:
    """Rows per COLUMNS block."""
    return unit if unit > 0 else max(<Py_ssize_t>1, COLUMN_BLOCK // W)


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


cdef inline void _col_moments(const floating *x, Py_ssize_t rows, Py_ssize_t W, double *th) noexcept nogil:
    # th: one thread's [count | mean (W) | M2 (W) | scratch (2W)]
    if floating is float:
        fbn_col_moments_f32(x, rows, W, th, th + 1, th + 1 + W, th + 1 + 2 * W)
    else:
        fbn_col_moments_f64(x, rows, W, th, th + 1, th + 1 + W, th + 1 + 2 * W)


cdef inline void _col_affine(const floating *x, floating *y, Py_ssize_t rows, Py_ssize_t W,
                             const floating *cf, int nt) noexcept nogil:
    if floating is float:
        fbn_col_affine_f32(x, y, rows, W, cf, nt)
    else:
        fbn_col_affine_f64(x, y, rows, W, cf, nt)
    if nt:
        fbn_sfence()


cdef inline void _col_grad_sums(const floating *dy, const floating *x, Py_ssize_t rows, Py_ssize_t W,
                                const double *mean, double *th) noexcept nogil:
    if floating is float:
        fbn_col_grad_sums_f32(dy, x, rows, W, mean, th)
    else:
        fbn_col_grad_sums_f64(dy, x, rows, W, mean, th)


cdef inline void _col_grad_input(const floating *dy, const floating *x, floating *dx, Py_ssize_t rows,
                                 Py_ssize_t W, const floating *cf, int nt) noexcept nogil:
    if floating is float:
        fbn_col_grad_input_f32(dy, x, dx, rows, W, cf, nt)
    else:
        fbn_col_grad_input_f64(dy, x, dx, rows, W, cf, nt)
    if nt:
        fbn_sfence()


# ---------------------------------------------------------------- per-channel coefficients
# cf arrays hold one block of C values per coefficient: [mhi | mlo | a | b] for the forward,
# [mhi | mlo | kdy | kx | kc] for the backward, where mhi + mlo is the float64 mean split into
# two values of the input type (mlo is 0 for float64).

cdef inline void _mean_coefs(Py_ssize_t c, Py_ssize_t C, double mean, floating *cf) noexcept nogil:
    cf[c] = <floating>mean
    cf[C + c] = <floating>(mean - <double>cf[c])


cdef inline void _affine_coefs(Py_ssize_t c, Py_ssize_t C, double mean, double istd, const floating *w,
                               const floating *b, floating *cf) noexcept nogil:
    _mean_coefs(c, C, mean, cf)
    cf[2 * C + c] = <floating>(<double>w[c] * istd)
    cf[3 * C + c] = b[c]


cdef inline void _finish_stats(Py_ssize_t c, Py_ssize_t C, const double *acc, double eps, const floating *w,
                               const floating *b, double *mean, double *var, double *invstd,
                               floating *cf) noexcept nogil:
    # acc: the channel's merged (count, mean, M2)
    cdef double v = acc[2] / acc[0]
    mean[c] = acc[1]
    var[c] = v
    invstd[c] = 1.0 / sqrt(v + eps)
    _affine_coefs(c, C, mean[c], invstd[c], w, b, cf)


cdef inline void _finish_grad(Py_ssize_t c, Py_ssize_t C, double sdy, double sdyx, double count, bint training,
                              const floating *w, const double *mean, const double *invstd, double *gw,
                              double *gb, floating *cf) noexcept nogil:
    cdef double istd = invstd[c], k = <double>w[c] * istd
    gb[c] = sdy
    gw[c] = sdyx * istd
    _mean_coefs(c, C, mean[c], cf)
    cf[2 * C + c] = <floating>k
    cf[3 * C + c] = <floating>(-k * istd * istd * sdyx / count) if training else 0
    cf[4 * C + c] = <floating>(-k * sdy / count) if training else 0


cdef inline void _expand(const floating *cf, Py_ssize_t C, Py_ssize_t S, Py_ssize_t ncoef, Py_ssize_t c,
                         floating *cfw) noexcept nogil:
    """Channel c's coefficients (ncoef blocks of C) copied to its S columns of the per-column
    ones (ncoef blocks of C*S), for the COLUMNS path."""
    cdef Py_ssize_t i, s, W = C * S
    for i in range(ncoef):
        for s in range(S):
            cfw[i * W + c * S + s] = cf[i * C + c]


# ---------------------------------------------------------------- merging the partials of one channel
# Each runs inside the parallel region, one channel per iteration, between the reduce and the
# apply loops (so a whole call is one fork/join of the thread team).

cdef void _merge_range_stats(Py_ssize_t c, Py_ssize_t C, Py_ssize_t K, const double *pp, double eps,
                             const floating *w, const floating *b, double *mean, double *var,
                             double *invstd, floating *cf) noexcept nogil:
    # pp: K ranges x C channels x (count, mean, M2), merged in range order
    cdef double acc[3]
    cdef Py_ssize_t k
    acc[0] = 0
    acc[1] = 0
    acc[2] = 0
    for k in range(K):
        fbn_chan_merge(&acc[0], &acc[1], &acc[2], pp[(k * C + c) * 3], pp[(k * C + c) * 3 + 1], pp[(k * C + c) * 3 + 2])
    _finish_stats(c, C, acc, eps, w, b, mean, var, invstd, cf)


cdef void _merge_column_stats(Py_ssize_t c, Py_ssize_t C, Py_ssize_t S, int T, const double *pp, double eps,
                              const floating *w, const floating *b, double *mean, double *var,
                              double *invstd, floating *cf, floating *cfw) noexcept nogil:
    # pp: per thread [count | mean (W) | M2 (W) | scratch (2W)]; channel c owns columns c*S .. c*S+S-1
    cdef double acc[3]
    cdef Py_ssize_t t, s, W = C * S, j
    acc[0] = 0
    acc[1] = 0
    acc[2] = 0
    for t in range(T):
        j = t * (4 * W + 1)
        for s in range(S):
            fbn_chan_merge(&acc[0], &acc[1], &acc[2], pp[j], pp[j + 1 + c * S + s], pp[j + 1 + W + c * S + s])
    _finish_stats(c, C, acc, eps, w, b, mean, var, invstd, cf)
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


cdef void _merge_column_grad(Py_ssize_t c, Py_ssize_t C, Py_ssize_t S, int T, const double *pp, double count,
                             bint training, const floating *w, const double *mean, const double *invstd,
                             double *gw, double *gb, floating *cf, floating *cfw) noexcept nogil:
    # pp: per thread [sum dy (W) | sum dy*(x-mean) (W)]
    cdef double sdy = 0, sdyx = 0
    cdef Py_ssize_t t, s, W = C * S
    for t in range(T):
        for s in range(S):
            sdy += pp[t * 2 * W + c * S + s]
            sdyx += pp[t * 2 * W + W + c * S + s]
    _finish_grad(c, C, sdy, sdyx, count, training, w, mean, invstd, gw, gb, cf)
    _expand(cf, C, S, 5, c, cfw)


# ---------------------------------------------------------------- forward, training mode
def forward_train(const floating[:, :, ::1] x,      # IN  (N, C, S)
                  floating[:, :, ::1] y,            # OUT (N, C, S); may be x itself
                  const floating[::1] weight,       # IN  (C,)
                  const floating[::1] bias,         # IN  (C,)
                  double eps,
                  double[::1] mean,                 # OUT (C,) batch mean
                  double[::1] var,                  # OUT (C,) biased batch variance
                  double[::1] invstd,               # OUT (C,) 1 / sqrt(var + eps)
                  int n_threads, int path=AUTO, Py_ssize_t unit=0, int stream=-1):
    """Batch statistics and the fused normalize + affine."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], S = x.shape[2], L = N * C * S, W = C * S
    cdef int T = _plan_threads(n_threads, L)
    cdef int nt = _plan_stream(2 * L * sizeof(floating), stream)
    cdef floating[::1] coef = np.empty(4 * C, dtype=np.float32 if floating is float else np.float64)
    cdef floating[::1] wide
    cdef const floating *xp = &x[0, 0, 0]
    cdef floating *yp = &y[0, 0, 0]
    cdef floating *cf = &coef[0]
    cdef floating *cw
    cdef const floating *wp = &weight[0]
    cdef const floating *bp = &bias[0]
    cdef double *mp = &mean[0]
    cdef double *vp = &var[0]
    cdef double *ip = &invstd[0]
    cdef double[:, ::1] part
    cdef double *pp
    cdef Py_ssize_t K, k, c, R, nb, j

    if _plan_path(C, S, path) == RANGES:
        K = _plan_ranges(L, T, unit)
        part = np.zeros((K, 3 * C))  # per range: (count, mean, M2) per channel
        pp = &part[0, 0]
        with nogil, parallel(num_threads=T):
            for k in prange(K, schedule="static"):
                _moments(xp, C, S, _split(L, K, k), _split(L, K, k + 1), pp + k * 3 * C)
            for c in prange(C, schedule="static"):
                _merge_range_stats(c, C, K, pp, eps, wp, bp, mp, vp, ip, cf)
            for k in prange(K, schedule="static"):  # the same thread per k as above; backwards
                _affine_backwards(xp, yp, C, S, _split(L, K, k), _split(L, K, k + 1), cf, nt)
        return

    # COLUMNS: an (N, W) matrix
    R = _plan_rows(W, unit)
    nb = (N + R - 1) // R
    T = <int>min(<Py_ssize_t>T, nb)
    part = np.zeros((T, 4 * W + 1))  # per share: [count | mean (W) | M2 (W) | scratch (2W)]
    pp = &part[0, 0]
    wide = np.empty(4 * W, dtype=np.float32 if floating is float else np.float64)
    cw = &wide[0]
    with nogil, parallel(num_threads=T):
        for k in prange(T, schedule="static"):  # share k of the blocks, front to back
            for j in range(_share(nb, T, k), _share(nb, T, k + 1)):
                _col_moments(xp + j * R * W, min(R, N - j * R), W, pp + k * (4 * W + 1))
        for c in prange(C, schedule="static"):
            _merge_column_stats(c, C, S, T, pp, eps, wp, bp, mp, vp, ip, cf, cw)
        for k in prange(T, schedule="static"):  # the same shares on the same threads, back to front
            j = _share(nb, T, k + 1)
            while j > _share(nb, T, k):
                j = j - 1
                _col_affine(xp + j * R * W, yp + j * R * W, min(R, N - j * R), W, cw, nt)


def update_running(floating[::1] running_mean,    # IN/OUT (C,)
                   floating[::1] running_var,     # IN/OUT (C,)
                   const double[::1] mean,        # IN (C,) batch mean
                   const double[::1] var,         # IN (C,) biased batch variance
                   double momentum, Py_ssize_t n):
    """running = (1 - momentum) * running + momentum * batch, unbiased variance n / (n - 1)."""
    cdef Py_ssize_t c
    cdef double unbias = <double>n / <double>(n - 1)
    for c in range(running_mean.shape[0]):
        running_mean[c] = <floating>((1.0 - momentum) * running_mean[c] + momentum * mean[c])
        running_var[c] = <floating>((1.0 - momentum) * running_var[c] + momentum * unbias * var[c])


# ---------------------------------------------------------------- forward with given statistics
def eval_stats(const floating[::1] running_mean,    # IN  (C,)
               const floating[::1] running_var,     # IN  (C,)
               double eps,
               double[::1] mean,                    # OUT (C,) running_mean in float64
               double[::1] invstd):                 # OUT (C,) 1 / sqrt(running_var + eps)
    """The statistics an evaluation-mode forward normalizes with (one call, not four ufuncs)."""
    cdef Py_ssize_t c
    for c in range(running_mean.shape[0]):
        mean[c] = running_mean[c]
        invstd[c] = 1.0 / sqrt(<double>running_var[c] + eps)


def forward_eval(const floating[:, :, ::1] x,       # IN  (N, C, S)
                 floating[:, :, ::1] y,             # OUT (N, C, S); may be x itself
                 const floating[::1] weight,        # IN  (C,)
                 const floating[::1] bias,          # IN  (C,)
                 const double[::1] mean,            # IN  (C,) running mean
                 const double[::1] invstd,          # IN  (C,) 1 / sqrt(running_var + eps)
                 int n_threads, int path=AUTO, Py_ssize_t unit=0, int stream=-1):
    """y = (x - mean) * invstd * weight + bias: one read of x, one write of y."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], S = x.shape[2], L = N * C * S, W = C * S
    cdef int T = _plan_threads(n_threads, L)
    cdef int nt = _plan_stream(2 * L * sizeof(floating), stream)
    cdef floating[::1] coef = np.empty(4 * C, dtype=np.float32 if floating is float else np.float64)
    cdef floating[::1] wide
    cdef const floating *xp = &x[0, 0, 0]
    cdef floating *yp = &y[0, 0, 0]
    cdef floating *cf = &coef[0]
    cdef Py_ssize_t K, k, c, R, nb, j
    with nogil:
        for c in range(C):
            _affine_coefs(c, C, mean[c], invstd[c], &weight[0], &bias[0], cf)
    if _plan_path(C, S, path) == RANGES:
        K = _plan_ranges(L, T, unit)
        with nogil:
            for k in prange(K, num_threads=T, schedule="static"):
                _affine(xp, yp, C, S, _split(L, K, k), _split(L, K, k + 1), cf, nt)
        return
    R = _plan_rows(W, unit)
    nb = (N + R - 1) // R
    wide = np.empty(4 * W, dtype=np.float32 if floating is float else np.float64)
    with nogil:
        for c in range(C):
            _expand(cf, C, S, 4, c, &wide[0])
        for j in prange(nb, num_threads=min(<Py_ssize_t>T, nb), schedule="static"):
            _col_affine(xp + j * R * W, yp + j * R * W, min(R, N - j * R), W, &wide[0], nt)


# ---------------------------------------------------------------- backward
def backward(const floating[:, :, ::1] dy,         # IN  (N, C, S) grad_output
             const floating[:, :, ::1] x,          # IN  (N, C, S) forward input
             floating[:, :, ::1] dx,               # OUT (N, C, S) grad_input
             const floating[::1] weight,           # IN  (C,)
             const double[::1] mean,               # IN  (C,) mean used in the forward
             const double[::1] invstd,             # IN  (C,) invstd used in the forward
             bint training,                        # batch statistics (True) or fixed ones
             double[::1] grad_weight,              # OUT (C,)
             double[::1] grad_bias,                # OUT (C,)
             int n_threads, int path=AUTO, Py_ssize_t unit=0, int stream=-1):
    """grad_input, grad_weight, grad_bias from the saved mean/invstd (no recomputation)."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], S = x.shape[2], L = N * C * S, W = C * S
    cdef int T = _plan_threads(n_threads, L)
    cdef int nt = _plan_stream(3 * L * sizeof(floating), stream)
    cdef floating[::1] coef = np.empty(5 * C, dtype=np.float32 if floating is float else np.float64)
    cdef floating[::1] wide
    cdef double[::1] wide_mean
    cdef const floating *gp = &dy[0, 0, 0]
    cdef const floating *xp = &x[0, 0, 0]
    cdef floating *dp = &dx[0, 0, 0]
    cdef floating *cf = &coef[0]
    cdef floating *cw
    cdef const floating *wp = &weight[0]
    cdef const double *mp = &mean[0]
    cdef const double *ip = &invstd[0]
    cdef double *gwp = &grad_weight[0]
    cdef double *gbp = &grad_bias[0]
    cdef double count = <double>(N * S)
    cdef double[:, ::1] part
    cdef double *pp
    cdef Py_ssize_t K, k, c, R, nb, j

    if _plan_path(C, S, path) == RANGES:
        K = _plan_ranges(L, T, unit)
        part = np.zeros((K, 2 * C))  # per range: (sum dy, sum dy*(x-mean)) per channel
        pp = &part[0, 0]
        with nogil, parallel(num_threads=T):
            for k in prange(K, schedule="static"):
                _grad_sums(gp, xp, C, S, _split(L, K, k), _split(L, K, k + 1), mp, pp + k * 2 * C)
            for c in prange(C, schedule="static"):
                _merge_range_grad(c, C, K, pp, count, training, wp, mp, ip, gwp, gbp, cf)
            for k in prange(K, schedule="static"):  # the same thread per k as above; backwards
                _grad_input_backwards(gp, xp, dp, C, S, _split(L, K, k), _split(L, K, k + 1), cf, nt)
        return

    # COLUMNS
    R = _plan_rows(W, unit)
    nb = (N + R - 1) // R
    T = <int>min(<Py_ssize_t>T, nb)
    part = np.zeros((T, 2 * W))  # per share: [sum dy (W) | sum dy*(x-mean) (W)]
    pp = &part[0, 0]
    wide = np.empty(5 * W, dtype=np.float32 if floating is float else np.float64)
    cw = &wide[0]
    wide_mean = np.repeat(np.asarray(mean), S)
    with nogil, parallel(num_threads=T):
        for k in prange(T, schedule="static"):  # share k of the blocks, front to back
            for j in range(_share(nb, T, k), _share(nb, T, k + 1)):
                _col_grad_sums(gp + j * R * W, xp + j * R * W, min(R, N - j * R), W, &wide_mean[0], pp + k * 2 * W)
        for c in prange(C, schedule="static"):
            _merge_column_grad(c, C, S, T, pp, count, training, wp, mp, ip, gwp, gbp, cf, cw)
        for k in prange(T, schedule="static"):  # the same shares on the same threads, back to front
            j = _share(nb, T, k + 1)
            while j > _share(nb, T, k):
                j = j - 1
                _col_grad_input(gp + j * R * W, xp + j * R * W, dp + j * R * W, min(R, N - j * R), W, cw, nt)


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
