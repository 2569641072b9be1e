"""The benchmark's floor: the least memory traffic of one pass of batch norm, on the kernels' split of
work, their threads and pool (_pool.pyx), and their rule for streaming stores (_plan.pyx), with next
to no arithmetic.  ``fastbn bench`` and ``fastbn bench --pipeline`` time an operation's passes with it
to show how fast that operation could possibly be on the machine.  Not part of fastbn's API, and
apart from the production kernels (fastbn._kernels)."""
from cython cimport floating
from libc.string cimport memset

from fastbn._plan cimport RANGES, plan_ranges, plan_stream, plan_threads, piece_elements, piece_start, range_start
from fastbn._pool cimport pool_run

cdef extern from "_floor.h" nogil:
    void fbn_sfence()
    double fbn_traffic_f32(const float *a, const float *b, float *y, Py_ssize_t n, int stream)
    double fbn_traffic_f64(const double *a, const double *b, double *y, Py_ssize_t n, int stream)

cdef extern from "stdlib.h" nogil:
    void *calloc(size_t n, size_t size)
    void free(void *p)


cdef struct _Floor:
    bint single             # float32 elements, else float64
    bint backwards          # tasks in reverse order, each walked back to front in pieces
    int stream              # streaming stores
    const void *a
    const void *b           # or NULL
    void *y                 # or NULL
    Py_ssize_t L, K         # elements, tasks (RANGES' ranges)
    double *part            # each task's sum of what it read


cdef double _range(const _Floor *fl, Py_ssize_t f0, Py_ssize_t f1, floating tag) noexcept nogil:
    """fbn_traffic over elements [f0, f1) of a (and b, and y, where not NULL); back to front in
    pieces when fl.backwards (the kernels' second passes' walk)."""
    cdef Py_ssize_t s, piece = piece_elements(sizeof(floating))
    cdef const floating *a = <const floating *>fl.a
    cdef const floating *bq
    cdef floating *yq
    cdef double total = 0
    while f1 > f0:
        s = piece_start(f0, f1, piece) if fl.backwards else f0
        bq = NULL if fl.b == NULL else <const floating *>fl.b + s
        yq = NULL if fl.y == NULL else <floating *>fl.y + s
        if floating is float:
            total += fbn_traffic_f32(a + s, bq, yq, f1 - s, fl.stream)
        else:
            total += fbn_traffic_f64(a + s, bq, yq, f1 - s, fl.stream)
        f1 = s
    if fl.stream:
        fbn_sfence()
    return total


cdef void _task(void *p, Py_ssize_t k) noexcept nogil:
    cdef _Floor *fl = <_Floor *>p
    if fl.single:
        fl.part[k] = _range(fl, range_start(fl.L, fl.K, k), range_start(fl.L, fl.K, k + 1), <float>0)
    else:
        fl.part[k] = _range(fl, range_start(fl.L, fl.K, k), range_start(fl.L, fl.K, k + 1), <double>0)


def traffic(const floating[::1] a, const floating[::1] b=None, floating[::1] y=None, int n_threads=1,
            int stream=-1, bint backwards=False):
    """The least memory traffic of one pass of batch norm, for ``fastbn bench``: reads a (and b),
    writes y = a (+ b) when y is given, on n_threads threads with the kernels' split of work
    (RANGES' tasks) and their rule for streaming stores (``stream`` as in the kernels: -1 by the
    bytes the pass touches).  ``backwards``: tasks in reverse order, each walked back to front in
    pieces, as the kernels' second passes do (PIECE_BYTES).  Returns a sum of what it read when y is
    None.  Not part of fastbn's API."""
    cdef Py_ssize_t n = a.shape[0], k
    cdef int arrays = 1 + (b is not None) + (y is not None)
    cdef _Floor fl
    cdef double total = 0
    if (b is not None and b.shape[0] != n) or (y is not None and y.shape[0] != n):
        raise ValueError("traffic: the arrays must have the same length")
    if n == 0:
        return 0.0
    memset(&fl, 0, sizeof(_Floor))
    fl.single = floating is float
    fl.L = n
    fl.K = plan_ranges(n, 0)
    fl.a = &a[0]
    if b is not None:
        fl.b = &b[0]
    if y is not None:
        fl.y = &y[0]
    fl.stream = (y is not None) and plan_stream(arrays * n * sizeof(floating), stream, RANGES, 0)
    fl.backwards = backwards
    fl.part = <double *>calloc(fl.K, sizeof(double))
    if fl.part == NULL:
        raise MemoryError()
    with nogil:
        pool_run(_task, &fl, fl.K, plan_threads(n_threads, n), fl.backwards)  # as the kernels' APPLY_BACK
    for k in range(fl.K):
        total += fl.part[k]
    free(fl.part)
    return total
