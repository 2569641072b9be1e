"""fastbn's work-split planner: how a kernel call is cut into tasks, and on how many threads.

The kernels (_kernels.pyx) and the benchmark's floor (_floor.pyx) cimport it through _plan.pxd,
which holds the constants and the pure index arithmetic; this module holds the knobs that are
set at run time (by fastbn._machine's cache sizes at import, by tests and the benchmark), once
per process, and the functions that read them.  A plan depends on the shape (and a forced unit),
never on the thread count: see PLAN_WIDTH.  fastbn._kernels re-exports the Python knobs
(PATHS, plan_width, thresholds, tune_for, thread_threshold).
"""
import os

PATHS = {"auto": AUTO, "ranges": RANGES, "columns": COLUMNS, "slices": SLICES}

# The most tasks a call is cut into, whatever the thread count: the tasks (not the threads) fix
# where partial sums are cut and merged, so results are the same on 1 thread or 16.  At least 16
# (8 per core on 2 cores: a helper that comes late still finds work), more on machines with more
# than 8 cores; fixed at import from the cores this process may use.
cdef Py_ssize_t PLAN_WIDTH


def _usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


PLAN_WIDTH = max(16, min(256, 2 * _usable_cores()))


def plan_width():
    """The most tasks a call is cut into (see PLAN_WIDTH)."""
    return PLAN_WIDTH



# A call whose arrays (inputs and output) take more than STREAM_BYTES writes its output with
# streaming stores, on the RANGES path: it would not stay in cache anyway, and skipping the
# read-for-ownership saves a pass over memory.  Below it, normal stores keep the output in the
# last-level cache for whoever reads it next.  STREAM_BYTES = STREAM_L3_RATIO x the L3 that
# fastbn._machine detects (l3_effective), set at import by tune_for.
# The ratio was measured on the 2-core AMD EPYC (Zen 4) VM, 32 MiB L3, 2 threads, float32
# (N, 64, 32, 32) and (N, 3, 224, 224), outputs from fastbn's caching allocator (recycled pages),
# streaming / normal stores in interleaved rounds: eval forward out= 1.06-1.30 at 12-16 MiB
# touched, 1.00 at 20, 0.82-0.87 at 24, 0.68-0.82 at 28-48; followed by a read of the output
# (which normal stores leave in L3) 1.03-1.06 at 12-16, 0.99-1.01 at 20-24, 0.82-0.85 at 32-48;
# train forward 0.94-0.96 at 16 MiB, 0.84-0.90 at 20-24, 0.78-0.94 at 28-48.  So 0.75x the L3.
# (It was 1.5x, measured on the same machine when every large output was a fresh mapping: the
# kernel's zeroing of the new pages left them in the cache, which normal stores then hit.)
# The column paths stream by size only for narrow rows (NARROW_ROW_BYTES): their streaming stores
# measured slower on every wide (N, C) and small-spatial shape tried, up to 192 MiB touched:
# (4096, 1024) float32 1.13-1.71x, (16384, 1024) 1.06-1.48x, (4096, 256, 4, 4) 1.13-1.41x,
# (16, 1048576) 0.97-1.19x; but faster on channels-last (64, 56, 56, 64) float32, 2 threads,
# rows of 256 bytes: train forward 6.5 -> 5.7 ms, eval 3.9 -> 2.5, backward 10.1 -> 9.0.
STREAM_L3_RATIO = 0.75
cdef Py_ssize_t STREAM_BYTES = 24 * 1024 * 1024  # until tune_for: 0.75 x a 32 MiB L3

# A two-pass operation (training forward, backward) makes its second pass over each task's range
# from the range's end back to its start, in pieces of about this many bytes (each piece front to
# back), and takes the tasks in reverse order.  The first pass went front to back, so the cache
# (L2, then L3) holds the end of the data: walking back meets those bytes first, while front to
# back would start with bytes long evicted and push out the cached ones before reaching them.  See
# "two passes" in bench/RESULTS.md.  Not derived from the detected L2: on the Zen 4 VM (1 MiB L2
# per core), train forward and backward of (64, 64, 56, 56), (256, 256, 14, 14), (32, 3, 224, 224)
# and (16, 64, 32, 32) float32 measured the same (0.97-1.02x) with pieces of 512 KiB, 1 MiB and
# 2 MiB, and 1.01-1.07x slower with 128 KiB: past a few hundred KiB the piece size does not matter,
# so a larger L2 gives no reason to change it, and 512 KiB is well past that on any L2 of 256 KiB
# or more.
cdef Py_ssize_t PIECE_BYTES = 512 * 1024


def thresholds(stream_bytes=None, piece_bytes=None):
    """The byte thresholds the kernels plan with, {"stream_bytes": STREAM_BYTES, "piece_bytes":
    PIECE_BYTES}; sets those given (tune_for sets them at import).  Neither changes a result, only
    how fast it comes.  Not part of fastbn's API."""
    global STREAM_BYTES, PIECE_BYTES
    for name, value in (("stream_bytes", stream_bytes), ("piece_bytes", piece_bytes)):
        if value is not None and not 4096 <= value <= (1 << 50):
            raise ValueError(f"thresholds({name}={value!r}): expected 4096 to 2**50 bytes")
    if stream_bytes is not None:
        STREAM_BYTES = stream_bytes
    if piece_bytes is not None:
        PIECE_BYTES = piece_bytes
    return {"stream_bytes": STREAM_BYTES, "piece_bytes": PIECE_BYTES}


def tune_for(Py_ssize_t l2_bytes, Py_ssize_t l3_bytes):
    """Set the thresholds for a machine with these cache sizes (L2 per core, the L3 the threads
    share: see fastbn._machine) by the ratios above; returns thresholds()."""
    return thresholds(stream_bytes=max(4096, int(STREAM_L3_RATIO * l3_bytes)))


