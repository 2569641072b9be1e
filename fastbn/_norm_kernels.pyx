"""fastbn's CPU kernels for group, instance and layer norm, on fastbn's thread pool (_pool.h).

All three normalize *rows* of a C-contiguous buffer viewed as (R, L): group norm's (n, group)
rows (instance norm is group norm with one channel a group), of L = C/G * S elements, and layer
norm's rows of prod(normalized_shape).  A row's statistics are its own, so rows never merge
with each other and the work splits by rows:

FUSED   (R >= PLAN_WIDTH rows, or rows too short to cut): a task takes a block of whole rows and
        does everything for one row before the next: moments (fbn_row_moments: shifted sums
        in double lanes, for float32 rows too, see _norm_simd.h), the row's
        coefficients, then the apply pass, which reads the row back from L1/L2 (a row of the
        benchmark's shapes is 3 to 25 KiB).  Memory sees one read and one write, as a copy.  The
        backward likewise: gradient sums, then grad_input.  Group norm's forward pairs float32
        rows of long channel runs with AVX-512: a row's apply pass runs in one loop with the
        next row's moments (_norm_simd.h's paired rows), so that the core reads and writes at
        once.
PIECES  (fewer rows than PLAN_WIDTH, long rows): each row is cut into P pieces, a task each; the
        pieces' partials go to their own slots and are merged per row in piece order on the
        calling thread (Chan's update, fbn_shift_merge), then a second pass of (row, piece) tasks
        applies.  P depends on the shape only, never on the thread count, so a result is the same
        on 1 thread or 16.

Group/instance norm's affine is per channel, i.e. per run of S elements inside a row: the apply
uses fbn_affine / fbn_grad_input (float32: _norm_simd.h's _fl loops; float64: _simd.h's) with
the row's coefficient block [mhi | mlo | a | b] (C/G values each).  Layer norm's is per
element: _norm_simd.h.  Layer norm's backward also sums grad_weight and grad_bias down the
columns: each block of rows (at most LN_MAX_BLOCKS, fixed by the shape) has its own column
partials, float32 ones folded into double every FBN_LN_FOLD rows.

The tasks run on fastbn._pool's pool (one per process, shared with _kernels.pyx), sized from
fastbn.get_num_threads() per call; the argument checks (_float_type, _data) are _arrays.pxd's, as
in _kernels.pyx; the streaming threshold comes from the planner (fastbn._plan), which scales it
with the detected L3.
"""
import numpy as np
cimport numpy as cnp
from cython cimport floating
from libc.stdlib cimport malloc, free

cnp.import_array()

from fastbn._arrays cimport data as _data, float_type as _float_type
from fastbn._alloc import scratch as _alloc_scratch
from fastbn._plan cimport norm_stream_bytes
from fastbn._pool cimport pool_run

cdef extern from "_coefs.h" nogil:
    double FBN_WIDE_F32, FBN_WIDE_F64  # means this large take the rows' double path (_norm_rows.pxi)
    double fbn_x_coef(double k, double invstd, double s, double count)  # grad_input's x - mean term
    double fbn_batch_invstd(double var, double eps)  # NaN where the variance overflowed

# the batch-norm loops this module shares are declared once, in _simd.pxd
from fastbn._simd cimport (FBN_ACC, FBN_K, FBN_M2, FBN_N, FBN_REL, fbn_acc_mean, fbn_affine_f64, fbn_grad_input_f64,
                           fbn_grad_sums_f64, fbn_moments_f64, fbn_sfence, fbn_shift_merge, fbn_short_inline)

