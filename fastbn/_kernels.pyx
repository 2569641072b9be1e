"""fastbn's CPU kernels: batch norm over C-contiguous (N, C, S) buffers, on fastbn's thread pool.

Every operation is "reduce per channel, derive per-channel coefficients, apply elementwise", and
batch norm is memory-bound, so what matters is how threads walk memory.  A call is cut into
tasks by its shape alone (never by the thread count: see PLAN_WIDTH), which threads of the pool
in _pool.h claim one by one, the calling thread first; three ways to cut (``path``):

RANGES   the buffer is cut into equal consecutive ranges in memory order, a task each; a task
         streams through its range front to back, accumulating per-channel partial sums (row r of
         S elements is channel r % C) into its own slot, the slots are merged in task order, and
         the apply pass takes the ranges in reverse order, each back to front in pieces of
         PIECE_BYTES, so that it starts with what the cache still holds.  Any shape splits
         evenly whatever C is (C=1 and C=3 included).
COLUMNS  spatial size below SMALL_S, e.g. an (N, C) matrix: the buffer is an (N, C*S) matrix and
         tasks take shares of consecutive row blocks, reducing down the columns with vector loads
         across them (per-task accumulators merged afterwards; the S columns of a channel merged
         last); the apply pass takes the shares, and their blocks, in reverse order.
SLICES   the same (N, C*S) matrix when it is much wider than tall (a small batch of many features): each
         task takes a slice of the channels, i.e. of the columns, over all the rows, and does
         everything for them alone (reduce, statistics, apply), so nothing is merged across
         tasks and no thread reads what another wrote: with blocks of rows instead, on
         (16, 8192) float32 two threads took 117 us for an evaluation forward and one thread 25,
         from reading the coefficients the other thread had just written.

``unit`` (0: choose) forces the range size in elements (RANGES) or the rows per block (COLUMNS,
SLICES; then every COLUMNS block is a task); tests set it small so small inputs run many tasks.
``stream`` (-1: choose by the bytes the call touches and the path, see STREAM_BYTES; 0 off, 1 on)
switches the non-temporal stores of _simd.h.

The entry points check what memory safety needs of their arrays (see "arguments" below);
fastbn.functional validated the rest.  Statistics are accumulated in double for float32 and
float64 alike.  The GIL is released for all the work.
"""

import numpy as np
cimport numpy as cnp
from cython cimport floating

from fastbn._pool cimport pool_run
# the pool's knobs and counters, part of this module's interface (see _pool.pyx)
from fastbn._pool import pool_counters, pool_helpers, pool_spin_us
from fastbn._simd cimport *
from libc.string cimport memset

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


from fastbn._plan cimport (
    AUTO, RANGES, COLUMNS, SLICES, MERGE_CHANNELS, MERGE_ALONE, SLICE_CHUNK, plan_threads, plan_tasks,
    plan_path, plan_stream, plan_ranges, plan_rows, plan_shares, plan_slices, plan_eval_stats, piece_elements,
    range_start, share_start, slice_start, slice_rows, piece_start)
# the planner's knobs, part of this module's interface (see _plan.pyx)
from fastbn._plan import PATHS, STREAM_L3_RATIO, plan_width, thread_threshold, thresholds, tune_for


# ---------------------------------------------------------------- second passes, walking back
cdef void _affine_backwards(const floating *x, floating *y, Py_ssize_t C, Py_ssize_t S, Py_ssize_t f0,
                            Py_ssize_t f1, const floating *cf, int stream) noexcept nogil:
    """_affine over [f0, f1) piece by piece, last piece first (PIECE_BYTES)."""
    cdef Py_ssize_t s, piece = piece_elements(sizeof(floating))
    while f1 > f0:
        s = piece_start(f0, f1, piece)
        _affine(x, y, C, S, s, f1, cf, stream)
        f1 = s


cdef void _grad_input_backwards(const floating *dy, const floating *x, floating *dx, Py_ssize_t C,
                                Py_ssize_t S, Py_ssize_t f0, Py_ssize_t f1, const floating *cf, int stream) noexcept nogil:
    """_grad_input over [f0, f1) piece by piece, last piece first (PIECE_BYTES)."""
    cdef Py_ssize_t s, piece = piece_elements(sizeof(floating))
    while f1 > f0:
        s = piece_start(f0, f1, piece)
        _grad_input(dy, x, dx, C, S, s, f1, cf, stream)
        f1 = s


# ---------------------------------------------------------------- per-column coefficients
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
# Each merges the partials of its K tasks in task order, so which thread ran a task does not
# matter; the drivers run them in tasks of MERGE_CHANNELS channels, between the reduce and the
# apply passes.

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


cdef void _merge_column_stats(Py_ssize_t c, Py_ssize_t C, Py_ssize_t S, Py_ssize_t T, const double *pp, Py_ssize_t ncols,
                              Py_ssize_t col0, double eps, const floating *w, const floating *b, double *mean,
                              double *var, double *invstd, floating *cf, floating *cfw) noexcept nogil:
    # pp: T shares of COL_MOMENTS * ncols + 1 (see _col_moments) over columns col0 .. col0 + ncols - 1 (all
    # W columns for COLUMNS, a task's own for SLICES); channel c owns columns c*S .. c*S+S-1
    cdef double acc[4]
    cdef Py_ssize_t t, s, j, col
    acc[0] = acc[1] = acc[2] = acc[3] = 0
    for t in range(T):
        j = t * (COL_MOMENTS * ncols + 1)
        for s in range(S):
            col = j + 1 + c * S + s - col0
            fbn_shift_merge(acc, pp[j], pp[col], pp[col + ncols], pp[col + 2 * ncols])
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


cdef void _merge_column_grad(Py_ssize_t c, Py_ssize_t C, Py_ssize_t S, Py_ssize_t T, const double *pp, Py_ssize_t ncols,
                             Py_ssize_t col0, double count, bint training, const floating *w, const double *mean,
                             const double *invstd, double *gw, double *gb, floating *cf, floating *cfw) noexcept nogil:
    # pp: T shares of [sum dy (ncols) | sum dy*(x-mean) (ncols)] over columns col0 .. col0 + ncols - 1
    cdef double sdy = 0, sdyx = 0
    cdef Py_ssize_t t, s, col
    for t in range(T):
        for s in range(S):
            col = t * 2 * ncols + c * S + s - col0
            sdy += pp[col]
            sdyx += pp[col + ncols]
    _finish_grad(c, C, sdy, sdyx, count, training, w, mean, invstd, gw, gb, cf)
    _expand(cf, C, S, 5, c, cfw)


