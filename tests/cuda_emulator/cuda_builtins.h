/* The CUDA builtins fastbn's kernels use, for g++.
 *
 * Included before the kernel source (the text given to cupy.RawModule), so the source compiles as
 * plain C++: the qualifiers become nothing (__global__, __device__, __launch_bounds__) or their
 * host meaning (__shared__ a static, one copy that the blocks reuse in turn, since they run one
 * after another); threadIdx & co. are globals that the scheduler (scheduler.cpp) sets before it
 * resumes a thread.  Every CUDA thread of a block is a fiber on one OS thread; __syncthreads and
 * __shfl_down_sync are the points where a fiber gives way to the others.
 *
 * float16 storage: __half (two bytes, as cuda_fp16.h's) with __half2float and __float2half_rn,
 * written here with integer arithmetic (round to nearest even, as the GPU's cvt.rn.f16.f32);
 * check_emulator.py checks them against NumPy's casts on every half and on the float32 values
 * around every rounding boundary.  No other half arithmetic is emulated.
 *
 * Only what the kernels use is here: no atomics, no other shuffles, no __syncwarp, no dynamic
 * shared memory, no 3-D blocks or grids.  A kernel that uses anything else fails to compile. */
#ifndef FBN_EMU_CUDA_BUILTINS_H
#define FBN_EMU_CUDA_BUILTINS_H

#include <cmath>
#include <cstdint>
#include <cstring>

struct emu_dim3 {
    unsigned x, y, z;
};
extern emu_dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

/* A barrier over the block's threads: returns once every thread of the block has called it. */
void __syncthreads();

/* The value of v held by lane (this lane + offset) of this warp, or v itself when that lane is past
 * the warp's end.  Every lane of the warp must call it (a barrier over the warp's 32 threads on each
 * side of the exchange); only the full mask is supported (any other aborts).  Computed in double:
 * float and int arguments convert exactly. */
double __shfl_down_sync(unsigned mask, double v, int offset);

/* Fused multiply-add, rounded once, as on the GPU. */
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }

/* float16 storage, bit for bit as on the GPU (but for a NaN's payload: a quiet NaN, sign kept). */
struct __half {
    unsigned short __x;
};

inline float __half2float(__half h)
{
    const uint32_t sign = (uint32_t)(h.__x & 0x8000u) << 16;
    const uint32_t e = (h.__x >> 10) & 0x1fu, m = h.__x & 0x3ffu;
    uint32_t bits;
    if (e == 0x1fu) { /* inf, NaN */
        bits = sign | 0x7f800000u | (m << 13);
    } else if (e == 0) { /* zero, subnormal: m * 2^-24, exact in float */
        float v = (float)m * 0x1p-24f;
        std::memcpy(&bits, &v, sizeof bits);
        bits |= sign;
    } else { /* normal: rebias the exponent (15 -> 127) */
        bits = sign | ((e + 112u) << 23) | (m << 13);
    }
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

inline __half __float2half_rn(float f)
{
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    const unsigned short sign = (unsigned short)((u >> 16) & 0x8000u);
    const uint32_t a = u & 0x7fffffffu;
    __half h;
    if (a > 0x7f800000u) { /* NaN: quiet, the payload's top bits kept */
        h.__x = (unsigned short)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
        return h;
    }
    if (a >= 0x477ff000u) { /* |f| >= 65520 (half-way past the largest half, 65504, ties to even): inf */
        h.__x = (unsigned short)(sign | 0x7c00u);
        return h;
    }
    const int e = (int)(a >> 23) - 127;          /* f = m * 2^(e - 23), m with its leading bit */
    if (e < -25) {                                /* below 2^-25, half the smallest subnormal: 0 */
        h.__x = sign;
        return h;
    }
    const uint32_t m = (a & 0x7fffffu) | 0x800000u;
    /* The result in units of its last place: 2^-24 for a subnormal half (e < -14), 2^(e - 10) for a
     * normal one; drop the bits below it, rounding to nearest, ties to even. */
    const int drop = e < -14 ? -e - 1 : 13;
    uint32_t q = m >> drop;
    const uint32_t rest = m & ((1u << drop) - 1u), half_ulp = 1u << (drop - 1);
    if (rest > half_ulp || (rest == half_ulp && (q & 1u)))
        q++; /* a carry out of the significand moves into the exponent field, as it should */
    /* subnormal: q is the encoding; normal: q holds the implicit 0x400, which adds 1 to the biased
     * exponent e + 14 */
    h.__x = (unsigned short)(sign | (e < -14 ? q : (((uint32_t)(e + 14) << 10) + q)));
    return h;
}

#endif
