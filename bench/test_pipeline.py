"""A training step right after a NumPy matmul: the "matmul" scenario of ``fastbn bench --pipeline``
(see fastbn/bench/pipeline.py) for pytest-benchmark.

The timed call is one step, a layer's training forward + backward (``y = bn(x); bn.backward(dy)``;
torch: ``bn(t).backward(g)``), float32, BatchNorm1d for the 2-D shape and BatchNorm2d for the 4-D
ones.  ``after-matmul``: pedantic's untimed setup runs ``A @ A`` (A 256x256 float32, NumPy's BLAS
on its default threads) before every round, and the step runs on FASTBN_BENCH_THREADS threads;
``idle-1-thread``: the step alone on one thread, the yardstick the pipeline report divides by.
Test ids look like ``test_step[450x100-float32-fastbn-after-matmul]``.
"""
import numpy as np
import pytest

from _settings import MAX_ROUNDS, MIN_ROUNDS, TARGET_S, THREADS
from fastbn.bench import impls, pipeline, timing

# conftest parametrizes shape, dtype and impl with these instead of the other files' cases
CASES = [(shape, "float32") for shape in pipeline.SHAPES]
IMPLS = ("fastbn", "torch")


@pytest.mark.parametrize("position", ["idle-1-thread", "after-matmul"])
def test_step(benchmark, problem, impl, position):
    torch = impls.import_torch()
    if impl == "torch" and torch is None:
        pytest.skip(impls.skip_reason("train", "torch"))
    A = np.random.default_rng(1).standard_normal((pipeline.MATMUL_N,) * 2, dtype=np.float32)
    step = pipeline.make_step(impl, problem.x, problem.dy, torch)

    def matmul():  # pedantic's setup: untimed, returns None
        A @ A

    setup, threads = (matmul, THREADS) if position == "after-matmul" else (None, 1)
    benchmark.group = f"pipeline step {problem.dtype.name}"
    benchmark.extra_info.update(threads=threads, position=position)
    with impls.thread_count(threads, torch):
        if benchmark.disabled:  # --benchmark-disable: one call
            rounds = 1
        else:
            t = timing.calibrate(impls.Bench(step, setup))
            rounds = min(MAX_ROUNDS, max(MIN_ROUNDS, round(TARGET_S / t)))
        benchmark.pedantic(step, setup=setup, rounds=rounds, iterations=1)
