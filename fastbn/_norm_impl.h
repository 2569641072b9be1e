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
