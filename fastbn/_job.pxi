# fastbn/_job.pxi -- included by _kernels.pyx: a call's job and its passes on the thread pool.
#
# A call fills one _Job (the entry points of _kernels.pyx check its arrays), plans its work split
# (fastbn._plan), and runs it as passes of tasks with pool_run: REDUCE (each task's partial sums
# into its own slot), MERGE (the partials of each channel in task order, then its statistics and
# coefficients: _simd.pxd's finishes, on _coefs.h's arithmetic), APPLY or APPLY_BACK (the
# elementwise pass), or SLICE (_slices.pxi: a slice of the channels, everything for it).  Nothing
# here depends on which thread ran a task, nor on how many threads there were.

# ---------------------------------------------------------------- second passes, walking back
cdef void _affine_backwards(const elem *x, elem *y, Py_ssize_t C, Py_ssize_t S, Py_ssize_t f0,
                            Py_ssize_t f1, const floating *cf, int stream, bint relu) noexcept nogil:
    """_affine over [f0, f1) piece by piece, last piece first (PIECE_BYTES)."""
    cdef Py_ssize_t s, piece = piece_elements(sizeof(elem))
    while f1 > f0:
        s = piece_start(f0, f1, piece)
        _affine(x, y, C, S, s, f1, cf, stream, relu)
        f1 = s


cdef void _grad_input_backwards(const elem *dy, const elem *x, elem *dx, Py_ssize_t C,
                                Py_ssize_t S, Py_ssize_t f0, Py_ssize_t f1, const floating *cf, int stream,
                                const elem *zs, const floating *fcf, bint fixed) noexcept nogil:
    """_grad_input over [f0, f1) piece by piece, last piece first (PIECE_BYTES)."""
    cdef Py_ssize_t s, piece = piece_elements(sizeof(elem))
    while f1 > f0:
        s = piece_start(f0, f1, piece)
        _grad_input(dy, x, dx, C, S, s, f1, cf, stream, zs, fcf, fixed)
        f1 = s


cdef inline const elem *_at(const elem *p, Py_ssize_t o) noexcept nogil:
    """p + o, or NULL for an absent array (NULL + o is undefined behaviour in C)."""
    return p + o if p != NULL else NULL


# ---------------------------------------------------------------- per-column coefficients
cdef inline object _columns_coefs(object coef, Py_ssize_t S, int typenum):
    """The per-column coefficients of the COLUMNS path: the per-channel ones (blocks of C) themselves
    when S = 1, an (N, C) matrix with the same layout; else a new array of blocks of C*S."""
    return coef if S == 1 else _new_wide(cnp.PyArray_SIZE(<cnp.ndarray>coef) * S, typenum)


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
    APPLY_BACK = 3  # the second pass: the tasks in reverse order, each back to front (see PIECE_BYTES)
    APPLY = 4       # evaluation forward: range k (RANGES) or row block k (COLUMNS), front to back
    SLICE = 5       # SLICES: slice k, all of it
    EVAL_STATS = 6  # channels of task k: statistics from the running buffers

cdef enum:  # job.elem
    E_F32 = 0
    E_F64 = 1
    E_F16 = 2
    E_BF16 = 3

cdef enum:  # job.kind
    TRAIN = 1
    EVAL = 2
    BACKWARD = 3


cdef struct _Job:
    int op, kind, how       # the pass, the operation, the work split (RANGES, COLUMNS, SLICES)
    bint single             # computed in float (float32 and half-precision elements), else double
    int elem                # the elements in memory: E_F32, E_F64, E_F16, E_BF16
    int itemsize            # their bytes
    bint training           # backward: the forward used batch statistics (else fixed ones)
    bint rsingle            # evaluation: float32 running buffers, else float64
    bint relu               # forward: the fused activation
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
    # backward through the activation (see _simd_impl.h): the forward's output (zs), or the forward's
    # coefficients [mhi | mlo | a | b] (fcw, blocks of C for RANGES, of W otherwise) to recompute it
    const void *zs
    const void *fcw
    double *part            # the tasks' partial sums, a slot each
    const void *rm          # evaluation: running buffers (NULL: mean and invstd are given)
    const void *rv
    double eps
    Py_ssize_t N, C, S, L, W
    Py_ssize_t K            # tasks that cut the data: ranges, shares of row blocks, or slices
    Py_ssize_t R, nb        # COLUMNS: rows per block, blocks
    Py_ssize_t unit


