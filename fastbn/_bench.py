"""``python -m fastbn bench``: fastbn's kernels timed against a memory copy, naive NumPy and PyTorch.

Batch norm is memory-bound, so every time is quoted as a multiple of a plain copy of the same
array measured in the same run (``x.copy()`` for calls that allocate their output,
``np.copyto(out, x)`` for ``out=`` calls), next to a naive NumPy implementation, PyTorch's
CPU batch norm and the floor (the least memory traffic of the operation) at the same thread
count, sampled in interleaved rounds (see :func:`time_calls`).  The building blocks
(:class:`Problem`, :func:`make_bench`, :func:`check`, :func:`thread_count`) are shared with the
pytest-benchmark suite in ``bench/``.

Nothing heavy is imported here at module level: ``python -m fastbn`` imports this module for
every subcommand, torch only loads when a benchmark runs, matplotlib only for ``--plot``.
"""
import argparse
import contextlib
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections import namedtuple

import numpy as np

import fastbn

from . import _openmp
from ._floor import traffic

# ---------------------------------------------------------------- what is measured
Op = namedtuple("Op", "title bytes_moved copy")
OPS = {
    # bytes_moved: multiples of x.nbytes that must cross the memory bus at the very least
    # copy: the yardstick, "copy" = x.copy() (allocate + copy), "copyto" = np.copyto(out, x)
    "train": Op("train forward", 2, "copy"),        # read x, write y
    "eval": Op("eval forward", 2, "copy"),          # read x, write y
    "eval_out": Op("eval forward out=", 2, "copyto"),  # read x, write into out
    "backward": Op("backward", 3, "copy"),          # read dy and x, write dx
}
# fastbn_out: the same fastbn call with out= (one buffer reused every call), beside the allocating one
IMPLS = ("copy", "fastbn", "fastbn_out", "floor", "torch", "numpy")  # sampled once each per round, in a shuffled order

TINY = (2, 16, 4, 4)
QUICK_CASES = [((64, 64, 56, 56), "float32"), ((4096, 1024), "float32"), (TINY, "float32")]
FULL_CASES = [((64, 64, 56, 56), "float32"), ((256, 256, 14, 14), "float32"), ((32, 3, 224, 224), "float32"),
              ((4096, 1024), "float32"), ((64, 64, 56, 56), "float64"), (TINY, "float32")]

# Targets the project holds itself to.  Memory-bound shapes: fastbn time / copy time at most
# `copy`, at least `torch`x / `numpy`x faster.  Tiny shapes measure per-call overhead instead:
# fastbn's layer must be no slower than torch.nn.BatchNorm*d.
# `out`: the allocating call at most this many times the same call with out= (fastbn_out).
TARGETS = {
    "train": {"copy": 1.6, "torch": 3.0, "numpy": 5.0, "out": 1.1},
    "eval": {"copy": 1.15, "torch": 2.0, "out": 1.1},
    "eval_out": {"copy": 1.1},
    "backward": {"copy": 2.4, "torch": 1.7, "out": 1.1},
}
TINY_TARGETS = {"train": {"torch": 1.0}, "eval": {"torch": 1.0}}
# Thread scaling: the training forward of SCALING_CASE through the layer, 2 threads at least this
# many times faster than 1 (measured with --full).
SCALING_CASE = ((64, 64, 56, 56), "float32")
SCALING_TARGET = 1.5


def is_tiny(shape):
    """Shapes so small that the call overhead, not memory traffic, is what gets measured."""
    return math.prod(shape) <= 4096


def import_torch():
    """The torch module, or None when it is not installed (or does not load)."""
    try:
        import torch
    except (ImportError, OSError):
        return None
    return torch


@contextlib.contextmanager
def thread_count(n, torch=None):
    """Run fastbn (and torch, when given) on ``n`` threads inside the block; restore afterwards.

    A build without OpenMP runs on one thread, and then so does torch (same thread count).
    """
    if not _openmp.OPENMP:
        n = 1
    old = fastbn.get_num_threads()
    old_torch = torch.get_num_threads() if torch is not None else None
    fastbn.set_num_threads(n)
    if torch is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        fastbn.set_num_threads(old)
        if torch is not None:
            torch.set_num_threads(old_torch)


