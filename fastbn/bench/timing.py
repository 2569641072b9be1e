"""How the bench times calls: interleaved rounds of samples, and what else ran on the machine.

:func:`time_calls` samples every implementation once per round, in a shuffled order, so that all
of them see the same stretch of a shared machine's time; :func:`latency_samples` does the same
with single calls timed one by one, for per-call medians and percentiles; :func:`settle` lets the
previous implementation's threads go quiet before the next one's sample; :class:`Contention`
measures how many cores other processes kept busy meanwhile.
"""
import math
import os
import random
import statistics
import threading
import time
from collections import namedtuple

Timing = namedtuple("Timing", "min median samples rounds")  # rounds: the seconds of each round's sample


def paired_ratio(a, b):
    """b's time over a's (Timings of one :func:`time_calls`): the median of the per-round ratios.

    The two samples of a round lie milliseconds apart, so their ratio cancels the machine's drift
    over seconds, which the ratio of the two medians does not: on this 2-core VM the ReLU backward
    over the plain one (32, 512, 7, 7) read 1.03-1.20 as a ratio of medians in runs whose paired
    ratios stayed within 1.03-1.06."""
    return statistics.median(y / x for x, y in zip(a.rounds, b.rounds))


def calibrate(bench):
    """Seconds of one call, after a warm-up call (lazy initialization, first-touch page faults)."""
    for _ in range(2):
        if bench.setup is not None:
            bench.setup()
        t0 = time.perf_counter()
        bench.run()
        t = time.perf_counter() - t0
    return max(t, 1e-7)


# ---------------------------------------------------------------- hand-over
def _other_threads_cpu():
    """{thread id: CPU seconds} of this process's threads other than the calling one (Linux: the
    kernel's per-thread CPU clocks, exact to the nanosecond even for a thread that is running now;
    /proc's utime and schedstat move in scheduler ticks), or None where that is not available."""
    me = threading.get_native_id()
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return None
    out = {}
    for tid in tids:
        if tid != me:
            try:  # the kernel's CPU clock id of thread `tid`: MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED)
                out[tid] = time.clock_gettime(((~tid) << 3) | 6)
            except (OSError, OverflowError):
                pass  # the thread has ended
    return out


def settle(step_s=5e-4, busy=0.05, max_s=0.2):
    """Wait until no other thread of this process runs: seconds waited (0.0 where that cannot be
    seen, off Linux).

    An OpenMP runtime's threads spin after every parallel region, waiting for the next one: PyTorch's
    libgomp workers here kept a core busy for 7.7 ms after a group_norm call (GOMP_SPINCOUNT's
    default), and onnxruntime's spin too.  A call of another library timed inside that window gets
    one core, not two: fastbn's GroupNorm (8, 256, 28, 28) backward at 2 threads took 0.56-0.63 ms
    right after PyTorch's calls and 0.30-0.32 ms with PyTorch's threads asleep (OMP_WAIT_POLICY=
    passive), as slow as on one thread.  Before each sample the benchmarks wait here, the calling
    thread awake (a busy wait: a sleeping vCPU comes back slower), until every other thread has
    used less than ``busy`` of a ``step_s`` interval, at most ``max_s``.  Each implementation is
    then timed as it runs in a loop of its own calls; its own threads' spinning between those
    calls is its own business."""
    last = _other_threads_cpu()
    if not last:
        return 0.0
    start = now = time.perf_counter()
    while now - start < max_s:
        mark = now
        while now - mark < step_s:
            now = time.perf_counter()
        cpu = _other_threads_cpu()
        if all(cpu[t] - last.get(t, cpu[t]) < busy * (now - mark) for t in cpu):
            break
        last = cpu
    return now - start


def hand_over(fn, warm_s=2e-3):
    """Make ``fn`` the process's running work, as in a loop of its own calls: :func:`settle`, then
    call it for ``warm_s`` seconds (once at least).  After the settle, a fastbn call whose helper
    thread had to wake on an idle core ran 2.4x its steady time, and reached it after 2 ms of
    calls (GroupNorm (8, 256, 28, 28) backward, 2 threads: 0.72, 0.49, 0.37 ... 0.29 ms)."""
    settle()
    end = time.perf_counter() + warm_s
    fn()
    while time.perf_counter() < end:
        fn()


