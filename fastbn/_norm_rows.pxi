# fastbn/_norm_rows.pxi -- the per-row work of the norm kernels (_norm_kernels.pyx includes it):
# a row's coefficients, and the C loops over a piece [f0, f1) of a row, by pass.

# ---------------------------------------------------------------- per-row work
cdef inline void _finish_row(const Job *jb, Py_ssize_t r, const double *acc) noexcept nogil:
    cdef double v = acc[<int>FBN_M2] / acc[<int>FBN_N]
    jb.mean[r] = fbn_acc_mean(acc)
    jb.var[r] = v
    jb.invstd[r] = fbn_batch_invstd(v, jb.eps)


cdef inline void _split_mean(double m, floating *hi, floating *lo) noexcept nogil:
    hi[0] = <floating>m
    if floating is float:
        lo[0] = fbn_mean_lo_f32(m, hi[0])
    else:
        lo[0] = fbn_mean_lo_f64(m, hi[0])


# ---- rows with a wide mean (|mean| >= 2**103 for float32, 2**970 for float64: FBN_WIDE in
# _coefs.h), where x - mean can overflow the input's type and the row's float coefficients can
# underflow: the rare row is done in double, exactly as the formulas read, halving x and the
# mean first (x/2 - m/2 cannot overflow), instead of in the vector loops.
cdef inline bint _wide(double m, floating tag) noexcept nogil:
    cdef double w = FBN_WIDE_F32 if floating is float else FBN_WIDE_F64
    return m >= w or m <= -w


# ---- rows of one element (layer norm over one feature, group norm with one element a group) take
# the same double path in the backward: there x - mean = 0 and dx = invstd * (g - mean(g)) is
# exactly 0, as PyTorch's, where the float coefficients' dy * w * invstd + kc left a rounding of
# dy * w * invstd (about 5e-8 of it).
# ---- rows with a steep spread (invstd below 2**-40 for float32, 2**-400 for float64: std past
# 1e12, 1e120), whose grad_input takes the same double path: the coefficient of x - mean is about
# weight * |dy| * invstd**2, which the float32 coefficients cannot hold past std 1e19 (it fell
# below float's normal range, and grad_input came out 5-45% off); the margin leaves room for a
# small weight and grad_output.
cdef inline bint _steep(double istd, floating tag) noexcept nogil:
    if floating is float:
        return istd < 9.094947017729282e-13  # 2**-40
    return istd < 3.872591914849318e-121  # 2**-400


cdef inline double _centred(double x, double m) noexcept nogil:
    """x - m, through halves: inf only where the exact difference is beyond double's range."""
    return 2.0 * (0.5 * x - 0.5 * m)


