"""``fastbn bench --pipeline`` (fastbn.bench.pipeline): the loops, the neighbour processes, the rows and
how targets are judged.  No timing is asserted here: these check the logic only, on tiny budgets."""
import io
import json
import os
import signal
import time

import numpy as np
import pytest

import fastbn
from fastbn import __main__ as cli
from fastbn.bench import impls, pipeline

SHAPE = (8, 4, 4, 4)
ROW_KEYS = {"scenario", "shape", "dtype", "impl", "threads", "steps", "idle1_median_s", "median_s", "p90_s", "x_idle",
            "p90_x_idle", "matmul_median_s", "control_matmul_median_s", "matmul_x_control", "targets"}


def _gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# ---------------------------------------------------------------- end to end, tiny budget
@pytest.fixture(scope="module")
def report():
    """One run of every scenario on one small shape (torch too, where it imports), with a record of
    every Neighbours block it opened; the thread count before the run."""
    opened = []

    class Recorded(pipeline.Neighbours):
        def __enter__(self):
            opened.append(self)
            return super().__enter__()

    before = fastbn.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "Neighbours", Recorded)
        rows, info = pipeline.run_pipeline([SHAPE], threads=2, repeat=2, torch=impls.import_torch(),
                                            log=io.StringIO())
    return rows, info, opened, before


def test_rows_cover_every_scenario_with_positive_ratios(report):
    rows, info, _, before = report
    names = ["fastbn", "floor"] + (["torch"] if impls.import_torch() is not None else [])
    assert [(r["scenario"], r["impl"]) for r in rows] == [(s, i) for s in pipeline.SCENARIOS for i in names]
    for r in rows:
        assert set(r) == ROW_KEYS
        assert r["shape"] == list(SHAPE) and r["threads"] == info["threads"]
        assert r["steps"] >= 2  # the budget: at least `repeat` timed steps
        assert r["idle1_median_s"] > 0 and r["x_idle"] > 0 and r["p90_s"] >= r["median_s"] > 0
        assert r["x_idle"] == pytest.approx(r["median_s"] / r["idle1_median_s"])
        if r["scenario"] == "threads":  # no matmul there
            assert r["matmul_x_control"] is None
        else:
            assert r["matmul_x_control"] > 0
            assert r["matmul_x_control"] == pytest.approx(r["matmul_median_s"] / r["control_matmul_median_s"])
    assert fastbn.get_num_threads() == before  # restored


def test_only_fastbn_rows_carry_targets(report):
    names = {(r["scenario"], r["impl"]): [t["name"] for t in r["targets"]] for r in report[0]}
    assert names[("matmul", "fastbn")] == ["median <= 1.3x idle", "p90 <= 2x idle", "matmul <= 1.3x control"]
    assert names[("neighbours", "fastbn")] == ["median <= 1.3x idle"]
    assert names[("threads", "fastbn")] == []
    assert all(not v for (scenario, impl), v in names.items() if impl in ("torch", "floor"))
    # every fastbn target carries its floor's value, the matmul ratio's too
    for r in report[0]:
        if r["impl"] == "fastbn":
            assert all("floor" in t and "reachable" in t for t in r["targets"])


def test_neighbour_processes_ran_until_the_end_and_are_gone(report):
    opened = [n for n in report[2] if n.count]
    assert len(opened) == 1 and len(opened[0].procs) == pipeline.NEIGHBOURS
    for p in opened[0].procs:
        assert p.returncode == -signal.SIGTERM  # still spinning when the block ended: terminated, and reaped
        assert _gone(p.pid)


def test_report_prints_the_machine_and_one_line_per_row(report):
    rows, info, _, _ = report
    out = io.StringIO()
    pipeline.print_report(rows, info, out)
    text = out.getvalue()
    assert text.startswith(f"fastbn {fastbn.__version__} | numpy ")
    assert f" | {info['threads']} threads | BLAS: " in text
    lines = text.splitlines()
    assert lines[1].split()[:3] == ["scenario", "shape", "impl"]
    assert sum(line.startswith(("matmul ", "neighbours ", "threads ")) for line in lines) == len(rows)
    assert lines[-1].startswith("targets met: {}/{}".format(*pipeline.targets_met(rows)))


