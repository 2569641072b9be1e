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
 * The typed loops are in _simd_impl.h, included once per element type: float (suffix _f32),
 * bfloat16 (_b16) and float16 (_h16), both computed in float, and double (_f64).  Numerics:
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

#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__)
#define FBN_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#define FBN_HAS_CLONES 1
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

/* Elements (of `item` bytes) in a chunk of results that starts at dst: FBN_CHUNK, fewer where dst
 * is inside a 64-byte line, so that the chunks after it start on a line and are streamed whole. */
static inline ptrdiff_t fbn_chunk_cap(const void *dst, size_t item)
{
    const uintptr_t a = (uintptr_t)dst;
    return (ptrdiff_t)(a % item ? FBN_CHUNK : FBN_CHUNK - (a & 63) / item);
}

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

/* ---- half-precision elements ----
 * float16 and bfloat16 arrays are read and written in place by their own instantiation of the
 * loops, computed in float (statistics in double, as for float): one pass over 2-byte elements,
 * not a float32 copy.  Each is a struct of its 16 bits, so that C (and Cython's fused types) keep
 * the two apart.  bfloat16 is the high half of a float: loading shifts, storing rounds to nearest
 * even in integer arithmetic, a NaN kept a (quiet) NaN.  float16: below. */
typedef struct { uint16_t bits; } fbn_bf16;
typedef struct { uint16_t bits; } fbn_f16;

FBN_INLINE float fbn_bf16_load(fbn_bf16 h)
{
    uint32_t u = (uint32_t)h.bits << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

FBN_INLINE fbn_bf16 fbn_bf16_store(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  /* to nearest, ties to even */
    const uint32_t nan = (u & 0x7fffffffu) > 0x7f800000u;
    fbn_bf16 h;
    h.bits = (uint16_t)(nan ? (u >> 16) | 0x40u : rounded);
    return h;
}

/* float16 in integer and float arithmetic that vectorizes (GCC's _Float16 conversions did not: 16x
 * slower than float32 on AVX-512), every case computed and the result selected by bit masks, so no
 * branch keeps the loops scalar.  Load: the 15 bits of exponent and mantissa, shifted into a float's
 * place, scaled by 2^112 (the difference of the biases): exact for normal and subnormal values;
 * infinity and NaN keep the float's all-ones exponent.  Store, to nearest with ties to even: normal
 * results round their 13 dropped bits in integer arithmetic (a carry moves into the exponent, up to
 * infinity at 65520); below 2^-14, adding 0.5f makes the float unit round the value to a multiple of
 * 2^-24, the subnormal step; NaN stays a quiet NaN. */
FBN_INLINE uint32_t fbn_fbits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

FBN_INLINE float fbn_ffrom(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

FBN_INLINE uint32_t fbn_pick(uint32_t cond, uint32_t a, uint32_t b)  /* cond ? a : b, as a mask */
{
    const uint32_t m = 0u - cond;
    return (a & m) | (b & ~m);
}

FBN_INLINE float fbn_f16_load(fbn_f16 h)
{
    const uint32_t em = (uint32_t)(h.bits & 0x7fffu) << 13, sign = (uint32_t)(h.bits & 0x8000u) << 16;
    const uint32_t normal = fbn_fbits(fbn_ffrom(em) * 0x1p112f);
    /* subnormal: its mantissa times 2^-24, from an integer, so that no float subnormal is involved
     * (a process with "denormals are zero" set would read them as 0, and they can be slow) */
    const uint32_t subnormal = fbn_fbits((float)(h.bits & 0x3ffu) * 0x1p-24f);
    const uint32_t finite = fbn_pick(em < (0x0400u << 13), subnormal, normal);
    return fbn_ffrom(sign | fbn_pick(em >= (0x7c00u << 13), em | 0x7f800000u, finite));
}

FBN_INLINE fbn_f16 fbn_f16_store(float f)
{
    const uint32_t u = fbn_fbits(f) & 0x7fffffffu, sign = (fbn_fbits(f) >> 16) & 0x8000u;
    const uint32_t normal = (u + 0xfffu + ((u >> 13) & 1u) - 0x38000000u) >> 13;
    const uint32_t small = fbn_fbits(fbn_ffrom(u) + 0.5f) - 0x3f000000u;
    uint32_t r = fbn_pick(u < 0x38800000u, small, normal);
    r = fbn_pick(u >= 0x477ff000u, 0x7c00u, r);
    r = fbn_pick(u > 0x7f800000u, 0x7e00u | ((u >> 13) & 0x3ffu), r);
    fbn_f16 h;
    h.bits = (uint16_t)(sign | r);
    return h;
}

/* Flushing a chunk of results (at most FBN_CHUNK, computed in float into an L1 buffer) to half
 * elements: every store of a half type goes through one, where the conversion runs on whole vectors.
 * float16 uses the hardware's conversion (vcvtps2ph, round to nearest even: F16C with AVX, or
 * AVX-512F), found at the first call; the per-element one above took 2x the float32 time of an
 * evaluation call on Zen 4.  stream: then streaming stores (fbn_stream_store).  Staging is the
 * other way, for the loops that read half elements in pieces (see FBN_RUN in _simd_impl.h). */
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f"))) static ptrdiff_t fbn_f16_avx512(fbn_f16 *d, const float *s, ptrdiff_t n)
{
    ptrdiff_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(d + i), _mm512_cvtps_ph(_mm512_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT));
    return i;
}

__attribute__((target("avx,f16c"))) static ptrdiff_t fbn_f16_f16c(fbn_f16 *d, const float *s, ptrdiff_t n)
{
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(d + i), _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT));
    return i;
}

