/* fastbn/_norm_impl.h -- the typed loops of _norm_simd.h; included once per type with T and
 * FBN_SUFFIX defined.  No include guard.  Every loop takes elements [0, n) of one row piece, with
 * w and b already offset to the piece's first element. */

/* y = ((x - mhi) - mlo) * istd * w + b; nt: streaming stores through an L1 buffer. */
FBN_CLONES static void FBN_NAME(fbn_ln_apply)(const T *x, T *y, ptrdiff_t n, T mhi, T mlo, T istd,
                                              const T *w, const T *b, int nt)
{
    T buf[FBN_CHUNK];
    for (ptrdiff_t j = 0; j < n; j += FBN_CHUNK) {
        ptrdiff_t bl = n - j < FBN_CHUNK ? n - j : FBN_CHUNK;
        const T *p = x + j, *wp = w + j, *bp = b + j;
        T *q = nt ? buf : y + j;
#pragma omp simd
        for (ptrdiff_t i = 0; i < bl; i++)
            q[i] = (((p[i] - mhi) - mlo) * istd) * wp[i] + bp[i];
        if (nt)
            fbn_stream_store(y + j, buf, (size_t)bl * sizeof(T));
    }
}

/* Row sums a += sum(dy * w), s += sum(dy * w * (x - m)); column partials gb[j] += dy,
 * gw[j] += dy * (x - m) * istd; all in double. */
FBN_CLONES static void FBN_NAME(fbn_ln_grad_sums)(const T *dy, const T *x, const T *w, ptrdiff_t n,
                                                  double m, double istd, double *a_out, double *s_out,
                                                  double *gw, double *gb)
{
    double a = 0.0, s = 0.0;
#pragma omp simd reduction(+:a, s)
    for (ptrdiff_t i = 0; i < n; i++) {
        const double g = (double)dy[i], d = (double)x[i] - m, gw_i = g * (double)w[i];
        a += gw_i;
        s += gw_i * d;
        gb[i] += g;
        gw[i] += g * d * istd;
    }
    *a_out += a;
    *s_out += s;
}

/* dx = dy * w * istd + ((x - mhi) - mlo) * kx + kc. */
FBN_CLONES static void FBN_NAME(fbn_ln_grad_input)(const T *dy, const T *x, T *dx, ptrdiff_t n, const T *w,
                                                   T istd, T mhi, T mlo, T kx, T kc, int nt)
{
    T buf[FBN_CHUNK];
    for (ptrdiff_t j = 0; j < n; j += FBN_CHUNK) {
        ptrdiff_t bl = n - j < FBN_CHUNK ? n - j : FBN_CHUNK;
        const T *g = dy + j, *p = x + j, *wp = w + j;
        T *q = nt ? buf : dx + j;
#pragma omp simd
        for (ptrdiff_t i = 0; i < bl; i++)
            q[i] = (g[i] * wp[i]) * istd + (((p[i] - mhi) - mlo) * kx + kc);
        if (nt)
            fbn_stream_store(dx + j, buf, (size_t)bl * sizeof(T));
    }
}

/* sum((p - k)) and sum((p - k)^2) over p[0:n] in double, with `lanes` lanes (a constant where
 * this is inlined).  Several vector accumulators keep the loop from waiting on the latency of
 * its adds, but GCC ends the reduction by adding the lanes one after the other: 2 x 32 lanes cost
 * about as much as a 768-element row (perf, LayerNorm(768)), so short rows take fewer lanes. */
FBN_INLINE void FBN_NAME(fbn_row_sums)(const T *p, ptrdiff_t n, double k, double *s_out, double *q_out,
                                       const int lanes)
{
    double s = 0.0, q = 0.0;
    if (lanes == 8) {
#pragma omp simd simdlen(8) reduction(+:s, q)
        for (ptrdiff_t i = 0; i < n; i++) {
            const double d = (double)p[i] - k;
            s += d;
            q += d * d;
        }
    } else if (lanes == 16) {
#pragma omp simd simdlen(16) reduction(+:s, q)
        for (ptrdiff_t i = 0; i < n; i++) {
            const double d = (double)p[i] - k;
            s += d;
            q += d * d;
        }
    } else {
#pragma omp simd simdlen(32) reduction(+:s, q)
        for (ptrdiff_t i = 0; i < n; i++) {
            const double d = (double)p[i] - k;
            s += d;
            q += d * d;
        }
    }
    *s_out = s;
    *q_out = q;
}