def time_calls(benches, repeats, sample_s=1e-3):
    """Seconds per call of each Bench in ``benches`` (a dict): a Timing (min and median of the
    samples) per key, after a warm-up.

    The samples are taken in rounds, one sample of each bench per round (``repeats[key]`` rounds
    for each), not all of one bench and then all of the next: on a shared machine whose speed
    drifts over seconds, every implementation then samples the same stretch of time, and each
    starts from the cache state the others leave behind, as a call in a real program would,
    rather than from its own warm copy.  Each round takes the benches in a new order (shuffled,
    the same every run), so that no bench always follows the same one: a call right after
    ``x.copy()`` of a 16 MiB array, whose output the allocator had just taken back, measured up to
    1.7x its time elsewhere in the round (fastbn's eval forward of (4096, 1024) float32, which
    always came second).  A sample is one call, or (for calls faster than ``sample_s`` without a
    setup) a loop of calls long enough to time reliably, divided by the count.  Before each sample
    the other threads :func:`settle`: another library's spinning workers would otherwise hold a
    core the sampled one needs.
    """
    number = {}
    for key, bench in benches.items():
        first = calibrate(bench)
        number[key] = 1 if bench.setup is not None else max(1, math.ceil(sample_s / first))
    samples = {key: [] for key in benches}
    order, shuffle = list(benches), random.Random(0).shuffle
    for i in range(max(repeats.values())):
        if i:
            shuffle(order)
        for key in order:
            bench = benches[key]
            if i >= repeats[key]:
                continue
            if bench.setup is not None:
                bench.setup()
            settle()
            t0 = time.perf_counter()
            for _ in range(number[key]):
                bench.run()
            samples[key].append((time.perf_counter() - t0) / number[key])
    return {key: Timing(min(v), statistics.median(v), len(v), tuple(v)) for key, v in samples.items()}


# ---------------------------------------------------------------- contention
def busy_cpu_seconds():
    """CPU seconds the whole machine has spent busy since boot (from /proc/stat), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class Contention:
    """Measures how many cores *other* processes kept busy while the block ran (None off Linux).

    An OpenMP team is only as fast as its slowest thread: when another process holds a core the
    team needs, every parallel region can wait a whole scheduler time slice (milliseconds), and
    then even the minimum of many repeats is wrong.
    """

    def __enter__(self):
        self.busy, self.cpu, self.wall = busy_cpu_seconds(), time.process_time(), time.perf_counter()
        self.cores = None
        return self

    def __exit__(self, *exc):
        busy = busy_cpu_seconds()
        if busy is not None and self.busy is not None:
            ours = time.process_time() - self.cpu  # all of this process's threads
            self.cores = max(0.0, (busy - self.busy - ours) / (time.perf_counter() - self.wall))
        return False


def print_footer(info, targets, what, out, digits=2):
    """The end of a side report (--channels-last, --half, --relu): a warning where other processes
    held more than a quarter of a core (info["contention_cores"]), then the targets, each met or
    MISSED with its ratio, under the heading ``targets (medians; <what>):``."""
    cores = info.get("contention_cores")
    if cores is not None and cores > 0.25:
        print(f"WARNING: other processes kept {cores:.2f} cores busy during the run: rerun on a quiet machine.", file=out)
    if targets:
        print(f"targets (medians; {what}):", file=out)
        for t in targets:
            print(f"  {'met   ' if t['met'] else 'MISSED'}  {t['what']}  ({t['value']:.{digits}f}x)", file=out)
        print(f"targets met: {sum(t['met'] for t in targets)}/{len(targets)}", file=out)




# ---------------------------------------------------------------- single calls
def latency_samples(calls, rounds, per_round, warmup=3):
    """{key: [seconds of one call, ...]}: ``rounds`` x ``per_round`` single calls of each function
    in ``calls`` (a dict), each timed on its own (perf_counter_ns around the call, so the timer's
    own ~0.1 us is in every sample: time an empty function beside them to see it).

    Rounds interleave the functions as :func:`time_calls` does (a new seeded shuffle each round);
    in a round the other threads first :func:`settle` (another library's threads still spinning),
    then each function runs ``warmup`` times untimed, so that its timed calls are the steady state
    of back-to-back calls (its data in cache, its threads awake)."""
    perf = time.perf_counter_ns
    order, shuffle = list(calls), random.Random(0).shuffle
    samples = {key: [] for key in calls}
    for i in range(rounds):
        if i:
            shuffle(order)
        for key in order:
            fn, out = calls[key], samples[key]
            settle()
            for _ in range(warmup):
                fn()
            for _ in range(per_round):
                t0 = perf()
                fn()
                out.append(perf() - t0)
    return {key: [t * 1e-9 for t in ts] for key, ts in samples.items()}