cdef extern from "_norm_simd.h" nogil:
    float fbn_mean_lo_f32(double m, float hi)  # _simd.h's, not in _simd.pxd (the batch-norm kernels split in C)
    double fbn_mean_lo_f64(double m, double hi)
    void fbn_row_moments_f32(const float *p, Py_ssize_t n, double *acc)
    void fbn_affine_fl(const float *x, float *y, Py_ssize_t C, Py_ssize_t S, Py_ssize_t f0, Py_ssize_t f1, const float *cf, int nt)
    void fbn_grad_sums_fl(const float *dy, const float *x, Py_ssize_t C, Py_ssize_t S, Py_ssize_t f0, Py_ssize_t f1, const double *mean, double *acc)
    void fbn_grad_input_fl(const float *dy, const float *x, float *dx, Py_ssize_t C, Py_ssize_t S, Py_ssize_t f0, Py_ssize_t f1, const float *cf, int nt)
    void fbn_row_moments_f64(const double *p, Py_ssize_t n, double *acc)
    void fbn_ln_apply_f32(const float *x, float *y, Py_ssize_t n, float mhi, float mlo, float istd, const float *w, const float *b, int nt)
    void fbn_ln_apply_f64(const double *x, double *y, Py_ssize_t n, double mhi, double mlo, double istd, const double *w, const double *b, int nt)
    void fbn_ln_grad_sums_f32(const float *dy, const float *x, const float *w, Py_ssize_t n, double m, double istd, double *a, double *s, double *gw, double *gb)
    void fbn_ln_grad_sums_f64(const double *dy, const double *x, const double *w, Py_ssize_t n, double m, double istd, double *a, double *s, double *gw, double *gb)
    void fbn_ln_grad_sums_fl(const float *dy, const float *x, const float *w, Py_ssize_t n, float mhi, float mlo, float istd, double *a, double *s, float *gwf, float *gbf)
    void fbn_ln_fold(float *gf, double *g, Py_ssize_t n)
    enum: FBN_LN_FOLD
    double fbn_row_traffic_f32(const float *x, const float *dy, float *y, Py_ssize_t n, int nt)
    double fbn_row_traffic_f64(const double *x, const double *dy, double *y, Py_ssize_t n, int nt)
    void fbn_ln_grad_input_fl(const float *dy, const float *x, float *dx, Py_ssize_t n, const float *w, float istd, float mhi, float mlo, float kx, float kc, int nt)
    void fbn_ln_grad_input_f64(const double *dy, const double *x, double *dx, Py_ssize_t n, const double *w, double istd, double mhi, double mlo, double kx, double kc, int nt)
    int fbn_pair_affine(const float *x, float *y, Py_ssize_t C, Py_ssize_t S, const float *cf, int nt, const float *xn, double *acc)
    int fbn_pair_grad(const float *dy, const float *x, float *dx, Py_ssize_t C, Py_ssize_t S, const float *cf, int nt,
                      const float *dyn, const float *xn, const double *meann, double *acc)
    int fbn_row_pairs(int set)

cdef enum:
    PLAN_WIDTH = 16          # tasks a call aims at (8 per core on 2 cores), fixed: see PIECES
    MIN_PIECE = 16384        # elements a piece at least
    MIN_PER_THREAD = 131072  # elements a thread at least (as _kernels.pyx: a helper costs a wake-up)
    ROW_ELEMS = 32768        # elements a FUSED task at least (whole rows)
    LN_MAX_BLOCKS = 16       # layer norm backward: column-partial slots, at most


cdef enum:  # ops
    GN_FWD = 1      # fused rows: stats + coefficients + apply
    GN_STATS = 2    # pieces: partial moments
    GN_APPLY = 3    # pieces (or whole rows, P = 1): apply the coefficients in cf
    GN_BWD = 4      # fused rows: grad sums + coefficients + grad_input
    GN_GSUMS = 5    # pieces: partial grad sums
    GN_GINPUT = 6   # pieces: grad_input from cf
    LN_FWD = 7
    LN_APPLY = 8
    LN_BWD = 9      # (block, piece): grad sums (+ grad_input when P == 1)
    LN_GINPUT = 10
    TRAFFIC = 11    # the memory floor (norms_bench): whole rows (P == 1) or (row, piece)


cdef struct Job:
    int op, dbl, nt, training
    void *x
    void *y
    void *dy
    const void *w
    const void *b
    void *cf            # group: per-row coefficient blocks, 5 * Cg values a row
    double *mean        # R values
    double *var
    double *invstd
    double *cmean       # group backward: each row's mean, repeated Cg times
    double *part        # per-task partials (see the ops)
    double *sums        # group backward: (R, Cg, 2) sums of dy and dy * (x - mean)
    double *col         # layer backward: (nb, 2, L) column partials of dy and dy * xhat
    float *colf         # layer backward, float32: the same in float32, folded into col (_ln_fold)
    Py_ssize_t R, L, G, Cg, S, P, nb, rows_task
    double eps


