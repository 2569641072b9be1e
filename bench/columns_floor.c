/* bench/columns_floor.c -- what the (N, C) backward's access pattern costs, apart from its arithmetic.
 *
 * The report's floor (fastbn._kernels.traffic) streams each thread's share of dy and x flat, front to
 * back.  A reduction over the rows of an (N, W) matrix cannot: it keeps one accumulator per column,
 * so it walks a few rows side by side (fastbn's COLUMNS kernels take four), and for W*4 bytes = 4 KiB
 * those rows are 4 KiB apart: eight read streams (four rows of dy and of x) in the sums pass and
 * twelve (four rows of dy, x and dx) in the grad-input pass, where the flat floor has two and three.
 * This program times, on T threads, with fastbn's schedule (blocks of rows as _plan_rows makes them,
 * the sums pass front to back, the grad-input pass back to front):
 *   kernel   fastbn's own loops (fbn_col_grad_sums_f32, fbn_col_grad_input_f32 from fastbn/_simd.h);
 *   pattern  the same four-row walk with next to no arithmetic (sums: one float add per element;
 *            grad input: dx = dy + x), i.e. the least a four-row column pass can cost;
 *   f32part  the sums with each four rows' partial sums in float32 before they go to double: the
 *            conversions to double drop to a quarter (fastbn does NOT do this: the project keeps
 *            float32 sums in float64; this row shows what bending that rule would buy);
 *   flat     the report's floor: fbn_traffic over each thread's share, read, then read+write back.
 * The arrays are allocated and advised as NumPy does for large arrays (2 MiB transparent huge pages,
 * 16 bytes into an aligned block), because the page size changes these timings by 10-40%.
 *
 *   cc -O3 -fopenmp -fno-math-errno -Ifastbn bench/columns_floor.c -o /tmp/columns_floor -lm
 *   /tmp/columns_floor [N W [threads [repeats]]]        # default 4096 1024 2 30
 *
 * Prints the minimum and median of each pass (microseconds) and each total as a multiple of flat.
 * The variants run interleaved, one sample of each per round, as `python -m fastbn bench` does. */
#define _GNU_SOURCE
#include "_simd.h"
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

/* sum over the rows of dy + x, four rows at a time, into a float per column: the walk of
 * fbn_col_grad_sums with one add per element. */
FBN_CLONES static void pattern_sums(const float *dy, const float *x, ptrdiff_t rows, ptrdiff_t W, float *acc)
{
    for (ptrdiff_t r = 0; r + 4 <= rows; r += 4) {
        const float *g = dy + r * W, *p = x + r * W;
#pragma omp simd
        for (ptrdiff_t c = 0; c < W; c++)
            acc[c] += ((g[c] + g[W + c]) + (g[2 * W + c] + g[3 * W + c]))
                      + ((p[c] + p[W + c]) + (p[2 * W + c] + p[3 * W + c]));
    }
}

/* dx = dy + x, four rows at a time, loads before stores: the walk of fbn_col_grad_input. */
FBN_CLONES static void pattern_input(const float *dy, const float *x, float *dx, ptrdiff_t rows, ptrdiff_t W)
{
    for (ptrdiff_t r = 0; r + 4 <= rows; r += 4) {
        const float *g = dy + r * W, *p = x + r * W;
        float *q = dx + r * W;
#pragma omp simd
        for (ptrdiff_t c = 0; c < W; c++) {
            const float a0 = g[c] + p[c], a1 = g[W + c] + p[W + c];
            const float a2 = g[2 * W + c] + p[2 * W + c], a3 = g[3 * W + c] + p[3 * W + c];
            q[c] = a0, q[W + c] = a1, q[2 * W + c] = a2, q[3 * W + c] = a3;
        }
    }
}

/* fbn_col_grad_sums with float32 partial sums of four rows (see the top of the file). */
FBN_CLONES static void f32part_sums(const float *dy, const float *x, ptrdiff_t rows, ptrdiff_t W,
                                    const float *mean, double *acc)
{
    double *sdy = acc, *sdyx = acc + W;
    for (ptrdiff_t r = 0; r + 4 <= rows; r += 4) {
        const float *g = dy + r * W, *p = x + r * W;
#pragma omp simd
        for (ptrdiff_t c = 0; c < W; c++) {
            const float m = mean[c], g0 = g[c], g1 = g[W + c], g2 = g[2 * W + c], g3 = g[3 * W + c];
            sdy[c] += (double)((g0 + g1) + (g2 + g3));
            sdyx[c] += (double)((g0 * (p[c] - m) + g1 * (p[W + c] - m))
                                + (g2 * (p[2 * W + c] - m) + g3 * (p[3 * W + c] - m)));
        }
    }
}

enum { KERNEL, PATTERN, F32PART, FLAT, VARIANTS };
static const char *NAMES[VARIANTS] = {"kernel", "pattern", "f32part", "flat"};

static ptrdiff_t N, W, R;
static int T;
static float *dy, *x, *dx, *cf, *meanf;
static double *mean, *acc;

static float *numpy_like(size_t n)
{
    const size_t huge = (size_t)2 << 20;
    char *p = aligned_alloc(huge, (n * sizeof(float) + 16 + huge - 1) / huge * huge);
    if (!p) {
        perror("aligned_alloc");
        exit(1);
    }
    madvise(p, n * sizeof(float) + 16, MADV_HUGEPAGE);
    return (float *)(p + 16);
}

