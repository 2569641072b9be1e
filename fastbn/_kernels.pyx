"""fastbn's CPU kernels: OpenMP-parallel batch norm over C-contiguous (N, C, S) buffers.

Every operation is "reduce per channel, derive per-channel coefficients, apply elementwise".
Three ways to split that work between threads (``path``):

CHANNELS  each thread owns whole channels and runs reduce + apply back to back, so the second
          pass over a channel re-reads it from L2 instead of DRAM.  Used when the channels
          divide evenly between the threads (or there are many of them).
UNITS     each channel is cut into units of ~``unit`` elements; partial results per unit are
          merged in a fixed order, then the apply pass runs over the same units.  Used when there
          are fewer channels than threads (C=1, C=3): no shape runs on one thread.  Channels go
          in waves small enough for the apply pass to re-read them from the last-level cache.
COLUMNS   spatial size 1, an (N, C) matrix: threads take blocks of rows and reduce along the
          columns with vector loads across C (per-thread accumulators, merged afterwards).

``unit`` (0: choose) is the unit size in elements for UNITS, rows per block for COLUMNS; tests
set it small to exercise many units, waves and blocks on small inputs.  ``stream`` (-1: choose by
output size) switches the non-temporal stores of _simd.h on (1) or off (0).

The kernels trust their arguments: fastbn.functional validated them.  Statistics are
accumulated in double for both float32 and float64.  The GIL is released for all the work.
"""
import numpy as np
from cython cimport floating
from cython.parallel cimport parallel, prange, threadid
from libc.math cimport sqrt

cdef extern from "_simd.h" nogil:
    # a "run" (x, S, stride, e0, len): channel elements [e0, e0 + len), rows of S, stride apart
    void fbn_sfence()
    void fbn_chan_merge(double *n, double *m, double *m2, double nb, double mb, double m2b)
    void fbn_moments_f32(const float *x, Py_ssize_t S, Py_ssize_t stride, Py_ssize_t e0, Py_ssize_t len, double *n, double *m, double *m2)
    void fbn_moments_f64(const double *x, Py_ssize_t S, Py_ssize_t stride, Py_ssize_t e0, Py_ssize_t len, double *n, double *m, double *m2)
    void fbn_affine_f32(const float *x, float *y, Py_ssize_t S, Py_ssize_t stride, Py_ssize_t e0, Py_ssize_t len, float mhi, float mlo, float a, float b, int nt)
    void fbn_affine_f64(const double *x, double *y, Py_ssize_t S, Py_ssize_t stride, Py_ssize_t e0, Py_ssize_t len, double mhi, double mlo, double a, double b, int nt)
    void fbn_grad_sums_f32(const float *dy, const float *x, Py_ssize_t S, Py_ssize_t stride, Py_ssize_t e0, Py_ssize_t len, double mean, double *sdy, double *sdyx)
    void fbn_grad_sums_f64(const double *dy, const double *x, Py_ssize_t S, Py_ssize_t stride, Py_ssize_t e0, Py_ssize_t len, double mean, double *sdy, double *sdyx)
    void fbn_grad_input_f32(const float *dy, const float *x, float *dx, Py_ssize_t S, Py_ssize_t stride, Py_ssize_t e0, Py_ssize_t len, float mhi, float mlo, float kdy, float kx, float kc, int nt)
    void fbn_grad_input_f64(const double *dy, const double *x, double *dx, Py_ssize_t S, Py_ssize_t stride, Py_ssize_t e0, Py_ssize_t len, double mhi, double mlo, double kdy, double kx, double kc, int nt)
    # spatial size 1: blocks of rows of an (N, C) matrix
    void fbn_col_moments_f32(const float *x, Py_ssize_t rows, Py_ssize_t C, double *n, double *m, double *m2, double *tmp)
    void fbn_col_moments_f64(const double *x, Py_ssize_t rows, Py_ssize_t C, double *n, double *m, double *m2, double *tmp)
    void fbn_col_affine_f32(const float *x, float *y, Py_ssize_t rows, Py_ssize_t C, const float *mhi, const float *mlo, const float *a, const float *b, int nt)
    void fbn_col_affine_f64(const double *x, double *y, Py_ssize_t rows, Py_ssize_t C, const double *mhi, const double *mlo, const double *a, const double *b, int nt)
    void fbn_col_grad_sums_f32(const float *dy, const float *x, Py_ssize_t rows, Py_ssize_t C, const double *mean, double *sdy, double *sdyx)
    void fbn_col_grad_sums_f64(const double *dy, const double *x, Py_ssize_t rows, Py_ssize_t C, const double *mean, double *sdy, double *sdyx)
    void fbn_col_grad_input_f32(const float *dy, const float *x, float *dx, Py_ssize_t rows, Py_ssize_t C, const float *mhi, const float *mlo, const float *kdy, const float *kx, const float *kc, int nt)
    void fbn_col_grad_input_f64(const double *dy, const double *x, double *dx, Py_ssize_t rows, Py_ssize_t C, const double *mhi, const double *mlo, const double *kdy, const double *kx, const double *kc, int nt)

