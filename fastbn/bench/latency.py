"""``fastbn bench --latency``: the per-call cost of an evaluation forward on inference-sized inputs.

Single float32 calls, each timed on its own (fastbn.bench.timing.latency_samples: interleaved
rounds, a few untimed calls first in each), of every way to run the same eval batch norm:

``kernel``             fastbn's eval kernel alone (fastbn.bench.native.eval_kernel on the (N, C, S)
                       views, preallocated output): no argument checks, no dispatch
``batch_norm_out``     ``fastbn.batch_norm(x, rm, rv, w, b, training=False, out=out)``
``batch_norm``         the same, allocating its output
``layer``              ``bn(x)`` on an eval-mode ``fastbn.BatchNorm2d``; ``layer_out``: ``bn(x, out=out)``
``onnxruntime``        onnxruntime's BatchNormalization through io_binding on the same arrays
                       (fastbn.bench.onnxrt), ``intra_op_num_threads`` = fastbn's threads
``torch``              ``bn(t)`` on an eval-mode ``torch.nn.BatchNorm2d`` without autograd

The report gives each one's median and 90th percentile in microseconds and its median over
onnxruntime's, and judges the targets of issue 12 (item 2) and issue 14 (item 6), which are set
for 2 threads (the default here): at (1, 64, 56, 56) and (1, 512, 7, 7), ``batch_norm out=`` at
least as fast as onnxruntime; at (2, 16, 4, 4) the layer call at most 2 us over the kernel; and
``out=`` never slower than allocating.  Medians of single calls include the timer (an empty
function, timed in the same rounds, shows how much).
"""
import statistics

import numpy as np

import fastbn

from . import impls, native, onnxrt
from .cases import Problem
from .timing import Contention, latency_samples

CASES = [(1, 64, 56, 56), (1, 512, 7, 7), (2, 16, 4, 4)]
DTYPE = "float32"
THREADS = 2           # the default --threads of --latency: the targets are set for 2
DEFAULT_REPEAT = 30   # rounds; each round times PER_ROUND calls of each implementation
PER_ROUND = 50
IMPLS = ("kernel", "batch_norm_out", "batch_norm", "layer", "layer_out", "onnxruntime", "torch")
LABELS = {"batch_norm_out": "batch_norm out=", "layer_out": "layer out="}  # in the table
OVER_KERNEL_S = 2e-6  # issue 12: a (2, 16, 4, 4) eval layer call at most this much over its kernel
# "out= never slower than allocating": both calls run the same code but for the output's checks
# (out=) or allocation; what is left between their medians is where the output lies in memory
# and the timer's tick (0.1 us): equal within max(one tick, 2%) counts as not slower.
SAME_S, SAME_FRACTION = 0.1e-6, 0.02
# (name, shapes it applies to (None: all), what, than, slack seconds (None: SAME_S / SAME_FRACTION), issue)
TARGETS = [
    ("batch_norm out= <= onnxruntime", [(1, 64, 56, 56), (1, 512, 7, 7)], "batch_norm_out", "onnxruntime", 0.0,
     "issue 12.2, 14.6"),
    ("layer <= kernel + 2 us", [(2, 16, 4, 4)], "layer", "kernel", OVER_KERNEL_S, "issue 12.2"),
    ("batch_norm out= <= batch_norm", None, "batch_norm_out", "batch_norm", None, "issue 12.2"),
    ("layer out= <= layer", None, "layer_out", "layer", None, "issue 12.2"),
]


def _beside(x):
    """An empty array like ``x`` whose address is half a page from x's modulo 4096: an output
    at the same offset within a page as its input makes every store alias a load of the same
    stride (4K aliasing), which cost 25% on (1, 512, 7, 7) here whoever's code runs, so that the
    ``out=`` rows measure fastbn and not where NumPy happened to put the array."""
    room = np.empty(x.nbytes + 8192, np.uint8)
    skip = (x.ctypes.data + 2048 - room.ctypes.data) % 4096
    return room[skip:skip + x.nbytes].view(x.dtype).reshape(x.shape)


