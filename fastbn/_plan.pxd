# fastbn/_plan.pxd -- the contract of the work-split planner (_plan.pyx), cimported by the
# kernels (_kernels.pyx) and the benchmark's floor (_floor.pyx).
#
# A call is cut into tasks by its shape alone, never by the thread count, so results are the same
# on 1 thread or 16 (see PLAN_WIDTH in _plan.pyx).  The planner owns the knobs that tests and
# fastbn._machine set at run time (the plan width, the byte thresholds, the elements a thread at
# least), so they exist once per process, not once per extension that plans; the functions that
# read them are exported here (one call through a pointer each, a few per kernel call), the pure
# index arithmetic is inline.

cdef enum:  # how a call is cut (see the docstring of _kernels.pyx); PATHS maps names to these
    AUTO = 0
    RANGES = 1
    COLUMNS = 2
    SLICES = 3

cdef enum:
    # Below this many elements a task, the task's bookkeeping starts to show.
    MIN_TASK = 16384
    # Below this many elements a thread, another thread costs more than it saves: waking a helper
    # costs the caller a system call, and a helper that then loses its core to another process
    # holds up the call until it gets one back.  (450, 100) forward + backward right after a
    # matmul, whose BLAS threads still spin, took 3.8x its 1-thread time on 2 threads.
    MIN_PER_THREAD = 131072
    # Spatial sizes below this take the COLUMNS path (rows that short would each cost a call) ...
    SMALL_S = 32
    # ... as blocks of rows (COLUMNS), unless the matrix is wider than this many columns (per-task
    # accumulators get large) or more than SLICE_RATIO times as wide as it is tall: then in SLICES.
    # Measured at kernel level on 2 threads, float32 (N, W), blocks of rows -> SLICES: (8, 16384)
    # train forward 180 -> 51 us, eval 55 -> 20, backward 159 -> 58; (32, 4096) 64 -> 36, 27 -> 20,
    # 65 -> 39; at W = 32 N about even; below it SLICES loses, most in eval, e.g. (64, 1024) eval
    # 9 -> 19 us, (128, 1024) 13 -> 40 (two threads writing the two halves of every 4 KiB row).
    MAX_COLUMNS = 1 << 16
    SLICE_RATIO = 32
    # Channels per task, at least, for eval_stats' square roots to be shared between threads.
    EVAL_STATS_SHARE = 4096
    # Elements per COLUMNS row block (~512 KiB of float32: still in L2 for the first block's
    # second pass; larger blocks mean fewer merges).  Fixed, not derived from the detected L2: the
    # blocks decide where partial sums are cut and merged, so a size that followed the machine
    # would give results that differ in the last bits from one machine to the next.
    COLUMN_BLOCK = 131072
    # Channels per task of a merge of the tasks' partials; merges of fewer than MERGE_ALONE
    # partials in all run on the calling thread.
    MERGE_CHANNELS = 256
    MERGE_ALONE = 8192

# The most tasks a call is cut into, whatever the thread count: the tasks (not the threads) fix
# where partial sums are cut and merged, so results are the same on 1 thread or 16.  At least 16
# (8 per core on 2 cores: a helper that comes late still finds work), more on machines with more
    # A SLICES task's chunk of columns (whole channels); spatial sizes up to this take SLICES.
    SLICE_CHUNK = 1024
    # COLUMNS rows of at most this many bytes stream their stores by size, as RANGES does (see
    # plan_stream): a channels-last (N*H*W, C) matrix of 64 float32 channels.
    NARROW_ROW_BYTES = 1024


# ---- what reads the knobs
cdef int plan_threads(int n_threads, Py_ssize_t total) noexcept nogil
cdef Py_ssize_t plan_tasks(Py_ssize_t total) noexcept nogil
cdef int plan_stream(Py_ssize_t touched_bytes, int stream, int how, Py_ssize_t row_bytes) noexcept nogil
cdef Py_ssize_t plan_ranges(Py_ssize_t L, Py_ssize_t unit) noexcept nogil
cdef Py_ssize_t plan_rows(Py_ssize_t N, Py_ssize_t W, Py_ssize_t unit) noexcept nogil
cdef Py_ssize_t plan_shares(Py_ssize_t nb, Py_ssize_t L, Py_ssize_t unit) noexcept nogil
cdef Py_ssize_t plan_slices(Py_ssize_t C, Py_ssize_t S, Py_ssize_t L) noexcept nogil
cdef Py_ssize_t plan_eval_stats(Py_ssize_t C) noexcept nogil
cdef Py_ssize_t piece_elements(Py_ssize_t itemsize) noexcept nogil
cdef Py_ssize_t norm_stream_bytes() noexcept nogil


# ---- pure index arithmetic
cdef inline int plan_path(Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, int path) noexcept nogil:
    """The path of an (N, C, S) call: ``path`` when forced, else by the shape (SMALL_S, MAX_COLUMNS,
    SLICE_RATIO)."""
    if path == SLICES and S > SLICE_CHUNK:  # a channel must fit a SLICES chunk (only when forced)
        return COLUMNS
    if path != AUTO:
        return path
    if S >= SMALL_S:
        return RANGES
    if C * S > MAX_COLUMNS or C * S > SLICE_RATIO * N:
        return SLICES
    return COLUMNS


cdef inline Py_ssize_t range_start(Py_ssize_t L, Py_ssize_t K, Py_ssize_t k) noexcept nogil:
    """Start of range k of K over L elements: equal shares, inner boundaries on multiples of 16
    elements (64 bytes of float32), so that neighbouring tasks do not write the same line."""
    if k >= K:
        return L
    return min(L, ((L * k) // K + 15) & ~(<Py_ssize_t>15))


cdef inline Py_ssize_t share_start(Py_ssize_t n, Py_ssize_t K, Py_ssize_t k) noexcept nogil:
    """Start of share k of n COLUMNS blocks over K tasks: n / K blocks each, the first n % K one more."""
    return k * (n // K) + min(k, n % K)


cdef inline Py_ssize_t slice_start(Py_ssize_t C, Py_ssize_t S, Py_ssize_t T, Py_ssize_t k) noexcept nogil:
    """First channel of SLICES task k's share of the C channels (T tasks): equal shares; with S = 1,
    inner boundaries on multiples of 16 channels (64 bytes of float32), so that neighbouring tasks
    share at most one cache line per row (none where rows start on a line).  Channels of S > 1
    columns are split evenly as they are: rounding there cost balance ((34, 31) went 32 / 2)."""
    if k >= T:
        return C
    if S > 1:
        return (C * k) // T
    return min(C, ((C * k) // T + 15) & ~(<Py_ssize_t>15))


cdef inline Py_ssize_t slice_rows(Py_ssize_t ncols, Py_ssize_t unit) noexcept nogil:
    """Rows per block of a SLICES task's ncols columns: COLUMN_BLOCK elements, at least 8 rows."""
    return unit if unit > 0 else max(<Py_ssize_t>8, COLUMN_BLOCK // max(ncols, <Py_ssize_t>1))


cdef inline Py_ssize_t piece_start(Py_ssize_t f0, Py_ssize_t e, Py_ssize_t piece) noexcept nogil:
    """Start of the last piece of [f0, e) in a backwards walk: about ``piece`` elements before e, on
    a multiple of 16 elements."""
    return max(f0, (e - piece) & ~(<Py_ssize_t>15))