__attribute__((target("avx512f"))) static ptrdiff_t fbn_f16_in_avx512(float *d, const fbn_f16 *s, ptrdiff_t n)
{
    ptrdiff_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(d + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + i))));
    return i;
}

__attribute__((target("avx,f16c"))) static ptrdiff_t fbn_f16_in_f16c(float *d, const fbn_f16 *s, ptrdiff_t n)
{
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
    return i;
}

/* 2: AVX-512F, 1: AVX2 with F16C, 0: neither; found by the first call (read and written atomically, as in
 * fbn_stream_store) */
static int fbn_f16_isa(void)
{
    static int isa = -1;
    int level = __atomic_load_n(&isa, __ATOMIC_RELAXED);
    if (level < 0) {
        /* F16C comes with AVX2 (x86-64-v3); older clang does not know the "f16c" string here */
        level = __builtin_cpu_supports("avx512f") ? 2 : __builtin_cpu_supports("avx2") ? 1 : 0;
        __atomic_store_n(&isa, level, __ATOMIC_RELAXED);
    }
    return level;
}
#endif

/* Staging: n float16 elements to float (the loops' FBN_STAGE). */
static void fbn_f16_stage(float *dst, const fbn_f16 *src, ptrdiff_t n)
{
    ptrdiff_t i = 0;
#if defined(__x86_64__) && defined(__GNUC__)
    const int level = fbn_f16_isa();
    i = level == 2 ? fbn_f16_in_avx512(dst, src, n) : level == 1 ? fbn_f16_in_f16c(dst, src, n) : 0;
#endif
    for (; i < n; i++)
        dst[i] = fbn_f16_load(src[i]);
}

FBN_INLINE void fbn_bf16_stage(float *dst, const fbn_bf16 *src, ptrdiff_t n)
{
#pragma omp simd
    for (ptrdiff_t i = 0; i < n; i++)
        dst[i] = fbn_bf16_load(src[i]);
}

static void fbn_f16_flush(fbn_f16 *dst, const float *src, ptrdiff_t n, int stream)
{
    fbn_f16 tmp[FBN_CHUNK];
    fbn_f16 *d = stream ? tmp : dst;
    ptrdiff_t i = 0;
#if defined(__x86_64__) && defined(__GNUC__)
    const int level = fbn_f16_isa();
    i = level == 2 ? fbn_f16_avx512(d, src, n) : level == 1 ? fbn_f16_f16c(d, src, n) : 0;
#endif
    for (; i < n; i++)
        d[i] = fbn_f16_store(src[i]);
    if (stream)
        fbn_stream_store(dst, tmp, (size_t)n * sizeof(fbn_f16));
}

FBN_INLINE void fbn_bf16_flush(fbn_bf16 *dst, const float *src, ptrdiff_t n, int stream)
{
    fbn_bf16 tmp[FBN_CHUNK];
    fbn_bf16 *d = stream ? tmp : dst;
#pragma omp simd
    for (ptrdiff_t i = 0; i < n; i++)
        d[i] = fbn_bf16_store(src[i]);
    if (stream)
        fbn_stream_store(dst, tmp, (size_t)n * sizeof(fbn_bf16));
}

/* The pieces of elements [f0, f1) of an (N, C, S) buffer, in memory order (see _simd_impl.h): flat
 * offset `off`, length `ln`, channel `c`. */
#define FBN_FOR_ROWS(C, S, f0, f1, off, ln, c)                                                   \
    for (ptrdiff_t r_ = (f0) / (S), end_ = (f1), off = (f0), ln = 0, c = (C) > 0 ? r_ % (C) : 0; \
         off < end_ && (ln = ((r_ + 1) * (S) < end_ ? (r_ + 1) * (S) : end_) - off, 1);          \
         off += ln, r_++, c = c + 1 == (C) ? 0 : c + 1) /* (no division a row: 7x7 rows are short) */