# ---------------------------------------------------------------- inputs
class Problem:
    """One benchmark input: x, dy and random per-channel parameters and running buffers."""

    momentum = 0.1
    eps = 1e-5

    def __init__(self, shape, dtype, rng):
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self._rng = rng
        C = self.shape[1]
        self.x = rng.standard_normal(self.shape, dtype=self.dtype)
        self.x *= 2
        self.x += 0.5
        self.weight = rng.uniform(0.5, 1.5, C).astype(self.dtype)
        self.bias = rng.standard_normal(C).astype(self.dtype)
        self.running_mean = (rng.standard_normal(C) * 0.5).astype(self.dtype)
        self.running_var = rng.uniform(0.5, 2.0, C).astype(self.dtype)
        self._dy = None

    @property
    def dy(self):
        """The incoming gradient (made on first use: only backward needs it)."""
        if self._dy is None:
            self._dy = self._rng.standard_normal(self.shape, dtype=self.dtype)
        return self._dy

    @property
    def nbytes(self):
        return self.x.nbytes

    def label(self):
        return f"{self.shape} {self.dtype.name}"


def _bcast(x):
    """Shape that broadcasts a (C,) vector over axis 1 of x."""
    return (1, -1) + (1,) * (x.ndim - 2)


def _axes(x):
    return (0,) + tuple(range(2, x.ndim))


# ---------------------------------------------------------------- the implementations
# make_bench(op, impl, problem) returns a Bench: `run` is the timed call (it returns the output,
# for backward (dx, grad_weight, grad_bias)); `setup`, when not None, runs untimed before each
# call.  Each Bench gets its own copies of the parameters and buffers.
Bench = namedtuple("Bench", "run setup", defaults=(None,))


def _naive_train(x, w, b, running_mean, running_var, momentum, eps):
    """Textbook NumPy: batch mean and variance, normalize, affine, update the running buffers."""
    axes, sh = _axes(x), _bcast(x)
    mean = x.mean(axis=axes)
    var = x.var(axis=axes)
    y = (x - mean.reshape(sh)) / np.sqrt(var.reshape(sh) + eps) * w.reshape(sh) + b.reshape(sh)
    n = x.size // x.shape[1]
    running_mean[...] = (1 - momentum) * running_mean + momentum * mean
    running_var[...] = (1 - momentum) * running_var + momentum * var * (n / (n - 1))
    return y


def _naive_eval(x, w, b, running_mean, running_var, eps, out=None):
    sh = _bcast(x)
    if out is None:
        return (x - running_mean.reshape(sh)) / np.sqrt(running_var.reshape(sh) + eps) * w.reshape(sh) + b.reshape(sh)
    np.subtract(x, running_mean.reshape(sh), out=out)
    np.multiply(out, (w / np.sqrt(running_var + eps)).reshape(sh), out=out)
    np.add(out, b.reshape(sh), out=out)
    return out


def _naive_stats(x, eps):
    """The batch mean and 1/sqrt(var + eps) a training forward saves for the backward."""
    mean = x.mean(axis=_axes(x))
    return mean, 1 / np.sqrt(x.var(axis=_axes(x)) + eps)


def _naive_backward(dy, x, w, mean, invstd):
    """Textbook NumPy backward of training-mode batch norm from the saved mean and invstd."""
    axes, sh = _axes(x), _bcast(x)
    m = x.size // x.shape[1]
    xhat = (x - mean.reshape(sh)) * invstd.reshape(sh)
    gb = dy.sum(axis=axes)
    gw = (dy * xhat).sum(axis=axes)
    dx = (w * invstd / m).reshape(sh) * (m * dy - gb.reshape(sh) - xhat * gw.reshape(sh))
    return dx, gw, gb


def _copies(p):
    return p.weight.copy(), p.bias.copy(), p.running_mean.copy(), p.running_var.copy()