# ---------------------------------------------------------------- a call's job
# A call fills one _Job and runs it as passes of tasks on fastbn's thread pool (_pool.h):
# pool_run(_task, &job, n, T) runs _task(&job, k) for k = 0 .. n-1 on up to T threads, the
# caller one of them, and returns when all n ran.  job.op says which pass; _task dispatches on the
# element type once, and _pass does task k of the pass.  Each task writes its partial sums to its
# own slot of job.part, and the merges read them in task order: a result does not depend on which
# thread ran which task, nor on how many threads there were.

cdef enum:  # job.op: the passes
    REDUCE = 1      # task k's partial sums: moments (forward) or gradient sums (backward)
    MERGE = 2       # channels of merge task k: merge the partials, statistics, coefficients
    APPLY_BACK = 3  # the second pass: task K-1-k, back to front (see PIECE_BYTES)
    APPLY = 4       # evaluation forward: range k (RANGES) or row block k (COLUMNS), front to back
    SLICE = 5       # SLICES: slice k, all of it
    EVAL_STATS = 6  # channels of task k: statistics from the running buffers

cdef enum:  # job.kind
    TRAIN = 1
    EVAL = 2
    BACKWARD = 3


cdef struct _Job:
    int op, kind, how       # the pass, the operation, the work split (RANGES, COLUMNS, SLICES)
    bint single             # float32 elements, else float64
    bint training           # backward: the forward used batch statistics (else fixed ones)
    bint rsingle            # evaluation: float32 running buffers, else float64
    int stream                  # streaming stores
    const void *x
    const void *dy          # backward: grad_output
    void *y                 # the output: y, or grad_input
    const void *w
    const void *b
    void *cf                # per-channel coefficients, blocks of C (see "per-channel coefficients")
    void *cw                # per-column coefficients, blocks of W (cf itself when S = 1)
    double *mean
    double *var
    double *invstd
    double *gw
    double *gb
    const double *wm        # COLUMNS backward: each column's channel mean
    double *part            # the tasks' partial sums, a slot each
    const void *rm          # evaluation: running buffers (NULL: mean and invstd are given)
    const void *rv
    double eps
    Py_ssize_t N, C, S, L, W
    Py_ssize_t K            # tasks that cut the data: ranges, shares of row blocks, or slices
    Py_ssize_t R, nb        # COLUMNS: rows per block, blocks
    Py_ssize_t unit


# ---------------------------------------------------------------- SLICES: one task's columns
# Task k of T takes channels slice_start(k) .. slice_start(k + 1) and does the whole operation for
# them alone, SLICE_CHUNK columns (whole channels) at a time: reduce over all the rows in blocks front
# to back, the chunk's statistics and coefficients, apply in blocks back to front (see "two passes";
# a chunk of a small batch is still in L1/L2 for the apply).  Its scratch is its own share of one
# array per call, SLICE_SCRATCH doubles a task (on the stack it took 49 KiB, which crashed threads
# given small stacks on purpose: threading.stack_size(48 KiB), OMP_STACKSIZE=56K).

cdef enum:
    # doubles a task: a training chunk's moments (the count, then 6 per column), a backward's sums and
    # column means (3 per column); rounded up to whole 64-byte lines
    SLICE_SCRATCH = COL_MOMENTS * SLICE_CHUNK + 8


cdef struct _Chunk:  # channels c0 .. end - 1 of a slice: columns col0 .. col0 + ncols - 1, nb blocks of R rows
    Py_ssize_t end, col0, ncols, R, nb