# Work-splitting strategies; the Python layer passes AUTO unless a test forces one.
cdef enum:
    AUTO = 0
    CHANNELS = 1
    UNITS = 2
    COLUMNS = 3
PATHS = {"auto": AUTO, "channels": CHANNELS, "units": UNITS, "columns": COLUMNS}

cdef enum:
    # Below this many elements per thread, more threads cost more than they save.
    MIN_PER_THREAD = 16384
    # Elements per COLUMNS row block (~128 KiB of float32: stays in L2 for the second pass).
    COLUMN_BLOCK = 32768
    MIN_UNIT = 4096
    # Outputs of at least this many bytes are written with streaming (non-temporal) stores.
    STREAM_BYTES = 8 * 1024 * 1024
    # UNITS path: inputs of one wave of channels (re-read by the apply pass) fit in this.
    WAVE_BYTES = 16 * 1024 * 1024


# ---------------------------------------------------------------- runs of one channel, fused-type dispatch
# Channel c of an (N, C, S) buffer at x: rows of S elements starting at x + c*S, C*S apart.
# Each helper covers channel elements [e0, e1) (see _simd_impl.h).

cdef inline void _run_moments(const floating *x, Py_ssize_t C, Py_ssize_t S, Py_ssize_t c,
                              Py_ssize_t e0, Py_ssize_t e1, double *acc) noexcept nogil:
    if floating is float:
        fbn_moments_f32(x + c * S, S, C * S, e0, e1 - e0, &acc[0], &acc[1], &acc[2])
    else:
        fbn_moments_f64(x + c * S, S, C * S, e0, e1 - e0, &acc[0], &acc[1], &acc[2])


cdef inline void _run_affine(const floating *x, floating *y, Py_ssize_t C, Py_ssize_t S, Py_ssize_t c,
                             Py_ssize_t e0, Py_ssize_t e1, const floating *cf, int nt) noexcept nogil:
    # cf holds [mhi | mlo | a | b], C values each
    if floating is float:
        fbn_affine_f32(x + c * S, y + c * S, S, C * S, e0, e1 - e0, cf[c], cf[C + c], cf[2 * C + c], cf[3 * C + c], nt)
    else:
        fbn_affine_f64(x + c * S, y + c * S, S, C * S, e0, e1 - e0, cf[c], cf[C + c], cf[2 * C + c], cf[3 * C + c], nt)


cdef inline void _run_grad_sums(const floating *dy, const floating *x, Py_ssize_t C, Py_ssize_t S,
                                Py_ssize_t c, Py_ssize_t e0, Py_ssize_t e1, double mean,
                                double *acc) noexcept nogil:
    if floating is float:
        fbn_grad_sums_f32(dy + c * S, x + c * S, S, C * S, e0, e1 - e0, mean, &acc[0], &acc[1])
    else:
        fbn_grad_sums_f64(dy + c * S, x + c * S, S, C * S, e0, e1 - e0, mean, &acc[0], &acc[1])


cdef inline void _run_grad_input(const floating *dy, const floating *x, floating *dx, Py_ssize_t C,
                                 Py_ssize_t S, Py_ssize_t c, Py_ssize_t e0, Py_ssize_t e1,
                                 const floating *cf, int nt) noexcept nogil:
    # cf holds [mhi | mlo | kdy | kx | kc], C values each
    if floating is float:
        fbn_grad_input_f32(dy + c * S, x + c * S, dx + c * S, S, C * S, e0, e1 - e0,
                           cf[c], cf[C + c], cf[2 * C + c], cf[3 * C + c], cf[4 * C + c], nt)
    else:
        fbn_grad_input_f64(dy + c * S, x + c * S, dx + c * S, S, C * S, e0, e1 - e0,
                           cf[c], cf[C + c], cf[2 * C + c], cf[3 * C + c], cf[4 * C + c], nt)