def _fastbn(op, p, out=None):
    """fastbn's layer (the functional API for eval_out); ``out``: an array every call writes
    (fastbn_out), None: each call allocates its output and the loop drops it."""
    x = p.x
    w, b, rm, rv = _copies(p)
    if op == "eval_out":
        out = np.empty_like(x)
        return Bench(lambda: fastbn.batch_norm(x, rm, rv, w, b, training=False, eps=p.eps, out=out))
    layer_cls = {2: fastbn.BatchNorm1d, 3: fastbn.BatchNorm1d, 4: fastbn.BatchNorm2d, 5: fastbn.BatchNorm3d}[x.ndim]
    layer = layer_cls(x.shape[1], eps=p.eps, momentum=p.momentum, dtype=x.dtype)
    layer.weight[...], layer.bias[...] = w, b
    layer.running_mean[...], layer.running_var[...] = rm, rv
    if op == "train":
        layer.train()
        return Bench(lambda: layer(x, out=out))
    if op == "eval":
        layer.eval()
        return Bench(lambda: layer(x, out=out))
    dy = p.dy
    layer.train()

    def forward():  # untimed; returns None, as pytest-benchmark's setup must
        layer(x)

    def backward():
        return layer.backward(dy, out=out), layer.grad_weight, layer.grad_bias

    # the layer forgets its saved state after a backward: each timed backward needs a fresh forward
    return Bench(backward, setup=forward)


def _fastbn_out(op, p):
    """The fastbn call of ``op`` with out=; None for eval_out, which is one already."""
    return None if op == "eval_out" else _fastbn(op, p, out=np.empty_like(p.x))


def _numpy(op, p):
    x = p.x
    w, b, rm, rv = _copies(p)
    if op == "train":
        return Bench(lambda: _naive_train(x, w, b, rm, rv, p.momentum, p.eps))
    if op == "eval":
        return Bench(lambda: _naive_eval(x, w, b, rm, rv, p.eps))
    if op == "eval_out":
        out = np.empty_like(x)
        return Bench(lambda: _naive_eval(x, w, b, rm, rv, p.eps, out=out))
    dy = p.dy
    mean, invstd = _naive_stats(x, p.eps)  # saved by the (untimed) forward
    return Bench(lambda: _naive_backward(dy, x, w, mean, invstd))


def _torch(op, p):
    """torch.nn.BatchNorm*d, or None where torch has no equivalent (no out= for batch norm)."""
    torch = import_torch()
    if torch is None or op == "eval_out":
        return None
    x = p.x
    C = x.shape[1]
    layer_cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}[x.ndim]
    dtype = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}[x.dtype]
    bn = layer_cls(C, eps=p.eps, momentum=p.momentum, dtype=dtype)
    with torch.no_grad():
        for name, value in zip(("weight", "bias", "running_mean", "running_var"), _copies(p)):
            getattr(bn, name).copy_(torch.from_numpy(value))
    t = torch.from_numpy(x)
    if op in ("train", "eval"):
        # forward only: no autograd recording, like torch.no_grad() but without a context
        # manager's cost in every call (it shows in the tiny per-call benchmark)
        bn.requires_grad_(False)
        bn.train(op == "train")
        return Bench(lambda: bn(t))
    # backward: a training-mode graph built once, replayed (retain_graph) with the same dy
    bn.train()
    t = t.requires_grad_()
    y = bn(t)
    tdy = torch.from_numpy(p.dy)
    params = [t, bn.weight, bn.bias]
    return Bench(lambda: torch.autograd.grad(y, params, tdy, retain_graph=True))


def _floor(op, p, n=None):
    """The least memory traffic of the operation's passes (fastbn._floor.traffic: no arithmetic
    to speak of) on fastbn's threads, allocating its output as fastbn's call does and writing it
    with streaming stores where fastbn's kernels would (they measured faster there): about as fast
    as any implementation of the operation can run on this machine (within the noise of a
    measurement: fastbn's backward on large NCHW shapes measures 0.92-1.1x the floor's time).
    A training forward needs the whole batch's statistics before it can write its first output,
    so it passes over x twice (read; read and write y); a backward passes over dy and x twice
    (read both; read both, write dx).  The second pass walks back, as fastbn's kernels do, so that
    it starts with what the cache still holds from the first."""
    n = n or fastbn.get_num_threads()
    x = p.x.reshape(-1)
    if op == "eval_out":
        out = np.empty_like(x)
        return Bench(lambda: traffic(x, None, out, n))
    if op == "eval":
        return Bench(lambda: traffic(x, None, np.empty_like(x), n))

    def two_passes(a, b=None):  # read a (and b); then read them again, backwards, into a new output
        def run():
            traffic(a, b, None, n)
            out = np.empty_like(x)
            traffic(a, b, out, n, backwards=True)
            return out
        return Bench(run)
    return two_passes(x) if op == "train" else two_passes(p.dy.reshape(-1), x)