cdef inline _Chunk _slice_chunk(Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t N, Py_ssize_t S,
                                Py_ssize_t unit) noexcept nogil:
    """The chunk of a slice's channels c0 .. c1 - 1 that starts at c0."""
    cdef _Chunk ch
    ch.end = min(c1, c0 + max(<Py_ssize_t>1, SLICE_CHUNK // S))
    ch.col0 = c0 * S
    ch.ncols = (ch.end - c0) * S
    ch.R = slice_rows(ch.ncols, unit)
    ch.nb = (N + ch.R - 1) // ch.R
    return ch


cdef void _slice_train(const _Job *jb, Py_ssize_t k, floating tag) noexcept nogil:
    cdef const floating *xp = <const floating *>jb.x
    cdef const floating *wp = <const floating *>jb.w
    cdef const floating *bp = <const floating *>jb.b
    cdef floating *yp = <floating *>jb.y
    cdef floating *cf = <floating *>jb.cf
    cdef floating *cw = <floating *>jb.cw
    cdef double *th = jb.part + k * SLICE_SCRATCH  # [count | K | rel | M2 | scratch], see _col_moments
    cdef Py_ssize_t N = jb.N, C = jb.C, S = jb.S, W = jb.W, j, c, o
    cdef Py_ssize_t c0 = slice_start(C, S, jb.K, k), c1 = slice_start(C, S, jb.K, k + 1)
    cdef _Chunk ch
    while c0 < c1:
        ch = _slice_chunk(c0, c1, N, S, jb.unit)
        th[0] = 0
        for j in range(ch.nb):
            o = j * ch.R * W + ch.col0
            _col_moments(xp + o, min(ch.R, N - j * ch.R), ch.ncols, W, th)
        if S == 1:
            _col_finish_stats(th, ch.ncols, jb.eps, wp + c0, bp + c0, jb.mean + c0, jb.var + c0, jb.invstd + c0, cf + c0, C)
        else:
            for c in range(c0, ch.end):
                _merge_column_stats(c, C, S, 1, th, ch.ncols, ch.col0, jb.eps, wp, bp, jb.mean, jb.var, jb.invstd, cf, cw)
        for j in range(ch.nb - 1, -1, -1):
            o = j * ch.R * W + ch.col0
            _col_affine(xp + o, yp + o, min(ch.R, N - j * ch.R), ch.ncols, W, cw + ch.col0, jb.stream)
        c0 = ch.end


cdef void _slice_eval(const _Job *jb, Py_ssize_t k, floating tag) noexcept nogil:
    # jb.rm != NULL: first the slice's channels' statistics from the running buffers (see _forward_eval)
    cdef floating *cf = <floating *>jb.cf
    cdef floating *cw = <floating *>jb.cw
    cdef Py_ssize_t N = jb.N, C = jb.C, S = jb.S, W = jb.W, j, c
    cdef Py_ssize_t c0 = slice_start(C, S, jb.K, k), c1 = slice_start(C, S, jb.K, k + 1)
    cdef Py_ssize_t col0 = c0 * S, ncols = (c1 - c0) * S, R = slice_rows(ncols, jb.unit), nb = (N + R - 1) // R
    if ncols == 0:
        return
    if jb.rm != NULL:
        _eval_stats(jb.rm, jb.rv, jb.eps, jb.mean, jb.invstd, c0, c1, jb.rsingle)
    _eval_coefs(jb.mean + c0, jb.invstd + c0, <const floating *>jb.w + c0, <const floating *>jb.b + c0, cf + c0,
                c1 - c0, C)
    for c in range(c0, c1):
        _expand(cf, C, S, 4, c, cw)
    for j in range(nb):
        _col_affine(<const floating *>jb.x + j * R * W + col0, <floating *>jb.y + j * R * W + col0,
                    min(R, N - j * R), ncols, W, cw + col0, jb.stream)


cdef void _slice_backward(const _Job *jb, Py_ssize_t k, floating tag) noexcept nogil:
    cdef const floating *gp = <const floating *>jb.dy
    cdef const floating *xp = <const floating *>jb.x
    cdef const floating *wp = <const floating *>jb.w
    cdef floating *dp = <floating *>jb.y
    cdef floating *cf = <floating *>jb.cf
    cdef floating *cw = <floating *>jb.cw
    cdef double *th = jb.part + k * SLICE_SCRATCH  # [sum dy (w) | sum dy*(x-mean) (w)]
    cdef double *wm = th + 2 * SLICE_CHUNK  # each column's channel mean
    cdef const double *m
    cdef const double *mp = jb.mean
    cdef Py_ssize_t N = jb.N, C = jb.C, S = jb.S, W = jb.W, j, c, o
    cdef Py_ssize_t c0 = slice_start(C, S, jb.K, k), c1 = slice_start(C, S, jb.K, k + 1)
    cdef _Chunk ch
    while c0 < c1:
        ch = _slice_chunk(c0, c1, N, S, jb.unit)
        for j in range(2 * ch.ncols):
            th[j] = 0
        m = mp + c0  # one column per channel: the channel means themselves
        if S > 1:
            for j in range(ch.ncols):
                wm[j] = mp[c0 + j // S]
            m = wm
        for j in range(ch.nb):
            o = j * ch.R * W + ch.col0
            _col_grad_sums(gp + o, xp + o, min(ch.R, N - j * ch.R), ch.ncols, W, m, th)
        if S == 1:
            _col_finish_grad(th, ch.ncols, <double>N, jb.training, wp + c0, mp + c0, jb.invstd + c0, jb.gw + c0,
                             jb.gb + c0, cf + c0, C)
        else:
            for c in range(c0, ch.end):
                _merge_column_grad(c, C, S, 1, th, ch.ncols, ch.col0, <double>(N * S), jb.training, wp, mp, jb.invstd,
                                   jb.gw, jb.gb, cf, cw)
        for j in range(ch.nb - 1, -1, -1):
            o = j * ch.R * W + ch.col0
            if jb.training:
                _col_grad_input(gp + o, xp + o, dp + o, min(ch.R, N - j * ch.R), ch.ncols, W, cw + ch.col0, jb.stream)
            else:
                _col_affine(gp + o, dp + o, min(ch.R, N - j * ch.R), ch.ncols, W, cw + ch.col0, jb.stream)
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


# ---------------------------------------------------------------- the passes
cdef void _task(void *p, Py_ssize_t k) noexcept nogil:
    cdef _Job *jb = <_Job *>p
    if jb.single:
        _pass(jb, k, <float>0)
    else:
        _pass(jb, k, <double>0)


cdef void _pass(const _Job *jb, Py_ssize_t k, floating tag) noexcept nogil:
    cdef const floating *xp = <const floating *>jb.x
    cdef const floating *gp = <const floating *>jb.dy
    cdef floating *yp = <floating *>jb.y
    cdef const floating *cw = <const floating *>jb.cw
    cdef Py_ssize_t C = jb.C, S = jb.S, W = jb.W, N = jb.N, f0, f1, j, c, c1
    cdef double *th
    if jb.op == SLICE:
        if jb.kind == TRAIN:
            _slice_train(jb, k, tag)
        elif jb.kind == EVAL:
            _slice_eval(jb, k, tag)
        else:
            _slice_backward(jb, k, tag)
    elif jb.op == MERGE:
        c1 = min(C, (k + 1) * MERGE_CHANNELS)
        for c in range(k * MERGE_CHANNELS, c1):
            if jb.how == RANGES and jb.kind == TRAIN:
                _merge_range_stats(c, C, jb.K, jb.part, jb.eps, <const floating *>jb.w, <const floating *>jb.b,
                                   jb.mean, jb.var, jb.invstd, <floating *>jb.cf)
            elif jb.how == RANGES:
                _merge_range_grad(c, C, jb.K, jb.part, <double>(N * S), jb.training, <const floating *>jb.w,
                                  jb.mean, jb.invstd, jb.gw, jb.gb, <floating *>jb.cf)
            elif jb.kind == TRAIN:
                _merge_column_stats(c, C, S, jb.K, jb.part, W, 0, jb.eps, <const floating *>jb.w,
                                    <const floating *>jb.b, jb.mean, jb.var, jb.invstd, <floating *>jb.cf,
                                    <floating *>jb.cw)
            else:
                _merge_column_grad(c, C, S, jb.K, jb.part, W, 0, <double>(N * S), jb.training,
                                   <const floating *>jb.w, jb.mean, jb.invstd, jb.gw, jb.gb, <floating *>jb.cf,
                                   <floating *>jb.cw)
    elif jb.op == EVAL_STATS:
        _eval_stats(jb.rm, jb.rv, jb.eps, jb.mean, jb.invstd, range_start(C, jb.K, k), range_start(C, jb.K, k + 1), jb.rsingle)
    elif jb.how == RANGES:
        if jb.op == APPLY_BACK:
            k = jb.K - 1 - k
        f0 = range_start(jb.L, jb.K, k)
        f1 = range_start(jb.L, jb.K, k + 1)
        if jb.op == REDUCE and jb.kind == TRAIN:
            _moments(xp, C, S, f0, f1, jb.part + k * FBN_ACC * C)
        elif jb.op == REDUCE:
            _grad_sums(gp, xp, C, S, f0, f1, jb.mean, jb.part + k * 2 * C)
        elif jb.op == APPLY:
            _affine(xp, yp, C, S, f0, f1, cw, jb.stream)
        elif jb.kind == TRAIN:
            _affine_backwards(xp, yp, C, S, f0, f1, cw, jb.stream)
        elif jb.training:
            _grad_input_backwards(gp, xp, yp, C, S, f0, f1, cw, jb.stream)
        else:  # fixed statistics: dx = dy * kdy, the affine applied to dy (see the coefficients)
            _affine_backwards(gp, yp, C, S, f0, f1, cw, jb.stream)
    elif jb.op == APPLY:  # COLUMNS, evaluation: row block k
        j = k * jb.R * W
        _col_affine(xp + j, yp + j, min(jb.R, N - k * jb.R), W, W, cw, jb.stream)
    elif jb.op == REDUCE:  # COLUMNS: share k of the row blocks, front to back
        if jb.kind == TRAIN:
            th = jb.part + k * (COL_MOMENTS * W + 1)
            th[0] = 0
        else:
            th = jb.part + k * 2 * W
            for j in range(2 * W):
                th[j] = 0
        for j in range(share_start(jb.nb, jb.K, k), share_start(jb.nb, jb.K, k + 1)):
            if jb.kind == TRAIN:
                _col_moments(xp + j * jb.R * W, min(jb.R, N - j * jb.R), W, W, th)
            else:
                _col_grad_sums(gp + j * jb.R * W, xp + j * jb.R * W, min(jb.R, N - j * jb.R), W, W, jb.wm, th)
    else:  # COLUMNS, APPLY_BACK: share K-1-k, its blocks back to front
        k = jb.K - 1 - k
        j = share_start(jb.nb, jb.K, k + 1)
        while j > share_start(jb.nb, jb.K, k):
            j = j - 1
            f0 = j * jb.R * W
            if jb.kind == TRAIN:
                _col_affine(xp + f0, yp + f0, min(jb.R, N - j * jb.R), W, W, cw, jb.stream)
            elif jb.training:
                _col_grad_input(gp + f0, xp + f0, yp + f0, min(jb.R, N - j * jb.R), W, W, cw, jb.stream)
            else:
                _col_affine(gp + f0, yp + f0, min(jb.R, N - j * jb.R), W, W, cw, jb.stream)


cdef inline void _run(_Job *jb, int op, Py_ssize_t n, int T) noexcept nogil:
    jb.op = op
    pool_run(_task, jb, n, T)


cdef inline void _merge(_Job *jb, Py_ssize_t merges, int T) noexcept nogil:
    """The MERGE pass: MERGE_CHANNELS channels a task, on the calling thread alone when the
    ``merges`` of partials in all are too few to be worth another thread."""
    _run(jb, MERGE, (jb.C + MERGE_CHANNELS - 1) // MERGE_CHANNELS, T if merges >= MERGE_ALONE else 1)


cdef void _job(_Job *jb, int kind, int t, object x, Py_ssize_t unit):
    """A job for x, an (N, C, S) array of element type t, everything else empty."""
    memset(jb, 0, sizeof(_Job))
    jb.kind = kind
    jb.single = t == cnp.NPY_FLOAT
    jb.N, jb.C, jb.S = x.shape[0], x.shape[1], x.shape[2]
    jb.W = jb.C * jb.S
    jb.L = jb.N * jb.W
    jb.unit = unit


cdef inline Py_ssize_t _itemsize(const _Job *jb) noexcept nogil:
    return 4 if jb.single else 8


cdef object _setup_split(_Job *jb, int path, int t, object coef, Py_ssize_t slot_doubles):
    """Plan the work split of a two-pass job (training forward, backward): jb.how and its tasks,
    jb.cw (coef itself, or a new array) and jb.part (slot_doubles for each RANGES task; COLUMNS
    and SLICES size their own).  Returns what must live as long as the job (the arrays)."""
    cdef Py_ssize_t N = jb.N, W = jb.W
    cdef object part, wide
    jb.how = plan_path(N, jb.C, jb.S, path)
    jb.cf = _ptr(coef)
    if jb.how == RANGES:
        jb.K = plan_ranges(jb.L, jb.unit)
        part = _new(jb.K * slot_doubles, cnp.NPY_DOUBLE, True)
        jb.cw = jb.cf
        jb.part = <double *>_ptr(part)
        return part
    wide = _columns_coefs(coef, jb.S, t)
    jb.cw = _ptr(wide)
    if jb.how == SLICES:
        jb.K = plan_slices(jb.C, jb.S, jb.L)
        part = _new(jb.K * SLICE_SCRATCH, cnp.NPY_DOUBLE, False)
    else:
        jb.R = plan_rows(N, W, jb.unit)
        jb.nb = (N + jb.R - 1) // jb.R
        jb.K = plan_shares(jb.nb, jb.L, jb.unit)
        # per share: moments [count | K | rel | M2 | scratch] (training) or [sum dy | sum dy*(x-mean)]
        part = _new(jb.K * (COL_MOMENTS * W + 1 if jb.kind == TRAIN else 2 * W), cnp.NPY_DOUBLE, False)
    jb.part = <double *>_ptr(part)
    return (part, wide)


cdef void _run_two_pass(_Job *jb, int T) noexcept nogil:
    """Reduce, merge, apply back to front: a training forward or a backward, planned by _setup_split."""
    if jb.how == SLICES:
        _run(jb, SLICE, jb.K, T)
        return
    _run(jb, REDUCE, jb.K, T)
    _merge(jb, jb.K * (jb.C if jb.how == RANGES else jb.W), T)
    _run(jb, APPLY_BACK, jb.K, T)


cdef _Job _forward_job(int kind, int t, x, y, weight, bias, Py_ssize_t unit) except *:
    """The job of a forward (TRAIN or EVAL) of x, of element type t (_float_type), into y with the
    affine's weight and bias, its arrays checked."""
    cdef _Job jb
    _job(&jb, kind, t, x, unit)
    jb.x = _data(x, t, jb.L, False, "x")
    jb.y = _data(y, t, jb.L, True, "y")
    jb.w = _data(weight, t, jb.C, False, "weight")
    jb.b = _data(bias, t, jb.C, False, "bias")
    return jb


# ---------------------------------------------------------------- forward, training mode
def forward_train(x, y, weight, bias, double eps, mean, var, invstd,
                  int n_threads, int path=AUTO, Py_ssize_t unit=0, int stream=-1):
    """Batch statistics and the fused normalize + affine.

    x: (N, C, S) float32 or float64; y: its output, the same size and dtype (may be x itself);
    weight, bias: (C,) of x's dtype; mean, var (biased), invstd: (C,) float64 outputs."""
    cdef int t = _float_type(x, 3, "x")
    cdef _Job jb = _forward_job(TRAIN, t, x, y, weight, bias, unit)
    cdef Py_ssize_t C = jb.C, L = jb.L
    jb.mean = <double *>_data(mean, cnp.NPY_DOUBLE, C, True, "mean")
    jb.var = <double *>_data(var, cnp.NPY_DOUBLE, C, True, "var")
    jb.invstd = <double *>_data(invstd, cnp.NPY_DOUBLE, C, True, "invstd")
    jb.eps = eps
    cdef object coef = _new(4 * C, t, False)  # [mhi | mlo | a | b]
    cdef object keep = _setup_split(&jb, path, t, coef, FBN_ACC * C)
    jb.stream = plan_stream(2 * L * _itemsize(&jb), stream, jb.how)
    cdef int T = plan_threads(n_threads, L)
    with nogil:
        _run_two_pass(&jb, T)


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
    cdef _Job jb
    memset(&jb, 0, sizeof(_Job))
    jb.C = running_mean.shape[0]
    jb.rm = _data(running_mean, t, jb.C, False, "running_mean")
    jb.rv = _data(running_var, t, jb.C, False, "running_var")
    jb.mean = <double *>_data(mean, cnp.NPY_DOUBLE, jb.C, True, "mean")
    jb.invstd = <double *>_data(invstd, cnp.NPY_DOUBLE, jb.C, True, "invstd")
    jb.eps = eps
    jb.rsingle = t == cnp.NPY_FLOAT
    with nogil:
        _eval_stats_all(&jb, n_threads)


cdef void _eval_stats_all(_Job *jb, int n_threads) noexcept nogil:
    """EVAL_STATS of all jb.C channels (jb.rm, jb.rv, jb.eps, jb.rsingle -> jb.mean, jb.invstd)."""
    jb.K = plan_eval_stats(jb.C)
    _run(jb, EVAL_STATS, jb.K, n_threads)


def forward_eval(x, y, weight, bias, mean, invstd, int n_threads, int path=AUTO, Py_ssize_t unit=0, int stream=-1):
    """y = (x - mean) * invstd * weight + bias: one read of x, one write of y.

    x: (N, C, S) float32 or float64; y: its output (may be x itself); weight, bias: (C,) of x's
    dtype; mean (the running mean), invstd (1 / sqrt(running_var + eps)): (C,) float64."""
    cdef int t = _float_type(x, 3, "x")
    cdef _Job jb = _forward_job(EVAL, t, x, y, weight, bias, unit)
    jb.mean = <double *>_data(mean, cnp.NPY_DOUBLE, jb.C, False, "mean")
    jb.invstd = <double *>_data(invstd, cnp.NPY_DOUBLE, jb.C, False, "invstd")
    cdef object coef = _new(4 * jb.C, t, False)  # [mhi | mlo | a | b], see _eval_coefs
    jb.cf = _ptr(coef)
    _forward_eval(&jb, t, n_threads, path, stream)


def forward_eval_running(x, y, weight, bias, running_mean, running_var, double eps, int n_threads, int path=AUTO,
                         Py_ssize_t unit=0, int stream=-1):
    """eval_stats and forward_eval in one call: y from x and the running buffers (of one float dtype,
    x's or the other); returns (mean, invstd), (C,) float64, as eval_stats.  Everything the call
    makes is one array (the statistics and the coefficients): with three, a wide small batch
    ((1, 16384) float32) added more than twice the size of the largest to the heap in every call,
    which made glibc give the memory back and the next call fault it in again (33 -> 90 us); and a
    SLICES task computes its own channels' statistics."""
    cdef int t = _float_type(x, 3, "x")
    cdef _Job jb = _forward_job(EVAL, t, x, y, weight, bias, unit)
    cdef Py_ssize_t C = jb.C
    cdef int rt = _float_type(running_mean, 1, "running_mean")
    jb.rm = _data(running_mean, rt, C, False, "running_mean")
    jb.rv = _data(running_var, rt, C, False, "running_var")
    jb.rsingle = rt == cnp.NPY_FLOAT
    jb.eps = eps
    cdef object block = _new(6 * C, cnp.NPY_DOUBLE, False)  # [mean | invstd | coefficients (4C of x's type)]
    jb.mean = <double *>_ptr(block)
    jb.invstd = jb.mean + C
    jb.cf = jb.mean + 2 * C
    _forward_eval(&jb, t, n_threads, path, stream)
    return block[:C], block[C:2 * C]


cdef int _forward_eval(_Job *jb, int t, int n_threads, int path, int stream) except -1:
    # jb.cf: room for the 4C coefficients; jb.rm != NULL: jb.mean, jb.invstd are outputs, the
    # statistics of the running buffers, else inputs
    cdef Py_ssize_t C = jb.C, c
    cdef int T = plan_threads(n_threads, jb.L)
    cdef object wide = None
    jb.how = plan_path(jb.N, C, jb.S, path)
    jb.stream = plan_stream(2 * jb.L * _itemsize(jb), stream, jb.how)
    jb.cw = jb.cf
    if jb.S > 1 and jb.how != RANGES:  # per-column coefficients: see _columns_coefs
        wide = _new(4 * jb.W, t, False)
        jb.cw = _ptr(wide)
    if jb.how == SLICES:  # each task makes its own channels' statistics and coefficients
        jb.K = plan_slices(C, jb.S, jb.L)
        if jb.rm != NULL:  # the square roots alone are worth threads, however small x is
            jb.K = max(jb.K, plan_eval_stats(C))
            T = <int>max(<Py_ssize_t>T, min(<Py_ssize_t>n_threads, plan_eval_stats(C)))
        with nogil:
            _run(jb, SLICE, jb.K, T)
        return 0
    with nogil:
        if jb.rm != NULL:
            _eval_stats_all(jb, n_threads)
        if jb.single:
            _eval_coefs(jb.mean, jb.invstd, <const float *>jb.w, <const float *>jb.b, <float *>jb.cf, C, C)
            for c in range(C if jb.cw != jb.cf else 0):
                _expand(<float *>jb.cf, C, jb.S, 4, c, <float *>jb.cw)
        else:
            _eval_coefs(jb.mean, jb.invstd, <const double *>jb.w, <const double *>jb.b, <double *>jb.cf, C, C)
            for c in range(C if jb.cw != jb.cf else 0):
                _expand(<double *>jb.cf, C, jb.S, 4, c, <double *>jb.cw)
        if jb.how == RANGES:
            jb.K = plan_ranges(jb.L, jb.unit)
            _run(jb, APPLY, jb.K, T)
        else:
            jb.R = plan_rows(jb.N, jb.W, jb.unit)
            jb.nb = (jb.N + jb.R - 1) // jb.R
            _run(jb, APPLY, jb.nb, T)
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
    cdef _Job jb
    _job(&jb, BACKWARD, t, x, unit)
    cdef Py_ssize_t C = jb.C, L = jb.L, j
    jb.dy = _data(dy, t, L, False, "dy")
    jb.x = _data(x, t, L, False, "x")
    jb.y = _data(dx, t, L, True, "dx")
    jb.w = _data(weight, t, C, False, "weight")
    jb.mean = <double *>_data(mean, cnp.NPY_DOUBLE, C, False, "mean")
    jb.invstd = <double *>_data(invstd, cnp.NPY_DOUBLE, C, False, "invstd")
    jb.gw = <double *>_data(grad_weight, cnp.NPY_DOUBLE, C, True, "grad_weight")
    jb.gb = <double *>_data(grad_bias, cnp.NPY_DOUBLE, C, True, "grad_bias")
    jb.training = training
    cdef object coef = _new(5 * C, t, False)  # [mhi | mlo | kdy | kx | kc]
    cdef object keep = _setup_split(&jb, path, t, coef, 2 * C), wide_mean = None
    jb.stream = plan_stream(3 * L * _itemsize(&jb), stream, jb.how)
    cdef double *wm
    if jb.how == COLUMNS:
        wide_mean = _new(jb.W, cnp.NPY_DOUBLE, False)  # the mean of each column's channel
        wm = <double *>_ptr(wide_mean)
        for j in range(jb.W):
            wm[j] = jb.mean[j // jb.S]
        jb.wm = wm
    cdef int T = plan_threads(n_threads, L)
    with nogil:
        _run_two_pass(&jb, T)


# ================================================================ SyncBatchNorm's pieces (issue 15)
# A synchronized batch norm splits the training forward and the backward at their merges: each rank
# reduces its own batch, the ranks exchange per-channel results, and each applies with the global
# ones.  These entry points are the halves of forward_train and backward, on the same passes:
# sync_moments (REDUCE, then a merge that keeps the raw moments), sync_grad_sums (REDUCE of the
# backward with a given mean, then a merge that keeps the raw sums) and sync_backward_apply (the
# coefficients of _finish_grad from given sums and count, then APPLY_BACK).  The forward's apply
# with the global statistics is sync_normalize (forward_eval's coefficients, forward_train's walk),
# and sync_merge merges the ranks' moments between the two.  A shape that the plan puts on SLICES
# runs each half as a SLICES pass (_sync_slice): a task's channels' moments or sums over all the
# rows, nothing merged across tasks; the applies as _slice_backward's and _slice_eval's.  (As
# COLUMNS passes instead, a SyncBatchNorm step on (8, 16384) float32 took 2.3x a local one, as
# SLICES 1.8x: the collective between the halves forces a second pass over x and dy, where a local
# SLICES task reduces and applies each chunk while it is still in L1/L2.)


cdef struct _SyncJob:  # a split backward's apply: the job, and the global sums and count
    _Job jb
    const double *sdy
    const double *sdyx
    double count


cdef void _sync_slice_task(void *p, Py_ssize_t k) noexcept nogil:
    cdef _SyncJob *sj = <_SyncJob *>p
    if sj.jb.single:
        _sync_slice(sj, k, <float>0)
    else:
        _sync_slice(sj, k, <double>0)


cdef void _sync_slice(const _SyncJob *sj, Py_ssize_t k, floating tag) noexcept nogil:
    """SLICES task k of a split operation (jb.op): REDUCE of TRAIN, the moments of its channels
    (mean into jb.mean, M2 into jb.var); REDUCE of BACKWARD, their sums (sum dy into jb.gb, sum
    dy*(x-mean) into jb.gw); APPLY_BACK, grad_input from sj's global sums (and grad_weight,
    grad_bias of its channels).  Chunk by chunk as _slice_train and _slice_backward."""
    cdef const _Job *jb = &sj.jb
    cdef const floating *gp = <const floating *>jb.dy
    cdef const floating *xp = <const floating *>jb.x
    cdef floating *dp = <floating *>jb.y
    cdef floating *cf = <floating *>jb.cf
    cdef floating *cw = <floating *>jb.cw
    cdef double *th = jb.part + k * SLICE_SCRATCH
    cdef double *wm = th + 2 * SLICE_CHUNK  # backward: each column's channel mean
    cdef const double *m
    cdef double acc[4]
    cdef double sdy, sdyx
    cdef Py_ssize_t N = jb.N, C = jb.C, S = jb.S, W = jb.W, j, c, s, col, o
    cdef Py_ssize_t c0 = slice_start(C, S, jb.K, k), c1 = slice_start(C, S, jb.K, k + 1)
    cdef _Chunk ch
    while c0 < c1:
        ch = _slice_chunk(c0, c1, N, S, jb.unit)
        if jb.op == REDUCE and jb.kind == TRAIN:
            th[0] = 0
            for j in range(ch.nb):
                o = j * ch.R * W + ch.col0
                _col_moments(xp + o, min(ch.R, N - j * ch.R), ch.ncols, W, th)
            for c in range(c0, ch.end):
                acc[0] = acc[1] = acc[2] = acc[3] = 0
                for s in range(S):
                    col = 1 + (c - c0) * S + s
                    fbn_shift_merge(acc, th[0], th[col], th[col + ch.ncols], th[col + 2 * ch.ncols])
                jb.mean[c] = fbn_acc_mean(acc)
                jb.var[c] = acc[<int>FBN_M2]
        elif jb.op == REDUCE:
            for j in range(2 * ch.ncols):
                th[j] = 0
            m = jb.mean + c0  # one column per channel: the channel means themselves
            if S > 1:
                for j in range(ch.ncols):
                    wm[j] = jb.mean[c0 + j // S]
                m = wm
            for j in range(ch.nb):
                o = j * ch.R * W + ch.col0
                _col_grad_sums(gp + o, xp + o, min(ch.R, N - j * ch.R), ch.ncols, W, m, th)
            for c in range(c0, ch.end):
                sdy = 0
                sdyx = 0
                for s in range(S):
                    col = (c - c0) * S + s
                    sdy += th[col]
                    sdyx += th[col + ch.ncols]
                jb.gb[c] = sdy
                jb.gw[c] = sdyx
        else:
            for c in range(c0, ch.end):
                _finish_grad(c, C, sj.sdy[c], sj.sdyx[c], sj.count, True, <const floating *>jb.w, jb.mean,
                             jb.invstd, jb.gw, jb.gb, cf)
                _expand(cf, C, S, 5, c, cw)
            for j in range(ch.nb - 1, -1, -1):
                o = j * ch.R * W + ch.col0
                _col_grad_input(gp + o, xp + o, dp + o, min(ch.R, N - j * ch.R), ch.ncols, W, cw + ch.col0, jb.stream)
        c0 = ch.end


cdef void _sync_run_slices(_SyncJob *sj, int op, int T) noexcept nogil:
    sj.jb.op = op
    pool_run(_sync_slice_task, sj, sj.jb.K, T)


cdef void _sync_merge_task(void *p, Py_ssize_t k) noexcept nogil:
    """MERGE_CHANNELS channels of a split job's partials, merged in task order as _merge_range_stats
    and friends do, kept raw: TRAIN writes the mean to jb.mean and M2 to jb.var; BACKWARD writes
    sum dy to jb.gb and sum dy*(x-mean) to jb.gw."""
    cdef _Job *jb = <_Job *>p
    cdef Py_ssize_t C = jb.C, S = jb.S, W = jb.W, K = jb.K, c, t, s, j, col
    cdef const double *pp = jb.part
    cdef const double *r
    cdef double acc[4]
    cdef double sdy, sdyx
    for c in range(k * MERGE_CHANNELS, min(C, (k + 1) * MERGE_CHANNELS)):
        if jb.kind == TRAIN:
            acc[0] = acc[1] = acc[2] = acc[3] = 0
            if jb.how == RANGES:
                for t in range(K):
                    r = pp + (t * C + c) * FBN_ACC
                    fbn_shift_merge(acc, r[<int>FBN_N], r[<int>FBN_K], r[<int>FBN_REL], r[<int>FBN_M2])
            else:
                for t in range(K):
                    j = t * (COL_MOMENTS * W + 1)
                    for s in range(S):
                        col = j + 1 + c * S + s
                        fbn_shift_merge(acc, pp[j], pp[col], pp[col + W], pp[col + 2 * W])
            jb.mean[c] = fbn_acc_mean(acc)
            jb.var[c] = acc[<int>FBN_M2]
        else:
            sdy = 0
            sdyx = 0
            if jb.how == RANGES:
                for t in range(K):
                    sdy += pp[(t * C + c) * 2]
                    sdyx += pp[(t * C + c) * 2 + 1]
            else:
                for t in range(K):
                    for s in range(S):
                        col = t * 2 * W + c * S + s
                        sdy += pp[col]
                        sdyx += pp[col + W]
            jb.gb[c] = sdy
            jb.gw[c] = sdyx


cdef void _sync_reduce_merge(_Job *jb, int T) noexcept nogil:
    """REDUCE, then the raw merge (_sync_merge_task), of a job planned by _setup_split."""
    _run(jb, REDUCE, jb.K, T)
    cdef Py_ssize_t merges = jb.K * (jb.C if jb.how == RANGES else jb.W)
    pool_run(_sync_merge_task, jb, (jb.C + MERGE_CHANNELS - 1) // MERGE_CHANNELS,
                 T if merges >= MERGE_ALONE else 1)


def sync_moments(x, mean, m2, int n_threads, int path=AUTO, Py_ssize_t unit=0):
    """A rank's share of a synchronized training forward: per-channel mean and M2 (the sum of
    squared deviations from the mean) of x, (N, C, S) float32 or float64, into (C,) float64
    outputs; the count is N * S.  The reduce pass of forward_train and its merge in task order,
    without the statistics' coefficients or the apply.  x must not be empty."""
    cdef int t = _float_type(x, 3, "x")
    cdef _SyncJob sj
    memset(&sj, 0, sizeof(_SyncJob))
    _job(&sj.jb, TRAIN, t, x, unit)
    sj.jb.x = _data(x, t, sj.jb.L, False, "x")
    sj.jb.mean = <double *>_data(mean, cnp.NPY_DOUBLE, sj.jb.C, True, "mean")
    sj.jb.var = <double *>_data(m2, cnp.NPY_DOUBLE, sj.jb.C, True, "m2")
    cdef object coef = _new(4 * sj.jb.C, t, False)  # unused: _setup_split wants one
    cdef object keep = _setup_split(&sj.jb, path, t, coef, FBN_ACC * sj.jb.C)
    cdef int T = plan_threads(n_threads, sj.jb.L)
    with nogil:
        if sj.jb.how == SLICES:
            _sync_run_slices(&sj, REDUCE, T)
        else:
            _sync_reduce_merge(&sj.jb, T)


cdef object _sync_backward_job(_Job *jb, dy, x, mean, int path, Py_ssize_t unit, int *t):
    """The job of a split backward over dy and x with the (global) mean; returns what must live
    as long as the job.  t: the element type."""
    t[0] = _float_type(x, 3, "x")
    _job(jb, BACKWARD, t[0], x, unit)
    cdef Py_ssize_t C = jb.C, L = jb.L, j
    jb.dy = _data(dy, t[0], L, False, "dy")
    jb.x = _data(x, t[0], L, False, "x")
    jb.mean = <double *>_data(mean, cnp.NPY_DOUBLE, C, False, "mean")
    jb.training = True
    cdef object coef = _new(5 * C, t[0], False)  # [mhi | mlo | kdy | kx | kc]
    cdef object keep = _setup_split(jb, path, t[0], coef, 2 * C), wide_mean = None
    cdef double *wm
    if jb.how == COLUMNS:
        wide_mean = _new(jb.W, cnp.NPY_DOUBLE, False)  # the mean of each column's channel
        wm = <double *>_ptr(wide_mean)
        for j in range(jb.W):
            wm[j] = jb.mean[j // jb.S]
        jb.wm = wm
    return (coef, keep, wide_mean)


def sync_grad_sums(dy, x, mean, sum_dy, sum_dyx, int n_threads, int path=AUTO, Py_ssize_t unit=0):
    """A rank's share of a synchronized backward: per-channel sum dy and sum dy * (x - mean), with
    the given (global) mean, (C,) float64 outputs.  The reduce pass of backward and its merge in
    task order, without the coefficients or the apply.  x must not be empty."""
    cdef int t
    cdef _SyncJob sj
    memset(&sj, 0, sizeof(_SyncJob))
    cdef object keep = _sync_backward_job(&sj.jb, dy, x, mean, path, unit, &t)
    sj.jb.gb = <double *>_data(sum_dy, cnp.NPY_DOUBLE, sj.jb.C, True, "sum_dy")
    sj.jb.gw = <double *>_data(sum_dyx, cnp.NPY_DOUBLE, sj.jb.C, True, "sum_dyx")
    cdef int T = plan_threads(n_threads, sj.jb.L)
    with nogil:
        if sj.jb.how == SLICES:
            _sync_run_slices(&sj, REDUCE, T)
        else:
            _sync_reduce_merge(&sj.jb, T)


cdef void _sync_coefs(_Job *jb, const double *sdy, const double *sdyx, double count, floating tag) noexcept nogil:
    """The training backward's coefficients from given sums and count: _finish_grad's arithmetic
    (and grad_weight, grad_bias), then the per-column copies for COLUMNS."""
    cdef Py_ssize_t c
    for c in range(jb.C):
        _finish_grad(c, jb.C, sdy[c], sdyx[c], count, True, <const floating *>jb.w, jb.mean, jb.invstd,
                     jb.gw, jb.gb, <floating *>jb.cf)
        if jb.how == COLUMNS:
            _expand(<floating *>jb.cf, jb.C, jb.S, 5, c, <floating *>jb.cw)


def sync_backward_apply(dy, x, dx, weight, mean, invstd, sum_dy, sum_dyx, double count, grad_weight, grad_bias,
                        int n_threads, int path=AUTO, Py_ssize_t unit=0, int stream=-1):
    """The end of a synchronized backward: grad_input into dx from the global sums (sum_dy,
    sum_dyx: (C,) float64, over all ranks) and the global count, with the global mean and invstd;
    grad_weight = sum_dyx * invstd and grad_bias = sum_dy into (C,) float64 outputs.  The same
    coefficients as backward's (_finish_grad) and its apply pass.  x must not be empty."""
    cdef int t
    cdef _SyncJob sj
    memset(&sj, 0, sizeof(_SyncJob))
    cdef _Job *jb = &sj.jb
    cdef object keep = _sync_backward_job(jb, dy, x, mean, path, unit, &t)
    cdef Py_ssize_t C = jb.C
    jb.y = _data(dx, t, jb.L, True, "dx")
    jb.w = _data(weight, t, C, False, "weight")
    jb.invstd = <double *>_data(invstd, cnp.NPY_DOUBLE, C, False, "invstd")
    jb.gw = <double *>_data(grad_weight, cnp.NPY_DOUBLE, C, True, "grad_weight")
    jb.gb = <double *>_data(grad_bias, cnp.NPY_DOUBLE, C, True, "grad_bias")
    sj.sdy = <const double *>_data(sum_dy, cnp.NPY_DOUBLE, C, False, "sum_dy")
    sj.sdyx = <const double *>_data(sum_dyx, cnp.NPY_DOUBLE, C, False, "sum_dyx")
    sj.count = count
    jb.stream = plan_stream(3 * jb.L * _itemsize(jb), stream, jb.how)
    cdef int T = plan_threads(n_threads, jb.L)
    with nogil:
        if jb.how == SLICES:  # each task its own channels' coefficients, then their apply
            _sync_run_slices(&sj, APPLY_BACK, T)
        else:
            if jb.single:
                _sync_coefs(jb, sj.sdy, sj.sdyx, count, <float>0)
            else:
                _sync_coefs(jb, sj.sdy, sj.sdyx, count, <double>0)
            _run(jb, APPLY_BACK, jb.K, T)


cdef void _sync_affine_coefs(_Job *jb, floating tag) noexcept nogil:
    """The training forward's coefficients from given statistics (_finish_stats' _affine_coefs),
    then the per-column copies for COLUMNS."""
    cdef Py_ssize_t c
    for c in range(jb.C):
        _affine_coefs(c, jb.C, jb.mean[c], jb.invstd[c], <const floating *>jb.w, <const floating *>jb.b,
                      <floating *>jb.cf)
        if jb.how == COLUMNS:
            _expand(<floating *>jb.cf, jb.C, jb.S, 4, c, <floating *>jb.cw)


def sync_normalize(x, y, weight, bias, mean, invstd, int n_threads, int path=AUTO, Py_ssize_t unit=0,
                   int stream=-1):
    """The end of a synchronized training forward: y = (x - mean) * invstd * weight + bias with
    the given (global) mean and invstd, (C,) float64.  forward_eval's arithmetic, but walked as
    forward_train's apply (tasks in reverse order, each back to front): it follows sync_moments'
    front-to-back pass over x, whose end the cache still holds (a front-to-back apply evicted it
    before reaching it: (32, 64, 28, 28) float32 on two ranks sharing a 32 MiB L3).  A shape the
    plan puts on SLICES runs forward_eval itself (its one pass per slice).  x must not be empty."""
    cdef int t = _float_type(x, 3, "x")
    if plan_path(x.shape[0], x.shape[1], x.shape[2], path) == SLICES:
        forward_eval(x, y, weight, bias, mean, invstd, n_threads, path, unit, stream)
        return
    cdef _Job jb = _forward_job(TRAIN, t, x, y, weight, bias, unit)
    cdef Py_ssize_t C = jb.C, L = jb.L
    jb.mean = <double *>_data(mean, cnp.NPY_DOUBLE, C, False, "mean")
    jb.invstd = <double *>_data(invstd, cnp.NPY_DOUBLE, C, False, "invstd")
    cdef object coef = _new(4 * C, t, False)  # [mhi | mlo | a | b]
    cdef object keep = _setup_split(&jb, path, t, coef, 0)
    jb.stream = plan_stream(2 * L * _itemsize(&jb), stream, jb.how)
    cdef int T = plan_threads(n_threads, L)
    with nogil:
        if jb.single:
            _sync_affine_coefs(&jb, <float>0)
        else:
            _sync_affine_coefs(&jb, <double>0)
        _run(&jb, APPLY_BACK, jb.K, T)


def sync_merge(const double[:, :] n, const double[:, :] mean, const double[:, :] m2, double eps,
               double[::1] count_out, double[::1] mean_out, double[::1] m2_out, double[::1] var_out,
               double[::1] invstd_out):
    """Chan's merge of per-rank moments in rank order: n, mean, m2 are (R, C) float64 (any strides:
    views of the gathered messages; a stride of 0 repeats a rank's one count); outputs (C,)
    float64: the union's count, mean, M2, biased variance M2 / count and 1 / sqrt(var + eps) (0
    and 1 / sqrt(eps) where the count is 0).  Ranks with a count of 0 are skipped exactly.  One
    call instead of a few dozen NumPy ones between the two kernels of a training forward, where
    the interpreter's memory is cold.  The merge is the kernels' (fbn_chan_merge in _coefs.h, the
    GPU's too): n' = n + nb, f = nb / n', d = mb - mean, mean' = mean + d * f,
    M2' = M2 + (M2b + (d * d) * (n * f)).  (A build with -march=native may fuse some into FMAs: the
    same bits on every rank of that build.)"""
    cdef Py_ssize_t R = n.shape[0], C = n.shape[1], r, c
    cdef double k, mu, q, v
    if (mean.shape[0] != R or m2.shape[0] != R or mean.shape[1] != C or m2.shape[1] != C
            or count_out.shape[0] != C or mean_out.shape[0] != C or m2_out.shape[0] != C or var_out.shape[0] != C
            or invstd_out.shape[0] != C):
        raise ValueError("sync_merge: shapes do not match")
    with nogil:
        for c in range(C):
            k = 0
            mu = 0
            q = 0
            for r in range(R):
                fbn_chan_merge(&k, &mu, &q, n[r, c], mean[r, c], m2[r, c])
            count_out[c] = k
            mean_out[c] = mu
            m2_out[c] = q
            v = fbn_var(k, q) if k != 0 else 0.0
            var_out[c] = v
            invstd_out[c] = fbn_invstd(v, eps)