# MIN_PER_THREAD, unless tests lower it to put small inputs on several threads.
cdef Py_ssize_t min_per_thread = MIN_PER_THREAD


def thread_threshold(n=None):
    """Elements a thread at least (MIN_PER_THREAD); sets it when given (tests: 1 puts every task
    of a small input up for the helpers).  Not part of fastbn's API."""
    global min_per_thread
    if n is not None:
        if not 1 <= n <= (1 << 40):
            raise ValueError(f"thread_threshold({n!r}): expected 1 to 2**40 elements")
        min_per_thread = n
    return min_per_thread


# ---------------------------------------------------------------- plans
cdef int plan_threads(int n_threads, Py_ssize_t total) noexcept nogil:
    """Threads for ``total`` elements of work (they change how fast, never what it computes)."""
    return <int>max(1, min(<Py_ssize_t>n_threads, total // min_per_thread))


cdef Py_ssize_t plan_tasks(Py_ssize_t total) noexcept nogil:
    """Tasks for ``total`` elements of work: one per MIN_TASK elements, at most PLAN_WIDTH."""
    return max(<Py_ssize_t>1, min(PLAN_WIDTH, total // MIN_TASK))


cdef int plan_stream(Py_ssize_t touched_bytes, int stream, int how, Py_ssize_t row_bytes) noexcept nogil:
    """Streaming stores when the call's arrays (inputs and output) overflow the cache, on the
    RANGES path and on COLUMNS rows of at most NARROW_ROW_BYTES (``row_bytes``: W elements; see
    STREAM_BYTES); forced on or off by ``stream`` >= 0."""
    if stream >= 0:
        return stream
    return (how == RANGES or (how == COLUMNS and row_bytes <= NARROW_ROW_BYTES)) and touched_bytes > STREAM_BYTES


cdef Py_ssize_t plan_ranges(Py_ssize_t L, Py_ssize_t unit) noexcept nogil:
    """How many ranges (tasks) RANGES cuts L elements into: plan_tasks, or L / unit when forced."""
    return plan_tasks(L) if unit <= 0 else max(<Py_ssize_t>1, (L + unit - 1) // unit)


cdef Py_ssize_t plan_rows(Py_ssize_t N, Py_ssize_t W, Py_ssize_t unit) noexcept nogil:
    """Rows per COLUMNS block: COLUMN_BLOCK elements, but no more than a plan_tasks-th of the N
    rows, so that a matrix of few blocks still gives every thread work (W = 0, no channels: any)."""
    cdef Py_ssize_t P = plan_tasks(N * W)
    if unit > 0:
        return unit
    return max(<Py_ssize_t>1, min(COLUMN_BLOCK // max(W, <Py_ssize_t>1), (N + P - 1) // P))


cdef Py_ssize_t plan_shares(Py_ssize_t nb, Py_ssize_t L, Py_ssize_t unit) noexcept nogil:
    """COLUMNS tasks: shares of consecutive blocks, each with its own accumulators (every block
    its own when the unit is forced)."""
    return nb if unit > 0 else min(nb, plan_tasks(L))


cdef Py_ssize_t plan_slices(Py_ssize_t C, Py_ssize_t S, Py_ssize_t L) noexcept nogil:
    """SLICES tasks: slices of the channels (at least 16 channels a slice when S = 1)."""
    return max(<Py_ssize_t>1, min(plan_tasks(L), C // 16 if S == 1 else C))


cdef Py_ssize_t plan_eval_stats(Py_ssize_t C) noexcept nogil:
    """Tasks for C channels' eval_stats: a square root and a division each, 15 us for 16384 channels on
    one thread here, so from 2 * EVAL_STATS_SHARE channels on they are shared (7-8 us on two)."""
    return max(<Py_ssize_t>1, min(PLAN_WIDTH, C // EVAL_STATS_SHARE))


cdef Py_ssize_t piece_elements(Py_ssize_t itemsize) noexcept nogil:
    """Elements of ``itemsize`` bytes in a piece of a backwards walk (PIECE_BYTES)."""
    return PIECE_BYTES // itemsize


# The group, layer and instance norm kernels (_norm_kernels.pyx) stream their output above
# NORM_STREAM_RATIO x the L3.  It was 0.5 (16 MiB on the Zen 4 VM's 32 MiB L3), from a measurement
# when those kernels were slower; with today's kernels (2026-12-07, kernel level, 2 threads,
# float32, min of 15 interleaved rounds, stream off / on) GroupNorm(32) on (N, 256, 28, 28):
# backward N = 8 (18 MiB touched) 0.279 / 0.316 ms, N = 10 (23 MiB) 0.383 / 0.405, N = 12 (28 MiB)
# 0.532 / 0.498, N = 16 (37 MiB) 0.85 / 0.74; forward N = 12 (18 MiB) 0.385 / 0.479, N = 16
# (25 MiB) 0.60 / 0.63, N = 24 (37 MiB) 1.06 / 1.02; InstanceNorm's backward on (16, 64, 64, 64)
# (48 MiB) 1.31 / 0.96.  The crossover sits at batch norm's STREAM_L3_RATIO.
NORM_STREAM_RATIO = 0.75
cdef double norm_share = NORM_STREAM_RATIO / STREAM_L3_RATIO


cdef Py_ssize_t norm_stream_bytes() noexcept nogil:
    """Bytes touched by a norm call above which it streams its output (NORM_STREAM_RATIO)."""
    return <Py_ssize_t>(<double>STREAM_BYTES * norm_share)


def norm_stream_threshold():
    """norm_stream_bytes(), for `fastbn info` and the tests (it follows thresholds()'s stream_bytes)."""
    return norm_stream_bytes()
