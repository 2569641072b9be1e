"""The machinery of ``python -m fastbn bench`` (fastbn._bench): the floor kernel, the interleaved
timing, and how targets are judged.  No timing is asserted here: these check the logic only."""
import numpy as np
import pytest

import fastbn
from fastbn import _bench, _floor, _openmp


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
    _floor.traffic(a, b, y, threads, stream, backwards)
    np.testing.assert_array_equal(y, a + b)
    _floor.traffic(a, None, y, threads, stream, backwards)
    np.testing.assert_array_equal(y, a)
    tol = 1e-3 * n if dtype == np.float32 else 1e-9 * n
    assert _floor.traffic(a, None, None, threads, -1, backwards) == pytest.approx(a.astype(np.float64).sum(), abs=tol)
    assert _floor.traffic(a, b, None, threads, -1, backwards) == pytest.approx((a.astype(np.float64) + b).sum(), abs=tol)
    np.testing.assert_array_equal(a, a0)  # the inputs are only read
    np.testing.assert_array_equal(b, b0)


def test_traffic_rejects_mismatched_lengths_and_accepts_empty():
    a = np.zeros(10, np.float32)
    with pytest.raises(ValueError, match="same length"):
        _floor.traffic(a, np.zeros(9, np.float32), None, 1)
    with pytest.raises(ValueError, match="same length"):
        _floor.traffic(a, None, np.zeros(11, np.float32), 1)
    assert _floor.traffic(np.zeros(0, np.float32), None, None, 2) == 0.0


@pytest.mark.parametrize("op", list(_bench.OPS))
def test_floor_bench_runs_every_operation(rng, op):
    p = _bench.Problem((3, 4, 5, 6), "float32", rng)
    out = _bench.make_bench(op, "floor", p).run()
    if op == "backward":
        np.testing.assert_array_equal(out, (p.dy + p.x).reshape(-1))
    elif not np.isscalar(out):
        np.testing.assert_array_equal(out, p.x.reshape(-1))


# ---------------------------------------------------------------- interleaved timing
def test_time_calls_samples_in_rounds_and_honours_each_repeat_count():
    log = []

    def bench(name, setup=False):
        return _bench.Bench(lambda: log.append(name), (lambda: log.append(name + ".setup")) if setup else None)

    benches = {"a": bench("a"), "b": bench("b", setup=True), "c": bench("c")}
    timings = _bench.time_calls(benches, {"a": 3, "b": 3, "c": 1}, sample_s=0)
    assert {k: t.samples for k, t in timings.items()} == {"a": 3, "b": 3, "c": 1}
    assert all(0 <= t.min <= t.median for t in timings.values())
    timed = [name for name in log if name != "b.setup"]
    # two warm-up calls each (calibration), then rounds: a b c in order, then each in a shuffled order
    assert timed[:9] == ["a", "a", "b", "b", "c", "c"] + ["a", "b", "c"]
    assert sorted(timed[9:11]) == sorted(timed[11:13]) == ["a", "b"]
    assert log.count("b.setup") == 2 + 3  # before every call of b, warm-ups included
    # over many rounds no bench always follows the same one
    log.clear()
    _bench.time_calls({k: bench(k) for k in "abcde"}, dict.fromkeys("abcde", 25), sample_s=0)
    rounds = [log[10 + 5 * i:15 + 5 * i] for i in range(25)]
    assert all(sorted(r) == list("abcde") for r in rounds)
    assert len({tuple(r) for r in rounds}) > 10
    after_a = {r[r.index("a") + 1] for r in rounds if r.index("a") < 4}
    assert len(after_a) >= 3


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
    row["targets"] = _bench.evaluate_targets(row)
    by_name = {t["name"]: t for t in row["targets"]}
    assert by_name["x copy <= 1.15"]["met"] and by_name["x copy <= 1.15"]["reachable"]
    torch_t = by_name["vs torch >= 2x"]
    assert not torch_t["met"] and not torch_t["reachable"]
    assert torch_t["floor"] == pytest.approx(1.875)
    row["error"] = None
    assert _bench._fmt_targets(row) == "MISS vs torch >= 2x (1.5; floor 1.88: out of reach)"


def test_a_target_the_floor_meets_is_a_plain_miss():
    # backward: x copy <= 2.4 missed (3.0) though the floor (1.5) meets it
    row = _row("backward", copy=1.0, fastbn=3.0, floor=1.5, torch=9.0)
    row["targets"] = _bench.evaluate_targets(row)
    row["error"] = None
    copy_t = next(t for t in row["targets"] if t["name"] == "x copy <= 2.4")
    assert not copy_t["met"] and copy_t["reachable"]
    assert _bench._fmt_targets(row) == "MISS x copy <= 2.4 (3)"


