"""The machinery of ``fastbn bench`` (the package fastbn.bench): the floor kernel, the interleaved
timing, and how targets are judged.  No timing is asserted here: these check the logic only."""
import ast
import glob
import io
import os
import re

import numpy as np
import pytest

import fastbn
from fastbn import _openmp
from fastbn.bench import cases, impls, latency, native, onnxrt, reference, report, timing


# ---------------------------------------------------------------- the floor kernel
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("stream", [-1, 0, 1], ids=["stream-by-size", "normal-stores", "streaming-stores"])
@pytest.mark.parametrize("backwards", [False, True], ids=["front-to-back", "backwards"])
def test_traffic_writes_and_reads_what_it_says(rng, dtype, threads, stream, backwards):
    # odd, above one thread's minimum share (two threads split it), and several 512 KiB pieces of
    # the backwards walk per thread, the first one short
    n = 300_001
    a = rng.standard_normal(n).astype(dtype)
    b = rng.standard_normal(n).astype(dtype)
    a0, b0 = a.copy(), b.copy()
    y = np.full(n + 1, np.nan, dtype)[1:]  # off 64-byte alignment: the streaming stores' head and tail
    native.traffic(a, b, y, threads, stream, backwards)
    np.testing.assert_array_equal(y, a + b)
    native.traffic(a, None, y, threads, stream, backwards)
    np.testing.assert_array_equal(y, a)
    tol = 1e-3 * n if dtype == np.float32 else 1e-9 * n
    assert native.traffic(a, None, None, threads, -1, backwards) == pytest.approx(a.astype(np.float64).sum(), abs=tol)
    assert native.traffic(a, b, None, threads, -1, backwards) == pytest.approx((a.astype(np.float64) + b).sum(), abs=tol)
    np.testing.assert_array_equal(a, a0)  # the inputs are only read
    np.testing.assert_array_equal(b, b0)


def test_traffic_rejects_mismatched_lengths_and_accepts_empty():
    a = np.zeros(10, np.float32)
    with pytest.raises(ValueError, match="same length"):
        native.traffic(a, np.zeros(9, np.float32), None, 1)
    with pytest.raises(ValueError, match="same length"):
        native.traffic(a, None, np.zeros(11, np.float32), 1)
    assert native.traffic(np.zeros(0, np.float32), None, None, 2) == 0.0


@pytest.mark.parametrize("op", list(cases.OPS))
def test_floor_bench_runs_every_operation(rng, op):
    p = cases.Problem((3, 4, 5, 6), "float32", rng)
    out = impls.make_bench(op, "floor", p).run()
    if op == "backward":
        np.testing.assert_array_equal(out, (p.dy + p.x).reshape(-1))
    elif not np.isscalar(out):
        np.testing.assert_array_equal(out, p.x.reshape(-1))


# ---------------------------------------------------------------- interleaved timing
def test_paired_ratio_is_the_median_of_the_rounds_ratios_not_of_the_medians():
    # b is 1.1x a in the rounds where both ran at the same speed; in round 2 the machine slowed 2x
    # for a's sample only.  The ratio of the medians (1.1 / 2.0) is off, the rounds' median is not.
    a = timing.Timing(1.0, 2.0, 3, (1.0, 2.0, 2.0))
    b = timing.Timing(1.1, 1.1, 3, (1.1, 1.1, 2.2))
    assert b.median / a.median == pytest.approx(0.55)
    assert timing.paired_ratio(a, b) == pytest.approx(1.1)
    assert timing.paired_ratio(b, a) == pytest.approx(1 / 1.1)


