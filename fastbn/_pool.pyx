"""fastbn's thread pool (_pool.h), one per process: pool_run for the kernels (see _pool.pxd), and the
knobs and counters fastbn._kernels re-exports for the benchmark and the tests.  (_norm_kernels
includes _pool.h itself, and so has its own instance.)"""
from libc.stdint cimport int64_t

cdef extern from "_pool.h" nogil:
    ctypedef void (*fbn_task_fn)(void *ctx, Py_ssize_t task) noexcept nogil
    void fbn_pool_run(fbn_task_fn fn, void *ctx, Py_ssize_t n, int threads, int back)
    void fbn_pool_wake(int threads)
    int fbn_pool_helpers()
    void fbn_pool_counters(int64_t *c)
    int64_t fbn_pool_spin()
    void fbn_pool_set_spin(int64_t ns)


cdef void pool_run(task_fn fn, void *ctx, Py_ssize_t n, int threads, bint back=False) noexcept nogil:
    fbn_pool_run(<fbn_task_fn>fn, ctx, n, threads, back)


cdef void pool_wake(int threads) noexcept nogil:
    fbn_pool_wake(threads)


def pool_helpers():
    """Helper threads fastbn's pool has started in this process (0 in a fresh fork child)."""
    return fbn_pool_helpers()


def pool_counters():
    """The pool's counters since the process started (for the benchmark): jobs run with helpers,
    tasks the helpers ran, the caller's waits for tasks a helper held, how many of those slept,
    the seconds it waited in all, and the sleeping helpers woken ahead of a job (pool_wake)."""
    cdef int64_t c[6]
    fbn_pool_counters(c)
    return {"jobs": c[0], "helper_tasks": c[1], "waits": c[2], "sleeps": c[3], "wait_s": c[4] * 1e-9,
            "wakes": c[5]}


def pool_spin_us(us=None):
    """How long (microseconds) an idle helper spins before it sleeps; sets it when given.  Not part
    of fastbn's API: for the benchmark's experiments."""
    if us is not None:
        if not 0 <= us <= 1000000:
            raise ValueError(f"pool_spin_us({us!r}): expected 0 to 1000000 microseconds")
        fbn_pool_set_spin(<int64_t>(us * 1000))
    return fbn_pool_spin() / 1000