def _copy(op, p):
    x = p.x
    if OPS[op].copy == "copyto":
        out = np.empty_like(x)
        return Bench(lambda: np.copyto(out, x))
    return Bench(x.copy)


def make_bench(op, impl, p):
    """The Bench for one operation ("train", "eval", "eval_out", "backward") of one implementation
    ("fastbn", "fastbn_out", "numpy", "torch", "copy", "floor") on problem ``p``; None when ``impl``
    cannot do ``op``."""
    if op not in OPS:
        raise ValueError(f"unknown operation {op!r}, expected one of {list(OPS)}")
    factory = {"fastbn": _fastbn, "fastbn_out": _fastbn_out, "numpy": _numpy, "torch": _torch, "copy": _copy,
               "floor": _floor}[impl]
    return factory(op, p)


def skip_reason(op, impl):
    """Why make_bench returns None for (op, impl)."""
    if impl == "torch" and import_torch() is None:
        return "torch is not installed (pip install 'fastbn[torch]')"
    if impl == "torch" and op == "eval_out":
        return "torch's batch norm has no out= (this group compares fastbn with np.copyto)"
    if impl == "fastbn_out" and op == "eval_out":
        return "eval_out is fastbn's out= call already"
    return None


def reference(op, p):
    """What fastbn's Bench must return: the naive NumPy result, in p's dtype."""
    bench = make_bench(op, "numpy", p)
    if bench.setup is not None:
        bench.setup()
    return bench.run()


def check(result, expected, dtype):
    """None if fastbn's ``result`` (an array or a tuple of arrays) is finite and close to
    ``expected``; else a message.  Loose tolerances: this catches broken kernels, not ulps."""
    tol = 2e-3 if np.dtype(dtype) == np.float32 else 1e-8
    got = result if isinstance(result, tuple) else (result,)
    want = expected if isinstance(expected, tuple) else (expected,)
    for i, (g, w) in enumerate(zip(got, want)):
        g = np.asarray(g)
        if g.shape != w.shape:
            return f"output {i}: shape {g.shape}, expected {w.shape}"
        if not np.isfinite(g).all():
            return f"output {i}: not all finite"
        if not np.allclose(g, w, rtol=tol, atol=tol):
            err = np.abs(g.astype(np.float64) - w).max()
            return f"output {i}: differs from naive NumPy by up to {err:.3g} (tolerance {tol:g})"
    return None


# ---------------------------------------------------------------- timing
Timing = namedtuple("Timing", "min median samples")


def calibrate(bench):
    """Seconds of one call, after a warm-up call (lazy initialization, first-touch page faults)."""
    for _ in range(2):
        if bench.setup is not None:
            bench.setup()
        t0 = time.perf_counter()
        bench.run()
        t = time.perf_counter() - t0
    return max(t, 1e-7)


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
    setup) a loop of calls long enough to time reliably, divided by the count.
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
            t0 = time.perf_counter()
            for _ in range(number[key]):
                bench.run()
            samples[key].append((time.perf_counter() - t0) / number[key])
    return {key: Timing(min(v), statistics.median(v), len(v)) for key, v in samples.items()}