def test_time_calls_samples_in_rounds_and_honours_each_repeat_count():
    log = []

    def bench(name, setup=False):
        return impls.Bench(lambda: log.append(name), (lambda: log.append(name + ".setup")) if setup else None)

    benches = {"a": bench("a"), "b": bench("b", setup=True), "c": bench("c")}
    timings = timing.time_calls(benches, {"a": 3, "b": 3, "c": 1}, sample_s=0)
    assert {k: t.samples for k, t in timings.items()} == {"a": 3, "b": 3, "c": 1}
    assert {k: len(t.rounds) for k, t in timings.items()} == {"a": 3, "b": 3, "c": 1}
    assert all(0 <= t.min <= t.median and min(t.rounds) == t.min for t in timings.values())
    timed = [name for name in log if name != "b.setup"]
    # two warm-up calls each (calibration), then rounds: a b c in order, then each in a shuffled order
    assert timed[:9] == ["a", "a", "b", "b", "c", "c"] + ["a", "b", "c"]
    assert sorted(timed[9:11]) == sorted(timed[11:13]) == ["a", "b"]
    assert log.count("b.setup") == 2 + 3  # before every call of b, warm-ups included
    # over many rounds no bench always follows the same one
    log.clear()
    timing.time_calls({k: bench(k) for k in "abcde"}, dict.fromkeys("abcde", 25), sample_s=0)
    rounds = [log[10 + 5 * i:15 + 5 * i] for i in range(25)]
    assert all(sorted(r) == list("abcde") for r in rounds)
    assert len({tuple(r) for r in rounds}) > 10
    after_a = {r[r.index("a") + 1] for r in rounds if r.index("a") < 4}
    assert len(after_a) >= 3


def _busy_thread(seconds):
    """A thread that keeps a core busy for about ``seconds`` (hashlib releases the GIL on long
    inputs), started; (thread, its end time on perf_counter, filled in when it ends)."""
    import hashlib
    import threading
    import time

    data, end = b"x" * (1 << 20), []

    def work():
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop:
            hashlib.sha256(data).digest()
        end.append(time.perf_counter())

    t = threading.Thread(target=work)
    t.start()
    return t, end


def test_settle_waits_until_the_other_threads_go_quiet(monkeypatch):
    # the other threads' CPU clocks, scripted: thread 7 runs flat out for its first 5 readings
    # (each step), then stops; settle returns after the first quiet step, and no sooner
    readings = iter([{7: 0.0}] + [{7: 0.1 * k} for k in range(1, 6)] + [{7: 0.5}] * 100)
    monkeypatch.setattr(timing, "_other_threads_cpu", lambda: next(readings))
    waited = timing.settle(step_s=0.002, max_s=5.0)
    assert 0.012 <= waited < 1.0, waited  # 5 busy steps, then one quiet one: at least 6 steps
    readings = iter([{7: 0.0}] + [{7: 0.1 * k} for k in range(1, 1000)])  # never quiet
    assert 0.02 <= timing.settle(step_s=0.001, max_s=0.02) < 0.5  # max_s bounds the wait
    readings = iter([{7: 0.0}] * 10)  # quiet at once: one step
    assert timing.settle(step_s=0.001, max_s=5.0) < 0.5
    monkeypatch.setattr(timing, "_other_threads_cpu", lambda: None)
    assert timing.settle() == 0.0  # no per-thread clocks (off Linux): no wait


@pytest.mark.skipif(timing._other_threads_cpu() is None, reason="per-thread CPU clocks are read from Linux's /proc")
def test_the_per_thread_clocks_see_a_busy_thread_and_not_a_sleeping_one():
    import threading
    import time

    t, end = _busy_thread(0.4)
    before = timing._other_threads_cpu()
    time.sleep(0.3)  # (the GIL free: the busy thread runs whenever it gets a core)
    after = timing._other_threads_cpu()
    t.join()
    grown = max(after[tid] - before[tid] for tid in after if tid in before)
    assert grown > 0.02, grown  # it ran (on a loaded 2-core machine it still gets a share)
    stop = threading.Event()
    sleeper = threading.Thread(target=stop.wait)
    sleeper.start()
    before = timing._other_threads_cpu()
    time.sleep(0.1)
    after = timing._other_threads_cpu()
    stop.set()
    sleeper.join()
    assert after[sleeper.native_id] - before[sleeper.native_id] < 0.01


def test_hand_over_runs_the_function_for_its_warm_up_time_at_least_once(monkeypatch):
    import types

    # a scripted clock, 1 ms a reading (on a loaded machine a real one jumps while the process
    # waits for a core, and the last call's time says little), and no settle
    ticks = iter(range(10**6))
    clock = types.SimpleNamespace(perf_counter=lambda: next(ticks) * 1e-3)
    monkeypatch.setattr(timing, "time", clock)
    monkeypatch.setattr(timing, "settle", lambda: 0.0)
    calls = []
    timing.hand_over(lambda: calls.append(clock.perf_counter()), warm_s=0.01)
    assert len(calls) >= 3 and calls[-1] >= 0.005 and clock.perf_counter() >= 0.01  # called until 10 ms had passed
    calls.clear()
    timing.hand_over(lambda: calls.append(1), warm_s=0)
    assert calls == [1]


