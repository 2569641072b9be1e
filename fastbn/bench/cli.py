"""``fastbn bench``: its options, and the six reports they choose between.

``fastbn bench``             the table: train, eval and eval out= forwards and the backward against a
                             copy, the floor, naive NumPy, torch and onnxruntime (fastbn.bench.report)
``fastbn bench --pipeline``  a training step in a loop next to other work (fastbn.bench.pipeline)
``fastbn bench --latency``   per-call eval forward latency against onnxruntime (fastbn.bench.latency)
``fastbn bench --channels-last``  channels-last memory against NCHW and torch (fastbn.bench.layouts)
``fastbn bench --half``      float16 and bfloat16 inputs against float32, in GB/s (fastbn.bench.halves)
``fastbn bench --relu``      the fused ReLU against the same calls without it (fastbn.bench.activation)

Nothing heavy is imported here at module level: ``fastbn`` imports this module for every
subcommand; torch and onnxruntime load only when a benchmark runs, matplotlib only for ``--plot``.
"""
import argparse
import json
import os
import sys

import numpy as np

import fastbn

from .. import _openmp
from . import activation, halves, impls, latency, layouts, pipeline, report
from .cases import FULL_CASES, OPS, QUICK_CASES, SCALING_CASE, Problem
from .timing import Contention


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