# ---------------------------------------------------------------- one row of the report
def measure(op, p, repeat, numpy_repeat=3):
    """A dict: times of every implementation on ``op`` for problem ``p``, ratios, correctness."""
    row = {"shape": list(p.shape), "dtype": p.dtype.name, "op": op, "operation": OPS[op].title,
           "threads": fastbn.get_num_threads(), "bytes": OPS[op].bytes_moved * p.nbytes}
    benches = {impl: make_bench(op, impl, p) for impl in IMPLS}
    benches = {impl: bench for impl, bench in benches.items() if bench is not None}  # torch: absent
    repeats = {impl: min(repeat, numpy_repeat) if impl == "numpy" else repeat for impl in benches}  # numpy: slow
    for impl, timing in time_calls(benches, repeats).items():
        row[f"{impl}_min_s"], row[f"{impl}_median_s"] = timing.min, timing.median
        row[f"{impl}_samples"] = timing.samples
    outputs = {}
    for impl in ("fastbn", "numpy"):
        bench = benches[impl]
        if bench.setup is not None:
            bench.setup()
        outputs[impl] = bench.run()
    del benches, bench
    fb = row["fastbn_min_s"]
    row["gbps"] = row["bytes"] / fb / 1e9
    row["x_copy"] = fb / row["copy_min_s"]
    row["floor_x_copy"] = row["floor_min_s"] / row["copy_min_s"]
    row["speedup_numpy"] = row["numpy_min_s"] / fb
    row["speedup_torch"] = row["torch_min_s"] / fb if "torch_min_s" in row else None
    row["x_out"] = fb / row["fastbn_out_min_s"] if "fastbn_out_min_s" in row else None
    row["error"] = check(outputs["fastbn"], outputs["numpy"], p.dtype)
    row["targets"] = evaluate_targets(row)
    return row


def evaluate_targets(row):
    """[{"name", "limit", "value", "met", "floor", "reachable"}] for the targets that apply to this
    row.  "floor" is what the floor (the least memory traffic of the operation, same run) scores on
    the same measure; "reachable" is False where even the floor misses the target."""
    rules = (TINY_TARGETS if is_tiny(row["shape"]) else TARGETS).get(row["op"], {})
    results = []
    for what, limit in rules.items():
        if what == "copy":
            name = ("x np.copyto <= " if OPS[row["op"]].copy == "copyto" else "x copy <= ") + f"{limit:g}"
            value, floor = row["x_copy"], row["floor_x_copy"]
            met, reachable = value <= limit, floor <= limit
        elif what == "out":  # allocating vs out=: no floor to compare with
            value, floor = row.get("x_out"), None
            if value is None:
                continue
            name, met, reachable = f"x out= <= {limit:g}", value <= limit, True
        else:
            value = row[f"speedup_{what}"]
            if value is None:  # torch not installed: the target cannot be checked
                continue
            name = f"vs {what} >= {limit:g}x" if limit != 1 else f"<= {what} per call"
            floor = row[f"{what}_min_s"] / row["floor_min_s"]
            met, reachable = value >= limit, floor >= limit
        results.append({"name": name, "limit": limit, "value": value, "met": bool(met), "floor": floor,
                        "reachable": bool(reachable)})
    return results


def measure_scaling(p, threads, repeat):
    """Thread scaling of the training forward: fastbn's layer and the floor on 1 and ``threads``
    threads, sampled in the same interleaved rounds.  A dict like a row: times, speedups, targets
    (the target applies to 2 threads)."""
    def on(n, bench):
        def run():
            fastbn.set_num_threads(n)
            return bench.run()
        return Bench(run)

    benches = {}
    for n in (1, threads):
        benches[f"fastbn_{n}"] = on(n, make_bench("train", "fastbn", p))
        benches[f"floor_{n}"] = on(n, _floor("train", p, n))
    try:
        timings = time_calls(benches, {key: repeat for key in benches})
    finally:
        fastbn.set_num_threads(threads)
    row = {"shape": list(p.shape), "dtype": p.dtype.name, "op": "train", "operation": OPS["train"].title,
           "threads": threads, "error": None}
    for key, t in timings.items():
        row[f"{key}_min_s"] = t.min
    row["speedup"] = row["fastbn_1_min_s"] / row[f"fastbn_{threads}_min_s"]
    row["floor_speedup"] = row["floor_1_min_s"] / row[f"floor_{threads}_min_s"]
    row["targets"] = []
    if threads == 2:
        row["targets"].append({"name": f"2 threads >= {SCALING_TARGET:g}x 1 thread", "limit": SCALING_TARGET,
                               "value": row["speedup"], "met": row["speedup"] >= SCALING_TARGET,
                               "floor": row["floor_speedup"], "reachable": row["floor_speedup"] >= SCALING_TARGET})
    return row


