# fastbn/_pool.pxd -- fastbn's thread pool (_pool.h), one per process, for the Cython kernels.
# pool_run(fn, ctx, n, T, back) runs fn(ctx, k) for k = 0 .. n-1 on up to T threads, the caller one
# of them, and returns when all n ran; each thread owns the same share of the tasks on every call,
# and takes it last task first where `back` (the kernels' second passes).  _pool.pyx holds the pool (the one instance of _pool.h's state)
# and exports pool_run: the kernels (_kernels.pyx) and the benchmark's floor (_floor.pyx) then run
# on the same helper threads, with the same spin setting and counters.

ctypedef void (*task_fn)(void *ctx, Py_ssize_t task) noexcept nogil

cdef void pool_run(task_fn fn, void *ctx, Py_ssize_t n, int threads, bint back=*) noexcept nogil
# pool_wake(T): wake sleeping helpers among the first T - 1 ahead of a call's first pool_run, when
# the call has work of its own to do first.
cdef void pool_wake(int threads) noexcept nogil
