/* fastbn/_simd_impl.h -- the typed loops of _simd.h; included once per type with
 * T (float or double), FBN_SUFFIX (f32 or f64) and FBN_TWO_PASS defined.  No include guard.
 *
 * A "run" is a range of one channel's elements in an (N, C, S) buffer: `x` points at the channel's
 * first element (row 0), rows of S contiguous elements lie `stride` (= C * S) apart, and the run
 * covers channel elements [e0, e0 + len), which may start and end inside a row.
 * FBN_FOR_PIECES visits its contiguous pieces: `off` (offset from x) and `ln` (length). */
#ifndef FBN_FOR_PIECES
#define FBN_FOR_PIECES(S, stride, e0, len, off, ln)                                             \
    for (ptrdiff_t r_ = (e0) / (S), o_ = (e0) - r_ * (S), left_ = (len), off = 0, ln = 0;      \
         left_ > 0 && (ln = (S) - o_ < left_ ? (S) - o_ : left_, off = r_ * (stride) + o_, 1); \
         left_ -= ln, r_++, o_ = 0)
#endif

/* (count, mean, M2) of a run, merged into (*n, *m, *m2).  Shifted sums s = sum(x - k) and
 * q = sum((x - k)^2) in double over blocks of about FBN_BLOCK elements give each block's mean
 * k + s/b and M2 q - s^2/b; with k close to the mean there is no cancellation.  k is the exact mean
 * of the first block (a first pass over it, in L1), then the mean of everything merged so far;
 * with FBN_TWO_PASS (float64, where the conversion is free) every block gets its own first pass. */
FBN_CLONES static void FBN_NAME(fbn_moments)(const T *x, ptrdiff_t S, ptrdiff_t stride, ptrdiff_t e0,
                                             ptrdiff_t len, double *n, double *m, double *m2)
{
    double k = *m, s = 0.0, q = 0.0, b = 0.0;
    FBN_FOR_PIECES(S, stride, e0, len, off, ln) {
        for (ptrdiff_t j = 0; j < ln; j += FBN_BLOCK) {
            const T *p = x + off + j;
            ptrdiff_t bl = ln - j < FBN_BLOCK ? ln - j : FBN_BLOCK;
            if (FBN_TWO_PASS || (*n == 0.0 && b == 0.0)) {
                if (b > 0.0) {
                    fbn_chan_merge(n, m, m2, b, k + s / b, q - s * (s / b));
                    s = q = b = 0.0;
                }
                double t = 0.0;
#pragma omp simd reduction(+:t)
                for (ptrdiff_t i = 0; i < bl; i++)
                    t += (double)p[i];
                k = t / (double)bl;
            }
#pragma omp simd reduction(+:s, q)
            for (ptrdiff_t i = 0; i < bl; i++) {
                double d = (double)p[i] - k;
                s += d;
                q += d * d;
            }
            b += (double)bl;
            if (b >= FBN_BLOCK) {
                fbn_chan_merge(n, m, m2, b, k + s / b, q - s * (s / b));
                s = q = b = 0.0;
                k = *m;
            }
        }
    }
    if (b > 0.0)
        fbn_chan_merge(n, m, m2, b, k + s / b, q - s * (s / b));
}

/* y = ((x - mhi) - mlo) * a + b over a run (y may be x).  nt: streaming stores through an L1
 * buffer of FBN_CHUNK elements. */
FBN_CLONES static void FBN_NAME(fbn_affine)(const T *x, T *y, ptrdiff_t S, ptrdiff_t stride, ptrdiff_t e0,
                                            ptrdiff_t len, T mhi, T mlo, T a, T b, int nt)
{
    T buf[FBN_CHUNK];
    FBN_FOR_PIECES(S, stride, e0, len, off, ln) {
        for (ptrdiff_t j = 0; j < ln; j += FBN_CHUNK) {
            ptrdiff_t bl = ln - j < FBN_CHUNK ? ln - j : FBN_CHUNK;
            const T *p = x + off + j;
            T *q = nt ? buf : y + off + j;
#pragma omp simd
            for (ptrdiff_t i = 0; i < bl; i++)
                q[i] = ((p[i] - mhi) - mlo) * a + b;
            if (nt)
                fbn_stream_store(y + off + j, buf, (size_t)bl * sizeof(T));
        }
    }
}

/* sum(dy) and sum(dy * (x - mean)) over a run, in double, added to *sdy and *sdyx. */
FBN_CLONES static void FBN_NAME(fbn_grad_sums)(const T *dy, const T *x, ptrdiff_t S, ptrdiff_t stride,
                                               ptrdiff_t e0, ptrdiff_t len, double mean, double *sdy,
                                               double *sdyx)
{
    double a = 0.0, b = 0.0;
    FBN_FOR_PIECES(S, stride, e0, len, off, ln) {
        const T *g = dy + off, *p = x + off;
#pragma omp simd reduction(+:a, b)
        for (ptrdiff_t i = 0; i < ln; i++) {
            double gi = (double)g[i];
            a += gi;
            b += gi * ((double)p[i] - mean);
        }
    }
    *sdy += a;
    *sdyx += b;
}

