"""``fastbn bench --pipeline``: fastbn inside a NumPy training loop, next to other work on the cores.

The work under test, one *step*, is a layer's training forward and backward on float32 input:
``y = bn(x); dx = bn.backward(dy)`` (BatchNorm1d for 2-D shapes, BatchNorm2d for 4-D, dy fixed),
and where torch is installed ``y = bn(t); y.backward(g)`` with ``torch.nn.BatchNorm1d/2d`` in the
same positions.  Every step time is quoted as a multiple of the same step's **idle 1-thread**
median: the step alone in a loop, on one thread, with nothing else running in this process.

Scenarios (at ``threads`` threads, fastbn's or torch's):

``matmul``      each iteration runs ``A @ A`` (A 256x256 float32, NumPy's BLAS on its own default
                threads), timed, then the step, timed.  Reported: the step's median and p90 over
                idle 1-thread, and the matmul's median over its median in a *control* loop where
                the step is replaced by three ``np.copyto(buf, x)`` (single-threaded NumPy moving
                comparable memory): how much the step slows the matmul down beyond what any memory
                traffic between two matmuls would (not the matmul alone: that one runs in cache).
``neighbours``  the matmul loop while two busy neighbour processes (pure-Python spin loops) hold
                cores; its matmul ratio is against a control loop run with the neighbours busy too.
``threads``     two Python threads, each with its own layer and input, loop the step at once
                (released together by a barrier); their step times are pooled.

Why these: an OpenMP team is only as fast as its slowest thread, so when the cores it wants are
held (BLAS threads that spin after a matmul, other processes, another team) each parallel region
can wait for a scheduler time slice.  Targets (fastbn rows; the issue set them for 2 threads):
matmul: median <= 1.3x idle, p90 <= 2x idle, matmul <= 1.3x control; neighbours: median <= 1.3x
idle.  The threads scenario and torch are reported without targets.

Loops are sized by ``repeat``: at least ``repeat`` timed steps and ``repeat`` x 25 ms each, split
over ``ROUNDS`` interleaved rounds (every loop of a group once per round, so the control runs next
to the loops it controls), after warm-up iterations.  Only numpy is imported here at module
level; torch comes through :func:`fastbn.bench.impls.import_torch`.
"""
import argparse
import math
import statistics
import subprocess
import sys
import threading
import time
from collections import namedtuple

import numpy as np

import fastbn

from . import native, report
from .impls import thread_count
from .timing import Contention, settle

SHAPES = [(450, 100), (32, 16, 8, 8), (32, 64, 28, 28), (64, 64, 56, 56)]
SCENARIOS = ("matmul", "neighbours", "threads")
MATMUL_N = 256
NEIGHBOURS = 2
DEFAULT_REPEAT = 20
SECONDS_PER_REPEAT = 0.025  # each loop times at least `repeat` steps and `repeat` * this many seconds
ROUNDS = 2                  # interleaved rounds per group of loops
WARMUP = 3                  # untimed iterations before a loop's first round (1 before the later ones)
TARGETS = {"matmul": {"median": 1.3, "p90": 2.0, "matmul": 1.3}, "neighbours": {"median": 1.3}, "threads": {}}
TARGET_NAMES = {"median": "median <= {:g}x idle", "p90": "p90 <= {:g}x idle", "matmul": "matmul <= {:g}x control"}

Budget = namedtuple("Budget", "steps seconds")
Timed = namedtuple("Timed", "matmul step")  # lists of seconds, one entry per timed iteration


def make_step(impl, x, dy, torch=None):
    """One training forward + backward of a new ``impl`` ("fastbn" or "torch") layer on x."""
    if impl == "fastbn":
        bn = (fastbn.BatchNorm1d if x.ndim == 2 else fastbn.BatchNorm2d)(x.shape[1])

        def step():
            bn(x)
            bn.backward(dy)
        return step
    if impl == "floor":
        return _floor_step(x, dy)
    if impl != "torch" or torch is None:
        raise ValueError(f"impl must be 'fastbn', 'floor' or 'torch' (with torch given), got {impl!r}")
    bn = (torch.nn.BatchNorm1d if x.ndim == 2 else torch.nn.BatchNorm2d)(x.shape[1])
    t, g = torch.from_numpy(x).requires_grad_(), torch.from_numpy(dy)

    def torch_step():
        t.grad = None
        bn(t).backward(g)
    return torch_step


def _floor_step(x, dy):
    """The floor of a step: the least memory traffic of a training forward and a backward
    (fastbn.bench.native.traffic, as ``fastbn bench``'s floor), on fastbn's threads and pool, with no
    arithmetic and no per-call overhead.  A target it misses too is out of reach."""
    xf, gf = x.reshape(-1), dy.reshape(-1)
    yf, df = np.empty_like(xf), np.empty_like(xf)

    def floor_step():
        n = fastbn.get_num_threads()
        native.traffic(xf, None, None, n)          # forward: the statistics read x
        native.traffic(xf, None, yf, n, -1, True)  # and the apply reads x, writes y (back to front)
        native.traffic(xf, gf, None, n)            # backward: the sums read dy and x
        native.traffic(xf, gf, df, n, -1, True)    # and the apply reads them again, writes dx
    return floor_step


