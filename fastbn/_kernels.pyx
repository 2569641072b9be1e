"""fastbn's CPU kernels: batch norm over C-contiguous (N, C, S) buffers, on fastbn's thread pool.

Every operation is "reduce per channel, derive per-channel coefficients, apply elementwise", and
batch norm is memory-bound, so what matters is how threads walk memory.  A call is cut into
tasks by its shape alone (never by the thread count: see PLAN_WIDTH in _plan.pyx), which threads
of the pool (_pool.pyx) claim one by one, the calling thread first; three ways to cut (``path``):

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

The entry points check what memory safety needs of their arrays (see "arguments" in _job.pxi);
fastbn.functional validated the rest.  Statistics are accumulated in double for float32 and
float64 alike.  The GIL is released for all the work.

Where each part lives, by role:
  _kernels.pyx  the entry points (forward_train, forward_eval[_running], eval_stats,
                update_running, backward), and the includes below
  _job.pxi      a call's job: the merges of the tasks' partials, the passes, the work-split setup
  _slices.pxi   the SLICES tasks
  _sync.pxi     SyncBatchNorm's halves (sync_*)
  _plan.pyx|pxd the work-split planner and its knobs (PATHS, thresholds, tune_for, ...)
  _pool.pyx|pxd the thread pool (_pool.h), one per process
  _simd.pxd     declarations of the C loops and the float/double dispatch
  _simd.h, _simd_impl.h   the vector loops, for float, double, float16 and bfloat16
  _half512.h, _short512.h AVX-512 loops the vector loops hand hot cases to, chosen at run time:
                half elements converted in the register; float32's backward over short rows
  _coefs.h      the per-channel arithmetic (merges, statistics, coefficients), shared with the
                CUDA source (_cuda/batch_norm.cu)
The benchmark's floor is fastbn._floor (_floor.pyx, _floor.h), apart from these.
"""

import numpy as np
cimport numpy as cnp
from cython cimport floating

from fastbn._arrays cimport data as _data, float_type as _float_type
from fastbn._alloc import scratch as _alloc_scratch
from fastbn._pool cimport pool_run, pool_wake
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
from fastbn._plan import PATHS, STREAM_L3_RATIO, norm_stream_threshold, plan_width, thread_threshold, thresholds, tune_for


# ---- element types: float32, float64, and the half types float16 and bfloat16 (computed in float)
cdef int _bf16_type = -1  # bfloat16's type number, which ml_dtypes registers at run time; once seen


cdef int _elem_type(object a, int ndim, str name) except -1:
    """The element type of a batch-norm array (x, y, dy, dx): NPY_FLOAT, NPY_DOUBLE, NPY_HALF, or
    bfloat16's number; TypeError for anything else, as _float_type."""
    global _bf16_type
    cdef int t
    if cnp.PyArray_Check(a) and (ndim < 0 or cnp.PyArray_NDIM(<cnp.ndarray>a) == ndim):
        t = cnp.PyArray_TYPE(<cnp.ndarray>a)
        if t == cnp.NPY_FLOAT16 or t == _bf16_type:
            return t
        if _bf16_type < 0 and cnp.PyArray_ITEMSIZE(<cnp.ndarray>a) == 2 and a.dtype.name == "bfloat16":
            _bf16_type = t
            return t
    return _float_type(a, ndim, name)


def half_inline(enabled=None):
    """Whether the ranges loops convert float16 and bfloat16 elements inside their vector loops
    (_half512.h, AVX-512F) rather than staging them through float; sets it when given (the tests
    run both).  Not part of fastbn's API."""
    return bool(fbn_half_inline(-1 if enabled is None else int(bool(enabled))))


def short_inline(enabled=None):
    """Whether float32's backward over rows shorter than 128 elements takes _short512.h's AVX-512
    loops (the same bits as the generic ones) rather than the generic loops; sets it when given
    (the tests run both).  Not part of fastbn's API."""
    return bool(fbn_short_inline(-1 if enabled is None else int(bool(enabled))))


cdef inline int _computed_type(int t) noexcept nogil:
    """The type an element type is computed in, and its weight, bias and coefficients are of."""
    return cnp.NPY_DOUBLE if t == cnp.NPY_DOUBLE else cnp.NPY_FLOAT


# The job, its passes and the SLICES tasks (textual includes: one extension, no call indirection).
include "_job.pxi"
include "_slices.pxi"


