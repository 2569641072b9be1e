/* Small kernels whose results are known, to check the emulator itself (check_emulator.py runs
 * them).  Plain CUDA: they would run the same on a GPU, except probe_deadlock, whose barrier in a
 * branch is undefined behaviour there and a reported deadlock here. */
typedef long long i64;

/* Every thread writes its 2-D thread and block indices and the launch's sizes, at its global
 * linear index (x fastest, as CUDA numbers threads). */
template <typename T> __global__ void probe_indices(int *out)
{
    const int t = threadIdx.y * blockDim.x + threadIdx.x;
    const int b = blockIdx.y * gridDim.x + blockIdx.x;
    int *o = out + 8 * (b * (int)(blockDim.x * blockDim.y) + t);
    o[0] = threadIdx.x;
    o[1] = threadIdx.y;
    o[2] = blockIdx.x;
    o[3] = blockIdx.y;
    o[4] = blockDim.x;
    o[5] = blockDim.y;
    o[6] = gridDim.x;
    o[7] = gridDim.y;
}

/* Lane 0 of each warp writes the sum of its warp's 32 values (a shuffle tree); every lane also
 * writes what one shuffle by `offset` gave it. */
template <typename T> __global__ void probe_shuffle(const T *x, T *sums, T *shifted, int offset)
{
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    T v = x[i];
    shifted[i] = __shfl_down_sync(0xffffffffu, v, offset);
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_down_sync(0xffffffffu, v, o);
    if ((threadIdx.x & 31) == 0)
        sums[i / 32] = v;
}

/* Thread 0 of each block writes the block's sum, gathered in shared memory across a barrier; the
 * threads write in reverse order, so the sum is right only if the barrier waits for all of them. */
template <typename T> __global__ void probe_shared(const T *x, T *sums, i64 n)
{
    __shared__ T sh[1024];
    const unsigned t = threadIdx.x, nt = blockDim.x;
    const i64 i = (i64)blockIdx.x * nt + (nt - 1 - t);
    sh[nt - 1 - t] = i < n ? x[i] : (T)0;
    __syncthreads();
    if (t == 0) {
        T s = 0;
        for (unsigned j = 0; j < nt; j++)
            s += sh[j];
        sums[blockIdx.x] = s;
    }
}

/* Only the first warp reaches the barrier: a deadlock when the block has more than one warp. */
template <typename T> __global__ void probe_deadlock(T *out)
{
    if (threadIdx.x < 32)
        __syncthreads();
    out[threadIdx.x] = (T)1;
}

/* out[0] = a + b + c + d, to check that scalars of each width arrive intact. */
template <typename T> __global__ void probe_scalars(T *out, int a, i64 b, float c, double d)
{
    if (threadIdx.x == 0)
        out[0] = (T)((double)a + (double)b + (double)c + d);
}

/* float16 conversions, grid-stride: h[i] = __float2half_rn(f[i]) and g[i] = __half2float(hin[i])
 * (T is __half; check_emulator.py compares them with NumPy's casts). */
template <typename T> __global__ void probe_half(const float *f, T *h, i64 n, const T *hin, float *g, i64 m)
{
    const i64 step = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n || i < m; i += step) {
        if (i < n)
            h[i] = __float2half_rn(f[i]);
        if (i < m)
            g[i] = __half2float(hin[i]);
    }
}