def make_calls(p, threads, torch=None):
    """{impl: (call, output array or None)} for problem ``p``; onnxruntime and torch only where
    they import.  Every call gets its own parameters, buffers and output."""
    x = p.x
    calls = {}
    w, b, rm, rv = p.copies()
    y = _beside(x)
    x3, y3 = x.reshape(x.shape[0], x.shape[1], -1), y.reshape(x.shape[0], x.shape[1], -1)
    calls["kernel"] = (lambda: native.eval_kernel(x3, y3, w, b, rm, rv, p.eps), y)
    w2, b2, rm2, rv2 = p.copies()
    out = _beside(x)
    calls["batch_norm_out"] = (lambda: fastbn.batch_norm(x, rm2, rv2, w2, b2, training=False, eps=p.eps, out=out),
                                out)
    calls["batch_norm"] = (lambda: fastbn.batch_norm(x, rm2, rv2, w2, b2, training=False, eps=p.eps), None)
    layer = impls.fastbn_layer(x, p).eval()
    layer_out = _beside(x)
    calls["layer"] = (lambda: layer(x), None)
    calls["layer_out"] = (lambda: layer(x, out=layer_out), layer_out)
    if onnxrt.unavailable() is None:
        w3, b3, rm3, rv3 = p.copies()
        ort_out = _beside(x)
        calls["onnxruntime"] = (onnxrt.bound_eval(x, ort_out, w3, b3, rm3, rv3, p.eps, threads), ort_out)
    if torch is not None:
        bn = impls.torch_layer(torch, p)
        bn.requires_grad_(False)
        bn.eval()
        t = torch.from_numpy(x)
        calls["torch"] = (lambda: bn(t), None)
    return calls


def measure(shape, threads, rounds=DEFAULT_REPEAT, per_round=PER_ROUND, torch=None, rng=None):
    """Rows (one per implementation that ran) for one shape: median, p90, ratio to onnxruntime,
    whether its output matches the float64 reference; plus the empty function's median."""
    p = Problem(shape, DTYPE, rng if rng is not None else np.random.default_rng(0))
    calls = make_calls(p, threads, torch)
    fns = {impl: fn for impl, (fn, _) in calls.items()}
    fns["empty"] = lambda: None
    samples = latency_samples(fns, rounds, per_round)
    want = impls.expected("eval", p)
    rows = []
    for impl, (fn, out) in calls.items():
        result = fn()
        got = out if out is not None else result
        if impl == "torch":
            got = got.numpy()
        ts = samples[impl]
        rows.append({"shape": list(shape), "dtype": DTYPE, "impl": impl, "threads": threads, "calls": len(ts),
                     "median_s": statistics.median(ts), "p90_s": float(np.percentile(ts, 90)),
                     "min_s": min(ts), "error": impls.check(got, want, p.dtype)})
    ort = next((r for r in rows if r["impl"] == "onnxruntime"), None)
    for r in rows:
        r["x_onnxruntime"] = r["median_s"] / ort["median_s"] if ort else None
    return rows, statistics.median(samples["empty"])


def evaluate_targets(rows, threads):
    """[{"name", "shape", "issue", "value", "than", "met"}]: every target whose implementations
    ran (medians; "value" and "than" in seconds, "than" with the slack added); [] unless 2 threads."""
    if threads != 2:
        return []
    by = {(tuple(r["shape"]), r["impl"]): r for r in rows}
    results = []
    for name, shapes, what, than, slack, issue in TARGETS:
        for shape in shapes or sorted({tuple(r["shape"]) for r in rows}, key=_case_order):
            a, b = by.get((shape, what)), by.get((shape, than))
            if a is None or b is None:  # onnxruntime not installed: not checked
                continue
            limit = b["median_s"] + (slack if slack is not None else max(SAME_S, SAME_FRACTION * b["median_s"]))
            results.append({"name": name, "shape": list(shape), "issue": issue, "value": a["median_s"],
                            "than": limit, "met": bool(a["median_s"] <= limit and not a["error"])})
    return results