def output_problem(path, kind):
    """Why ``path`` cannot receive the --json or --plot output (None when it can): checked before
    the run, so that a typo does not cost a whole benchmark."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"--{kind} {path}: the folder {folder} does not exist"
    if not os.access(folder, os.W_OK):
        return f"--{kind} {path}: the folder {folder} is not writable"
    if os.path.isdir(path):
        return f"--{kind} {path}: is a folder, expected a file name"
    existed = os.path.exists(path)
    try:  # what the folder's permissions do not tell: a read-only file, a file system that refuses
        with open(path, "a"):
            pass
    except OSError as e:
        return f"--{kind} {path}: cannot be written ({e.strerror})"
    if not existed:
        os.remove(path)
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
                          "same array, naive NumPy, PyTorch and onnxruntime (when installed) at the same thread "
                          "count, and check them against the project's targets.")
    parser.add_argument("--threads", type=_thread_count, default=None,
                        help="threads for fastbn, torch and onnxruntime (default: fastbn.get_num_threads(); "
                             f"{latency.THREADS} with --latency)")
    parser.add_argument("--full", action="store_true",
                        help="all shapes (also float64) and more repeats; the default is a quick run")
    parser.add_argument("--repeat", type=_positive_int, default=None,
                        help="timed samples per implementation (default 7, 15 with --full; naive NumPy gets at most 3)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows and machine facts as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw a bar chart (needs matplotlib: fastbn[plot])")
    parser.add_argument("--pipeline", action="store_true",
                        help="instead of the table: fastbn's forward + backward after a NumPy matmul in a loop, "
                             "with busy neighbour processes, and from two Python threads (see "
                             "fastbn/bench/pipeline.py); --repeat: at least that many steps and that many x "
                             f"{pipeline.SECONDS_PER_REPEAT * 1e3:g} ms per loop (default {pipeline.DEFAULT_REPEAT})")
    parser.add_argument("--shape", type=pipeline.parse_shape, action="append", metavar="NxC[xHxW]",
                        help="with --pipeline: a shape to run instead of the four default ones (repeatable)")
    parser.add_argument("--latency", action="store_true",
                        help="instead of the table: the per-call latency of an eval forward (fastbn's kernel, "
                             "functional and layer calls, onnxruntime with io_binding, torch) on "
                             + ", ".join(map(str, latency.CASES)) + f" float32 (see fastbn/bench/latency.py); "
                             f"--repeat: rounds of {latency.PER_ROUND} calls each (default {latency.DEFAULT_REPEAT})")
    parser.add_argument("--half", action="store_true",
                        help=f"instead of the table: float16 and bfloat16 inputs against float32 on {halves.SHAPE}, "
                             f"in GB/s (see fastbn/bench/halves.py); --repeat: rounds (default {halves.DEFAULT_REPEAT})")
    parser.add_argument("--relu", action="store_true",
                        help="instead of the table: the fused ReLU (activation='relu') against the same forward and "
                             "backward calls without it on " + ", ".join(map(str, activation.SHAPES))
                             + f" float32 (see fastbn/bench/activation.py); --repeat: rounds "
                             f"(default {activation.DEFAULT_REPEAT})")
    parser.add_argument("--channels-last", action="store_true",
                        help=f"instead of the table: channels-last memory against NCHW and torch's channels_last on "
                             f"{layouts.SHAPE} float32 (see fastbn/bench/layouts.py); --repeat: rounds "
                             f"(default {layouts.DEFAULT_REPEAT})")


def _write_json(path, data):
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    print(f"wrote {path}")


def run(args):
    """Run the report the options ask for; its exit status (2 on a bad combination of options)."""
    modes = [m for m, on in (("--pipeline", args.pipeline), ("--latency", args.latency),
                             ("--channels-last", args.channels_last), ("--half", args.half),
                             ("--relu", args.relu)) if on]
    mode = modes[0] if modes else None
    problem = (f"{' and '.join(modes)} are different reports: pick one" if len(modes) > 1 else
               "--shape applies to --pipeline only" if args.shape and not args.pipeline else
               f"--full applies to the usual table, not to {mode}" if args.full and mode else
               f"--plot applies to the usual table, not to {mode}" if args.plot and mode else None)
    for kind in ("json", "plot"):
        path = getattr(args, kind)
        problem = problem or (path and output_problem(path, kind))
    if problem:
        print(problem, file=sys.stderr)
        return 2
    if args.pipeline:
        return run_pipeline(args)
    if args.latency:
        return run_latency(args)
    if args.channels_last:
        return run_layouts(args)
    if args.half:
        return run_halves(args)
    if args.relu:
        return run_activation(args)
    return run_table(args)


def run_table(args):
    cases = FULL_CASES if args.full else QUICK_CASES
    repeat = args.repeat or (15 if args.full else 7)
    threads = args.threads or fastbn.get_num_threads()
    torch = impls.import_torch()
    jobs = [(shape, dtype, op) for shape, dtype in cases for op in OPS]
    rng = np.random.default_rng(0)
    rows = []
    with impls.thread_count(threads, torch), Contention() as contention:
        info = report.machine_info(torch, fastbn.get_num_threads())
        problem = None
        for i, (shape, dtype, op) in enumerate(jobs, 1):
            if problem is None or problem.shape != shape or problem.dtype != dtype:
                problem = None  # free the previous arrays first
                problem = Problem(shape, dtype, rng)
            print(f"[{i}/{len(jobs)}] {OPS[op].title} {shape} {dtype}", file=sys.stderr, flush=True)
            rows.append(report.measure(op, problem, repeat))
        scaling = None
        if args.full and fastbn.get_num_threads() > 1:
            problem = None
            print(f"[thread scaling] {OPS['train'].title} {SCALING_CASE[0]} {SCALING_CASE[1]}, 1 and "
                  f"{fastbn.get_num_threads()} threads", file=sys.stderr, flush=True)
            scaling = report.measure_scaling(Problem(*SCALING_CASE, rng), fastbn.get_num_threads(), repeat)
    info["other_processes_busy_cores"] = contention.cores
    report.print_report(rows, info, scaling=scaling, json_path=args.json)
    if args.json:
        met, checked = report.targets_met(rows + ([scaling] if scaling else []))
        _write_json(args.json, {"machine": info, "repeat": repeat, "targets_met": met, "targets_checked": checked,
                                "rows": rows, "scaling": scaling})
    if args.plot:
        report.plot(rows, info, args.plot)
        print(f"wrote {args.plot}")
    return 1 if any(r["error"] for r in rows) else 0


def run_pipeline(args):
    """``fastbn bench --pipeline`` with --threads, --repeat, --json and --shape."""
    repeat = args.repeat or pipeline.DEFAULT_REPEAT
    rows, info = pipeline.run_pipeline(args.shape or pipeline.SHAPES, args.threads, repeat, impls.import_torch())
    pipeline.print_report(rows, info)
    if args.json:
        met, checked = pipeline.targets_met(rows)
        _write_json(args.json, {"machine": info, "repeat": repeat, "targets_met": met, "targets_checked": checked,
                                "out_of_reach": pipeline.out_of_reach(rows), "rows": rows})
    return 0


def run_latency(args):
    """``fastbn bench --latency`` with --threads, --repeat and --json; 1 if a fastbn result is wrong."""
    repeat = args.repeat or latency.DEFAULT_REPEAT
    rows, targets, info, empty_s = latency.run(args.threads or latency.THREADS, repeat, impls.import_torch(),
                                               report.machine_info, sys.stderr)
    latency.print_report(rows, targets, info, empty_s, sys.stdout)
    if args.json:
        _write_json(args.json, {"machine": info, "repeat": repeat, "per_round": latency.PER_ROUND,
                                "empty_call_median_s": empty_s, "targets_met": sum(t["met"] for t in targets),
                                "targets_checked": len(targets), "targets": targets, "rows": rows})
    fastbn_wrong = [r for r in rows if r["error"] and r["impl"] not in ("onnxruntime", "torch")]
    return 1 if fastbn_wrong else 0


def run_layouts(args):
    """``fastbn bench --channels-last`` with --threads, --repeat and --json."""
    repeat = args.repeat or layouts.DEFAULT_REPEAT
    rows, targets, info = layouts.run(args.threads or layouts.THREADS, repeat, impls.import_torch(), report.machine_info)
    layouts.print_report(rows, targets, info, sys.stdout)
    if args.json:
        _write_json(args.json, {"machine": info, "repeat": repeat, "targets_met": sum(t["met"] for t in targets),
                                "targets_checked": len(targets), "targets": targets, "rows": rows})
    return 0


def run_halves(args):
    """``fastbn bench --half`` with --threads, --repeat and --json."""
    repeat = args.repeat or halves.DEFAULT_REPEAT
    rows, info = halves.run(args.threads or halves.THREADS, repeat, report.machine_info)
    halves.print_report(rows, info, sys.stdout)
    if args.json:
        _write_json(args.json, {"machine": info, "repeat": repeat, "rows": rows})
    return 0


def run_activation(args):
    """``fastbn bench --relu`` with --threads, --repeat and --json."""
    repeat = args.repeat or activation.DEFAULT_REPEAT
    rows, targets, info = activation.run(args.threads or activation.THREADS, repeat, report.machine_info)
    activation.print_report(rows, targets, info, sys.stdout)
    if args.json:
        _write_json(args.json, {"machine": info, "repeat": repeat, "targets_met": sum(t["met"] for t in targets),
                                "targets_checked": len(targets), "targets": targets, "rows": rows})
    return 0