def _set_threads(impl, n, torch):
    if impl in ("fastbn", "floor"):
        fastbn.set_num_threads(n)
    elif impl == "torch":
        torch.set_num_threads(n)


def loop(impl, n, step, matmul=None, torch=None):
    """A loop for :func:`interleave`: on ``n`` threads of ``impl`` (None: the control, plain
    NumPy), run (matmul, then) step until the budget is spent; Timed, each timed apart."""
    before = matmul or (lambda: None)

    def run(budget, warmup):
        _set_threads(impl, n, torch)
        for _ in range(warmup):
            before()
            step()
        timed, perf = Timed([], []), time.perf_counter
        start = perf()
        while len(timed.step) < budget.steps or perf() - start < budget.seconds:
            t0 = perf()
            before()
            t1 = perf()
            step()
            timed.step.append(perf() - t1)
            timed.matmul.append(t1 - t0)
        return Timed(timed.matmul if matmul else [], timed.step)
    return run


def two_threads(impl, n, inputs, torch=None):
    """A loop for :func:`interleave`: Python threads, one per (x, dy) of ``inputs``, each with its
    own layer, warm up, meet at a barrier, then step until their budget is spent or another one
    finished; their step times pooled."""
    steps = [make_step(impl, x, dy, torch) for x, dy in inputs]

    def run(budget, warmup):
        barrier, done = threading.Barrier(len(steps)), threading.Event()
        times, errors = [[] for _ in steps], []

        def work(step, out):
            try:
                _set_threads(impl, n, torch)  # OpenMP thread counts are per calling thread
                for _ in range(warmup):
                    step()
                barrier.wait()
                perf, start = time.perf_counter, time.perf_counter()
                while not done.is_set() and (len(out) < budget.steps or perf() - start < budget.seconds):
                    t0 = perf()
                    step()
                    out.append(perf() - t0)
            except BaseException as exc:  # re-raised in the caller's thread
                errors.append(exc)
                barrier.abort()
            finally:
                done.set()
        workers = [threading.Thread(target=work, args=a, name="fastbn-pipeline") for a in zip(steps, times)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        if errors:
            raise errors[0]
        return Timed([], [t for ts in times for t in ts])
    return run


def interleave(loops, budget, rounds=ROUNDS):
    """{key: Timed}: every loop of the dict once per round, each round a share of ``budget``; before
    each, the previous loop's threads settle (its library's spinning workers belong to that loop,
    not to the next one's first steps)."""
    part = Budget(max(1, math.ceil(budget.steps / rounds)), budget.seconds / rounds)
    out = {key: Timed([], []) for key in loops}
    for r in range(rounds):
        for key, run in loops.items():
            settle()
            timed = run(part, WARMUP if r == 0 else 1)
            out[key].matmul.extend(timed.matmul)
            out[key].step.extend(timed.step)
    return out


_SPIN = """import os, sys, time
parent, end = os.getppid(), time.monotonic() + float(sys.argv[1])
print("ready", flush=True)
while time.monotonic() < end and os.getppid() == parent:
    pass
"""


class Neighbours:
    """``count`` busy neighbour processes inside the block: pure-Python spin loops, each in its
    own interpreter (standard library only).  ``__exit__`` terminates and reaps them (``procs``:
    their subprocess.Popen objects, for a look afterwards); should it never run, a spinner ends
    itself once this process is gone (it polls its parent) or after ``deadline_s``."""

    def __init__(self, count=NEIGHBOURS, deadline_s=3600.0):
        self.count, self.deadline_s, self.procs = count, deadline_s, []

    def __enter__(self):
        try:
            for _ in range(self.count):
                self.procs.append(subprocess.Popen([sys.executable, "-S", "-c", _SPIN, str(self.deadline_s)],
                                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE))
            for p in self.procs:  # every spinner is spinning before the first timed step
                line = p.stdout.readline()
                if line != b"ready\n":
                    raise RuntimeError(f"a neighbour process did not start: it said {line!r}, exit code {p.poll()}")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            p.stdout.close()
        return False


def evaluate_targets(row):
    """[{"name", "limit", "value", "met"}] for the targets of the row's scenario; torch has none."""
    if row["impl"] != "fastbn":
        return []
    values = {"median": row["x_idle"], "p90": row["p90_x_idle"], "matmul": row["matmul_x_control"]}
    return [{"name": TARGET_NAMES[what].format(limit), "limit": limit, "value": values[what],
             "met": bool(values[what] <= limit)}
            for what, limit in TARGETS[row["scenario"]].items() if values[what] is not None]


def judge_against_floor(row, floor_row):
    """Mark each target of a fastbn row that its floor row (same scenario and shape) misses too as
    out of reach: no implementation moving the step's memory on these threads meets it.  The matmul
    target too: the floor's matmul is timed next to the same control, in the same rounds, so a
    control that ran in a quiet spell (its median is the divisor of both) fails them alike."""
    values = {"median": floor_row["x_idle"], "p90": floor_row["p90_x_idle"], "matmul": floor_row["matmul_x_control"]}
    for target, what in zip(row["targets"], [w for w in TARGETS[row["scenario"]] if _value(row, w) is not None]):
        if values.get(what) is not None:
            target["floor"] = values[what]
            target["reachable"] = bool(values[what] <= target["limit"])


def _value(row, what):
    return {"median": row["x_idle"], "p90": row["p90_x_idle"], "matmul": row["matmul_x_control"]}[what]


def fmt_targets(row):
    """"ok", "MISS name (value[; floor F: out of reach]); ...", or "-" for a row without targets."""
    missed = [f"{t['name']} ({t['value']:.3g}" + (f"; floor {t['floor']:.3g}: out of reach)"
                                                  if t.get("reachable") is False else ")")
              for t in row["targets"] if not t["met"]]
    return "-" if not row["targets"] else "MISS " + "; ".join(missed) if missed else "ok"


def targets_met(rows):
    """(met, checked) over all rows."""
    return sum(t["met"] for r in rows for t in r["targets"]), sum(len(r["targets"]) for r in rows)


def out_of_reach(rows):
    """How many missed targets the floor misses too."""
    return sum(not t["met"] and t.get("reachable") is False for r in rows for t in r["targets"])


def make_row(scenario, shape, impl, threads, idle, timed, control=None):
    """A report row from the idle 1-thread step times, the scenario's Timed and its control's."""
    median, p90 = statistics.median(timed.step), float(np.percentile(timed.step, 90))
    idle_median = statistics.median(idle)
    row = {"scenario": scenario, "shape": list(shape), "dtype": "float32", "impl": impl, "threads": threads,
           "steps": len(timed.step), "idle1_median_s": idle_median, "median_s": median, "p90_s": p90,
           "x_idle": median / idle_median, "p90_x_idle": p90 / idle_median,
           "matmul_median_s": None, "control_matmul_median_s": None, "matmul_x_control": None}
    if timed.matmul and control is not None and control.matmul:
        row["matmul_median_s"] = statistics.median(timed.matmul)
        row["control_matmul_median_s"] = statistics.median(control.matmul)
        row["matmul_x_control"] = row["matmul_median_s"] / row["control_matmul_median_s"]
    row["targets"] = evaluate_targets(row)
    return row


def run_pipeline(shapes=SHAPES, threads=None, repeat=DEFAULT_REPEAT, torch=None, log=None):
    """(rows, info): every scenario for each shape, fastbn (and torch, when given); progress to
    ``log`` (default stderr)."""
    log, budget = log or sys.stderr, Budget(repeat, repeat * SECONDS_PER_REPEAT)
    impls = ["fastbn", "floor"] + (["torch"] if torch is not None else [])
    rng = np.random.default_rng(0)
    A = rng.standard_normal((MATMUL_N, MATMUL_N), dtype=np.float32)

    def matmul():
        return A @ A
    rows, busy = [], []
    with thread_count(threads or fastbn.get_num_threads(), torch):
        n = fastbn.get_num_threads()  # 1 on a build without OpenMP
        info = dict(report.machine_info(torch, n), blas=blas_threads())
        for i, shape in enumerate(shapes, 1):
            def group(what, loops, neighbours=0):
                print(f"[pipeline {i}/{len(shapes)}] {shape} float32: {what}", file=log, flush=True)
                with Neighbours(neighbours), Contention() as contention:
                    timed = interleave(loops, budget)
                if not neighbours:  # our own neighbours are not "other processes"
                    busy.append(contention.cores)
                return timed
            x, dy = rng.standard_normal(shape, dtype=np.float32), rng.standard_normal(shape, dtype=np.float32)
            buf = np.empty_like(x)

            def control():
                for _ in range(3):
                    np.copyto(buf, x)
            steps = {impl: make_step(impl, x, dy, torch) for impl in impls}
            loops = {("idle", impl): loop(impl, 1, steps[impl], torch=torch) for impl in impls}
            loops["control"] = loop(None, n, control, matmul)
            loops.update({impl: loop(impl, n, steps[impl], matmul, torch) for impl in impls})
            timed = group("idle and matmul loops", loops)
            idle = {impl: timed[("idle", impl)].step for impl in impls}
            rows += [make_row("matmul", shape, impl, n, idle[impl], timed[impl], timed["control"]) for impl in impls]
            loops = {key: loops[key] for key in ["control"] + impls}  # the same loops, neighbours busy
            timed = group(f"matmul loops, {NEIGHBOURS} busy neighbours", loops, NEIGHBOURS)
            rows += [make_row("neighbours", shape, impl, n, idle[impl], timed[impl], timed["control"]) for impl in impls]
            inputs = [(x.copy(), dy.copy()) for _ in range(2)]  # each thread its own
            timed = group("two Python threads", {impl: two_threads(impl, n, inputs, torch) for impl in impls})
            rows += [make_row("threads", shape, impl, n, idle[impl], timed[impl]) for impl in impls]
            for row in rows[-3 * len(impls):]:
                if row["impl"] == "fastbn":
                    judge_against_floor(row, next(r for r in rows if r["impl"] == "floor"
                                                  and r["scenario"] == row["scenario"] and r["shape"] == row["shape"]))
            steps = loops = timed = x = dy = buf = inputs = None  # free this shape's arrays before the next
    known = [b for b in busy if b is not None]
    info["other_processes_busy_cores"] = max(known) if known else None
    return rows, info


def blas_threads():
    """["openblas (libscipy_openblas) 2 threads", ...]: the BLAS libraries loaded, or None without
    threadpoolctl.  NumPy's is the one the matmul uses; torch brings its own."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    return [f"{p['internal_api']} ({p['prefix']}) {p['num_threads']} threads"
            for p in threadpool_info() if p["user_api"] == "blas"]


LEGEND = """\
idle 1-thr  the step (forward + backward) alone in a loop on 1 thread: the median
median      the step's median in the scenario; x idle: over idle 1-thr; p90 x idle: its 90th percentile over idle 1-thr
matmul/ctl  NumPy's A @ A median next to the step / its median next to 3 np.copyto(buf, x) (same scenario)
scenarios   matmul: A @ A (256x256 float32, NumPy's BLAS threads) then the step; neighbours: the same with
            2 busy processes; threads: two Python threads looping the step at once (1.0x: each had a core)
floor       the step's least memory traffic (fastbn bench's floor: 4 passes, no arithmetic) on fastbn's
            threads, in the same positions; a target the floor misses too is out of reach
targets     fastbn, matmul: median <= 1.3, p90 <= 2, matmul <= 1.3x control; neighbours: median <= 1.3
            (set for 2 threads); floor, torch and the threads scenario: reported only"""


def print_report(rows, info, out=None):
    """The machine, one table line per row, the legend, a warning on a busy machine, the target count."""
    out = out or sys.stdout
    others = info["other_processes_busy_cores"]
    print(f"fastbn {info['fastbn']} | numpy {info['numpy']} | torch {info['torch'] or 'not installed'} | "
          f"{info['cpu']}, {info['cores']} cores | {info['threads']} threads | BLAS: "
          + (", ".join(info["blas"]) if info.get("blas") else "unknown (no threadpoolctl)")
          + (f" | other processes used {others:.2f} cores" if others is not None else ""), file=out)
    header = ("scenario", "shape", "impl", "idle 1-thr", "median", "x idle", "p90 x idle", "matmul/ctl", "steps",
              "targets")
    table = [header] + [(r["scenario"], str(tuple(r["shape"])), r["impl"], report._fmt_time(r["idle1_median_s"]),
                         report._fmt_time(r["median_s"]), f"{r['x_idle']:.2f}x", f"{r['p90_x_idle']:.2f}x",
                         report._fmt_ratio(r["matmul_x_control"]), str(r["steps"]), fmt_targets(r)) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header) - 1)]
    for line in table:
        cells = [c.rjust(w) if i >= 3 else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))]
        print("  ".join(cells + [line[-1]]).rstrip(), file=out)
    print("\n" + LEGEND, file=out)
    if others is not None and others > 0.2:
        print(f"WARNING: other processes kept {others:.2f} of the {info['cores']} cores busy outside the neighbours "
              "scenario: the idle yardstick and every scenario shared the cores with them; rerun on a quiet machine.",
              file=out)
    unreachable = out_of_reach(rows)
    print("targets met: {}/{}".format(*targets_met(rows))
          + (f"; {unreachable} of the misses out of reach (the floor misses them too)" if unreachable else ""),
          file=out)


def parse_shape(text):
    """'32x16x8x8' -> (32, 16, 8, 8): a 2-D or 4-D shape, more than one value per channel."""
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) not in (2, 4) or min(shape) < 1 or math.prod(shape) // shape[1] < 2:
        raise argparse.ArgumentTypeError(f"expected a 2-D or 4-D shape like 450x100 or 32x16x8x8, with more than "
                                         f"one value per channel (training mode), got {text!r}")
    return shape