def _case_order(shape):
    return CASES.index(shape) if shape in CASES else len(CASES)  # the report's order, others last


def _us(s):
    return f"{s * 1e6:.1f}"


LEGEND = """\
median, p90  of single calls, in us (each timed alone, the timer included: see "empty call" above)
x onnxrt     median / onnxruntime's median (lower is faster; < 1: faster than onnxruntime)
kernel       fastbn's eval kernel alone; batch_norm: fastbn.batch_norm(..., training=False[, out=out]);
             layer: an eval-mode fastbn.BatchNorm2d call[, out=out]; onnxruntime: BatchNormalization
             (opset 15, inference) with io_binding on the same NumPy arrays; torch: nn.BatchNorm2d eval"""


def print_report(rows, targets, info, empty_s, out):
    others = info["other_processes_busy_cores"]
    print(f"fastbn {info['fastbn']} | onnxruntime {info.get('onnxruntime') or 'not installed'} | "
          f"torch {info['torch'] or 'not installed'} | {info['cpu']}, {info['cores']} cores | "
          f"{info['threads']} threads | empty call {_us(empty_s)} us"
          + (f" | other processes used {others:.2f} cores" if others is not None else ""), file=out)
    header = ("shape", "implementation", "median", "p90", "x onnxrt", "")
    table, last = [header], None
    for r in rows:
        shape = str(tuple(r["shape"]))
        table.append((shape if shape != last else "", LABELS.get(r["impl"], r["impl"]), _us(r["median_s"]), _us(r["p90_s"]),
                      "-" if r["x_onnxruntime"] is None else f"{r['x_onnxruntime']:.2f}x",
                      "WRONG RESULT" if r["error"] else ""))
        last = shape
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        cells = [c.rjust(w) if 2 <= i <= 4 else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))]
        print("  ".join(cells).rstrip(), file=out)
    print("\n" + LEGEND, file=out)
    if info.get("onnxruntime") is None:
        print(f"no onnxruntime rows, and its targets are not checked: {onnxrt.unavailable()}", file=out)
    if others is not None and others > 0.2:
        print(f"WARNING: other processes kept {others:.2f} of the {info['cores']} cores busy during the run: "
              "these numbers are not representative; rerun on a quiet machine.", file=out)
    for r in rows:
        if r["error"]:
            print(f"WRONG RESULT: {r['impl']} {tuple(r['shape'])}: {r['error']}", file=out)
    if info["threads"] != 2:
        print(f"targets: not judged (they are set for 2 threads; this run used {info['threads']})", file=out)
        return
    print("targets (medians; issue 12 item 2, issue 14 item 6):", file=out)
    for t in targets:
        print(f"  {'met   ' if t['met'] else 'MISSED'}  {str(tuple(t['shape'])):<16} {t['name']:<31} "
              f"{_us(t['value'])} vs {_us(t['than'])} us  ({t['issue']})", file=out)
    print(f"targets met: {sum(t['met'] for t in targets)}/{len(targets)}", file=out)


def run(threads, repeat, torch, machine_info, log, per_round=None, shapes=None):
    """(rows, targets, info, empty_s) over ``shapes`` (default CASES), ``repeat`` rounds of
    ``per_round`` calls (default PER_ROUND) each, on ``threads`` threads of fastbn, torch and
    onnxruntime; progress to ``log``."""
    shapes, per_round = shapes or CASES, per_round or PER_ROUND
    rows, empties = [], []
    rng = np.random.default_rng(0)
    with impls.thread_count(threads, torch), Contention() as contention:
        n = fastbn.get_num_threads()  # 1 on a build without OpenMP
        info = machine_info(torch, n)
        for i, shape in enumerate(shapes, 1):
            print(f"[latency {i}/{len(shapes)}] {shape} {DTYPE}", file=log, flush=True)
            shape_rows, empty = measure(shape, n, repeat, per_round, torch, rng)
            rows += shape_rows
            empties.append(empty)
    info["other_processes_busy_cores"] = contention.cores
    return rows, evaluate_targets(rows, n), info, statistics.median(empties)