# ---------------------------------------------------------------- judging targets
def _row(op, shape=(64, 64, 56, 56), **times):
    row = {"op": op, "shape": list(shape)}
    row.update({f"{impl}_min_s": t for impl, t in times.items()})
    row["x_copy"] = row["fastbn_min_s"] / row["copy_min_s"]
    row["floor_x_copy"] = row["floor_min_s"] / row["copy_min_s"]
    row["speedup_torch"] = row["torch_min_s"] / row["fastbn_min_s"] if "torch_min_s" in row else None
    row["speedup_numpy"] = row["numpy_min_s"] / row["fastbn_min_s"] if "numpy_min_s" in row else None
    return row


def test_a_target_the_floor_also_misses_is_reported_out_of_reach():
    # eval: x copy <= 1.15 (met: 1.0), >= 2x torch (missed: 1.5x; the floor is only 1.875x faster)
    row = _row("eval", copy=1.0, fastbn=1.0, floor=0.8, torch=1.5)
    row["targets"] = report.evaluate_targets(row)
    by_name = {t["name"]: t for t in row["targets"]}
    assert by_name["x copy <= 1.15"]["met"] and by_name["x copy <= 1.15"]["reachable"]
    torch_t = by_name["vs torch >= 2x"]
    assert not torch_t["met"] and not torch_t["reachable"]
    assert torch_t["floor"] == pytest.approx(1.875)
    row["error"] = None
    assert report._fmt_targets(row) == "MISS vs torch >= 2x (1.5; floor 1.88: out of reach)"


def test_a_target_the_floor_meets_is_a_plain_miss():
    # backward: x copy <= 2.4 missed (3.0) though the floor (1.5) meets it
    row = _row("backward", copy=1.0, fastbn=3.0, floor=1.5, torch=9.0)
    row["targets"] = report.evaluate_targets(row)
    row["error"] = None
    copy_t = next(t for t in row["targets"] if t["name"] == "x copy <= 2.4")
    assert not copy_t["met"] and copy_t["reachable"]
    assert report._fmt_targets(row) == "MISS x copy <= 2.4 (3)"


def test_measure_gives_a_checked_row_with_the_floor(rng):
    p = cases.Problem((8, 3, 16, 16), "float32", rng)  # not tiny: the copy targets apply
    row = report.measure("train", p, repeat=2, numpy_repeat=1)
    assert row["error"] is None
    assert row["floor_min_s"] > 0 and row["floor_x_copy"] == row["floor_min_s"] / row["copy_min_s"]
    assert row["fastbn_samples"] == 2 and row["numpy_samples"] == 1
    assert {t["name"] for t in row["targets"]} >= {"x copy <= 1.6", "vs numpy >= 5x", "x out= <= 1.1"}
    assert row["fastbn_out_samples"] == 2 and row["x_out"] == row["fastbn_min_s"] / row["fastbn_out_min_s"]


def test_the_allocating_call_is_judged_against_the_same_call_with_out():
    row = _row("backward", copy=1.0, fastbn=2.4, floor=1.5, torch=9.0, fastbn_out=2.0)
    row["x_out"] = 1.2
    row["targets"] = report.evaluate_targets(row)
    row["error"] = None
    out_t = next(t for t in row["targets"] if t["name"] == "x out= <= 1.1")
    assert not out_t["met"] and out_t["reachable"] and out_t["value"] == 1.2
    assert report._fmt_targets(row) == "MISS x out= <= 1.1 (1.2)"
    row["x_out"] = None  # eval_out rows, and rows without the out= call: no such target
    assert all(t["name"] != "x out= <= 1.1" for t in report.evaluate_targets(row))