def test_cli_without_torch_has_no_torch_rows_and_writes_json(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(impls, "import_torch", lambda: None)
    path = tmp_path / "pipeline.json"
    argv = ["bench", "--pipeline", "--shape", "16x8", "--repeat", "1", "--threads", "2", "--json", str(path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "| torch not installed |" in out and f"wrote {path}" in out
    data = json.loads(path.read_text())
    assert data["machine"]["torch"] is None and data["repeat"] == 1
    assert [(r["scenario"], r["impl"], r["shape"]) for r in data["rows"]] == [
        (s, impl, [16, 8]) for s in pipeline.SCENARIOS for impl in ("fastbn", "floor")]
    assert data["out_of_reach"] == pipeline.out_of_reach(data["rows"])
    assert (data["targets_met"], data["targets_checked"]) == pipeline.targets_met(data["rows"])


# ---------------------------------------------------------------- judging targets
def _timed(step, matmul=()):
    return pipeline.Timed(list(matmul), list(step))


@pytest.mark.parametrize("steps,matmul,expected,met", [
    ([1.0] * 9 + [1.3], [1.3] * 10, "ok", 3),  # exactly at a limit counts as met
    ([1.0] * 8 + [2.0] * 2, [1.0] * 10, "ok", 3),  # p90 (linear interpolation): 2.0
    ([1.5] * 8 + [3.0] * 2, [1.0] * 10, "MISS median <= 1.3x idle (1.5); p90 <= 2x idle (3)", 1),
    ([1.0] * 10, [2.0] * 10, "MISS matmul <= 1.3x control (2)", 2),
])
def test_matmul_targets(steps, matmul, expected, met):
    # idle 1-thread median 1.0, the control's matmul median 1.0: the values are the ratios
    row = pipeline.make_row("matmul", SHAPE, "fastbn", 2, [0.5, 1.0, 9.0], _timed(steps, matmul),
                             _timed([1.0], [1.0] * 3))
    assert pipeline.fmt_targets(row) == expected
    assert pipeline.targets_met([row]) == (met, 3)


def test_neighbours_judge_the_median_only_and_torch_and_threads_are_reported():
    slow_tail = _timed([1.2] * 9 + [9.0], [5.0] * 10)
    row = pipeline.make_row("neighbours", SHAPE, "fastbn", 2, [1.0], slow_tail, _timed([1.0], [1.0]))
    assert pipeline.fmt_targets(row) == "ok" and row["matmul_x_control"] == 5.0
    assert pipeline.fmt_targets(pipeline.make_row("neighbours", SHAPE, "fastbn", 2, [1.0], _timed([1.4]))) == \
        "MISS median <= 1.3x idle (1.4)"
    assert pipeline.make_row("matmul", SHAPE, "torch", 2, [1.0], slow_tail, _timed([1.0], [1.0]))["targets"] == []
    row = pipeline.make_row("threads", SHAPE, "fastbn", 2, [1.0], _timed([50.0]))
    assert row["targets"] == [] and pipeline.fmt_targets(row) == "-" and row["matmul_x_control"] is None


# ---------------------------------------------------------------- the pieces
def test_interleave_runs_every_loop_once_per_round_with_a_share_of_the_budget():
    calls = []

    def fake(name):
        def run(budget, warmup):
            calls.append((name, budget, warmup))
            return pipeline.Timed([0.5], [1.0])
        return run

    out = pipeline.interleave({"a": fake("a"), "b": fake("b")}, pipeline.Budget(3, 0.4), rounds=2)
    part = pipeline.Budget(2, 0.2)
    assert calls == [("a", part, pipeline.WARMUP), ("b", part, pipeline.WARMUP), ("a", part, 1), ("b", part, 1)]
    assert out["a"] == pipeline.Timed([0.5, 0.5], [1.0, 1.0])


def test_loop_warms_up_then_times_matmul_and_step_apart():
    log = []
    run = pipeline.loop(None, 1, lambda: log.append("step"), lambda: log.append("mm"))
    timed = run(pipeline.Budget(4, 0.0), warmup=2)
    assert log == ["mm", "step"] * 6 and len(timed.matmul) == len(timed.step) == 4
    assert pipeline.loop(None, 1, lambda: None)(pipeline.Budget(3, 0.0), warmup=0).matmul == []


def test_two_threads_pool_both_threads_steps(rng):
    x = rng.standard_normal((16, 3), dtype="float32")
    timed = pipeline.two_threads("fastbn", 2, [(x, x.copy()), (x.copy(), x)])(pipeline.Budget(3, 0.0), warmup=1)
    assert len(timed.step) >= 3 and all(t > 0 for t in timed.step) and timed.matmul == []


def test_two_threads_raise_a_workers_error_in_the_caller(rng):
    x = rng.standard_normal((16, 3), dtype="float32")
    run = pipeline.two_threads("fastbn", 1, [(x, x), (x, x[:4])])  # the second dy does not match its x
    with pytest.raises(ValueError, match="grad_output must match"):
        run(pipeline.Budget(3, 0.0), warmup=1)


def test_neighbours_spin_inside_the_block_and_end_themselves_after_the_deadline():
    with pipeline.Neighbours(2) as nb:
        assert [p.poll() for p in nb.procs] == [None, None]
    assert all(p.returncode == -signal.SIGTERM and _gone(p.pid) for p in nb.procs)
    with pipeline.Neighbours(1, deadline_s=0.05) as nb:
        deadline = time.monotonic() + 5
        while nb.procs[0].poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert nb.procs[0].returncode == 0  # it ended itself


def test_make_step_refuses_an_unknown_implementation(rng):
    x = rng.standard_normal((4, 3), dtype="float32")
    with pytest.raises(ValueError, match="impl must be 'fastbn', 'floor' or 'torch'.*got 'numpy'"):
        pipeline.make_step("numpy", x, x)


# ---------------------------------------------------------------- command line
@pytest.mark.parametrize("text,shape", [("450x100", (450, 100)), ("32X16x8x8", (32, 16, 8, 8))])
def test_parse_shape(text, shape):
    assert pipeline.parse_shape(text) == shape


@pytest.mark.parametrize("text", ["", "x", "4x3x2", "0x3", "1x8", "1x8x1x1", "4xa"])
def test_bench_refuses_a_bad_shape(capsys, text):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--pipeline", "--shape", text])
    assert exc.value.code == 2
    assert "argument --shape: expected a 2-D or 4-D shape like 450x100 or 32x16x8x8" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--shape", "4x3"], "--shape applies to --pipeline only"),
    (["--pipeline", "--full"], "--full applies to the usual table, not to --pipeline"),
    (["--pipeline", "--plot", "x.png"], "--plot applies to the usual table, not to --pipeline"),
    (["--pipeline", "--json", "/nonexistent-folder/x.json"], "the folder /nonexistent-folder does not exist"),
])
def test_bench_pipeline_refuses_arguments_before_running(capsys, argv, message):
    assert cli.main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "[pipeline" not in err


def test_a_miss_the_floor_shares_is_out_of_reach():
    row = pipeline.make_row("neighbours", SHAPE, "fastbn", 2, [1.0], _timed([1.6]))
    pipeline.judge_against_floor(row, pipeline.make_row("neighbours", SHAPE, "floor", 2, [1.0], _timed([1.5])))
    assert pipeline.fmt_targets(row) == "MISS median <= 1.3x idle (1.6; floor 1.5: out of reach)"
    assert pipeline.out_of_reach([row]) == 1
    row = pipeline.make_row("neighbours", SHAPE, "fastbn", 2, [1.0], _timed([1.6]))
    pipeline.judge_against_floor(row, pipeline.make_row("neighbours", SHAPE, "floor", 2, [1.0], _timed([1.2])))
    assert pipeline.fmt_targets(row) == "MISS median <= 1.3x idle (1.6)" and pipeline.out_of_reach([row]) == 0
    # the matmul next to the step over the matmul next to the control: the floor's, in the same rounds
    control = _timed([0.1], [1.0])

    def judged(floor_matmul):
        row = pipeline.make_row("matmul", SHAPE, "fastbn", 2, [1.0], _timed([1.0], [1.45]), control)
        floor = pipeline.make_row("matmul", SHAPE, "floor", 2, [1.0], _timed([1.0], [floor_matmul]), control)
        pipeline.judge_against_floor(row, floor)
        return row
    row = judged(1.4)
    assert pipeline.fmt_targets(row) == "MISS matmul <= 1.3x control (1.45; floor 1.4: out of reach)"
    row = judged(1.1)
    assert pipeline.fmt_targets(row) == "MISS matmul <= 1.3x control (1.45)" and pipeline.out_of_reach([row]) == 0


def test_the_floor_step_moves_the_memory_it_says(rng):
    x = rng.standard_normal((4, 3, 5, 5)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    x0 = x.copy()
    pipeline.make_step("floor", x, dy)()
    np.testing.assert_array_equal(x, x0)  # it reads the input, never writes it
