"""Fixtures of fastbn's pytest-benchmark suite (see bench/README.md).

Every test that takes ``impl`` runs once per implementation (fastbn, fastbn_out, numpy, torch,
onnxruntime, copy, floor) and every test that takes ``problem`` once per (shape, dtype) case, so that
``pytest bench/ --benchmark-group-by=group,param:shape`` puts the implementations side by side.
The implementations themselves live in the package fastbn.bench, shared with ``fastbn bench``.
"""
import numpy as np
import pytest

import fastbn
from _settings import CASES, MAX_ROUNDS, MIN_ROUNDS, TARGET_S, THREADS
from fastbn.bench import cases, impls, onnxrt, timing


def case_id(shape, dtype):
    """'64x64x56x56-float32': a test id that ``-k`` can select (``-k 64x64x56x56``)."""
    return "x".join(map(str, shape)) + "-" + dtype


def pytest_generate_tests(metafunc):
    # a test file may name its own CASES and IMPLS (test_pipeline.py does)
    if "shape" in metafunc.fixturenames:
        cases = getattr(metafunc.module, "CASES", CASES)
        # module scope: each case's arrays are made once per file and shared by the implementations
        metafunc.parametrize("shape,dtype", [pytest.param(s, d, id=case_id(s, d)) for s, d in cases], scope="module")
    if "impl" in metafunc.fixturenames:
        metafunc.parametrize("impl", getattr(metafunc.module, "IMPLS", impls.IMPLS))


def pytest_report_header(config):
    torch = impls.import_torch()
    return (f"fastbn bench: {THREADS} threads for fastbn, torch and onnxruntime (FASTBN_BENCH_THREADS); "
            f"torch {torch.__version__ if torch else 'not installed'}; "
            f"onnxruntime {onnxrt.version() or 'not installed'}")


@pytest.fixture(scope="session", autouse=True)
def bench_threads():
    with impls.thread_count(THREADS, impls.import_torch()):
        yield THREADS


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="module")
def problem(rng, shape, dtype):
    """x, dy, weight, bias and running buffers for one (shape, dtype) case."""
    return cases.Problem(shape, dtype, rng)


def _plan(bench):
    """(rounds, iterations) for about TARGET_S of timing, from a warm-up and a timed call."""
    t = timing.calibrate(bench)
    # fast calls without a setup run in loops of ~1 ms (a setup allows one call per round)
    iterations = 1 if bench.setup is not None else max(1, int(1e-3 / t))
    rounds = min(MAX_ROUNDS, max(MIN_ROUNDS, round(TARGET_S / (t * iterations))))
    return rounds, iterations


@pytest.fixture
def run_bench(benchmark, impl, problem):
    """run_bench(op): benchmark ``impl`` on ``op`` ("train", "eval", "eval_out", "backward") and,
    for fastbn and onnxruntime, assert the result matches the float64 reference (so a broken
    kernel, or a wrongly bound buffer, cannot look fast)."""

    def run(op):
        bench = impls.make_bench(op, impl, problem)
        if bench is None:
            pytest.skip(impls.skip_reason(op, impl))
        benchmark.group = f"{cases.OPS[op].title} {problem.dtype.name}"
        benchmark.extra_info.update(bytes=cases.OPS[op].bytes_moved * problem.nbytes,
                                    threads=fastbn.get_num_threads())
        if benchmark.disabled:  # --benchmark-disable: one call, the check still runs
            rounds, iterations = 1, 1
        else:
            timing.settle()  # the previous test's library threads (PyTorch's spin ~8 ms) go quiet first
            rounds, iterations = _plan(bench)
        result = benchmark.pedantic(bench.run, setup=bench.setup, rounds=rounds, iterations=iterations)
        if impl in ("fastbn", "fastbn_out", "onnxruntime"):
            error = impls.check(result, impls.expected(op, problem), problem.dtype)
            assert error is None, f"{impl} {cases.OPS[op].title} {problem.label()}: {error}"
        return result

    return run