# ---------------------------------------------------------------- arguments
# The entry points below take NumPy arrays and check, cheaply, what memory safety needs: element
# type, native byte order, alignment, C order, element count, and writability for outputs.  Typed
# memoryviews check the same but cost about 1 us per call for six arguments, which showed in the
# per-call time of small inputs; fastbn.functional has validated everything else.

cdef inline object _new(Py_ssize_t n, int typenum, bint zero):
    """A new 1-D array of n elements (zeros, or uninitialized) for a kernel's scratch."""
    cdef cnp.npy_intp d = n
    return cnp.PyArray_ZEROS(1, &d, typenum, 0) if zero else cnp.PyArray_EMPTY(1, &d, typenum, 0)


cdef inline object _new_wide(Py_ssize_t n, int typenum):
    """Uninitialized scratch that grows with the row's width (the COLUMNS path's per-column
    coefficients and partials): _alloc.scratch's, from the pool when it is large."""
    return _alloc_scratch(n, np.float64 if typenum == cnp.NPY_DOUBLE else np.float32)


cdef inline void *_ptr(object a) noexcept:
    return cnp.PyArray_DATA(<cnp.ndarray>a)


# ---------------------------------------------------------------- the passes
cdef void _task(void *p, Py_ssize_t k) noexcept nogil:
    # the pass, specialized for the element type and the type computed in (the pointers are tags)
    cdef _Job *jb = <_Job *>p
    if jb.elem == E_F32:
        _pass(jb, k, <float *>NULL, <float *>NULL)
    elif jb.elem == E_F64:
        _pass(jb, k, <double *>NULL, <double *>NULL)
    elif jb.elem == E_F16:
        _pass(jb, k, <float *>NULL, <fbn_f16 *>NULL)
    else:
        _pass(jb, k, <float *>NULL, <fbn_bf16 *>NULL)


cdef void _pass(const _Job *jb, Py_ssize_t k, floating *tag, elem *etag) noexcept nogil:
    cdef const elem *xp = <const elem *>jb.x
    cdef const elem *gp = <const elem *>jb.dy
    cdef elem *yp = <elem *>jb.y
    cdef const floating *cw = <const floating *>jb.cw
    cdef const elem *zp = <const elem *>jb.zs
    cdef const floating *fp = <const floating *>jb.fcw
    cdef bint gated = zp != NULL or fp != NULL  # backward through the activation
    cdef Py_ssize_t C = jb.C, S = jb.S, W = jb.W, N = jb.N, f0, f1, j, c, c1
    cdef double *th
    if jb.op == SLICE:
        if jb.kind == TRAIN:
            _slice_train(jb, k, tag, etag)
        elif jb.kind == EVAL:
            _slice_eval(jb, k, tag, etag)
        else:
            _slice_backward(jb, k, tag, etag)
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
        f0 = range_start(jb.L, jb.K, k)
        f1 = range_start(jb.L, jb.K, k + 1)
        if jb.op == REDUCE and jb.kind == TRAIN:
            _moments(xp, C, S, f0, f1, jb.part + k * FBN_ACC * C)
        elif jb.op == REDUCE:
            _grad_sums(gp, xp, C, S, f0, f1, jb.mean, jb.part + k * 2 * C, zp, fp)
        elif jb.op == APPLY:
            _affine(xp, yp, C, S, f0, f1, cw, jb.stream, jb.relu)
        elif jb.kind == TRAIN:
            _affine_backwards(xp, yp, C, S, f0, f1, cw, jb.stream, jb.relu)
        elif jb.training or gated:
            _grad_input_backwards(gp, xp, yp, C, S, f0, f1, cw, jb.stream, zp, fp, not jb.training)
        else:  # fixed statistics: dx = dy * kdy, the affine applied to dy (see the coefficients)
            _affine_backwards(gp, yp, C, S, f0, f1, cw, jb.stream, False)
    elif jb.op == APPLY:  # COLUMNS, evaluation: row block k
        j = k * jb.R * W
        _col_affine(xp + j, yp + j, min(jb.R, N - k * jb.R), W, W, cw, jb.stream, jb.relu)
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
                _col_grad_sums(gp + j * jb.R * W, xp + j * jb.R * W, min(jb.R, N - j * jb.R), W, W, jb.wm, th,
                               _at(zp, j * jb.R * W), fp)
    else:  # COLUMNS, APPLY_BACK: share k, its blocks back to front
        j = share_start(jb.nb, jb.K, k + 1)
        while j > share_start(jb.nb, jb.K, k):
            j = j - 1
            f0 = j * jb.R * W
            if jb.kind == TRAIN:
                _col_affine(xp + f0, yp + f0, min(jb.R, N - j * jb.R), W, W, cw, jb.stream, jb.relu)
            elif jb.training or gated:
                _col_grad_input(gp + f0, xp + f0, yp + f0, min(jb.R, N - j * jb.R), W, W, cw, jb.stream,
                                _at(zp, f0), fp, not jb.training)
            else:
                _col_affine(gp + f0, yp + f0, min(jb.R, N - j * jb.R), W, W, cw, jb.stream, False)