def _fmt_scaling(row):
    n = row["threads"]
    return (f"thread scaling, {row['operation']} {tuple(row['shape'])} {row['dtype']}: {n} threads "
            f"{row['speedup']:.2f}x faster than 1 ({_fmt_time(row['fastbn_1_min_s'])} -> "
            f"{_fmt_time(row[f'fastbn_{n}_min_s'])}), the floor {row['floor_speedup']:.2f}x: "
            + (_fmt_targets(row) if row["targets"] else "no target (it is for 2 threads)"))


# ---------------------------------------------------------------- report
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


def machine_info(torch, threads):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "other_processes_busy_cores": None,  # filled in after the run: see Contention
        "threads": threads,
        "openmp": _openmp.OPENMP,
        "fastbn": fastbn.__version__,
        "numpy": np.__version__,
        "torch": torch.__version__ if torch is not None else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _fmt_time(s):
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def _fmt_ratio(v):
    return "-" if v is None else f"{v:.2f}x"


def _fmt_targets(row):
    if row["error"]:
        return "WRONG RESULT"
    if not row["targets"]:
        return "-"
    missed = [f"{t['name']} ({t['value']:.3g}" + ("" if t["reachable"] else f"; floor {t['floor']:.3g}: out of reach")
              + ")" for t in row["targets"] if not t["met"]]
    return "ok" if not missed else "MISS " + "; ".join(missed)


LEGEND = f"""\
fastbn    time per call, min of the repeats (the JSON also has medians)
GB/s      bytes that must move (train/eval: read x + write y = 2x the array; backward: dy, x, dx = 3x) / fastbn time
x copy    fastbn time / x.copy() time of the same array in this run (np.copyto(out, x) for out=)
x out=    fastbn time / the same fastbn call with out= (one buffer, reused), in the same rounds
floor     the least memory traffic of the operation (its passes over the arrays, no arithmetic) on the same
          threads, in x copy: about the best any implementation can do; a target the floor misses is out of reach
vs numpy  naive NumPy time / fastbn time (higher is better); vs torch: the same for torch.nn.BatchNorm*d
targets   train: x copy <= 1.6, >= 3x torch, >= 5x numpy; eval: x copy <= 1.15, >= 2x torch;
          eval out=: <= 1.1x np.copyto; backward: x copy <= 2.4, >= 1.7x torch; allocating train, eval and
          backward: x out= <= 1.1;
          tiny {TINY}: fastbn per call <= torch per call (train and eval forward);
          --full: 2 threads >= {SCALING_TARGET:g}x faster than 1 on the train forward of {SCALING_CASE[0]}"""


def targets_met(rows):
    """(met, checked) over all rows; a row with a wrong result meets none of its targets."""
    checked = [(t, r) for r in rows for t in r["targets"]]
    return sum(t["met"] and not r["error"] for t, r in checked), len(checked)


