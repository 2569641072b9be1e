"""fastbn's caching allocator for the arrays it returns (the C side is _alloc.h).

fastbn.functional takes every output it allocates from :func:`empty_like`: below ``min_bytes``
(1 MiB) that is NumPy's own ``empty_like``, whose small blocks malloc reuses anyway; from there on
the array's memory comes from fastbn's pool, through a NumPy data memory handler installed for
that one allocation (the handler lives in a context variable, so other threads and other code
never see it) and restored at once.  The array is an ordinary ``numpy.ndarray`` that owns its
data; NumPy keeps a reference to the handler in it and frees the memory through it, back into
the pool, when the last reference goes, from any thread.  A handler the caller installed
themselves (``PyDataMem_SetHandler``) wins: fastbn then allocates under it, like NumPy.

``FASTBN_ALLOCATOR`` (read at import): ``fastbn`` (the default) the pool; ``system`` NumPy's
allocator for everything; ``debug`` the pool with every cached block made inaccessible, so that
a use after free crashes at once (for tests).
"""
import os
import warnings
from contextlib import contextmanager

cimport numpy as cnp
from cpython.pycapsule cimport PyCapsule_New
from cpython.object cimport PyTypeObject, Py_TYPE
from cpython.ref cimport PyObject, Py_INCREF
from libc.stdint cimport int64_t

cnp.import_array()

cdef extern from "_alloc.h" nogil:
    int FBN_ALLOC_POOL
    int FBN_ALLOC_ALIGN
    int FBN_ALLOC_MULTIPLE
    ctypedef struct fbn_alloc_stats:
        int64_t hits, misses, releases, frees
        int64_t bytes_in_use, blocks_in_use, peak_bytes_in_use
        int64_t bytes_cached, blocks_cached
        int64_t cache_limit
    void fbn_alloc_init(int debug, int huge, size_t min_bytes, size_t max_cached)
    int64_t fbn_alloc_empty()
    void fbn_alloc_get_stats(fbn_alloc_stats *out)
    void fbn_alloc_configure(size_t min_bytes, size_t max_cached, int multiple, int forget)
    void fbn_alloc_settings(size_t *max_cached, int *multiple)

cdef extern from *:
    """
    static PyDataMem_Handler fbn_handler = {
        "fastbn_caching_allocator", 1,
        {NULL, fbn_np_malloc, fbn_np_calloc, fbn_np_realloc, fbn_np_free}
    };
    static void *fbn_handler_ptr(void) { return &fbn_handler; }
    """
    void *fbn_handler_ptr()

cdef extern from "numpy/arrayobject.h":
    object PyDataMem_SetHandler(object handler)  # returns the previous handler
    PyObject *PyDataMem_DefaultHandler
    object _new_from_descr "PyArray_NewFromDescr"(PyTypeObject *subtype, PyObject *descr, int nd, cnp.npy_intp *dims,
                                                  cnp.npy_intp *strides, void *data, int flags, PyObject *obj)

# Outputs smaller than this stay with NumPy's allocator: glibc's malloc keeps freed blocks under
# its mmap threshold (128 KiB at first, raised up to 32 MiB by the first frees of larger blocks)
# in its heap and hands them out again, and small calls keep their per-call cost (no handler
# switch).  Measured on the 2-core AMD EPYC (Zen 4) VM, 2 threads, float32 train and eval
# forwards in a loop that drops the previous output, pool / NumPy's allocator: 1.00-1.03x for
# 0.12-0.5 MiB outputs (nothing to gain), 0.87-1.02x at 1-4 MiB, 0.84-1.06x at 16 MiB, 0.39-0.63x
# at 48 MiB (where glibc maps and unmaps every output).
MIN_BYTES = 1 << 20

# The cache never holds more than this fraction of the memory the process may use (physical
# memory, or a cgroup's limit where lower).
MAX_FRACTION = 8


def _memory_limit():
    """Bytes of memory this process may use: physical memory, or a cgroup v2/v1 limit if lower."""
    total = None
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and (total is None or 0 < int(text) < total):
            total = int(text)
    return total if total and total > 0 else 8 << 30


def _mode_from_env():
    value = os.environ.get("FASTBN_ALLOCATOR", "").strip().lower()
    if value in ("", "fastbn", "caching", "pool"):
        mode = "fastbn"
    elif value in ("system", "numpy"):
        mode = "system"
    elif value == "debug":
        mode = "debug"
    else:
        warnings.warn(f"FASTBN_ALLOCATOR={value!r} is not one of 'fastbn', 'system', 'debug': "
                      f"using the default, 'fastbn'", RuntimeWarning, stacklevel=2)
        mode = "fastbn"
    if mode != "system" and not FBN_ALLOC_POOL:
        mode = "system"  # no mmap and pthreads on this platform: NumPy's allocator
    return mode


