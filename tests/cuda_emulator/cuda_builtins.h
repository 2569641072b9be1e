/* The CUDA builtins fastbn's kernels use, for g++.
 *
 * Included before the kernel source (the text given to cupy.RawModule), so the source compiles as
 * plain C++: the qualifiers become nothing (__global__, __device__, __launch_bounds__) or their
 * host meaning (__shared__ a static, one copy that the blocks reuse in turn, since they run one
 * after another); threadIdx & co. are globals that the scheduler (scheduler.cpp) sets before it
 * resumes a thread.  Every CUDA thread of a block is a fiber on one OS thread; __syncthreads and
 * __shfl_down_sync are the points where a fiber gives way to the others.
 *
 * Only what the kernels use is here: no atomics, no other shuffles, no __syncwarp, no dynamic
 * shared memory, no 3-D blocks or grids.  A kernel that uses anything else fails to compile. */
#ifndef FBN_EMU_CUDA_BUILTINS_H
#define FBN_EMU_CUDA_BUILTINS_H

#include <cmath>

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

#endif