# ---------------------------------------------------------------- per-channel coefficients
cdef inline void _split_mean(double m, floating *hi, floating *lo) noexcept nogil:
    # m ~= hi + lo in the input type; lo is 0 for float64
    hi[0] = <floating>m
    lo[0] = <floating>(m - <double>hi[0])


cdef inline void _finish_stats(Py_ssize_t c, Py_ssize_t C, const double *acc, double eps,
                               const floating *w, const floating *b, double *mean, double *var,
                               double *invstd, floating *cf) noexcept nogil:
    cdef double v = acc[2] / acc[0]
    cdef double istd = 1.0 / sqrt(v + eps)
    mean[c] = acc[1]
    var[c] = v
    invstd[c] = istd
    _affine_coefs(c, C, acc[1], istd, w, b, cf)


cdef inline void _affine_coefs(Py_ssize_t c, Py_ssize_t C, double mean, double istd,
                               const floating *w, const floating *b, floating *cf) noexcept nogil:
    _split_mean(mean, &cf[c], &cf[C + c])
    cf[2 * C + c] = <floating>(<double>w[c] * istd)
    cf[3 * C + c] = b[c]


cdef inline void _finish_grad(Py_ssize_t c, Py_ssize_t C, const double *acc, double count, bint training,
                              const floating *w, const double *mean, const double *invstd,
                              double *gw, double *gb, floating *cf) noexcept nogil:
    cdef double istd = invstd[c], k = <double>w[c] * istd
    gb[c] = acc[0]
    gw[c] = acc[1] * istd
    _split_mean(mean[c], &cf[c], &cf[C + c])
    cf[2 * C + c] = <floating>k
    if training:
        cf[3 * C + c] = <floating>(-k * istd * istd * acc[1] / count)
        cf[4 * C + c] = <floating>(-k * acc[0] / count)
    else:
        cf[3 * C + c] = 0
        cf[4 * C + c] = 0


# ---------------------------------------------------------------- planning
cdef int _plan_threads(int n_threads, Py_ssize_t total) noexcept nogil:
    cdef Py_ssize_t t = total // MIN_PER_THREAD
    if t < 1:
        t = 1
    return <int>min(<Py_ssize_t>n_threads, t)


cdef int _plan_path(Py_ssize_t C, Py_ssize_t S, int T, int path) noexcept nogil:
    if path == COLUMNS and S != 1:
        return UNITS
    if path != AUTO:
        return path
    if S == 1:
        return COLUMNS
    if T == 1 or C % T == 0 or C >= 4 * T:
        return CHANNELS
    return UNITS


cdef int _plan_stream(Py_ssize_t out_bytes, int stream) noexcept nogil:
    """Streaming stores for outputs too big to stay in the last-level cache (stream < 0: decide)."""
    if stream >= 0:
        return stream
    return out_bytes >= STREAM_BYTES


