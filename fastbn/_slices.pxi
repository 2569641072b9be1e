# fastbn/_slices.pxi -- included by _kernels.pyx: the SLICES path, a task per slice of the channels.

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


cdef void _slice_train(const _Job *jb, Py_ssize_t k, floating *tag, elem *etag) noexcept nogil:
    cdef const elem *xp = <const elem *>jb.x
    cdef const floating *wp = <const floating *>jb.w
    cdef const floating *bp = <const floating *>jb.b
    cdef elem *yp = <elem *>jb.y
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
            _col_affine(xp + o, yp + o, min(ch.R, N - j * ch.R), ch.ncols, W, cw + ch.col0, jb.stream, jb.relu)
        c0 = ch.end


cdef void _slice_eval(const _Job *jb, Py_ssize_t k, floating *tag, elem *etag) noexcept nogil:
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
        _col_affine(<const elem *>jb.x + j * R * W + col0, <elem *>jb.y + j * R * W + col0,
                    min(R, N - j * R), ncols, W, cw + col0, jb.stream, jb.relu)


cdef void _slice_backward(const _Job *jb, Py_ssize_t k, floating *tag, elem *etag) noexcept nogil:
    cdef const elem *gp = <const elem *>jb.dy
    cdef const elem *xp = <const elem *>jb.x
    cdef const floating *wp = <const floating *>jb.w
    cdef elem *dp = <elem *>jb.y
    cdef floating *cf = <floating *>jb.cf
    cdef floating *cw = <floating *>jb.cw
    cdef const elem *zp = <const elem *>jb.zs
    cdef const floating *fp = <const floating *>jb.fcw
    cdef bint gated = zp != NULL or fp != NULL  # through the activation
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
            _col_grad_sums(gp + o, xp + o, min(ch.R, N - j * ch.R), ch.ncols, W, m, th, _at(zp, o), _at(fp, ch.col0))
        if S == 1:
            _col_finish_grad(th, ch.ncols, <double>N, jb.training, wp + c0, mp + c0, jb.invstd + c0, jb.gw + c0,
                             jb.gb + c0, cf + c0, C)
        else:
            for c in range(c0, ch.end):
                _merge_column_grad(c, C, S, 1, th, ch.ncols, ch.col0, <double>(N * S), jb.training, wp, mp, jb.invstd,
                                   jb.gw, jb.gb, cf, cw)
        for j in range(ch.nb - 1, -1, -1):
            o = j * ch.R * W + ch.col0
            if jb.training or gated:
                _col_grad_input(gp + o, xp + o, dp + o, min(ch.R, N - j * ch.R), ch.ncols, W, cw + ch.col0, jb.stream,
                                _at(zp, o), _at(fp, ch.col0), not jb.training)
            else:
                _col_affine(gp + o, dp + o, min(ch.R, N - j * ch.R), ch.ncols, W, cw + ch.col0, jb.stream, False)
        c0 = ch.end