def print_report(rows, info, out=sys.stdout, scaling=None):
    torch_v = info["torch"] or "not installed"
    others = info["other_processes_busy_cores"]
    print(f"fastbn {info['fastbn']} | numpy {info['numpy']} | torch {torch_v} | {info['cpu']}, "
          f"{info['cores']} cores | {info['threads']} threads"
          + (f" | other processes used {others:.2f} cores" if others is not None else ""), file=out)
    header = ("shape", "dtype", "operation", "fastbn", "GB/s", "x copy", "x out=", "floor", "vs numpy", "vs torch",
              "thr", "targets")
    table = [header]
    for r in rows:
        table.append((str(tuple(r["shape"])), r["dtype"], r["operation"], _fmt_time(r["fastbn_min_s"]),
                      f"{r['gbps']:.1f}", f"{r['x_copy']:.2f}", _fmt_ratio(r.get("x_out")), f"{r['floor_x_copy']:.2f}",
                      _fmt_ratio(r["speedup_numpy"]),
                      _fmt_ratio(r["speedup_torch"]), str(r["threads"]), _fmt_targets(r)))
    widths = [max(len(line[i]) for line in table) for i in range(len(header) - 1)]
    right = {3, 4, 5, 6, 7, 8, 9, 10}
    for line in table:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))]
        print("  ".join(cells + [line[-1]]).rstrip(), file=out)
    print(file=out)
    print(LEGEND, file=out)
    if info["torch"] is None:
        print("torch is not installed: the torch targets are not checked (pip install 'fastbn[torch]').", file=out)
    if others is not None and others > 0.2:
        print(f"WARNING: other processes kept {others:.2f} of the {info['cores']} cores busy during the run: "
              "a thread that loses its core stalls its whole OpenMP team for a scheduler time slice, so "
              "these numbers are not representative; rerun on a quiet machine.", file=out)
    spread, impl, r = max(((r[f"{impl}_median_s"] / r[f"{impl}_min_s"], impl, r)
                           for r in rows for impl in ("copy", "fastbn")), key=lambda t: t[0])
    if spread > 1.3:
        print(f"note: unsteady timings: {impl}'s median is {spread:.1f}x its min in {r['operation']} "
              f"{tuple(r['shape'])} {r['dtype']} (the JSON has every median).", file=out)
    for r in rows:
        if r["error"]:
            print(f"WRONG RESULT: {r['operation']} {tuple(r['shape'])} {r['dtype']}: {r['error']}", file=out)
    if scaling is not None:
        print(_fmt_scaling(scaling), file=out)
        rows = rows + [scaling]
    met, checked = targets_met(rows)
    unreachable = sum(not t["met"] and not t["reachable"] for r in rows for t in r["targets"])
    print(f"targets met: {met}/{checked}" + (f"; {unreachable} of the misses out of reach (the floor misses them too)"
                                            if unreachable else ""), file=out)


_PLOT_IMPLS = [("fastbn", "tab:blue"), ("floor", "tab:green"), ("torch", "tab:orange"), ("numpy", "tab:gray")]


def _bars(ax, rows, value):
    """Grouped bars, one group per row, one bar per implementation that ran."""
    width = 0.8 / len(_PLOT_IMPLS)
    for k, (impl, color) in enumerate(_PLOT_IMPLS):
        pts = [(i + (k - (len(_PLOT_IMPLS) - 1) / 2) * width, value(r, impl)) for i, r in enumerate(rows)
               if f"{impl}_min_s" in r]
        if pts:
            ax.bar([p[0] for p in pts], [p[1] for p in pts], width, label=impl, color=color)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r['operation']}\n{'x'.join(map(str, r['shape']))} {r['dtype']}" for r in rows],
                       fontsize=7, rotation=45, ha="right")


def plot(rows, info, path):
    """Left: memory-bound rows, each implementation's time / copy time (log scale), with fastbn's
    target.  Right: tiny rows, time per call in microseconds (copy ratios mean nothing there)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    big = [r for r in rows if not is_tiny(r["shape"])]
    tiny = [r for r in rows if is_tiny(r["shape"])]
    panels = [p for p in (big, tiny) if p]
    fig, axes = plt.subplots(1, len(panels), figsize=(max(8, 0.9 * len(rows) + 2), 5.5), squeeze=False,
                             gridspec_kw={"width_ratios": [len(p) for p in panels]})
    axes = list(axes[0])
    if big:
        ax = axes.pop(0)
        _bars(ax, big, lambda r, impl: r[f"{impl}_min_s"] / r["copy_min_s"])
        for i, r in enumerate(big):
            limit = TARGETS.get(r["op"], {}).get("copy")
            if limit:
                ax.hlines(limit, i - 0.45, i + 0.45, colors="tab:red", linestyles="dashed",
                          label="fastbn target" if i == 0 else None)
        ax.axhline(1.0, color="black", linewidth=0.8, label="memory copy")
        ax.set_yscale("log")
        ax.set_ylabel("time / copy time of the same array (lower is better)")
        ax.legend(fontsize=8, ncol=5, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    if tiny:
        ax = axes.pop(0)
        _bars(ax, tiny, lambda r, impl: r[f"{impl}_min_s"] * 1e6)
        ax.set_ylabel("time per call, us (lower is better)")
        ax.set_title("tiny shapes: per-call overhead", fontsize=9)
        if not big:
            ax.legend(fontsize=8)
    fig.suptitle(f"fastbn {info['fastbn']}: {info['cpu']}, {info['threads']} threads, min of repeats", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- command line
def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _thread_count(text):
    value = _positive_int(text)
    if value > _openmp.MAX_THREADS:
        raise argparse.ArgumentTypeError(f"expected at most {_openmp.MAX_THREADS} threads, got {text!r}")
    return value


def _output_problem(path, kind):
    """Why ``path`` cannot receive the --json or --plot output (None when it can): checked before
    the run, so that a typo does not cost a whole benchmark."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"--{kind} {path}: the folder {folder} does not exist"
    if not os.access(folder, os.W_OK):
        return f"--{kind} {path}: the folder {folder} is not writable"
    if os.path.isdir(path):
        return f"--{kind} {path}: is a folder, expected a file name"
    if kind == "plot":
        try:
            import matplotlib
        except ImportError:
            return "--plot needs matplotlib: pip install 'fastbn[plot]'"
        matplotlib.use("Agg")
        from matplotlib.figure import Figure

        formats = Figure().canvas.get_supported_filetypes()
        ext = os.path.splitext(path)[1].lstrip(".").lower()
        if ext not in formats:
            return f"--plot {path}: unknown image format {ext!r}, expected one of {', '.join(sorted(formats))}"
    return None