static ptrdiff_t share(ptrdiff_t n, ptrdiff_t k) { return k * (n / T) + (k < n % T ? k : n % T); }

/* One backward's two passes with variant v; the time of each pass. */
static void run(int v, double *t_sums, double *t_input)
{
    const ptrdiff_t nb = (N + R - 1) / R, L = N * W;
    double t0 = now(), t1 = 0;
#pragma omp parallel num_threads(T)
    {
        const int k = omp_get_thread_num();
        const ptrdiff_t j0 = share(nb, k), j1 = share(nb, k + 1);
        const ptrdiff_t f0 = L * k / T, f1 = L * (k + 1) / T;
        double *a = acc + (size_t)k * 2 * W;
        volatile double sink = 0;
        if (v == FLAT)
            sink += fbn_traffic_f32(dy + f0, x + f0, NULL, f1 - f0, 0);
        for (ptrdiff_t j = j0; v != FLAT && j < j1; j++) {
            const ptrdiff_t rows = N - j * R < R ? N - j * R : R, o = j * R * W;
            if (v == KERNEL)
                fbn_col_grad_sums_f32(dy + o, x + o, rows, W, W, mean, a, a + W);
            else if (v == PATTERN)
                pattern_sums(dy + o, x + o, rows, W, (float *)a);
            else
                f32part_sums(dy + o, x + o, rows, W, meanf, a);
        }
#pragma omp barrier
#pragma omp master
        t1 = now();
        if (v == FLAT) {
            for (ptrdiff_t e = f1; e > f0;) {  /* back to front in 512 KiB pieces, as the floor */
                ptrdiff_t s = e - 131072 > f0 ? e - 131072 : f0;
                fbn_traffic_f32(dy + s, x + s, dx + s, e - s, 0);
                e = s;
            }
        }
        for (ptrdiff_t j = j1 - 1; v != FLAT && j >= j0; j--) {
            const ptrdiff_t rows = N - j * R < R ? N - j * R : R, o = j * R * W;
            if (v == PATTERN)
                pattern_input(dy + o, x + o, dx + o, rows, W);
            else
                fbn_col_grad_input_f32(dy + o, x + o, dx + o, rows, W, W, cf, 0);
        }
    }
    *t_sums = t1 - t0;
    *t_input = now() - t1;
}

static int cmp(const void *a, const void *b)
{
    double d = *(const double *)a - *(const double *)b;
    return (d > 0) - (d < 0);
}

int main(int argc, char **argv)
{
    N = argc > 1 ? atol(argv[1]) : 4096;
    W = argc > 2 ? atol(argv[2]) : 1024;
    T = argc > 3 ? atoi(argv[3]) : 2;
    const int reps = argc > 4 ? atoi(argv[4]) : 30;
    if (N < T || W < 1 || T < 1 || reps < 1) {
        fprintf(stderr, "usage: %s [N W [threads [repeats]]]\n", argv[0]);
        return 2;
    }
    R = 131072 / W < (N + T - 1) / T ? 131072 / W : (N + T - 1) / T;  /* _plan_rows */
    if (R < 1)
        R = 1;
    const size_t L = (size_t)N * W;
    dy = numpy_like(L), x = numpy_like(L), dx = numpy_like(L);
    cf = malloc(5 * W * sizeof(float)), meanf = malloc(W * sizeof(float));
    mean = malloc(W * sizeof(double)), acc = calloc((size_t)T * 2 * W, sizeof(double));
    srand(1);
    for (size_t i = 0; i < L; i++) {
        dy[i] = (float)rand() / RAND_MAX - 0.5f;
        x[i] = 2.0f * rand() / RAND_MAX;
        dx[i] = 0;
    }
    for (ptrdiff_t c = 0; c < W; c++) {
        mean[c] = meanf[c] = 1.0f;
        cf[c] = 1.0f, cf[W + c] = 0, cf[2 * W + c] = 0.9f, cf[3 * W + c] = 0.1f, cf[4 * W + c] = 0.01f;
    }
    double *ts = malloc(sizeof(double) * VARIANTS * reps * 3);
    for (int i = 0; i < reps; i++)
        for (int v = 0; v < VARIANTS; v++) {
            double *t = ts + ((size_t)v * 3) * reps;
            run(v, &t[i], &t[reps + i]);
            t[2 * reps + i] = t[i] + t[reps + i];
        }
    double flat_min = 0;
    printf("(%td, %td) float32, %d threads, %td rows per block, %d repeats; microseconds, min / median\n",
           N, W, T, R, reps);
    printf("%-8s %15s %15s %15s %12s\n", "variant", "sums pass", "grad input", "total", "total/flat");
    for (int v = VARIANTS - 1; v >= 0; v--) {  /* flat first: the others' ratios need it */
        double *t = ts + ((size_t)v * 3) * reps;
        for (int p = 0; p < 3; p++)
            qsort(t + p * reps, reps, sizeof(double), cmp);
        if (v == FLAT)
            flat_min = t[2 * reps];
    }
    for (int v = 0; v < VARIANTS; v++) {
        const double *t = ts + ((size_t)v * 3) * reps;
        printf("%-8s", NAMES[v]);
        for (int p = 0; p < 3; p++)
            printf(" %7.0f / %5.0f", t[p * reps] * 1e6, t[p * reps + reps / 2] * 1e6);
        printf(" %12.2f\n", t[2 * reps] / flat_min);
    }
    return 0;
}