cdef Py_ssize_t _plan_wave(Py_ssize_t channel_bytes, Py_ssize_t C, Py_ssize_t unit) noexcept nogil:
    """Channels per wave in the UNITS path: a wave's inputs are read twice, so they should still
    be in the last-level cache the second time.  A forced unit size (tests) forces one channel
    per wave, so small inputs run many waves."""
    if unit > 0:
        return 1
    return max(1, min(C, WAVE_BYTES // channel_bytes))


cdef Py_ssize_t _plan_unit(Py_ssize_t per_channel, Py_ssize_t C, int T, Py_ssize_t unit) noexcept nogil:
    """Elements per unit: about 16 units per thread overall, none smaller than MIN_UNIT."""
    cdef Py_ssize_t k
    if unit > 0:
        return unit
    k = (16 * T + C - 1) // C
    unit = (per_channel + k - 1) // k
    return max(unit, <Py_ssize_t>MIN_UNIT)


# ---------------------------------------------------------------- one whole channel (CHANNELS path)
cdef void _channel_forward(const floating *x, floating *y, Py_ssize_t C, Py_ssize_t S, Py_ssize_t NS,
                           Py_ssize_t c, double eps, const floating *w, const floating *b, double *mean,
                           double *var, double *invstd, floating *cf, int nt) noexcept nogil:
    cdef double acc[3]
    acc[0] = 0
    acc[1] = 0
    acc[2] = 0
    _run_moments(x, C, S, c, 0, NS, acc)
    _finish_stats(c, C, acc, eps, w, b, mean, var, invstd, cf)
    _run_affine(x, y, C, S, c, 0, NS, cf, nt)  # re-reads the channel from cache
    if nt:
        fbn_sfence()


cdef void _channel_backward(const floating *dy, const floating *x, floating *dx, Py_ssize_t C,
                            Py_ssize_t S, Py_ssize_t NS, Py_ssize_t c, bint training, const floating *w,
                            const double *mean, const double *invstd, double *gw, double *gb,
                            floating *cf, int nt) noexcept nogil:
    cdef double acc[2]
    acc[0] = 0
    acc[1] = 0
    _run_grad_sums(dy, x, C, S, c, 0, NS, mean[c], acc)
    _finish_grad(c, C, acc, <double>NS, training, w, mean, invstd, gw, gb, cf)
    _run_grad_input(dy, x, dx, C, S, c, 0, NS, cf, nt)
    if nt:
        fbn_sfence()


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
    """Batch statistics and the fused normalize + affine in one call."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], S = x.shape[2], NS = N * S
    cdef int T = _plan_threads(n_threads, N * C * S)
    cdef int nt = _plan_stream(N * C * S * sizeof(floating), stream)
    path = _plan_path(C, S, T, path)
    cdef floating[::1] coef = np.empty(4 * C, dtype=np.float32 if floating is float else np.float64)
    cdef const floating *xp = &x[0, 0, 0]
    cdef floating *yp = &y[0, 0, 0]
    cdef floating *cf = &coef[0]
    cdef const floating *wp = &weight[0]
    cdef const floating *bp = &bias[0]
    cdef double *mp = &mean[0]
    cdef double *vp = &var[0]
    cdef double *ip = &invstd[0]
    cdef Py_ssize_t c, c0, c1, u, k, nu, U, W, e0, j, t, tid, R, nb, r0
    cdef double acc[3]
    cdef double[:, ::1] part
    cdef double *pp
    cdef double *th

    if path == CHANNELS:
        with nogil:
            for c in prange(C, num_threads=min(<Py_ssize_t>T, C), schedule="static"):
                _channel_forward(xp, yp, C, S, NS, c, eps, wp, bp, mp, vp, ip, cf, nt)
    elif path == UNITS:
        W = _plan_wave(NS * sizeof(floating), C, unit)
        U = _plan_unit(NS, W, T, unit)
        k = (NS + U - 1) // U
        part = np.zeros((C * k, 3))
        pp = &part[0, 0]
        with nogil:
            c0 = 0
            while c0 < C:  # one wave of W channels: reduce, merge, apply
                c1 = min(C, c0 + W)
                nu = (c1 - c0) * k
                for u in prange(c0 * k, c1 * k, num_threads=min(<Py_ssize_t>T, nu), schedule="static"):
                    e0 = (u % k) * U
                    _run_moments(xp, C, S, u // k, e0, min(NS, e0 + U), pp + 3 * u)
                for c in range(c0, c1):
                    acc[0] = 0
                    acc[1] = 0
                    acc[2] = 0
                    for j in range(c * k, c * k + k):
                        fbn_chan_merge(&acc[0], &acc[1], &acc[2], pp[3 * j], pp[3 * j + 1], pp[3 * j + 2])
                    _finish_stats(c, C, acc, eps, wp, bp, mp, vp, ip, cf)
                for u in prange(c0 * k, c1 * k, num_threads=min(<Py_ssize_t>T, nu), schedule="static"):
                    e0 = (u % k) * U
                    _run_affine(xp, yp, C, S, u // k, e0, min(NS, e0 + U), cf, nt)
                    if nt:
                        fbn_sfence()
                c0 = c1
    else:  # COLUMNS: x is an (N, C) matrix
        R = unit if unit > 0 else max(1, <Py_ssize_t>(COLUMN_BLOCK // C))
        nb = (N + R - 1) // R
        T = <int>min(<Py_ssize_t>T, nb)
        part = np.zeros((T, 4 * C + 1))  # per thread: [count | mean(C) | M2(C) | scratch(2C)]
        pp = &part[0, 0]
        with nogil, parallel(num_threads=T):
            tid = threadid()
            for j in prange(nb, schedule="static"):
                r0 = j * R
                _col_moments(xp + r0 * C, min(R, N - r0), C, pp + tid * (4 * C + 1))
        with nogil:
            for t in range(1, T):  # merge the threads' accumulators into thread 0's
                th = pp + t * (4 * C + 1)
                for c in range(C):
                    acc[0] = pp[0]
                    fbn_chan_merge(&acc[0], &pp[1 + c], &pp[1 + C + c], th[0], th[1 + c], th[1 + C + c])
                pp[0] += th[0]
            for c in range(C):
                acc[0] = pp[0]
                acc[1] = pp[1 + c]
                acc[2] = pp[1 + C + c]
                _finish_stats(c, C, acc, eps, wp, bp, mp, vp, ip, cf)
            for j in prange(nb, num_threads=T, schedule="static"):
                r0 = j * R
                _col_affine(xp + r0 * C, yp + r0 * C, min(R, N - r0), C, cf, nt)


cdef inline void _col_moments(const floating *x, Py_ssize_t rows, Py_ssize_t C, double *th) noexcept nogil:
    # th: one thread's [count | mean(C) | M2(C) | scratch(2C)]
    if floating is float:
        fbn_col_moments_f32(x, rows, C, th, th + 1, th + 1 + C, th + 1 + 2 * C)
    else:
        fbn_col_moments_f64(x, rows, C, th, th + 1, th + 1 + C, th + 1 + 2 * C)


cdef inline void _col_affine(const floating *x, floating *y, Py_ssize_t rows, Py_ssize_t C,
                             const floating *cf, int nt) noexcept nogil:
    if floating is float:
        fbn_col_affine_f32(x, y, rows, C, cf, cf + C, cf + 2 * C, cf + 3 * C, nt)
    else:
        fbn_col_affine_f64(x, y, rows, C, cf, cf + C, cf + 2 * C, cf + 3 * C, nt)
    if nt:
        fbn_sfence()


# ---------------------------------------------------------------- forward with given statistics
def forward_eval(const floating[:, :, ::1] x,       # IN  (N, C, S)
                 floating[:, :, ::1] y,             # OUT (N, C, S); may be x itself
                 const floating[::1] weight,        # IN  (C,)
                 const floating[::1] bias,          # IN  (C,)
                 const double[::1] mean,            # IN  (C,) running mean
                 const double[::1] invstd,          # IN  (C,) 1 / sqrt(running_var + eps)
                 int n_threads, int path=AUTO, Py_ssize_t unit=0, int stream=-1):
    """y = (x - mean) * invstd * weight + bias: one read of x, one write of y."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], S = x.shape[2], NS = N * S
    cdef int T = _plan_threads(n_threads, N * C * S)
    cdef int nt = _plan_stream(N * C * S * sizeof(floating), stream)
    path = _plan_path(C, S, T, path)
    cdef floating[::1] coef = np.empty(4 * C, dtype=np.float32 if floating is float else np.float64)
    cdef const floating *xp = &x[0, 0, 0]
    cdef floating *yp = &y[0, 0, 0]
    cdef floating *cf = &coef[0]
    cdef Py_ssize_t c, u, k, nu, U, e0, j, R, nb, r0
    with nogil:
        for c in range(C):
            _affine_coefs(c, C, mean[c], invstd[c], &weight[0], &bias[0], cf)
        if path == COLUMNS:
            R = unit if unit > 0 else max(1, <Py_ssize_t>(COLUMN_BLOCK // C))
            nb = (N + R - 1) // R
            for j in prange(nb, num_threads=min(<Py_ssize_t>T, nb), schedule="static"):
                r0 = j * R
                _col_affine(xp + r0 * C, yp + r0 * C, min(R, N - r0), C, cf, nt)
        else:  # no reduction: CHANNELS is UNITS with one unit per channel
            U = NS if path == CHANNELS else _plan_unit(NS, C, T, unit)
            k = (NS + U - 1) // U
            nu = C * k
            for u in prange(nu, num_threads=min(<Py_ssize_t>T, nu), schedule="static"):
                e0 = (u % k) * U
                _run_affine(xp, yp, C, S, u // k, e0, min(NS, e0 + U), cf, nt)
                if nt:
                    fbn_sfence()


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
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], S = x.shape[2], NS = N * S
    cdef int T = _plan_threads(n_threads, N * C * S)
    cdef int nt = _plan_stream(N * C * S * sizeof(floating), stream)
    path = _plan_path(C, S, T, path)
    cdef floating[::1] coef = np.empty(5 * C, dtype=np.float32 if floating is float else np.float64)
    cdef const floating *gp = &dy[0, 0, 0]
    cdef const floating *xp = &x[0, 0, 0]
    cdef floating *dp = &dx[0, 0, 0]
    cdef floating *cf = &coef[0]
    cdef const floating *wp = &weight[0]
    cdef const double *mp = &mean[0]
    cdef const double *ip = &invstd[0]
    cdef double *gwp = &grad_weight[0]
    cdef double *gbp = &grad_bias[0]
    cdef double count = <double>NS
    cdef Py_ssize_t c, c0, c1, u, k, nu, U, W, e0, j, t, tid, R, nb, r0
    cdef double acc[2]
    cdef double[:, ::1] part
    cdef double *pp

    if path == CHANNELS:
        with nogil:
            for c in prange(C, num_threads=min(<Py_ssize_t>T, C), schedule="static"):
                _channel_backward(gp, xp, dp, C, S, NS, c, training, wp, mp, ip, gwp, gbp, cf, nt)
    elif path == UNITS:
        W = _plan_wave(2 * NS * sizeof(floating), C, unit)
        U = _plan_unit(NS, W, T, unit)
        k = (NS + U - 1) // U
        part = np.zeros((C * k, 2))
        pp = &part[0, 0]
        with nogil:
            c0 = 0
            while c0 < C:  # one wave of W channels: reduce, merge, apply
                c1 = min(C, c0 + W)
                nu = (c1 - c0) * k
                for u in prange(c0 * k, c1 * k, num_threads=min(<Py_ssize_t>T, nu), schedule="static"):
                    e0 = (u % k) * U
                    _run_grad_sums(gp, xp, C, S, u // k, e0, min(NS, e0 + U), mp[u // k], pp + 2 * u)
                for c in range(c0, c1):
                    acc[0] = 0
                    acc[1] = 0
                    for j in range(c * k, c * k + k):
                        acc[0] += pp[2 * j]
                        acc[1] += pp[2 * j + 1]
                    _finish_grad(c, C, acc, count, training, wp, mp, ip, gwp, gbp, cf)
                for u in prange(c0 * k, c1 * k, num_threads=min(<Py_ssize_t>T, nu), schedule="static"):
                    e0 = (u % k) * U
                    _run_grad_input(gp, xp, dp, C, S, u // k, e0, min(NS, e0 + U), cf, nt)
                    if nt:
                        fbn_sfence()
                c0 = c1
    else:  # COLUMNS
        R = unit if unit > 0 else max(1, <Py_ssize_t>(COLUMN_BLOCK // C))
        nb = (N + R - 1) // R
        T = <int>min(<Py_ssize_t>T, nb)
        part = np.zeros((T, 2 * C))  # per thread: [sum dy (C) | sum dy*(x-mean) (C)]
        pp = &part[0, 0]
        with nogil, parallel(num_threads=T):
            tid = threadid()
            for j in prange(nb, schedule="static"):
                r0 = j * R
                _col_grad_sums(gp + r0 * C, xp + r0 * C, min(R, N - r0), C, mp, pp + tid * 2 * C)
        with nogil:
            for c in range(C):
                acc[0] = 0
                acc[1] = 0
                for t in range(T):
                    acc[0] += pp[t * 2 * C + c]
                    acc[1] += pp[t * 2 * C + C + c]
                _finish_grad(c, C, acc, count, training, wp, mp, ip, gwp, gbp, cf)
            for j in prange(nb, num_threads=T, schedule="static"):
                r0 = j * R
                _col_grad_input(gp + r0 * C, xp + r0 * C, dp + r0 * C, min(R, N - r0), C, cf, nt)


cdef inline void _col_grad_sums(const floating *dy, const floating *x, Py_ssize_t rows, Py_ssize_t C,
                                const double *mean, double *th) noexcept nogil:
    if floating is float:
        fbn_col_grad_sums_f32(dy, x, rows, C, mean, th, th + C)
    else:
        fbn_col_grad_sums_f64(dy, x, rows, C, mean, th, th + C)


cdef inline void _col_grad_input(const floating *dy, const floating *x, floating *dx, Py_ssize_t rows,
                                 Py_ssize_t C, const floating *cf, int nt) noexcept nogil:
    if floating is float:
        fbn_col_grad_input_f32(dy, x, dx, rows, C, cf, cf + C, cf + 2 * C, cf + 3 * C, cf + 4 * C, nt)
    else:
        fbn_col_grad_input_f64(dy, x, dx, rows, C, cf, cf + C, cf + 2 * C, cf + 3 * C, cf + 4 * C, nt)
    if nt:
        fbn_sfence()
