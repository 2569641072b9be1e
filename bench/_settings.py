"""Settings of fastbn's pytest-benchmark suite, shared by bench/conftest.py and the test files
(which import them from here, not from conftest)."""
import os

import pytest

from fastbn.bench import cases


def _threads_from_env():
    text = os.environ.get("FASTBN_BENCH_THREADS", "2")
    if not text.strip().isdigit() or int(text) < 1:
        raise pytest.UsageError(f"FASTBN_BENCH_THREADS must be a positive integer, got {text!r}")
    return int(text)


# Threads for fastbn and torch alike; numpy's naive implementation runs on one thread.
THREADS = _threads_from_env()

# (shape, dtype): the float32 shapes of a ResNet-ish network, an MLP's BatchNorm1d, one float64
# case, and a tiny one that measures per-call overhead.
CASES = [
    ((64, 64, 56, 56), "float32"),
    ((256, 256, 14, 14), "float32"),
    ((32, 3, 224, 224), "float32"),
    ((4096, 1024), "float32"),
    ((64, 64, 56, 56), "float64"),
    (cases.TINY, "float32"),
]

# Timed seconds to aim for per benchmark, and the bounds on the number of rounds.
TARGET_S = 0.3
MIN_ROUNDS, MAX_ROUNDS = 5, 50