# ---------------------------------------------------------------- forward, training mode
def forward_train(x, y, weight, bias, double eps, mean, var, invstd,
                  int n_threads, int path=AUTO, Py_ssize_t unit=0, int stream=-1, bint relu=False):
    """Batch statistics and the fused normalize + affine (+ ReLU when relu).

    x: (N, C, S) float32, float64, float16 or bfloat16; y: its output, the same size and dtype (may
    be x itself); weight, bias: (C,) of the type x is computed in (float64 for float64, else
    float32); mean, var (biased), invstd: (C,) float64 outputs."""
    cdef int t = _elem_type(x, 3, "x")
    cdef _Job jb = _forward_job(TRAIN, t, x, y, weight, bias, unit, relu)
    cdef Py_ssize_t C = jb.C, L = jb.L
    jb.mean = <double *>_data(mean, cnp.NPY_DOUBLE, C, True, "mean")
    jb.var = <double *>_data(var, cnp.NPY_DOUBLE, C, True, "var")
    jb.invstd = <double *>_data(invstd, cnp.NPY_DOUBLE, C, True, "invstd")
    jb.eps = eps
    cdef int ct = _computed_type(t)
    cdef object coef = _new(4 * C, ct, False)  # [mhi | mlo | a | b]
    cdef object keep = _setup_split(&jb, path, ct, coef, FBN_ACC * C)
    jb.stream = plan_stream(2 * L * _itemsize(&jb), stream, jb.how, jb.W * _itemsize(&jb))
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


def forward_eval(x, y, weight, bias, mean, invstd, int n_threads, int path=AUTO, Py_ssize_t unit=0, int stream=-1,
                 bint relu=False):
    """y = (x - mean) * invstd * weight + bias (then ReLU when relu): one read of x, one write of y.

    x: (N, C, S) float32, float64, float16 or bfloat16; y: its output (may be x itself); weight,
    bias: (C,) of the type x is computed in (as forward_train); mean (the running mean), invstd
    (1 / sqrt(running_var + eps)): (C,) float64."""
    cdef int t = _elem_type(x, 3, "x")
    cdef _Job jb = _forward_job(EVAL, t, x, y, weight, bias, unit, relu)
    jb.mean = <double *>_data(mean, cnp.NPY_DOUBLE, jb.C, False, "mean")
    jb.invstd = <double *>_data(invstd, cnp.NPY_DOUBLE, jb.C, False, "invstd")
    cdef object coef = _new(4 * jb.C, _computed_type(t), False)  # [mhi | mlo | a | b], see _eval_coefs
    jb.cf = _ptr(coef)
    _forward_eval(&jb, t, n_threads, path, stream)


