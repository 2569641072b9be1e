/* fastbn/_floor.h -- the benchmark's floor loop (for _floor.pyx), apart from the kernels.
 *
 * Includes _simd.h for its machinery (target_clones, FBN_CHUNK, streaming stores), then itself
 * twice, with T = float (suffix _f32) and T = double (_f64), for the typed loop below. */
#ifndef FASTBN_FLOOR_H
#define FASTBN_FLOOR_H
#include "_simd.h"

#define FBN_FLOOR_TYPED
#define T float
#define FBN_SUFFIX f32
#include "_floor.h"
#undef T
#undef FBN_SUFFIX
#define T double
#define FBN_SUFFIX f64
#include "_floor.h"
#undef T
#undef FBN_SUFFIX
#undef FBN_FLOOR_TYPED

#elif defined(FBN_FLOOR_TYPED)
/* * The least memory traffic a pass of batch norm can make, with next to no arithmetic: reads
 * a[0:n] and, when given, b[0:n]; with y, writes y = a (+ b), with streaming stores when stream
 * (as the kernels do for outputs beyond the cache); without y, returns a sum of what it read, so
 * that the reads cannot be optimized away.  `python -m fastbn bench` times an operation's passes
 * with it to show how fast that operation could possibly be on the machine. */
FBN_CLONES static double FBN_NAME(fbn_traffic)(const T *a, const T *b, T *y, ptrdiff_t n, int stream)
{
    T s = 0, buf[FBN_CHUNK];
    if (y && stream && !b) {
        fbn_stream_store(y, a, (size_t)n * sizeof(T));
    } else if (y) {
        for (ptrdiff_t j = 0; j < n; j += FBN_CHUNK) {
            ptrdiff_t bl = n - j < FBN_CHUNK ? n - j : FBN_CHUNK;
            T *q = stream ? buf : y + j;
            if (b) {
#pragma omp simd
                for (ptrdiff_t i = 0; i < bl; i++)
                    q[i] = a[j + i] + b[j + i];
            } else {
#pragma omp simd
                for (ptrdiff_t i = 0; i < bl; i++)
                    q[i] = a[j + i];
            }
            if (stream)
                fbn_stream_store(y + j, buf, (size_t)bl * sizeof(T));
        }
    } else if (b) {
#pragma omp simd reduction(+:s)
        for (ptrdiff_t i = 0; i < n; i++)
            s += a[i] + b[i];
    } else {
#pragma omp simd reduction(+:s)
        for (ptrdiff_t i = 0; i < n; i++)
            s += a[i];
    }
    return (double)s;
}

#endif /* FASTBN_FLOOR_H */
