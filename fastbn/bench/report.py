"""The rows of ``fastbn bench``'s table: measured, judged against the targets, printed, plotted.

:func:`measure` times every implementation of one operation on one problem (fastbn.bench.impls,
sampled by fastbn.bench.timing) and checks fastbn's result against the float64 reference;
:func:`evaluate_targets` judges the row, each target next to what the floor scores on it;
:func:`print_report` and :func:`plot` show the rows.
"""
import os
import platform
import sys
import time

import numpy as np

import fastbn

from .. import _openmp
from . import impls, onnxrt
from .cases import OPS, SCALING_CASE, SCALING_TARGET, TARGETS, TINY, TINY_TARGETS, is_tiny
from .impls import Bench, make_bench
from .timing import time_calls

# ---------------------------------------------------------------- one row of the report
def measure(op, p, repeat, numpy_repeat=3):
    """A dict: times of every implementation on ``op`` for problem ``p``, ratios, correctness."""
    row = {"shape": list(p.shape), "dtype": p.dtype.name, "op": op, "operation": OPS[op].title,
           "threads": fastbn.get_num_threads(), "bytes": OPS[op].bytes_moved * p.nbytes}
    benches = {impl: make_bench(op, impl, p) for impl in impls.IMPLS}
    benches = {impl: bench for impl, bench in benches.items() if bench is not None}  # torch: absent
    repeats = {impl: min(repeat, numpy_repeat) if impl == "numpy" else repeat for impl in benches}  # numpy: slow
    for impl, timing in time_calls(benches, repeats).items():
        row[f"{impl}_min_s"], row[f"{impl}_median_s"] = timing.min, timing.median
        row[f"{impl}_samples"] = timing.samples
    outputs = {}
    for impl in ("fastbn", "onnxruntime"):
        bench = benches.get(impl)
        if bench is not None:
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
    row["speedup_onnxruntime"] = row["onnxruntime_min_s"] / fb if "onnxruntime_min_s" in row else None
    want = impls.expected(op, p)
    row["error"] = impls.check(outputs["fastbn"], want, p.dtype)
    row["onnxruntime_error"] = impls.check(outputs["onnxruntime"], want, p.dtype) if "onnxruntime" in outputs else None
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
        benches[f"floor_{n}"] = on(n, impls.floor("train", p, n))
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
        "onnxruntime": onnxrt.version(),
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


def medians_note(json_path):
    """Where the medians are: the --json file when one was asked for."""
    return f"{json_path} also has the medians" if json_path else "--json FILE also writes the medians"


LEGEND = f"""\
fastbn    time per call, min of the repeats ({{medians}})
GB/s      bytes that must move (train/eval: read x + write y = 2x the array; backward: dy, x, dx = 3x) / fastbn time
x copy    fastbn time / x.copy() time of the same array in this run (np.copyto(out, x) for out=)
x out=    fastbn time / the same fastbn call with out= (one buffer, reused), in the same rounds
floor     the least memory traffic of the operation (its passes over the arrays, no arithmetic) on the same
          threads, in x copy: about the best any implementation can do; a target the floor misses is out of reach
vs numpy  naive NumPy time / fastbn time (higher is better); vs torch: the same for torch.nn.BatchNorm*d;
          vs onnxrt (eval out= rows): the same for onnxruntime's BatchNormalization with io_binding
targets   train: x copy <= 1.6, >= 3x torch, >= 5x numpy; eval: x copy <= 1.15, >= 2x torch;
          eval out=: <= 1.1x np.copyto; backward: x copy <= 2.4, >= 1.7x torch; allocating train, eval and
          backward: x out= <= 1.1;
          tiny {TINY}: fastbn per call <= torch per call (train and eval forward);
          --full: 2 threads >= {SCALING_TARGET:g}x faster than 1 on the train forward of {SCALING_CASE[0]}"""


def targets_met(rows):
    """(met, checked) over all rows; a row with a wrong result meets none of its targets."""
    checked = [(t, r) for r in rows for t in r["targets"]]
    return sum(t["met"] and not r["error"] for t, r in checked), len(checked)


def print_report(rows, info, out=sys.stdout, scaling=None, json_path=None):
    """The table, its legend, warnings and the target count; ``json_path``: where --json writes
    the rows (None: it was not asked for)."""
    torch_v = info["torch"] or "not installed"
    others = info["other_processes_busy_cores"]
    print(f"fastbn {info['fastbn']} | numpy {info['numpy']} | torch {torch_v} | "
          f"onnxruntime {info.get('onnxruntime') or 'not installed'} | {info['cpu']}, "
          f"{info['cores']} cores | {info['threads']} threads"
          + (f" | other processes used {others:.2f} cores" if others is not None else ""), file=out)
    header = ("shape", "dtype", "operation", "fastbn", "GB/s", "x copy", "x out=", "floor", "vs numpy", "vs torch",
              "vs onnxrt", "thr", "targets")
    table = [header]
    for r in rows:
        table.append((str(tuple(r["shape"])), r["dtype"], r["operation"], _fmt_time(r["fastbn_min_s"]),
                      f"{r['gbps']:.1f}", f"{r['x_copy']:.2f}", _fmt_ratio(r.get("x_out")), f"{r['floor_x_copy']:.2f}",
                      _fmt_ratio(r["speedup_numpy"]),
                      _fmt_ratio(r["speedup_torch"]), _fmt_ratio(r.get("speedup_onnxruntime")), str(r["threads"]),
                      _fmt_targets(r)))
    widths = [max(len(line[i]) for line in table) for i in range(len(header) - 1)]
    right = {3, 4, 5, 6, 7, 8, 9, 10, 11}
    for line in table:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))]
        print("  ".join(cells + [line[-1]]).rstrip(), file=out)
    print(file=out)
    print(LEGEND.format(medians=medians_note(json_path)), file=out)
    if info["torch"] is None:
        print("torch is not installed: the torch targets are not checked (pip install 'fastbn[torch]').", file=out)
    if not info.get("onnxruntime"):
        print(f"vs onnxrt is empty: {onnxrt.unavailable()}", file=out)
    if others is not None and others > 0.2:
        print(f"WARNING: other processes kept {others:.2f} of the {info['cores']} cores busy during the run: "
              "a thread that loses its core leaves its share of the work to the others, so "
              "these numbers are not representative; rerun on a quiet machine.", file=out)
    spread, impl, r = max(((r[f"{impl}_median_s"] / r[f"{impl}_min_s"], impl, r)
                           for r in rows for impl in ("copy", "fastbn")), key=lambda t: t[0])
    if spread > 1.3:
        print(f"note: unsteady timings: {impl}'s median is {spread:.1f}x its min in {r['operation']} "
              f"{tuple(r['shape'])} {r['dtype']} ({medians_note(json_path)}).", file=out)
    for r in rows:
        if r["error"]:
            print(f"WRONG RESULT: {r['operation']} {tuple(r['shape'])} {r['dtype']}: {r['error']}", file=out)
        if r.get("onnxruntime_error"):
            print(f"onnxruntime's result is wrong in {r['operation']} {tuple(r['shape'])} {r['dtype']}: "
                  f"{r['onnxruntime_error']}", file=out)
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


