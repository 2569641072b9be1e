"""Per-call latency of an evaluation forward on inference-sized float32 inputs: the cases of
``fastbn bench --latency`` (see fastbn/bench/latency.py) for pytest-benchmark.

One timed call per round: fastbn's bare kernel, ``fastbn.batch_norm(..., training=False, out=out)``
and without out=, an eval-mode ``fastbn.BatchNorm2d`` call (and with out=), onnxruntime's
BatchNormalization through io_binding on the same arrays, and ``torch.nn.BatchNorm2d`` in eval
mode, on FASTBN_BENCH_THREADS threads (2 by default: the targets of issues 12 and 14 are set for
2).  Test ids look like ``test_latency[1x512x7x7-float32-onnxruntime]``; compare with
``--benchmark-group-by=param:shape --benchmark-columns=median,iqr,min``.
"""
import pytest

import fastbn
from _settings import TARGET_S
from fastbn.bench import impls, latency, onnxrt, timing

# conftest parametrizes shape, dtype and impl with these instead of the other files' cases
CASES = [(shape, latency.DTYPE) for shape in latency.CASES]
IMPLS = latency.IMPLS
MAX_ROUNDS = 5000


def test_latency(benchmark, problem, impl):
    torch = impls.import_torch()
    calls = latency.make_calls(problem, fastbn.get_num_threads(), torch)
    if impl not in calls:
        pytest.skip(onnxrt.unavailable() if impl == "onnxruntime" else impls.skip_reason("eval", "torch"))
    call, out = calls[impl]
    benchmark.group = f"eval latency {problem.dtype.name}"
    benchmark.extra_info.update(threads=fastbn.get_num_threads())
    if benchmark.disabled:  # --benchmark-disable: one call, the check still runs
        rounds = 1
    else:
        rounds = min(MAX_ROUNDS, max(100, round(TARGET_S / timing.calibrate(impls.Bench(call)))))
    result = benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=0 if benchmark.disabled else 20)
    got = out if out is not None else result
    got = got.numpy() if impl == "torch" else got
    error = impls.check(got, impls.expected("eval", problem), problem.dtype)
    assert error is None, f"{impl} eval forward {problem.label()}: {error}"