cdef void _wide_apply(const floating *x, floating *y, Py_ssize_t f0, Py_ssize_t f1, double m, double istd,
                      const floating *w, const floating *b, Py_ssize_t S) noexcept nogil:
    """y[f] = (x[f] - m) * istd * w[f // S] + b[f // S] for f in [f0, f1) of a row."""
    cdef Py_ssize_t f
    for f in range(f0, f1):
        y[f] = <floating>((0.5 * x[f] - 0.5 * m) * (2.0 * istd * <double>w[f // S]) + <double>b[f // S])


cdef void _wide_grad(const floating *dy, const floating *x, floating *dx, Py_ssize_t f0, Py_ssize_t f1, double m,
                     double istd, const floating *w, Py_ssize_t S, double kxh, double kc) noexcept nogil:
    """dx[f] = dy[f] * w[f // S] * istd + xhat[f] * kxh + kc for f in [f0, f1) of a row, xhat =
    (x - m) * istd (kxh = -istd * (istd * B) / n: the (x - m) coefficient times 1 / istd, so that
    nothing underflows on the way)."""
    cdef Py_ssize_t f
    for f in range(f0, f1):
        dx[f] = <floating>(<double>dy[f] * <double>w[f // S] * istd + (0.5 * x[f] - 0.5 * m) * (2.0 * istd) * kxh + kc)


cdef void _group_coefs(const Job *jb, Py_ssize_t r, floating tag) noexcept nogil:
    """The forward's [mhi | mlo | a | b] for row r (channels (r % G) * Cg ...)."""
    cdef Py_ssize_t Cg = jb.Cg, c, ch0 = (r % jb.G) * Cg
    cdef floating *cf = <floating *>jb.cf + r * 5 * Cg
    cdef const floating *w = <const floating *>jb.w
    cdef const floating *b = <const floating *>jb.b
    cdef floating hi, lo
    cdef double istd = jb.invstd[r]
    _split_mean(jb.mean[r], &hi, &lo)
    for c in range(Cg):
        cf[c] = hi
        cf[Cg + c] = lo
        cf[2 * Cg + c] = <floating>(<double>w[ch0 + c] * istd)
        cf[3 * Cg + c] = b[ch0 + c]


cdef void _group_grad_coefs(const Job *jb, Py_ssize_t r, floating tag) noexcept nogil:
    """The backward's [mhi | mlo | kdy | kx | kc] for row r, from its merged sums: with
    g = dy * w, dx = istd * (g - mean(g) - xhat * mean(g * xhat)).  Without batch statistics
    (instance norm on running statistics) dx = dy * w * istd: the forward's affine applied to dy
    with [0 | 0 | kdy | 0], which reads neither x nor the mean."""
    cdef Py_ssize_t Cg = jb.Cg, c, ch0 = (r % jb.G) * Cg
    cdef floating *cf = <floating *>jb.cf + r * 5 * Cg
    cdef const floating *w = <const floating *>jb.w
    cdef const double *s = jb.sums + r * 2 * Cg
    cdef double istd = jb.invstd[r], A = 0.0, B = 0.0, n = <double>jb.L
    cdef floating hi, lo, kx, kc
    for c in range(Cg):
        A += <double>w[ch0 + c] * s[2 * c]
        B += <double>w[ch0 + c] * s[2 * c + 1]
    if jb.training:
        _split_mean(jb.mean[r], &hi, &lo)
        kx = <floating>fbn_x_coef(istd, istd, B, n)
        kc = <floating>(-istd * A / n)
    else:
        hi = lo = kx = kc = 0
    for c in range(Cg):
        cf[c] = hi
        cf[Cg + c] = lo
        cf[2 * Cg + c] = <floating>(<double>w[ch0 + c] * istd)
        cf[3 * Cg + c] = kx
        cf[4 * Cg + c] = kc


cdef void _moments(const Job *jb, Py_ssize_t r, Py_ssize_t f0, Py_ssize_t f1, double *acc, floating tag) noexcept nogil:
    cdef const floating *x = <const floating *>jb.x + r * jb.L
    acc[0] = acc[1] = acc[2] = acc[3] = 0.0
    if floating is float:  # in double lanes: float64's statistics (_norm_simd.h)
        fbn_row_moments_f32(x + f0, f1 - f0, acc)
    else:
        fbn_row_moments_f64(x + f0, f1 - f0, acc)


cdef void _group_apply(const Job *jb, Py_ssize_t r, Py_ssize_t f0, Py_ssize_t f1, floating tag) noexcept nogil:
    cdef const floating *cf = <const floating *>jb.cf + r * 5 * jb.Cg
    cdef const floating *x = <const floating *>jb.x + r * jb.L
    cdef floating *y = <floating *>jb.y + r * jb.L
    cdef Py_ssize_t ch0 = (r % jb.G) * jb.Cg
    if _wide(jb.mean[r], tag):
        _wide_apply(x, y, f0, f1, jb.mean[r], jb.invstd[r], <const floating *>jb.w + ch0,
                    <const floating *>jb.b + ch0, jb.S)
        return
    if floating is float:
        fbn_affine_fl(x, y, jb.Cg, jb.S, f0, f1, cf, jb.nt)
    else:
        fbn_affine_f64(x, y, jb.Cg, jb.S, f0, f1, cf, jb.nt, 0)


cdef void _group_gsums(const Job *jb, Py_ssize_t r, Py_ssize_t f0, Py_ssize_t f1, double *acc, floating tag) noexcept nogil:
    cdef Py_ssize_t o = r * jb.L, c, f
    cdef const floating *gy = <const floating *>jb.dy + o
    cdef const floating *gx = <const floating *>jb.x + o
    for c in range(2 * jb.Cg):
        acc[c] = 0.0
    if _wide(jb.mean[r], tag):
        for f in range(f0, f1):
            c = f // jb.S
            acc[2 * c] += gy[f]
            acc[2 * c + 1] += <double>gy[f] * _centred(gx[f], jb.mean[r])
        return
    if floating is float:
        fbn_grad_sums_fl(<const float *>jb.dy + o, <const float *>jb.x + o, jb.Cg, jb.S, f0, f1, jb.cmean + r * jb.Cg, acc)
    else:
        fbn_grad_sums_f64(<const double *>jb.dy + o, <const double *>jb.x + o, jb.Cg, jb.S, f0, f1, jb.cmean + r * jb.Cg, acc, NULL, NULL)


cdef void _group_ginput(const Job *jb, Py_ssize_t r, Py_ssize_t f0, Py_ssize_t f1, floating tag) noexcept nogil:
    cdef Py_ssize_t o = r * jb.L, c, Cg = jb.Cg, ch0 = (r % jb.G) * jb.Cg
    cdef const floating *cf = <const floating *>jb.cf + r * 5 * jb.Cg
    cdef const floating *w = <const floating *>jb.w + ch0
    cdef const double *sums = jb.sums + r * 2 * Cg
    cdef double A = 0.0, B = 0.0, istd = jb.invstd[r]
    if jb.training and (_wide(jb.mean[r], tag) or _steep(istd, tag) or jb.L == 1):  # as _group_grad_coefs, in double
        for c in range(Cg):
            A += <double>w[c] * sums[2 * c]
            B += <double>w[c] * sums[2 * c + 1]
        _wide_grad(<const floating *>jb.dy + o, <const floating *>jb.x + o, <floating *>jb.y + o, f0, f1,
                   jb.mean[r], istd, w, jb.S, -istd * (istd * B) / <double>jb.L, -istd * A / <double>jb.L)
        return
    if jb.training:
        if floating is float:
            fbn_grad_input_fl(<const float *>jb.dy + o, <const float *>jb.x + o, <float *>jb.y + o, jb.Cg, jb.S, f0, f1, cf, jb.nt)
        else:
            fbn_grad_input_f64(<const double *>jb.dy + o, <const double *>jb.x + o, <double *>jb.y + o, jb.Cg, jb.S, f0, f1, cf, jb.nt, NULL, NULL, 0)
    else:  # cf's first four blocks are [0 | 0 | kdy | 0]
        if floating is float:
            fbn_affine_fl(<const float *>jb.dy + o, <float *>jb.y + o, jb.Cg, jb.S, f0, f1, cf, jb.nt)
        else:
            fbn_affine_f64(<const double *>jb.dy + o, <double *>jb.y + o, jb.Cg, jb.S, f0, f1, cf, jb.nt, 0)


# ---- a task's whole rows, one after the other; float32 rows that pair (fbn_pair_affine and
# fbn_pair_grad in _norm_simd.h) normalize a row in one loop with the next row's moments, or take a
# row's grad_input in one loop with the next row's gradient sums.
cdef bint _group_apply_pair(const Job *jb, Py_ssize_t r, double *acc, floating tag) noexcept nogil:
    """Row r's normalize (as _group_apply, a mean that is not wide) with row r + 1's moments into
    acc, where the rows pair."""
    cdef Py_ssize_t L = jb.L
    if floating is double or _wide(jb.mean[r], tag):
        return False
    return fbn_pair_affine(<const float *>jb.x + r * L, <float *>jb.y + r * L, jb.Cg, jb.S,
                           <const float *>jb.cf + r * 5 * jb.Cg, jb.nt, <const float *>jb.x + (r + 1) * L, acc) != 0


cdef void _group_forward_rows(const Job *jb, Py_ssize_t r0, Py_ssize_t r1, floating tag) noexcept nogil:
    cdef double acc[4]
    cdef bint summed = False  # row r's moments are in acc
    cdef Py_ssize_t r
    for r in range(r0, r1):
        if not summed:
            _moments(jb, r, 0, jb.L, acc, tag)
        _finish_row(jb, r, acc)
        _group_coefs(jb, r, tag)
        summed = r + 1 < r1 and _group_apply_pair(jb, r, acc, tag)
        if not summed:
            _group_apply(jb, r, 0, jb.L, tag)


cdef bint _group_ginput_pair(const Job *jb, Py_ssize_t r, floating tag) noexcept nogil:
    """Row r's grad_input (as _group_ginput's float loops) with row r + 1's gradient sums into its
    jb.sums (as _group_gsums), where the rows pair."""
    cdef Py_ssize_t o = r * jb.L, c
    cdef double *acc = jb.sums + (r + 1) * 2 * jb.Cg
    if (floating is double or not jb.training or jb.L == 1 or _wide(jb.mean[r], tag) or _steep(jb.invstd[r], tag)
            or _wide(jb.mean[r + 1], tag)):
        return False
    for c in range(2 * jb.Cg):
        acc[c] = 0.0
    return fbn_pair_grad(<const float *>jb.dy + o, <const float *>jb.x + o, <float *>jb.y + o, jb.Cg, jb.S,
                         <const float *>jb.cf + r * 5 * jb.Cg, jb.nt, <const float *>jb.dy + o + jb.L,
                         <const float *>jb.x + o + jb.L, jb.cmean + (r + 1) * jb.Cg, acc) != 0


cdef void _group_backward_rows(const Job *jb, Py_ssize_t r0, Py_ssize_t r1, floating tag) noexcept nogil:
    cdef bint summed = False  # row r's gradient sums are in jb.sums
    cdef Py_ssize_t r
    for r in range(r0, r1):
        if not summed:
            _group_gsums(jb, r, 0, jb.L, jb.sums + r * 2 * jb.Cg, tag)
        _group_grad_coefs(jb, r, tag)
        summed = r + 1 < r1 and _group_ginput_pair(jb, r, tag)
        if not summed:
            _group_ginput(jb, r, 0, jb.L, tag)


cdef void _ln_row_coefs(const Job *jb, Py_ssize_t r, double A, double B, floating *istd, floating *hi,
                        floating *lo, floating *kx, floating *kc) noexcept nogil:
    cdef double s = jb.invstd[r], n = <double>jb.L
    istd[0] = <floating>s
    _split_mean(jb.mean[r], hi, lo)
    kx[0] = <floating>fbn_x_coef(s, s, B, n)
    kc[0] = <floating>(-s * A / n)


cdef void _ln_apply(const Job *jb, Py_ssize_t r, Py_ssize_t f0, Py_ssize_t f1, floating tag) noexcept nogil:
    cdef Py_ssize_t o = r * jb.L + f0
    cdef floating hi, lo
    if _wide(jb.mean[r], tag):
        _wide_apply(<const floating *>jb.x + r * jb.L, <floating *>jb.y + r * jb.L, f0, f1, jb.mean[r], jb.invstd[r],
                    <const floating *>jb.w, <const floating *>jb.b, 1)
        return
    _split_mean(jb.mean[r], &hi, &lo)
    if floating is float:
        fbn_ln_apply_f32(<const float *>jb.x + o, <float *>jb.y + o, f1 - f0, hi, lo, <float>jb.invstd[r],
                         <const float *>jb.w + f0, <const float *>jb.b + f0, jb.nt)
    else:
        fbn_ln_apply_f64(<const double *>jb.x + o, <double *>jb.y + o, f1 - f0, hi, lo, jb.invstd[r],
                         <const double *>jb.w + f0, <const double *>jb.b + f0, jb.nt)


cdef void _ln_ginput(const Job *jb, Py_ssize_t r, Py_ssize_t f0, Py_ssize_t f1, double A, double B, floating tag) noexcept nogil:
    cdef Py_ssize_t o = r * jb.L + f0
    cdef floating istd, hi, lo, kx, kc
    cdef double s = jb.invstd[r]
    if _wide(jb.mean[r], tag) or _steep(s, tag) or jb.L == 1:
        _wide_grad(<const floating *>jb.dy + r * jb.L, <const floating *>jb.x + r * jb.L, <floating *>jb.y + r * jb.L,
                   f0, f1, jb.mean[r], s, <const floating *>jb.w, 1, -s * (s * B) / <double>jb.L, -s * A / <double>jb.L)
        return
    _ln_row_coefs(jb, r, A, B, &istd, &hi, &lo, &kx, &kc)
    if floating is float:
        fbn_ln_grad_input_fl(<const float *>jb.dy + o, <const float *>jb.x + o, <float *>jb.y + o, f1 - f0,
                             <const float *>jb.w + f0, istd, hi, lo, kx, kc, jb.nt)
    else:
        fbn_ln_grad_input_f64(<const double *>jb.dy + o, <const double *>jb.x + o, <double *>jb.y + o, f1 - f0,
                              <const double *>jb.w + f0, istd, hi, lo, kx, kc, jb.nt)


cdef void _ln_gsums(const Job *jb, Py_ssize_t blk, Py_ssize_t r, Py_ssize_t f0, Py_ssize_t f1, double *A,
                    double *B, floating tag) noexcept nogil:
    cdef Py_ssize_t o = r * jb.L + f0
    cdef double *col = jb.col + blk * 2 * jb.L
    cdef float *colf
    cdef floating hi, lo
    cdef const floating *gy = <const floating *>jb.dy + r * jb.L
    cdef const floating *gx = <const floating *>jb.x + r * jb.L
    cdef const floating *w = <const floating *>jb.w
    cdef double h, xhat, m = jb.mean[r], s = jb.invstd[r]
    cdef Py_ssize_t f
    A[0] = B[0] = 0.0
    if _wide(m, tag):  # in double; the column partials as the loops keep them (float32 for float32)
        for f in range(f0, f1):
            h = <double>gy[f] * <double>w[f]
            xhat = (0.5 * gx[f] - 0.5 * m) * (2.0 * s)
            A[0] += h
            B[0] += h * _centred(gx[f], m)
            if floating is float:
                jb.colf[blk * 2 * jb.L + f] += gy[f]
                jb.colf[blk * 2 * jb.L + jb.L + f] += <float>(<double>gy[f] * xhat)
            else:
                col[f] += gy[f]
                col[jb.L + f] += <double>gy[f] * xhat
        return
    if floating is float:  # float32 column partials, folded by _ln_fold
        colf = jb.colf + blk * 2 * jb.L
        _split_mean(jb.mean[r], &hi, &lo)
        fbn_ln_grad_sums_fl(<const float *>jb.dy + o, <const float *>jb.x + o, <const float *>jb.w + f0, f1 - f0,
                            hi, lo, <float>jb.invstd[r], A, B, colf + jb.L + f0, colf + f0)
    else:
        fbn_ln_grad_sums_f64(<const double *>jb.dy + o, <const double *>jb.x + o, <const double *>jb.w + f0, f1 - f0,
                             jb.mean[r], jb.invstd[r], A, B, col + jb.L + f0, col + f0)


cdef void _traffic(const Job *jb, Py_ssize_t r, Py_ssize_t f0, Py_ssize_t f1, double *out, floating tag) noexcept nogil:
    cdef Py_ssize_t o = r * jb.L + f0
    cdef const floating *dy = NULL
    cdef floating *y = NULL
    if jb.dy != NULL:
        dy = <const floating *>jb.dy + o
    if jb.y != NULL:
        y = <floating *>jb.y + o
    if floating is float:
        out[0] += fbn_row_traffic_f32(<const float *>jb.x + o, dy, y, f1 - f0, jb.nt)
    else:
        out[0] += fbn_row_traffic_f64(<const double *>jb.x + o, dy, y, f1 - f0, jb.nt)


cdef inline void _ln_fold(const Job *jb, Py_ssize_t blk, Py_ssize_t f0, Py_ssize_t f1) noexcept nogil:
    """Fold block blk's float32 column partials [f0, f1) into its double ones."""
    cdef Py_ssize_t o = blk * 2 * jb.L
    fbn_ln_fold(jb.colf + o + f0, jb.col + o + f0, f1 - f0)
    fbn_ln_fold(jb.colf + o + jb.L + f0, jb.col + o + jb.L + f0, f1 - f0)