cdef inline void _run(_Job *jb, int op, Py_ssize_t n, int T) noexcept nogil:
    jb.op = op
    pool_run(_task, jb, n, T, op == APPLY_BACK)  # APPLY_BACK: each thread's tasks last to first


cdef inline void _merge(_Job *jb, Py_ssize_t merges, int T) noexcept nogil:
    """The MERGE pass: MERGE_CHANNELS channels a task, on the calling thread alone when the
    ``merges`` of partials in all are too few to be worth another thread."""
    _run(jb, MERGE, (jb.C + MERGE_CHANNELS - 1) // MERGE_CHANNELS, T if merges >= MERGE_ALONE else 1)


cdef void _job(_Job *jb, int kind, int t, object x, Py_ssize_t unit):
    """A job for x, an (N, C, S) array of element type t (see _elem_type), everything else empty."""
    memset(jb, 0, sizeof(_Job))
    jb.kind = kind
    jb.single = _computed_type(t) == cnp.NPY_FLOAT
    jb.elem = E_F32 if t == cnp.NPY_FLOAT else E_F64 if t == cnp.NPY_DOUBLE else E_F16 if t == cnp.NPY_FLOAT16 else E_BF16
    jb.itemsize = 4 if jb.elem == E_F32 else 8 if jb.elem == E_F64 else 2
    jb.N, jb.C, jb.S = x.shape[0], x.shape[1], x.shape[2]
    jb.W = jb.C * jb.S
    jb.L = jb.N * jb.W
    jb.unit = unit


cdef inline Py_ssize_t _itemsize(const _Job *jb) noexcept nogil:
    return jb.itemsize


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
        part = _new_wide(jb.K * (COL_MOMENTS * W + 1 if jb.kind == TRAIN else 2 * W), cnp.NPY_DOUBLE)
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


cdef _Job _forward_job(int kind, int t, x, y, weight, bias, Py_ssize_t unit, bint relu) except *:
    """The job of a forward (TRAIN or EVAL) of x, of element type t (_elem_type), into y with the
    affine's weight and bias (and the fused ReLU when relu), its arrays checked."""
    cdef _Job jb
    _job(&jb, kind, t, x, unit)
    jb.relu = relu
    jb.x = _data(x, t, jb.L, False, "x")
    jb.y = _data(y, t, jb.L, True, "y")
    jb.w = _data(weight, _computed_type(t), jb.C, False, "weight")
    jb.b = _data(bias, _computed_type(t), jb.C, False, "bias")
    return jb