/* The shift of fbn_row_moments: the exact mean of the first h = min(n, max(32, min(256, n / 8)))
 * elements of p[0:n], n > 0.  (Not inlined: the paired rows' loops (_norm_simd.h) take the same
 * clone's shift.) */
FBN_CLONES static double FBN_NAME(fbn_row_shift)(const T *p, ptrdiff_t n)
{
    ptrdiff_t h = n / 8 < 256 ? n / 8 : 256;
    if (h < 32)
        h = 32;
    if (h > n)
        h = n;
    double k = 0.0;
#pragma omp simd simdlen(8) reduction(+:k)
    for (ptrdiff_t i = 0; i < h; i++)
        k += (double)p[i];
    return k / (double)h;
}

/* Moments of p[0:n] merged into acc (fbn_shift_merge), in one pass: the shift k is the exact mean
 * of the row's head (fbn_row_shift), then sums of (x - k) and (x - k)^2 in double
 * (fbn_row_sums).  No cancellation to speak of: the head's mean is within sqrt(n / h) standard
 * deviations of the mean (the head's deviation counts in the variance), so M2's relative
 * rounding is below 1e-16 * (1 + n / h). */
FBN_CLONES static void FBN_NAME(fbn_row_moments)(const T *p, ptrdiff_t n, double *acc)
{
    if (n <= 0)
        return;
    const double k = FBN_NAME(fbn_row_shift)(p, n);
    double s, q;
#if defined(FBN_NT512) && FBN_IS_F32
    if (n >= FBN_NORM_LONG && fbn_nt512_ok(p)) {
        fbn_row_sums_512(p, n, k, &s, &q);
        fbn_shift_merge(acc, (double)n, k, s / (double)n, q - s * (s / (double)n));
        return;
    }
#endif
    if (n < FBN_NORM_SHORT)
        FBN_NAME(fbn_row_sums)(p, n, k, &s, &q, 8);
    else if (n < FBN_NORM_LONG)
        FBN_NAME(fbn_row_sums)(p, n, k, &s, &q, 16);
    else
        FBN_NAME(fbn_row_sums)(p, n, k, &s, &q, 32);
    fbn_shift_merge(acc, (double)n, k, s / (double)n, q - s * (s / (double)n));
}

/* The memory floor of a pass over one row piece, for bench/norms_bench.py: y = x (+ dy) when y
 * is given (streaming stores through an L1 buffer with nt, as the kernels), else only reads.
 * Returns a sum of what it read, so that the reads are not optimized away. */
FBN_CLONES static double FBN_NAME(fbn_row_traffic)(const T *x, const T *dy, T *y, ptrdiff_t n, int nt)
{
    T buf[FBN_CHUNK];
    double t = 0.0;
    for (ptrdiff_t j = 0; j < n; j += FBN_CHUNK) {
        ptrdiff_t bl = n - j < FBN_CHUNK ? n - j : FBN_CHUNK;
        const T *p = x + j;
        if (y) {
            T *q = nt ? buf : y + j;
            if (dy) {
#pragma omp simd
                for (ptrdiff_t i = 0; i < bl; i++)
                    q[i] = p[i] + dy[j + i];
            } else {
#pragma omp simd
                for (ptrdiff_t i = 0; i < bl; i++)
                    q[i] = p[i];
            }
            if (nt)
                fbn_stream_store(y + j, buf, (size_t)bl * sizeof(T));
        } else {
            T s = 0;
            if (dy) {
#pragma omp simd reduction(+:s)
                for (ptrdiff_t i = 0; i < bl; i++)
                    s += p[i] + dy[j + i];
            } else {
#pragma omp simd reduction(+:s)
                for (ptrdiff_t i = 0; i < bl; i++)
                    s += p[i];
            }
            t += (double)s;
        }
    }
    return t;
}
