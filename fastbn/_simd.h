/* fastbn/_simd.h -- the vector loops under fastbn's Cython kernels.
 *
 * Every function here works on one thread's share of one channel (a "run", see _simd_impl.h) or
 * on a block of rows, and is called from the tasks of _kernels.pyx (run on _pool.h's threads), which decide
 * who works on what.  They live in C for two
 * reasons Cython cannot express:
 *   - `#pragma omp simd reduction(...)` lets the compiler vectorize a floating-point sum
 *     without -ffast-math (which would break NaN propagation and the hi/lo mean split below);
 *   - on x86-64 with GCC, `target_clones` builds each loop for the baseline, AVX2+FMA and AVX-512
 *     and picks one at load time, so a portable wheel still runs wide vectors.
 *
 * The typed loops are in _simd_impl.h, included once for float (suffix _f32) and once for
 * double (_f64).  Numerics:
 *   - moments: mean and M2 per block of about FBN_CPU_BLOCK elements from sums shifted by a value
 *     close to the mean (see moments in _simd_impl.h), in double, merged with Chan et al.'s
 *     pairwise update relative to a fixed shift (fbn_shift_merge, _coefs.h).  Never E[x^2]-E[x]^2.
 *   - normalize: y = ((x - m_hi) - m_lo) * a + b, where m_hi + m_lo is the double mean split
 *     into two values of the input type.  x - m_hi is exact for x near the mean, so a float32
 *     input with mean 1e4 and std 1 keeps float32 precision in y (x * a + (b - m * a) would not).
 *     Past FBN_WIDE (_coefs.h) a channel's mean is so large that x - m_hi could overflow: the loops
 *     then halve before the subtraction and double the scale, the same bits where nothing overflows.
 *   - the statistics and coefficients of a channel: _coefs.h, the formulas the GPU uses too.
 */
#ifndef FASTBN_SIMD_H
#define FASTBN_SIMD_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__)
#define FBN_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define FBN_CLONES
#endif

/* Helpers called from a cloned function must be inlined into it to get its instruction set. */
#if defined(__GNUC__)
#define FBN_INLINE static inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define FBN_INLINE static __forceinline
#else
#define FBN_INLINE static inline
#endif

#define FBN_CPU_BLOCK 2048 /* elements per block of a run's moments (see fbn_piece_moments) */
#define FBN_SHORT 128  /* rows shorter than this reduce with 8 lanes (see _simd_impl.h) */

/* The per-channel arithmetic (merges, statistics, coefficients), shared with the CUDA source. */
#include "_coefs.h"

/* ---- streaming (non-temporal) stores ------------------------------------------------------
 * An output much larger than the last-level cache is written with non-temporal stores: they skip
 * the read-for-ownership a normal store does, so writing y costs one pass over memory instead of
 * two, as in memcpy.  The kernels compute FBN_CHUNK results into an L1 buffer with the vector loop,
 * then fbn_stream_store() moves the buffer out.  fbn_sfence() orders the stores before the data is
 * handed to another thread. */
#define FBN_CHUNK 1024

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

__attribute__((target("avx512f"))) static void fbn_nt_avx512(char *d, const char *s, size_t n)
{
    for (size_t i = 0; i < n; i += 64)
        _mm512_stream_si512((__m512i *)(d + i), _mm512_loadu_si512((const void *)(s + i)));
}

__attribute__((target("avx"))) static void fbn_nt_avx(char *d, const char *s, size_t n)
{
    for (size_t i = 0; i < n; i += 64) {
        _mm256_stream_si256((__m256i *)(d + i), _mm256_loadu_si256((const __m256i *)(s + i)));
        _mm256_stream_si256((__m256i *)(d + i + 32), _mm256_loadu_si256((const __m256i *)(s + i + 32)));
    }
}

static void fbn_nt_sse2(char *d, const char *s, size_t n)
{
    for (size_t i = 0; i < n; i += 16)
        _mm_stream_si128((__m128i *)(d + i), _mm_loadu_si128((const __m128i *)(s + i)));
}

static void fbn_stream_store(void *dst, const void *src, size_t n)
{
    /* 2: AVX-512F, 1: AVX, 0: SSE2; found by the first call (every thread finds the same),
     * read and written atomically so that it is no data race (ThreadSanitizer reported one) */
    static int isa = -1;
    char *d = (char *)dst;
    const char *s = (const char *)src;
    size_t head = (size_t)(-(uintptr_t)d) & 63;  /* normal stores up to the first 64-byte boundary */
    if (head > n)
        head = n;
    memcpy(d, s, head);
    d += head, s += head, n -= head;
    size_t body = n & ~(size_t)63;
    int level = __atomic_load_n(&isa, __ATOMIC_RELAXED);
    if (level < 0) {
        level = __builtin_cpu_supports("avx512f") ? 2 : __builtin_cpu_supports("avx") ? 1 : 0;
        __atomic_store_n(&isa, level, __ATOMIC_RELAXED);
    }
    if (level == 2)
        fbn_nt_avx512(d, s, body);
    else if (level == 1)
        fbn_nt_avx(d, s, body);
    else
        fbn_nt_sse2(d, s, body);
    memcpy(d + body, s + body, n - body);
}

static inline void fbn_sfence(void) { _mm_sfence(); }
#else
#include <string.h>
static void fbn_stream_store(void *dst, const void *src, size_t n) { memcpy(dst, src, n); }
static inline void fbn_sfence(void) {}
#endif

/* The typed loops, once per input type (no C++ templates in a C extension). */
#define FBN_CAT2(a, b) a##_##b
#define FBN_CAT(a, b) FBN_CAT2(a, b)
#define FBN_NAME(name) FBN_CAT(name, FBN_SUFFIX)

#define T float
#define FBN_SUFFIX f32
#define FBN_UINT uint32_t /* T's bits, and its exponent field */
#define FBN_EXP_BITS 0x7f800000u
#define FBN_TWO_PASS 0
#define FBN_WIDE FBN_WIDE_F32
#include "_simd_impl.h"
#undef FBN_WIDE
#undef T
#undef FBN_SUFFIX
#undef FBN_TWO_PASS
#undef FBN_UINT
#undef FBN_EXP_BITS

#define T double
#define FBN_SUFFIX f64
#define FBN_UINT uint64_t
#define FBN_EXP_BITS 0x7ff0000000000000ull
#define FBN_TWO_PASS 1
#define FBN_WIDE FBN_WIDE_F64
#include "_simd_impl.h"
#undef FBN_WIDE
#undef T
#undef FBN_SUFFIX
#undef FBN_TWO_PASS
#undef FBN_UINT
#undef FBN_EXP_BITS

#endif /* FASTBN_SIMD_H */