/* dx = kdy * dy + ((x - mhi) - mlo) * kx + kc over a run; nt as in fbn_affine. */
FBN_CLONES static void FBN_NAME(fbn_grad_input)(const T *dy, const T *x, T *dx, ptrdiff_t S,
                                                ptrdiff_t stride, ptrdiff_t e0, ptrdiff_t len, T mhi,
                                                T mlo, T kdy, T kx, T kc, int nt)
{
    T buf[FBN_CHUNK];
    FBN_FOR_PIECES(S, stride, e0, len, off, ln) {
        for (ptrdiff_t j = 0; j < ln; j += FBN_CHUNK) {
            ptrdiff_t bl = ln - j < FBN_CHUNK ? ln - j : FBN_CHUNK;
            const T *g = dy + off + j, *p = x + off + j;
            T *q = nt ? buf : dx + off + j;
#pragma omp simd
            for (ptrdiff_t i = 0; i < bl; i++)
                q[i] = kdy * g[i] + (((p[i] - mhi) - mlo) * kx + kc);
            if (nt)
                fbn_stream_store(dx + off + j, buf, (size_t)bl * sizeof(T));
        }
    }
}

/* ---- spatial size 1: an (N, C) matrix, a block of `rows` rows at a time, vectors across C ---- */

/* Column moments of the block merged into per-column accumulators sharing the count *n.
 * Shifted sums per column, as in fbn_moments: the shift is the exact column means of the block
 * (a first pass; the block is sized to stay in L2) for a thread's first block, then the means
 * merged so far.  tmp: 2*C doubles of scratch. */
FBN_CLONES static void FBN_NAME(fbn_col_moments)(const T *x, ptrdiff_t rows, ptrdiff_t C, double *n,
                                                 double *m, double *m2, double *tmp)
{
    double *s = tmp, *q = tmp + C, *k = m;
    for (ptrdiff_t c = 0; c < C; c++)
        s[c] = q[c] = 0.0;
    if (*n == 0.0) {  /* k = the block's column means; m is still 0 and is free to hold them */
        for (ptrdiff_t r = 0; r < rows; r++) {
            const T *p = x + r * C;
#pragma omp simd
            for (ptrdiff_t c = 0; c < C; c++)
                s[c] += (double)p[c];
        }
        for (ptrdiff_t c = 0; c < C; c++) {
            k[c] = s[c] / (double)rows;
            s[c] = 0.0;
        }
    }
    for (ptrdiff_t r = 0; r < rows; r++) {
        const T *p = x + r * C;
#pragma omp simd
        for (ptrdiff_t c = 0; c < C; c++) {
            double d = (double)p[c] - k[c];
            s[c] += d;
            q[c] += d * d;
        }
    }
    double b = (double)rows;
    if (*n == 0.0) {
        for (ptrdiff_t c = 0; c < C; c++) {
            m[c] = k[c] + s[c] / b;
            m2[c] = q[c] - s[c] * (s[c] / b);
        }
    } else {
        for (ptrdiff_t c = 0; c < C; c++) {
            double nc = *n;
            fbn_chan_merge(&nc, &m[c], &m2[c], b, k[c] + s[c] / b, q[c] - s[c] * (s[c] / b));
        }
    }
    *n += b;
}

FBN_CLONES static void FBN_NAME(fbn_col_affine)(const T *x, T *y, ptrdiff_t rows, ptrdiff_t C,
                                                const T *mhi, const T *mlo, const T *a, const T *b, int nt)
{
    T buf[FBN_CHUNK];
    for (ptrdiff_t r = 0; r < rows; r++) {
        for (ptrdiff_t c0 = 0; c0 < C; c0 += FBN_CHUNK) {
            ptrdiff_t bl = C - c0 < FBN_CHUNK ? C - c0 : FBN_CHUNK;
            const T *p = x + r * C + c0;
            T *q = nt ? buf : y + r * C + c0;
#pragma omp simd
            for (ptrdiff_t c = 0; c < bl; c++)
                q[c] = ((p[c] - mhi[c0 + c]) - mlo[c0 + c]) * a[c0 + c] + b[c0 + c];
            if (nt)
                fbn_stream_store(y + r * C + c0, buf, (size_t)bl * sizeof(T));
        }
    }
}

FBN_CLONES static void FBN_NAME(fbn_col_grad_sums)(const T *dy, const T *x, ptrdiff_t rows, ptrdiff_t C,
                                                   const double *mean, double *sdy, double *sdyx)
{
    for (ptrdiff_t r = 0; r < rows; r++) {
        const T *g = dy + r * C, *p = x + r * C;
#pragma omp simd
        for (ptrdiff_t c = 0; c < C; c++) {
            sdy[c] += (double)g[c];
            sdyx[c] += (double)g[c] * ((double)p[c] - mean[c]);
        }
    }
}

FBN_CLONES static void FBN_NAME(fbn_col_grad_input)(const T *dy, const T *x, T *dx, ptrdiff_t rows,
                                                    ptrdiff_t C, const T *mhi, const T *mlo, const T *kdy,
                                                    const T *kx, const T *kc, int nt)
{
    T buf[FBN_CHUNK];
    for (ptrdiff_t r = 0; r < rows; r++) {
        for (ptrdiff_t c0 = 0; c0 < C; c0 += FBN_CHUNK) {
            ptrdiff_t bl = C - c0 < FBN_CHUNK ? C - c0 : FBN_CHUNK;
            const T *g = dy + r * C + c0, *p = x + r * C + c0;
            T *q = nt ? buf : dx + r * C + c0;
#pragma omp simd
            for (ptrdiff_t c = 0; c < bl; c++)
                q[c] = kdy[c0 + c] * g[c] + (((p[c] - mhi[c0 + c]) - mlo[c0 + c]) * kx[c0 + c] + kc[c0 + c]);
            if (nt)
                fbn_stream_store(dx + r * C + c0, buf, (size_t)bl * sizeof(T));
        }
    }
}