cdef inline Py_ssize_t _split(Py_ssize_t L, Py_ssize_t K, Py_ssize_t k) noexcept nogil:
    return L * k // K


cdef object _scratch(object like, Py_ssize_t n):
    """n elements of like's dtype for a call's own use, from fastbn's caching allocator
    (_alloc.scratch): a coefficient block as large as the data (group norm on (N, C) input, one
    element a channel) was mapped afresh, its pages faulted in, on every call."""
    return _alloc_scratch(n, like.dtype)


cdef inline double *_dptr(object a) noexcept:
    return <double *>cnp.PyArray_DATA(<cnp.ndarray>a)


include "_norm_rows.pxi"


# ---------------------------------------------------------------- tasks
cdef void _pass(const Job *jb, Py_ssize_t k, floating tag) noexcept nogil:
    cdef Py_ssize_t r, r0, r1, p, f0, f1, blk
    cdef double acc[4]
    cdef double A, B
    cdef int op = jb.op
    if op == TRAFFIC:
        jb.part[k] = 0.0
        if jb.P == 1:
            for r in range(k * jb.rows_task, min(jb.R, (k + 1) * jb.rows_task)):
                _traffic(jb, r, 0, jb.L, jb.part + k, tag)
        else:
            _traffic(jb, k // jb.P, _split(jb.L, jb.P, k % jb.P), _split(jb.L, jb.P, k % jb.P + 1), jb.part + k, tag)
    elif op == GN_FWD or op == GN_BWD or op == LN_FWD:  # whole rows
        r0 = k * jb.rows_task
        r1 = min(jb.R, r0 + jb.rows_task)
        if op == GN_FWD:
            _group_forward_rows(jb, r0, r1, tag)
        elif op == GN_BWD:
            _group_backward_rows(jb, r0, r1, tag)
        else:
            for r in range(r0, r1):
                _moments(jb, r, 0, jb.L, acc, tag)
                _finish_row(jb, r, acc)
                _ln_apply(jb, r, 0, jb.L, tag)
    elif op == LN_BWD or op == LN_GINPUT:  # (row block, piece)
        blk = k // jb.P
        p = k % jb.P
        f0 = _split(jb.L, jb.P, p)
        f1 = _split(jb.L, jb.P, p + 1)
        r0 = _split(jb.R, jb.nb, blk)
        r1 = _split(jb.R, jb.nb, blk + 1)
        for r in range(r0, r1):
            if op == LN_BWD:
                _ln_gsums(jb, blk, r, f0, f1, &A, &B, tag)
                if floating is float:  # fold every FBN_LN_FOLD rows of the block, and at its end
                    if (r - r0 + 1) % FBN_LN_FOLD == 0 or r == r1 - 1:
                        _ln_fold(jb, blk, f0, f1)
                if jb.P == 1:
                    _ln_ginput(jb, r, 0, jb.L, A, B, tag)
                else:
                    jb.part[2 * (r * jb.P + p)] = A
                    jb.part[2 * (r * jb.P + p) + 1] = B
            else:
                _ln_ginput(jb, r, f0, f1, jb.part[2 * r], jb.part[2 * r + 1], tag)
    else:  # (row, piece)
        r = k // jb.P
        p = k % jb.P
        f0 = _split(jb.L, jb.P, p)
        f1 = _split(jb.L, jb.P, p + 1)
        if op == GN_STATS:
            _moments(jb, r, f0, f1, jb.part + 4 * k, tag)
        elif op == GN_APPLY:
            _group_apply(jb, r, f0, f1, tag)
        elif op == LN_APPLY:
            _ln_apply(jb, r, f0, f1, tag)
        elif op == GN_GSUMS:
            _group_gsums(jb, r, f0, f1, jb.part + 2 * jb.Cg * k, tag)
        elif op == GN_GINPUT:
            _group_ginput(jb, r, f0, f1, tag)
    if jb.nt:
        fbn_sfence()


cdef void _task(void *ctx, Py_ssize_t k) noexcept nogil:
    cdef const Job *jb = <const Job *>ctx
    if jb.dbl:
        _pass(jb, k, <double>0)
    else:
        _pass(jb, k, <float>0)


cdef void _run(Job *jb, int op, Py_ssize_t ntasks, int threads) noexcept nogil:
    cdef Py_ssize_t k
    jb.op = op
    if ntasks == 1 or threads <= 1:
        for k in range(ntasks):
            _task(jb, k)
    else:
        pool_run(_task, jb, ntasks, threads)


# ---------------------------------------------------------------- planning
cdef Py_ssize_t _pieces(Py_ssize_t R, Py_ssize_t L) noexcept nogil:
    """Pieces a row is cut into: 1 with PLAN_WIDTH rows or more, else enough for PLAN_WIDTH
    tasks, of MIN_PIECE elements at least.  The shape's alone."""
    if R >= PLAN_WIDTH or L < 2 * MIN_PIECE:
        return 1
    return max(1, min((PLAN_WIDTH + R - 1) // R, L // MIN_PIECE))


cdef int _threads(int n_threads, Py_ssize_t total, Py_ssize_t ntasks) noexcept nogil:
    return <int>max(1, min(<Py_ssize_t>n_threads, min(ntasks, total // MIN_PER_THREAD)))


cdef void _setup(Job *jb, int t, Py_ssize_t R, Py_ssize_t L, int nbuf, int stream):
    jb.dbl = t == cnp.NPY_DOUBLE
    jb.R = R
    jb.L = L
    cdef Py_ssize_t item = 8 if jb.dbl else 4
    # streaming stores above a share of the detected L3 (fastbn._plan.norm_stream_bytes)
    jb.nt = (R * L * item * nbuf > norm_stream_bytes()) if stream < 0 else stream
    jb.rows_task = max(1, ROW_ELEMS // max(L, 1))
    jb.P = _pieces(R, L)


# ---------------------------------------------------------------- entry points
def short_inline(enabled=None):
    """Whether float32 rows of short channel runs take the AVX-512 loops (_norm_simd.h's
    fbn_gs_affine and fbn_gs_grad_input, and _short512.h's gradient sums: the same bits as the
    generic loops) rather than the generic ones; sets it when given (the tests run both).  This
    module's switch; fastbn._kernels.short_inline is batch norm's.  Not part of fastbn's API."""
    return bool(fbn_short_inline(-1 if enabled is None else int(bool(enabled))))


def row_pairs(enabled=None):
    """Whether group norm's fused float32 tasks pair rows (_norm_simd.h: a row's normalize in one
    loop with the next row's moments, a row's grad_input with the next row's gradient sums; the
    same bits as a row at a time) where they can; sets it when given (the tests run both).  Not
    part of fastbn's API."""
    return bool(fbn_row_pairs(-1 if enabled is None else int(bool(enabled))))


def group_forward(x, y, weight, bias, Py_ssize_t G, Py_ssize_t S, double eps, mean, var, invstd,
                  int threads, int stream=-1):
    """Group norm's training forward on x viewed as (N, C, S) with C = G * Cg: write y, and each
    (n, g) row's mean, biased variance and invstd (float64, N * G values each)."""
    cdef int t = _float_type(x, -1, "x")
    cdef Job jb
    cdef Py_ssize_t n = cnp.PyArray_SIZE(<cnp.ndarray>x), C = weight.shape[0], R, L, k, p
    if G <= 0 or S <= 0 or C % G or n % (C * S):
        raise ValueError("group_forward: inconsistent shape")
    R = n // (C * S) * G
    L = n // R if R else 0
    _setup(&jb, t, R, L, 2, stream)
    jb.G = G
    jb.Cg = C // G
    jb.S = S
    jb.eps = eps
    jb.x = _data(x, t, n, False, "x")
    jb.y = _data(y, t, n, True, "y")
    jb.w = _data(weight, t, C, False, "weight")
    jb.b = _data(bias, t, C, False, "bias")
    jb.mean = <double *>_data(mean, cnp.NPY_DOUBLE, R, True, "mean")
    jb.var = <double *>_data(var, cnp.NPY_DOUBLE, R, True, "var")
    jb.invstd = <double *>_data(invstd, cnp.NPY_DOUBLE, R, True, "invstd")
    if n == 0:
        return
    cf = _scratch(x, R * 5 * jb.Cg)
    jb.cf = cnp.PyArray_DATA(<cnp.ndarray>cf)
    part = _alloc_scratch(4 * R * jb.P, np.float64)
    jb.part = _dptr(part)
    cdef double acc[4]
    with nogil:
        if jb.P == 1:
            k = (R + jb.rows_task - 1) // jb.rows_task
            _run(&jb, GN_FWD, k, _threads(threads, n, k))
        else:
            _run(&jb, GN_STATS, R * jb.P, _threads(threads, n, R * jb.P))
            for k in range(R):
                acc[0] = acc[1] = acc[2] = acc[3] = 0.0
                for p in range(jb.P):
                    fbn_shift_merge(acc, jb.part[4 * (k * jb.P + p)], jb.part[4 * (k * jb.P + p) + 1],
                                    jb.part[4 * (k * jb.P + p) + 2], jb.part[4 * (k * jb.P + p) + 3])
                _finish_row(&jb, k, acc)
                if jb.dbl:
                    _group_coefs(&jb, k, <double>0)
                else:
                    _group_coefs(&jb, k, <float>0)
            _run(&jb, GN_APPLY, R * jb.P, _threads(threads, n, R * jb.P))


def group_apply(x, y, weight, bias, Py_ssize_t G, Py_ssize_t S, mean, invstd, int threads, int stream=-1):
    """y = (x - mean[row]) * invstd[row] * weight[c] + bias[c], with given per-row statistics
    (instance norm on running statistics)."""
    cdef int t = _float_type(x, -1, "x")
    cdef Job jb
    cdef Py_ssize_t n = cnp.PyArray_SIZE(<cnp.ndarray>x), C = weight.shape[0], R, L, k
    if G <= 0 or S <= 0 or C % G or n % (C * S):
        raise ValueError("group_apply: inconsistent shape")
    R = n // (C * S) * G
    L = n // R if R else 0
    _setup(&jb, t, R, L, 2, stream)
    jb.G = G
    jb.Cg = C // G
    jb.S = S
    jb.x = _data(x, t, n, False, "x")
    jb.y = _data(y, t, n, True, "y")
    jb.w = _data(weight, t, C, False, "weight")
    jb.b = _data(bias, t, C, False, "bias")
    jb.mean = <double *>_data(mean, cnp.NPY_DOUBLE, R, False, "mean")
    jb.invstd = <double *>_data(invstd, cnp.NPY_DOUBLE, R, False, "invstd")
    if n == 0:
        return
    cf = _scratch(x, R * 5 * jb.Cg)
    jb.cf = cnp.PyArray_DATA(<cnp.ndarray>cf)
    with nogil:
        for k in range(R):
            if jb.dbl:
                _group_coefs(&jb, k, <double>0)
            else:
                _group_coefs(&jb, k, <float>0)
        _run(&jb, GN_APPLY, R * jb.P, _threads(threads, n, R * jb.P))


def group_backward(dy, x, dx, weight, Py_ssize_t G, Py_ssize_t S, mean, invstd, bint training, int threads,
                   int stream=-1):
    """Group norm's backward: write dx; return (grad_weight, grad_bias) as float64 (C,) arrays,
    from the per-(n, c) sums of dy and dy * (x - mean) (summed over n in order, the (n, c) sum of
    dy * (x - mean) times its row's invstd).  ``training`` False: the statistics were constants
    (dx = dy * weight * invstd)."""
    cdef int t = _float_type(x, -1, "x")
    cdef Job jb
    cdef Py_ssize_t n = cnp.PyArray_SIZE(<cnp.ndarray>x), C = weight.shape[0], R, L, k, p, c, g, Cg, N
    cdef double istd
    if G <= 0 or S <= 0 or C % G or n % (C * S):
        raise ValueError("group_backward: inconsistent shape")
    R = n // (C * S) * G
    L = n // R if R else 0
    N = R // G
    _setup(&jb, t, R, L, 3, stream)
    Cg = C // G
    jb.G = G
    jb.Cg = Cg
    jb.S = S
    jb.training = training
    jb.dy = _data(dy, t, n, False, "dy")
    jb.x = _data(x, t, n, False, "x")
    jb.y = _data(dx, t, n, True, "dx")
    jb.w = _data(weight, t, C, False, "weight")
    jb.mean = <double *>_data(mean, cnp.NPY_DOUBLE, R, False, "mean")
    jb.invstd = <double *>_data(invstd, cnp.NPY_DOUBLE, R, False, "invstd")
    gw, gb = np.zeros(C), np.zeros(C)
    if n == 0:
        return gw, gb
    cdef double *pw = _dptr(gw)
    cdef double *pb = _dptr(gb)
    sums = _alloc_scratch(2 * R * Cg, np.float64)  # every (n, c) pair is written by the kernel
    jb.sums = _dptr(sums)
    cf = _scratch(x, R * 5 * Cg)
    jb.cf = cnp.PyArray_DATA(<cnp.ndarray>cf)
    cmean = _alloc_scratch(R * Cg, np.float64)
    jb.cmean = _dptr(cmean)
    part = _alloc_scratch(2 * Cg * R * jb.P if jb.P > 1 else 0, np.float64)
    jb.part = _dptr(part)
    with nogil:
        for k in range(R):  # each channel's mean: its row's (loops, not k // Cg: a division costs)
            for c in range(Cg):
                jb.cmean[k * Cg + c] = jb.mean[k]
        if jb.P == 1:
            k = (R + jb.rows_task - 1) // jb.rows_task
            _run(&jb, GN_BWD, k, _threads(threads, n, k))
        else:
            _run(&jb, GN_GSUMS, R * jb.P, _threads(threads, n, R * jb.P))
            for k in range(R):
                for c in range(2 * Cg):
                    jb.sums[k * 2 * Cg + c] = 0.0
                for p in range(jb.P):
                    for c in range(2 * Cg):
                        jb.sums[k * 2 * Cg + c] += jb.part[(k * jb.P + p) * 2 * Cg + c]
                if jb.dbl:
                    _group_grad_coefs(&jb, k, <double>0)
                else:
                    _group_grad_coefs(&jb, k, <float>0)
            _run(&jb, GN_GINPUT, R * jb.P, _threads(threads, n, R * jb.P))
        for k in range(N):  # sums[(n * C + c) * 2 + {0, 1}]; channel c is in row n * G + c // Cg
            for g in range(G):
                istd = jb.invstd[k * G + g]
                for c in range(g * Cg, (g + 1) * Cg):
                    pb[c] += jb.sums[(k * C + c) * 2]
                    pw[c] += jb.sums[(k * C + c) * 2 + 1] * istd
    return gw, gb


def layer_forward(x, y, weight, bias, Py_ssize_t L, double eps, mean, var, invstd, int threads, int stream=-1):
    """Layer norm's forward on x viewed as (R, L) rows: write y and each row's mean, biased
    variance and invstd (float64)."""
    cdef int t = _float_type(x, -1, "x")
    cdef Job jb
    cdef Py_ssize_t n = cnp.PyArray_SIZE(<cnp.ndarray>x), R, k, p
    if L <= 0 or n % L:
        raise ValueError("layer_forward: inconsistent shape")
    R = n // L
    _setup(&jb, t, R, L, 2, stream)
    jb.eps = eps
    jb.x = _data(x, t, n, False, "x")
    jb.y = _data(y, t, n, True, "y")
    jb.w = _data(weight, t, L, False, "weight")
    jb.b = _data(bias, t, L, False, "bias")
    jb.mean = <double *>_data(mean, cnp.NPY_DOUBLE, R, True, "mean")
    jb.var = <double *>_data(var, cnp.NPY_DOUBLE, R, True, "var")
    jb.invstd = <double *>_data(invstd, cnp.NPY_DOUBLE, R, True, "invstd")
    if n == 0:
        return
    part = _alloc_scratch(4 * R * jb.P, np.float64)
    jb.part = _dptr(part)
    cdef double acc[4]
    with nogil:
        if jb.P == 1:
            k = (R + jb.rows_task - 1) // jb.rows_task
            _run(&jb, LN_FWD, k, _threads(threads, n, k))
        else:
            _run(&jb, GN_STATS, R * jb.P, _threads(threads, n, R * jb.P))
            for k in range(R):
                acc[0] = acc[1] = acc[2] = acc[3] = 0.0
                for p in range(jb.P):
                    fbn_shift_merge(acc, jb.part[4 * (k * jb.P + p)], jb.part[4 * (k * jb.P + p) + 1],
                                    jb.part[4 * (k * jb.P + p) + 2], jb.part[4 * (k * jb.P + p) + 3])
                _finish_row(&jb, k, acc)
            _run(&jb, LN_APPLY, R * jb.P, _threads(threads, n, R * jb.P))


def layer_backward(dy, x, dx, weight, Py_ssize_t L, mean, invstd, int threads, int stream=-1):
    """Layer norm's backward: write dx; return (grad_weight, grad_bias) as float64 (L,) arrays."""
    cdef int t = _float_type(x, -1, "x")
    cdef Job jb
    cdef Py_ssize_t n = cnp.PyArray_SIZE(<cnp.ndarray>x), R, k, p
    cdef double A, B
    if L <= 0 or n % L:
        raise ValueError("layer_backward: inconsistent shape")
    R = n // L
    _setup(&jb, t, R, L, 3, stream)
    jb.dy = _data(dy, t, n, False, "dy")
    jb.x = _data(x, t, n, False, "x")
    jb.y = _data(dx, t, n, True, "dx")
    jb.w = _data(weight, t, L, False, "weight")
    jb.mean = <double *>_data(mean, cnp.NPY_DOUBLE, R, False, "mean")
    jb.invstd = <double *>_data(invstd, cnp.NPY_DOUBLE, R, False, "invstd")
    if n == 0:
        return np.zeros(L), np.zeros(L)
    # Row blocks, each with its own (2, L) column partials: at most LN_MAX_BLOCKS, and no more
    # than R / 8 (the partials stay smaller than the input); with pieces, one block.
    jb.nb = 1 if jb.P > 1 else max(1, min(<Py_ssize_t>LN_MAX_BLOCKS, R // 8))
    col = np.zeros((jb.nb, 2, L))
    jb.col = _dptr(col)
    colf = np.zeros(0 if jb.dbl else jb.nb * 2 * L, dtype=np.float32)
    jb.colf = <float *>cnp.PyArray_DATA(<cnp.ndarray>colf)
    part = _alloc_scratch(2 * R * jb.P, np.float64)
    jb.part = _dptr(part)
    with nogil:
        _run(&jb, LN_BWD, jb.nb * jb.P, _threads(threads, n, jb.nb * jb.P))
        if jb.P > 1:
            for k in range(R):
                A = B = 0.0
                for p in range(jb.P):
                    A += jb.part[2 * (k * jb.P + p)]
                    B += jb.part[2 * (k * jb.P + p) + 1]
                jb.part[2 * k] = A
                jb.part[2 * k + 1] = B
            _run(&jb, LN_GINPUT, jb.P, _threads(threads, n, jb.P))
    sums = col.sum(axis=0) if jb.nb > 1 else col[0]
    return sums[1], sums[0]


def traffic(x, dy, y, Py_ssize_t L, int threads, int stream=-1):
    """The memory floor of the norms' passes, for bench/norms_bench.py: x viewed as rows of L
    elements, split into tasks as the fused kernels split them (whole rows, or pieces of long
    rows), on the same pool and with the same rule for streaming stores; each task reads its rows
    of x (and dy) and writes y = x (+ dy) when y is given.  Returns a sum of what it read when y
    is None.  Not part of fastbn's API."""
    cdef int t = _float_type(x, -1, "x")
    cdef Job jb
    cdef Py_ssize_t n = cnp.PyArray_SIZE(<cnp.ndarray>x), R, k, ntasks
    cdef double total = 0.0
    if L <= 0 or n % L:
        raise ValueError("traffic: inconsistent shape")
    R = n // L
    _setup(&jb, t, R, L, 1 + (dy is not None) + (y is not None), stream)
    jb.x = _data(x, t, n, False, "x")
    jb.dy = NULL if dy is None else _data(dy, t, n, False, "dy")
    jb.y = NULL if y is None else _data(y, t, n, True, "y")
    if y is None:
        jb.nt = 0
    ntasks = (R + jb.rows_task - 1) // jb.rows_task if jb.P == 1 else R * jb.P
    part = np.zeros(ntasks)
    jb.part = _dptr(part)
    with nogil:
        _run(&jb, TRAFFIC, ntasks, _threads(threads, n, ntasks))
    for k in range(ntasks):
        total += jb.part[k]
    return total
