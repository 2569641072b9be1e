# fastbn/_sync.pxi -- included by _kernels.pyx: SyncBatchNorm's halves of the training forward and
# the backward, on the passes of _job.pxi.

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
                _col_grad_sums(gp + o, xp + o, min(ch.R, N - j * ch.R), ch.ncols, W, m, th, <const floating *>NULL,
                               <const floating *>NULL)
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
                _col_grad_input(gp + o, xp + o, dp + o, min(ch.R, N - j * ch.R), ch.ncols, W, cw + ch.col0, jb.stream,
                                <const floating *>NULL, <const floating *>NULL, False)
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
        wide_mean = _new_wide(jb.W, cnp.NPY_DOUBLE)  # the mean of each column's channel
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
    jb.stream = plan_stream(3 * jb.L * _itemsize(jb), stream, jb.how, jb.W * _itemsize(jb))
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
    cdef _Job jb = _forward_job(TRAIN, t, x, y, weight, bias, unit, False)
    cdef Py_ssize_t C = jb.C, L = jb.L
    jb.mean = <double *>_data(mean, cnp.NPY_DOUBLE, C, False, "mean")
    jb.invstd = <double *>_data(invstd, cnp.NPY_DOUBLE, C, False, "invstd")
    cdef object coef = _new(4 * C, t, False)  # [mhi | mlo | a | b]
    cdef object keep = _setup_split(&jb, path, t, coef, 0)
    jb.stream = plan_stream(2 * L * _itemsize(&jb), stream, jb.how, jb.W * _itemsize(&jb))
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
            invstd_out[c] = fbn_batch_invstd(v, eps)