MODE = _mode_from_env()
cdef bint _on = MODE != "system"
cdef Py_ssize_t _min_bytes = MIN_BYTES
MAX_CACHED = _memory_limit() // MAX_FRACTION


def _numpy_uses_huge_pages():
    """Whether NumPy marks its large arrays for transparent huge pages (it does on Linux >= 4.6,
    unless turned off with np._core.multiarray._set_madvise_hugepage(False)); the pool follows."""
    try:
        from numpy._core import multiarray
    except ImportError:  # NumPy 1.x
        from numpy.core import multiarray
    getter = getattr(multiarray, "_get_madvise_hugepage", None)
    return bool(getter()) if getter is not None else False


HUGE_PAGES = _numpy_uses_huge_pages()
fbn_alloc_init(MODE == "debug", HUGE_PAGES, MIN_BYTES, MAX_CACHED)
cdef object _handler = PyCapsule_New(fbn_handler_ptr(), "mem_handler", NULL)


cdef inline object _new_like(cnp.ndarray a, int nd, cnp.npy_intp *dims):
    """np.empty_like(a, shape=dims) in C order: a's dtype, and a's subclass (finalized from a)."""
    cdef PyObject *descr = <PyObject *>cnp.PyArray_DESCR(a)
    Py_INCREF(<object>descr)  # PyArray_NewFromDescr steals it
    return _new_from_descr(Py_TYPE(a), descr, nd, dims, NULL, NULL, 0,
                           NULL if type(a) is cnp.ndarray else <PyObject *>a)


def empty_like(cnp.ndarray a, tuple shape):
    """An uninitialized C-ordered array of ``shape`` (as many elements as ``a``) in a's dtype and
    subclass (as np.empty_like) for fastbn to return: from the pool from MIN_BYTES on, else from
    NumPy's allocator."""
    cdef cnp.npy_intp dims[64]
    cdef int nd = len(shape), i
    if nd > 64:
        raise ValueError(f"at most 64 dimensions, got {nd}")
    for i in range(nd):
        dims[i] = shape[i]
    if not _on or cnp.PyArray_NBYTES(a) < _min_bytes:
        return _new_like(a, nd, dims)
    old = PyDataMem_SetHandler(_handler)
    if <PyObject *>old != PyDataMem_DefaultHandler:  # the caller's own handler: theirs, not ours
        PyDataMem_SetHandler(old)
        return _new_like(a, nd, dims)
    try:
        return _new_like(a, nd, dims)
    finally:
        PyDataMem_SetHandler(old)


# Scratch from this size on comes from the pool (scratch): coefficient blocks and sums that grow
# with the data.  Below the pool's 1 MiB NumPy's allocator (glibc's malloc) did not keep them
# mapped: with the fused ReLU's 720 KiB of coefficients next to the partials, a batch-norm backward
# on (32, 1024, 4, 4) float32 page-faulted 230 times a call (0.9 MiB mapped afresh) and took 3x
# the plain call's time; GroupNorm(32)'s backward on (64, 512, 2, 2), 1.4 MiB of sums,
# coefficients and means, 320 times a call (2 threads, Zen 4 VM).  128 KiB: glibc's first mmap
# threshold; smaller blocks stay in its heap.
SCRATCH_POOL_BYTES = 128 << 10

# The pool's blocks start on pages, as large inputs do (mmap, 16 bytes in): scratch read and
# written beside them at the same offset within 4 KiB (x, grad_output and the column partials)
# conflicts in the L1 (4K aliasing).  Without the skew the plain backward and the training
# forward on (32, 1024, 4, 4) and (64, 2048, 4) float32 took 1.2-1.47x their time with NumPy's
# scratch; with it 1.00-1.02x (min of 8 rounds, alternating processes, 2 threads).
SCRATCH_SKEW = 2048 + 192