def test_measure_gives_a_checked_row_with_the_floor(rng):
    p = _bench.Problem((8, 3, 16, 16), "float32", rng)  # not tiny: the copy targets apply
    row = _bench.measure("train", p, repeat=2, numpy_repeat=1)
    assert row["error"] is None
    assert row["floor_min_s"] > 0 and row["floor_x_copy"] == row["floor_min_s"] / row["copy_min_s"]
    assert row["fastbn_samples"] == 2 and row["numpy_samples"] == 1
    assert {t["name"] for t in row["targets"]} >= {"x copy <= 1.6", "vs numpy >= 5x", "x out= <= 1.1"}
    assert row["fastbn_out_samples"] == 2 and row["x_out"] == row["fastbn_min_s"] / row["fastbn_out_min_s"]


def test_the_allocating_call_is_judged_against_the_same_call_with_out():
    row = _row("backward", copy=1.0, fastbn=2.4, floor=1.5, torch=9.0, fastbn_out=2.0)
    row["x_out"] = 1.2
    row["targets"] = _bench.evaluate_targets(row)
    row["error"] = None
    out_t = next(t for t in row["targets"] if t["name"] == "x out= <= 1.1")
    assert not out_t["met"] and out_t["reachable"] and out_t["value"] == 1.2
    assert _bench._fmt_targets(row) == "MISS x out= <= 1.1 (1.2)"
    row["x_out"] = None  # eval_out rows, and rows without the out= call: no such target
    assert all(t["name"] != "x out= <= 1.1" for t in _bench.evaluate_targets(row))


def test_fastbn_out_writes_the_buffer_and_matches_the_allocating_call(rng):
    p = _bench.Problem((3, 4, 5, 6), "float32", rng)
    assert _bench.make_bench("eval_out", "fastbn_out", p) is None
    assert "out=" in _bench.skip_reason("eval_out", "fastbn_out")
    for op in ("train", "eval", "backward"):
        alloc, out = _bench.make_bench(op, "fastbn", p), _bench.make_bench(op, "fastbn_out", p)
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
    p = _bench.Problem((8, 4, 32, 32), "float32", rng)
    before = fastbn.get_num_threads()
    row = _bench.measure_scaling(p, threads, repeat=2)
    assert fastbn.get_num_threads() == threads  # left on the report's thread count
    fastbn.set_num_threads(before)
    for key in ("fastbn_1", f"fastbn_{threads}", "floor_1", f"floor_{threads}"):
        assert row[f"{key}_min_s"] > 0
    assert row["speedup"] == pytest.approx(row["fastbn_1_min_s"] / row[f"fastbn_{threads}_min_s"])
    assert row["floor_speedup"] == pytest.approx(row["floor_1_min_s"] / row[f"floor_{threads}_min_s"])
    # the target is defined for 2 threads against 1
    assert [t["name"] for t in row["targets"]] == (["2 threads >= 1.5x 1 thread"] if threads == 2 else [])
    assert _bench._fmt_scaling(row).startswith(f"thread scaling, train forward (8, 4, 32, 32) float32: {threads} threads")


def test_a_scaling_miss_the_floor_shares_is_out_of_reach_and_counted(rng):
    row = {"shape": [64, 64, 56, 56], "dtype": "float32", "op": "train", "operation": "train forward",
           "threads": 2, "error": None, "fastbn_1_min_s": 8.6e-3, "fastbn_2_min_s": 6.0e-3,
           "floor_1_min_s": 6.5e-3, "floor_2_min_s": 5.0e-3}
    row["speedup"], row["floor_speedup"] = 8.6 / 6.0, 6.5 / 5.0
    row["targets"] = [{"name": "2 threads >= 1.5x 1 thread", "limit": 1.5, "value": row["speedup"], "met": False,
                       "floor": row["floor_speedup"], "reachable": False}]
    assert _bench._fmt_scaling(row).endswith("the floor 1.30x: MISS 2 threads >= 1.5x 1 thread (1.43; floor 1.3: out of reach)")
    assert _bench.targets_met([row]) == (0, 1)


def test_plot_draws_big_and_tiny_rows_into_a_png(rng, tmp_path):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (fastbn[plot]; CI installs it)")
    rows = [_bench.measure(op, _bench.Problem(shape, "float32", rng), repeat=1, numpy_repeat=1)
            for op, shape in (("eval", (8, 3, 16, 16)), ("train", _bench.TINY))]
    path = tmp_path / "chart.png"
    _bench.plot(rows, _bench.machine_info(None, 1), str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
