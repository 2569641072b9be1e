"""The thread count of fastbn's kernels, read from the OpenMP runtime.

The kernels run on fastbn's own thread pool (_pool.h), not in OpenMP parallel regions, but the
count follows the OpenMP runtime's setting (OMP_NUM_THREADS, omp_set_num_threads,
threadpoolctl's limits) so that every tool that steers OpenMP steers fastbn too; the OpenMP
runtime itself never starts a thread for fastbn.  Without OpenMP in the build, everything runs
on one thread.
"""

import numbers

cdef extern from *:
    """
    #if FASTBN_HAVE_OPENMP
    #include <omp.h>
    #else
    static int omp_get_max_threads(void) { return 1; }
    static void omp_set_num_threads(int n) { (void)n; }
    #endif
    static const char *fastbn_build_flags = FASTBN_BUILD_FLAGS;
    """
    int FASTBN_HAVE_OPENMP
    const char *fastbn_build_flags
    int omp_get_max_threads() noexcept nogil
    void omp_set_num_threads(int) noexcept nogil

# A process-wide request from set_num_threads(); 0 means "follow the OpenMP runtime".
cdef int _requested = 0

OPENMP = bool(FASTBN_HAVE_OPENMP)
BUILD_FLAGS = fastbn_build_flags.decode()


cdef int effective_threads() noexcept nogil:
    cdef int omp = omp_get_max_threads()
    if _requested > 0 and _requested < omp:
        return _requested
    return omp if omp > 0 else 1


def get_num_threads():
    """Threads fastbn's kernels use in a call from this Python thread."""
    return effective_threads()


# More threads than this is a typo, not a machine: the OpenMP runtime would try to start them all
# and end the process when the system refuses (it cannot raise a Python exception).  A runtime
# started with more (OMP_NUM_THREADS) keeps its own count as the limit, so that a value read with
# get_num_threads() can always be set back.
MAX_THREADS = max(1024, omp_get_max_threads())


def set_num_threads(n):
    """Use ``n`` threads in fastbn's kernels (and in OpenMP code of this thread).

    ``n`` is an integer from 1 to ``MAX_THREADS`` (1024, or OMP_NUM_THREADS if larger).  The default follows
    ``OMP_NUM_THREADS`` (else the core count); ``threadpoolctl``'s ``threadpool_limits``
    lowers it for the duration of its block.
    """
    global _requested
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"set_num_threads expects an integer number of threads, got {n!r}")
    if not 1 <= n <= MAX_THREADS:
        raise ValueError(f"set_num_threads({n}) is invalid: expected a number of threads from 1 to {MAX_THREADS}")
    if not FASTBN_HAVE_OPENMP and n > 1:
        import warnings
        warnings.warn("fastbn was built without OpenMP: kernels run on one thread", RuntimeWarning, stacklevel=2)
    _requested = int(n)
    omp_set_num_threads(_requested)