def test_fastbn_out_writes_the_buffer_and_matches_the_allocating_call(rng):
    p = cases.Problem((3, 4, 5, 6), "float32", rng)
    assert impls.make_bench("eval_out", "fastbn_out", p) is None
    assert "out=" in impls.skip_reason("eval_out", "fastbn_out")
    for op in ("train", "eval", "backward"):
        alloc, out = impls.make_bench(op, "fastbn", p), impls.make_bench(op, "fastbn_out", p)
        for bench in (alloc, out):
            if bench.setup is not None:
                bench.setup()
        first, second = alloc.run(), out.run()
        if op == "backward":
            first, second = first[0], second[0]
        np.testing.assert_array_equal(first, second)
        again = out.run() if op != "backward" else (out.setup(), out.run())[1][0]
        assert again is second  # the same buffer every call


# ---------------------------------------------------------------- thread scaling
@pytest.mark.skipif(not _openmp.OPENMP, reason="fastbn was built without OpenMP (serial kernels): "
                                               "it cannot run on 2 or 3 threads")
@pytest.mark.parametrize("threads", [2, 3])
def test_measure_scaling_times_one_and_n_threads_of_fastbn_and_the_floor(rng, threads):
    p = cases.Problem((8, 4, 32, 32), "float32", rng)
    before = fastbn.get_num_threads()
    row = report.measure_scaling(p, threads, repeat=2)
    assert fastbn.get_num_threads() == threads  # left on the report's thread count
    fastbn.set_num_threads(before)
    for key in ("fastbn_1", f"fastbn_{threads}", "floor_1", f"floor_{threads}"):
        assert row[f"{key}_min_s"] > 0
    assert row["speedup"] == pytest.approx(row["fastbn_1_min_s"] / row[f"fastbn_{threads}_min_s"])
    assert row["floor_speedup"] == pytest.approx(row["floor_1_min_s"] / row[f"floor_{threads}_min_s"])
    # the target is defined for 2 threads against 1
    assert [t["name"] for t in row["targets"]] == (["2 threads >= 1.5x 1 thread"] if threads == 2 else [])
    assert report._fmt_scaling(row).startswith(f"thread scaling, train forward (8, 4, 32, 32) float32: {threads} threads")


def test_a_scaling_miss_the_floor_shares_is_out_of_reach_and_counted(rng):
    row = {"shape": [64, 64, 56, 56], "dtype": "float32", "op": "train", "operation": "train forward",
           "threads": 2, "error": None, "fastbn_1_min_s": 8.6e-3, "fastbn_2_min_s": 6.0e-3,
           "floor_1_min_s": 6.5e-3, "floor_2_min_s": 5.0e-3}
    row["speedup"], row["floor_speedup"] = 8.6 / 6.0, 6.5 / 5.0
    row["targets"] = [{"name": "2 threads >= 1.5x 1 thread", "limit": 1.5, "value": row["speedup"], "met": False,
                       "floor": row["floor_speedup"], "reachable": False}]
    assert report._fmt_scaling(row).endswith("the floor 1.30x: MISS 2 threads >= 1.5x 1 thread (1.43; floor 1.3: out of reach)")
    assert report.targets_met([row]) == (0, 1)