def scratch(Py_ssize_t n, dtype):
    """An uninitialized 1-D ndarray of ``n`` elements of ``dtype`` for a kernel's own use during a
    call (coefficient blocks, per-channel sums).  From SCRATCH_POOL_BYTES on it comes from the
    pool, SCRATCH_SKEW bytes into a block of at least MIN_BYTES (so that the pool, not the heap,
    serves it), and its pages stay mapped for the next call; smaller, from NumPy's allocator."""
    import numpy as np
    cdef Py_ssize_t item = np.dtype(dtype).itemsize, skew
    if not _on or n * item < SCRATCH_POOL_BYTES:
        return np.empty(n, dtype)
    old = PyDataMem_SetHandler(_handler)
    if <PyObject *>old != PyDataMem_DefaultHandler:  # the caller's own handler: theirs
        PyDataMem_SetHandler(old)
        return np.empty(n, dtype)
    skew = SCRATCH_SKEW // item
    try:
        block = np.empty(max(n + skew, (_min_bytes + item - 1) // item), dtype)
    finally:
        PyDataMem_SetHandler(old)
    return block[skew:skew + n]


@contextmanager
def handler():
    """Every NumPy array made in the block takes its memory from fastbn's allocator (small ones
    from its heap blocks).  Not part of fastbn's API: for tests."""
    old = PyDataMem_SetHandler(_handler)
    try:
        yield
    finally:
        PyDataMem_SetHandler(old)


HANDLER_NAME = "fastbn_caching_allocator"
MULTIPLE = FBN_ALLOC_MULTIPLE


def memory_stats():
    """The caching allocator's counters, as a dict (see fastbn.memory_stats)."""
    cdef fbn_alloc_stats s
    cdef size_t cap
    cdef int mult
    fbn_alloc_get_stats(&s)
    fbn_alloc_settings(&cap, &mult)
    return {
        "allocator": MODE,
        "bytes_in_use": s.bytes_in_use,
        "blocks_in_use": s.blocks_in_use,
        "peak_bytes_in_use": s.peak_bytes_in_use,
        "bytes_cached": s.bytes_cached,
        "blocks_cached": s.blocks_cached,
        "bytes_reserved": s.bytes_in_use + s.bytes_cached,
        "cache_limit": s.cache_limit,
        "max_cached": cap,
        "min_bytes": _min_bytes,
        "hits": s.hits,
        "misses": s.misses,
        "frees": s.frees,
        "releases": s.releases,
    }


def empty_cache():
    """Give every cached block back to the OS; returns the bytes released."""
    return fbn_alloc_empty()


def configure(min_bytes=None, max_cached=None, multiple=None, forget=False):
    """Change the pool's minimum size, the cap on the cache and the multiple of the largest recent
    request it may hold; ``forget``: forget the recent requests.  Not part of fastbn's API: for tests
    and experiments.  Returns the settings before."""
    global _min_bytes
    cdef size_t cap
    cdef int mult
    fbn_alloc_settings(&cap, &mult)
    before = {"min_bytes": _min_bytes, "max_cached": cap, "multiple": mult}
    if min_bytes is not None:
        if not 1 <= min_bytes <= (1 << 40):
            raise ValueError(f"min_bytes must be from 1 to 2**40, got {min_bytes!r}")
        _min_bytes = min_bytes
    fbn_alloc_configure(min_bytes or 0, max_cached or 0, multiple or 0, forget)
    return before


# ---------------------------------------------------------------- where arrays lie
cdef inline void _extent(cnp.ndarray a, char **lo, char **hi) noexcept:
    """[lo, hi): the bytes any element of ``a`` may touch (NumPy's may_share_memory bounds)."""
    cdef char *start = <char *>cnp.PyArray_DATA(a)
    cdef char *end = start
    cdef int d
    cdef Py_ssize_t n, s
    if cnp.PyArray_SIZE(a) == 0:
        lo[0] = hi[0] = start
        return
    for d in range(cnp.PyArray_NDIM(a)):
        n, s = cnp.PyArray_DIM(a, d), cnp.PyArray_STRIDE(a, d)
        if s < 0:
            start += s * (n - 1)
        else:
            end += s * (n - 1)
    lo[0], hi[0] = start, end + cnp.PyArray_ITEMSIZE(a)


def relation(cnp.ndarray a, cnp.ndarray b):
    """0: a and b touch no byte in common (by their bounds); 1: they start at the same address
    and span the same bytes (an in-place call); 2: anything else (a partial overlap)."""
    cdef char *alo
    cdef char *ahi
    cdef char *blo
    cdef char *bhi
    _extent(a, &alo, &ahi)
    _extent(b, &blo, &bhi)
    if ahi <= blo or bhi <= alo:
        return 0
    if alo == blo and ahi == bhi and cnp.PyArray_DATA(a) == cnp.PyArray_DATA(b):
        return 1
    return 2


def overlapping(cnp.ndarray out, tuple arrays):
    """A bit mask: bit i set where ``arrays[i]`` (an ndarray, or None) may share memory with ``out``."""
    cdef char *olo
    cdef char *ohi
    cdef char *lo
    cdef char *hi
    cdef int i, mask = 0
    _extent(out, &olo, &ohi)
    for i in range(len(arrays)):
        a = arrays[i]
        if a is None:
            continue
        _extent(<cnp.ndarray>a, &lo, &hi)
        if not (ohi <= lo or hi <= olo):
            mask |= 1 << i
    return mask