/* The typed loops, once per input type (no C++ templates in a C extension). */
#define FBN_CAT2(a, b) a##_##b
#define FBN_CAT(a, b) FBN_CAT2(a, b)
#define FBN_NAME(name) FBN_CAT(name, FBN_SUFFIX)

#define FBN_LD(v) (v) /* the element is the computed type */
#define FBN_ST(v) (v)
#define FBN_HALF 0   /* results reach memory directly, or through fbn_stream_store when streaming */
#define FBN_ZERO 0   /* the largest value stored as +0 (see fbn_gate_at in _simd_impl.h) */
#define FBN_FLUSH(dst, buf, n, stream) fbn_stream_store(dst, buf, (size_t)(n) * sizeof(*(buf)))

#define E float
#define T float
#define FBN_SUFFIX f32
#define FBN_UINT uint32_t /* T's bits, and its exponent field */
#define FBN_EXP_BITS 0x7f800000u
#define FBN_TWO_PASS 0
#define FBN_WIDE FBN_WIDE_F32
#if defined(__GNUC__) && defined(__has_builtin)
#if __has_builtin(__builtin_convertvector)
#define FBN_COL_REG 1 /* narrow float32 rows' column sums in registers (see _simd_impl.h) */
#endif
#endif
#include "_short512.h"
#ifdef FBN_SHORT_512
#define FBN_S512_HERE 1 /* float32's short rows take _short512.h's loops */
#endif
#include "_simd_impl.h"
#undef FBN_S512_HERE
#undef FBN_COL_REG
#undef E
#undef FBN_SUFFIX

#include "_half512.h"
#define FBN_BF 1 /* the half type is bfloat16 (for _half512.h's loops) */
#define E fbn_bf16 /* bfloat16 in memory, computed in float (the rest as for float) */
#define FBN_SUFFIX b16
#define FBN_DATA_ONLY
#undef FBN_LD
#undef FBN_ST
#define FBN_LD(v) fbn_bf16_load(v)
#define FBN_ST(v) fbn_bf16_store(v)
#undef FBN_HALF
#undef FBN_FLUSH
#define FBN_HALF 1
#define FBN_FLUSH fbn_bf16_flush
#define FBN_STAGE fbn_bf16_stage
#undef FBN_ZERO
#define FBN_ZERO 0x1p-134f /* half bfloat16's smallest subnormal: ties to even, to 0 */
#include "_simd_impl.h"
#undef FBN_FLUSH
#undef FBN_STAGE
#undef E
#undef FBN_SUFFIX
#undef FBN_LD
#undef FBN_ST

#undef FBN_BF
#define FBN_BF 0 /* not bfloat16 (_half512.h) */
#define E fbn_f16 /* IEEE half (float16) in memory, computed in float */
#define FBN_SUFFIX h16
#define FBN_LD(v) fbn_f16_load(v)
#define FBN_ST(v) fbn_f16_store(v)
#define FBN_FLUSH fbn_f16_flush
#define FBN_STAGE fbn_f16_stage
#undef FBN_ZERO
#define FBN_ZERO 0x1p-25f /* half float16's smallest subnormal */
#include "_simd_impl.h"
#undef FBN_FLUSH
#undef FBN_STAGE
#undef FBN_HALF
#define FBN_HALF 0
#undef FBN_ZERO
#define FBN_ZERO 0 /* float64 stores every positive output as itself */
#define FBN_FLUSH(dst, buf, n, stream) fbn_stream_store(dst, buf, (size_t)(n) * sizeof(*(buf)))
#undef E
#undef FBN_SUFFIX
#undef FBN_LD
#undef FBN_ST
#undef FBN_DATA_ONLY
#define FBN_LD(v) (v)
#define FBN_ST(v) (v)
#undef FBN_WIDE
#undef T
#undef FBN_TWO_PASS
#undef FBN_UINT
#undef FBN_EXP_BITS

#define E double
#define T double
#define FBN_SUFFIX f64
#define FBN_UINT uint64_t
#define FBN_EXP_BITS 0x7ff0000000000000ull
#define FBN_TWO_PASS 1
#define FBN_WIDE FBN_WIDE_F64
#include "_simd_impl.h"
#undef FBN_WIDE
#undef E
#undef T
#undef FBN_SUFFIX
#undef FBN_TWO_PASS
#undef FBN_UINT
#undef FBN_EXP_BITS
#undef FBN_LD
#undef FBN_ST
#undef FBN_HALF
#undef FBN_FLUSH
#undef FBN_ZERO

#endif /* FASTBN_SIMD_H */
