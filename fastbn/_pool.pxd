# fastbn/_pool.pxd -- the declarations of fastbn's thread pool (_pool.h) for the Cython kernels.
# fbn_pool_run(fn, ctx, n, T) runs fn(ctx, k) for k = 0 .. n-1 on up to T threads, the caller one of
# them, and returns when all n ran.  Each extension that cimports this has its own pool instance.
from libc.stdint cimport int64_t

cdef extern from "_pool.h" nogil:
    ctypedef void (*fbn_task_fn)(void *ctx, Py_ssize_t task) noexcept nogil
    void fbn_pool_run(fbn_task_fn fn, void *ctx, Py_ssize_t n, int threads)
    int fbn_pool_helpers()
    void fbn_pool_counters(int64_t *c)
    int64_t fbn_pool_spin()
    void fbn_pool_set_spin(int64_t ns)