def test_plot_draws_big_and_tiny_rows_into_a_png(rng, tmp_path):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (fastbn[plot]; CI installs it)")
    rows = [report.measure(op, cases.Problem(shape, "float32", rng), repeat=1, numpy_repeat=1)
            for op, shape in (("eval", (8, 3, 16, 16)), ("train", cases.TINY))]
    path = tmp_path / "chart.png"
    report.plot(rows, report.machine_info(None, 1), str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


# ---------------------------------------------------------------- the float64 reference
def test_the_reference_is_float64_and_the_naive_numpy_is_the_same_formula(rng):
    p = cases.Problem((6, 3, 5, 4), "float32", rng)
    w, b, rm, rv = p.copies()
    ref = reference.forward_eval(p.x, w, b, rm, rv, p.eps)
    naive = reference.forward_eval(p.x, w, b, rm, rv, p.eps, dtype=None)
    assert ref.dtype == np.float64 and naive.dtype == np.float32
    np.testing.assert_allclose(naive, ref, rtol=1e-5, atol=1e-5)
    rm64, rv64 = rm.astype(np.float64), rv.astype(np.float64)
    y, mean, var = reference.forward_train(p.x, w, b, rm64, rv64, 0.25, p.eps)
    n = p.x.size // 3
    x64 = p.x.astype(np.float64).transpose(1, 0, 2, 3).reshape(3, -1)
    np.testing.assert_allclose(mean, x64.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(rv64, 0.75 * rv.astype(np.float64) + 0.25 * x64.var(axis=1, ddof=1), rtol=1e-12)  # unbiased
    np.testing.assert_allclose(y.std(axis=(0, 2, 3)), np.abs(w) * np.sqrt(var / (var + p.eps)), rtol=1e-6)
    dx, gw, gb = reference.backward(p.dy, p.x, w, *reference.saved_stats(p.x, p.eps))
    np.testing.assert_allclose(gb, p.dy.astype(np.float64).sum(axis=(0, 2, 3)), rtol=1e-10)
    np.testing.assert_allclose(dx.sum(axis=(0, 2, 3)), 0, atol=1e-9)  # d/dx of a mean-free output
    assert n == 120


def test_the_bench_checks_against_the_float64_reference(rng):
    p = cases.Problem((3, 4, 5, 6), "float32", rng)
    for op in cases.OPS:
        want = impls.expected(op, p)
        first = want[0] if isinstance(want, tuple) else want
        assert first.dtype == np.float64
        bench = impls.make_bench(op, "fastbn", p)
        if bench.setup is not None:
            bench.setup()
        assert impls.check(bench.run(), want, p.dtype) is None, op
    wrong = impls.expected("eval", p) + 0.1
    assert "differs from the float64 reference" in impls.check(wrong.astype(np.float32), impls.expected("eval", p),
                                                                 np.float32)


def test_the_bench_reaches_compiled_code_through_native_only():
    """The floor kernel and the bare eval kernel are imported in fastbn/bench/native.py and
    nowhere else in the harness or bench/ (but gpu_bench.py, which times the CUDA backend's
    kernels): moving them is a change of one file."""
    import fastbn.bench

    here = os.path.dirname(fastbn.bench.__file__)
    sources = glob.glob(os.path.join(here, "*.py"))
    bench_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
    sources += [p for p in glob.glob(os.path.join(bench_dir, "*.py")) if os.path.basename(p) != "gpu_bench.py"]
    offenders = []
    for path in sources:
        if os.path.basename(path) == "native.py" and os.path.dirname(path) == here:
            continue
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] + [node.module or ""] if isinstance(node, ast.ImportFrom) else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            if any(re.search(r"(^|\.)(_kernels|_backends|_cpu)($|\.)", name) for name in names):
                offenders.append(f"{path}:{node.lineno}")
    assert not offenders, f"reach the compiled modules through fastbn.bench.native instead: {offenders}"


# ---------------------------------------------------------------- onnxruntime
def test_onnxruntime_runs_eval_out_only_and_says_why_when_missing(monkeypatch, rng):
    p = cases.Problem((3, 4, 5, 6), "float32", rng)
    for op in ("train", "eval", "backward"):
        assert impls.make_bench(op, "onnxruntime", p) is None
        assert "eval forward with out=" in impls.skip_reason(op, "onnxruntime")
    monkeypatch.setattr(onnxrt, "_modules", lambda: (None, None, "onnxruntime or onnx is not installed (pip ...)"))
    assert impls.make_bench("eval_out", "onnxruntime", p) is None
    assert impls.skip_reason("eval_out", "onnxruntime") == "onnxruntime or onnx is not installed (pip ...)"
    assert onnxrt.version() is None


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_onnxruntime_writes_the_bound_output_in_place(rng, dtype):
    pytest.importorskip("onnxruntime", reason="the onnxruntime rows need onnxruntime: pip install 'fastbn[bench]'")
    pytest.importorskip("onnx", reason="the onnxruntime rows need onnx: pip install 'fastbn[bench]'")
    p = cases.Problem((3, 4, 5, 6), dtype, rng)
    bench = impls.make_bench("eval_out", "onnxruntime", p)
    out = bench.run()
    assert impls.check(out, impls.expected("eval_out", p), p.dtype) is None
    assert bench.run() is out  # the same preallocated array every call
    p.x *= 2  # bound by pointer: the next run reads the new values, no copy was taken
    again = bench.run()
    assert again is out and impls.check(again, impls.expected("eval_out", p), p.dtype) is None


def test_the_eval_out_row_has_the_onnxruntime_ratio(rng):
    pytest.importorskip("onnxruntime", reason="the onnxruntime rows need onnxruntime: pip install 'fastbn[bench]'")
    pytest.importorskip("onnx", reason="the onnxruntime rows need onnx: pip install 'fastbn[bench]'")
    row = report.measure("eval_out", cases.Problem((8, 3, 16, 16), "float32", rng), repeat=2, numpy_repeat=1)
    assert row["error"] is None and row["onnxruntime_error"] is None and row["onnxruntime_samples"] == 2
    assert row["speedup_onnxruntime"] == row["onnxruntime_min_s"] / row["fastbn_min_s"]
    out = io.StringIO()
    info = dict(report.machine_info(None, 1), other_processes_busy_cores=None)
    report.print_report([row], info, out)
    lines = out.getvalue().splitlines()
    assert f"| onnxruntime {onnxrt.version()} |" in lines[0] and "vs onnxrt" in lines[1]
    assert f"{row['speedup_onnxruntime']:.2f}x" in lines[2]


def test_the_report_points_at_a_json_file_only_when_one_was_asked_for(rng):
    row = report.measure("eval", cases.Problem((8, 3, 16, 16), "float32", rng), repeat=1, numpy_repeat=1)
    info = dict(report.machine_info(None, 1), other_processes_busy_cores=None)
    row["fastbn_median_s"] = 2 * row["fastbn_min_s"]  # unsteady: the note about medians shows
    without, to_file = io.StringIO(), io.StringIO()
    report.print_report([row], info, without)
    report.print_report([row], info, to_file, json_path="out.json")
    assert "JSON" not in without.getvalue() and "--json FILE also writes the medians" in without.getvalue()
    assert "JSON" not in to_file.getvalue() and "out.json also has the medians" in to_file.getvalue()
    assert "note: unsteady timings" in without.getvalue()


# ---------------------------------------------------------------- fastbn bench --latency
@pytest.mark.skipif(not _openmp.OPENMP, reason="fastbn was built without OpenMP: the latency targets are set "
                                               "for 2 threads, a serial build runs on 1")
def test_latency_rows_for_every_implementation_and_the_targets_of_a_tiny_shape():
    torch = impls.import_torch()
    rows, targets, info, empty = latency.run(2, 2, torch, report.machine_info, io.StringIO(), per_round=3,
                                             shapes=[(2, 16, 4, 4)])
    expect = [i for i in latency.IMPLS if (i != "onnxruntime" or onnxrt.unavailable() is None)
              and (i != "torch" or torch is not None)]
    assert [r["impl"] for r in rows] == expect and info["threads"] == 2
    for r in rows:
        assert r["error"] is None, r
        assert r["calls"] == 6 and 0 < r["min_s"] <= r["median_s"] <= r["p90_s"]
        assert (r["x_onnxruntime"] is None) == ("onnxruntime" not in expect)
    assert 0 < empty < min(r["median_s"] for r in rows)
    names = [t["name"] for t in targets]
    assert names == ["layer <= kernel + 2 us", "batch_norm out= <= batch_norm", "layer out= <= layer"]
    kernel = next(r for r in rows if r["impl"] == "kernel")
    assert targets[0]["than"] == pytest.approx(kernel["median_s"] + 2e-6)
    out = io.StringIO()
    latency.print_report(rows, targets, info, empty, out)
    text = out.getvalue()
    assert "x onnxrt" in text and f"targets met: {sum(t['met'] for t in targets)}/3" in text


def _latency_row(shape, impl, median):
    return {"shape": list(shape), "impl": impl, "median_s": median, "error": None}


def test_latency_targets_compare_medians_and_are_set_for_two_threads():
    rows = [_latency_row((1, 512, 7, 7), impl, t) for impl, t in
            (("kernel", 4e-6), ("batch_norm_out", 6e-6), ("batch_norm", 7e-6), ("layer", 9e-6),
             ("layer_out", 8e-6), ("onnxruntime", 6.5e-6))]
    rows += [_latency_row((2, 16, 4, 4), impl, t) for impl, t in
             (("kernel", 1e-6), ("batch_norm_out", 5e-6), ("batch_norm", 4e-6), ("layer", 3.5e-6),
              ("layer_out", 3e-6))]  # no onnxruntime here: its target is not checked
    got = {(t["name"], tuple(t["shape"])): t["met"] for t in latency.evaluate_targets(rows, 2)}
    assert got == {("batch_norm out= <= onnxruntime", (1, 512, 7, 7)): True,
                   ("layer <= kernel + 2 us", (2, 16, 4, 4)): False,
                   ("batch_norm out= <= batch_norm", (1, 512, 7, 7)): True,
                   ("batch_norm out= <= batch_norm", (2, 16, 4, 4)): False,
                   ("layer out= <= layer", (1, 512, 7, 7)): True,
                   ("layer out= <= layer", (2, 16, 4, 4)): True}
    assert latency.evaluate_targets(rows, 1) == []
    rows[1]["error"] = "output 0: not all finite"  # a wrong result meets nothing
    assert not next(t for t in latency.evaluate_targets(rows, 2) if t["name"] == "batch_norm out= <= onnxruntime")["met"]


def test_channels_last_report_runs_and_judges(monkeypatch, capsys):
    """fastbn bench --channels-last on a small shape: every row timed, the targets judged at 2
    threads (the report's numbers are not asserted: timings are not pass/fail)."""
    import io

    from fastbn.bench import layouts, report

    monkeypatch.setattr(layouts, "SHAPE", (4, 8, 6, 6))
    rows, targets, info = layouts.run(2, 2, None, report.machine_info)
    assert [r["op"] for r in rows] == list(layouts.OPS)
    assert all(r["nchw_s"] > 0 and r["channels_last_s"] > 0 and r["torch_channels_last_s"] is None for r in rows)
    assert [t["what"].split(":")[0] for t in targets] == list(layouts.OPS)  # no torch: the layout targets only
    out = io.StringIO()
    layouts.print_report(rows, targets, info, out)
    assert "targets met:" in out.getvalue() and "chan-last" in out.getvalue()
    rows1, targets1, _ = layouts.run(1, 1, None, report.machine_info)
    assert targets1 == []  # the targets are set for 2 threads


def test_relu_report_times_every_variant_and_judges():
    """fastbn bench --relu on small shapes: each op with and without the activation, the backward
    both ways, the targets judged at 2 threads on the recomputed mask (bias=) only."""
    import io

    from fastbn.bench import activation, report

    rows, targets, info = activation.run(2, 2, report.machine_info, shapes=((4, 8, 6, 6), (16, 5)))
    assert [(tuple(r["shape"]), r["op"]) for r in rows] == [(s, op) for s in ((4, 8, 6, 6), (16, 5))
                                                            for op in activation.OPS]
    for r in rows:
        want = activation.VARIANTS if "backward" in r["op"] else activation.VARIANTS[:2]
        assert all(r[v] > 0 for v in want) and set(want) <= set(r)
    judged = [op for op, limit in activation.OPS.items() if limit is not None]
    assert [t["what"].split(") ", 1)[1].split(",")[0] for t in targets] == judged * 2
    assert all("bias=" in t["what"] for t in targets)
    out = io.StringIO()
    activation.print_report(rows, targets, info, out)
    assert "targets met:" in out.getvalue() and "relu (output=) ms" in out.getvalue()
    assert activation.run(1, 1, report.machine_info, shapes=((4, 8, 6, 6),))[1] == []  # set for 2 threads


def test_half_report_times_every_width(monkeypatch):
    """fastbn bench --half on a small shape: a row per (dtype, op) with a positive GB/s."""
    import io

    from fastbn.bench import halves, report

    monkeypatch.setattr(halves, "SHAPE", (4, 8, 6, 6))
    rows, info = halves.run(2, 2, report.machine_info)
    assert {(r["dtype"], r["op"]) for r in rows} == {(d, op) for d in halves.dtypes() for op in halves.OPS}
    assert all(r["gbps"] > 0 for r in rows)
    out = io.StringIO()
    halves.print_report(rows, info, out)
    assert "float16 ms" in out.getvalue()