def forward_eval_running(x, y, weight, bias, running_mean, running_var, double eps, int n_threads, int path=AUTO,
                         Py_ssize_t unit=0, int stream=-1, bint relu=False):
    """eval_stats and forward_eval in one call: y from x and the running buffers (of one float dtype,
    x's or the other); returns (mean, invstd), (C,) float64, as eval_stats.  Everything the call
    makes is one array (the statistics and the coefficients): with three, a wide small batch
    ((1, 16384) float32) added more than twice the size of the largest to the heap in every call,
    which made glibc give the memory back and the next call fault it in again (33 -> 90 us); and a
    SLICES task computes its own channels' statistics."""
    cdef int t = _elem_type(x, 3, "x")
    cdef _Job jb = _forward_job(EVAL, t, x, y, weight, bias, unit, relu)
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
    jb.stream = plan_stream(2 * jb.L * _itemsize(jb), stream, jb.how, jb.W * _itemsize(jb))
    jb.cw = jb.cf
    if jb.S > 1 and jb.how != RANGES:  # per-column coefficients: see _columns_coefs
        wide = _new_wide(4 * jb.W, _computed_type(t))
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
             int n_threads, int path=AUTO, Py_ssize_t unit=0, int stream=-1, bias=None, output=None):
    """grad_input, grad_weight, grad_bias from the saved mean/invstd (no recomputation).

    dy (grad_output), x (the forward's input): (N, C, S) float32, float64, float16 or bfloat16; dx:
    grad_input, an output of the same size and dtype; weight: (C,) of the type x is computed in (as
    forward_train); mean, invstd: (C,) float64, the
    statistics the forward used; training: they were the batch's (True) or fixed (False);
    grad_weight, grad_bias: (C,) float64 outputs.  Through a fused ReLU: ``bias`` ((C,) of x's
    dtype), the forward's, to recompute its output from x in the same passes, or ``output`` (like
    x), the forward's output itself; at most one of them."""
    cdef int t = _elem_type(x, 3, "x")
    cdef _Job jb
    _job(&jb, BACKWARD, t, x, unit)
    cdef Py_ssize_t C = jb.C, L = jb.L, j
    jb.dy = _data(dy, t, L, False, "dy")
    jb.x = _data(x, t, L, False, "x")
    jb.y = _data(dx, t, L, True, "dx")
    cdef int ct = _computed_type(t)
    jb.w = _data(weight, ct, C, False, "weight")
    jb.mean = <double *>_data(mean, cnp.NPY_DOUBLE, C, False, "mean")
    jb.invstd = <double *>_data(invstd, cnp.NPY_DOUBLE, C, False, "invstd")
    jb.gw = <double *>_data(grad_weight, cnp.NPY_DOUBLE, C, True, "grad_weight")
    jb.gb = <double *>_data(grad_bias, cnp.NPY_DOUBLE, C, True, "grad_bias")
    jb.training = training
    if output is not None:
        jb.zs = _data(output, t, L, False, "output")
    cdef int T = plan_threads(n_threads, L)
    if bias is not None and T > 1:
        pool_wake(T)  # the mask's bounds come first: the helpers wake meanwhile (_pool.h)
    # [mhi | mlo | kdy | kx | kc], then the forward's [mhi | mlo | a | b | lo | hi] when its output
    # is recomputed (see _forward_coefs)
    cdef object coef = _new((11 if bias is not None else 5) * C, ct, False)
    cdef object keep = _setup_split(&jb, path, ct, coef, 2 * C), wide_mean = None
    if bias is not None:
        _forward_coefs(&jb, _data(bias, ct, C, False, "bias"))
    jb.stream = plan_stream(3 * L * _itemsize(&jb), stream, jb.how, jb.W * _itemsize(&jb))
    cdef double *wm
    if jb.how == COLUMNS:
        wide_mean = _new_wide(jb.W, cnp.NPY_DOUBLE)  # the mean of each column's channel
        wm = <double *>_ptr(wide_mean)
        for j in range(jb.W):
            wm[j] = jb.mean[j // jb.S]
        jb.wm = wm
    with nogil:
        _run_two_pass(&jb, T)


cdef void _forward_coefs(_Job *jb, const void *bias) noexcept:
    """The forward's coefficients [mhi | mlo | a | b] from jb.mean, jb.invstd, jb.w and bias, in
    blocks 5 .. 8 of jb.cf and, per column, of jb.cw (see _columns_coefs), for the backward through
    the activation; the arithmetic of the forward's own (_eval_coefs), so the output has its bits.
    On the RANGES path, float32 and float64 elements, blocks 9 and 10 hold the bounds on x that
    give the same mask (fbn_relu_bounds in _simd_impl.h), for the gradient sums."""
    cdef Py_ssize_t C = jb.C, c
    cdef Py_ssize_t off = 5 * (C if jb.how == RANGES else jb.W)
    cdef bint bounds = jb.how == RANGES and (jb.elem == E_F32 or jb.elem == E_F64)
    if jb.single:
        _eval_coefs(jb.mean, jb.invstd, <const float *>jb.w, <const float *>bias, <float *>jb.cf + 5 * C, C, C)
        for c in range(C):
            _expand(<float *>jb.cf + 5 * C, C, jb.S, 4, c, <float *>jb.cw + off)
        if bounds:
            fbn_relu_bounds_f32(<float *>jb.cf + 5 * C, C, <float *>jb.cf + 9 * C, <float *>jb.cf + 10 * C)
        jb.fcw = <float *>jb.cw + off
    else:
        _eval_coefs(jb.mean, jb.invstd, <const double *>jb.w, <const double *>bias, <double *>jb.cf + 5 * C, C, C)
        for c in range(C):
            _expand(<double *>jb.cf + 5 * C, C, jb.S, 4, c, <double *>jb.cw + off)
        if bounds:
            fbn_relu_bounds_f64(<double *>jb.cf + 5 * C, C, <double *>jb.cf + 9 * C, <double *>jb.cf + 10 * C)
        jb.fcw = <double *>jb.cw + off


# SyncBatchNorm's entry points: sync_moments, sync_grad_sums, sync_backward_apply, sync_normalize,
# sync_merge.
include "_sync.pxi"