def add_arguments(parser):
    parser.description = ("Time fastbn's train forward, eval forward and backward against a memory copy of the "
                          "same array, naive NumPy and PyTorch (when installed) at the same thread count, "
                          "and check them against the project's targets.")
    parser.add_argument("--threads", type=_thread_count, default=None,
                        help="threads for fastbn and torch (default: fastbn.get_num_threads())")
    parser.add_argument("--full", action="store_true",
                        help="all shapes (also float64) and more repeats; the default is a quick run")
    parser.add_argument("--repeat", type=_positive_int, default=None,
                        help="timed samples per implementation (default 7, 15 with --full; naive NumPy gets at most 3)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows and machine facts as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw a bar chart (needs matplotlib: fastbn[plot])")
    from . import _pipeline

    _pipeline.add_arguments(parser)  # --pipeline, --shape


def run(args):
    if args.pipeline or args.shape:
        from . import _pipeline

        return _pipeline.run(args)
    for kind in ("json", "plot"):
        path = getattr(args, kind)
        problem = path and _output_problem(path, kind)
        if problem:
            print(problem, file=sys.stderr)
            return 2
    cases = FULL_CASES if args.full else QUICK_CASES
    repeat = args.repeat or (15 if args.full else 7)
    threads = args.threads or fastbn.get_num_threads()
    torch = import_torch()
    jobs = [(shape, dtype, op) for shape, dtype in cases for op in OPS]
    rng = np.random.default_rng(0)
    rows = []
    with thread_count(threads, torch), Contention() as contention:
        info = machine_info(torch, fastbn.get_num_threads())
        problem = None
        for i, (shape, dtype, op) in enumerate(jobs, 1):
            if problem is None or problem.shape != shape or problem.dtype != dtype:
                problem = None  # free the previous arrays first
                problem = Problem(shape, dtype, rng)
            print(f"[{i}/{len(jobs)}] {OPS[op].title} {shape} {dtype}", file=sys.stderr, flush=True)
            rows.append(measure(op, problem, repeat))
        scaling = None
        if args.full and fastbn.get_num_threads() > 1:
            problem = None
            print(f"[thread scaling] {OPS['train'].title} {SCALING_CASE[0]} {SCALING_CASE[1]}, 1 and "
                  f"{fastbn.get_num_threads()} threads", file=sys.stderr, flush=True)
            scaling = measure_scaling(Problem(*SCALING_CASE, rng), fastbn.get_num_threads(), repeat)
    info["other_processes_busy_cores"] = contention.cores
    print_report(rows, info, scaling=scaling)
    if args.json:
        with open(args.json, "w") as f:
            met, checked = targets_met(rows + ([scaling] if scaling else []))
            json.dump({"machine": info, "repeat": repeat, "targets_met": met, "targets_checked": checked,
                       "rows": rows, "scaling": scaling}, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        plot(rows, info, args.plot)
        print(f"wrote {args.plot}")
    return 1 if any(r["error"] for r in rows) else 0
