"""Short channel runs: group norm and batch norm where each channel of a sample is a few elements.

    PYTHONPATH=. nice -n -15 python bench/short_runs.py [threads] [rounds]

GroupNorm(32) on (N, C) input and on maps of 1x1 to 28x28, the group-norm functional calls
(forward, and backward from the forward's statistics) against PyTorch's aten kernels
(native_group_norm and its backward, no autograd), and batch norm on large 7x7 and 5x5 maps, whose
outputs pass half the L3 and so take streaming stores, against torch.nn.functional.batch_norm.
Milliseconds, the minimum over interleaved rounds (each round times every implementation once, in
a fixed order); the ratio is PyTorch / fastbn, so above 1 is fastbn ahead.  Needs torch.
"""
import sys
import time

import numpy as np
import torch

import fastbn

GROUP_CASES = [(256, 1024), (32, 512, 1, 1), (64, 512, 2, 2), (64, 256, 3, 3), (16, 512, 4, 4),
               (32, 2048, 7, 7), (32, 256, 14, 14), (8, 256, 28, 28)]
BATCH_CASES = [(256, 512, 7, 7), (512, 256, 5, 5)]
GROUPS = 32


def once(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def best(fns, rounds):
    """{name: min seconds} over interleaved rounds, after a warm-up call of each."""
    for fn in fns.values():
        fn()
    times = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k] = min(times[k], once(fn))
    return times


def group_case(shape, rng, rounds):
    N, C = shape[:2]
    S = int(np.prod(shape[2:]))
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    w, b = rng.uniform(0.5, 2, C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    _, mean, invstd = fastbn.group_norm_forward(x, GROUPS, w, b)
    tx, tdy, tw, tb = map(torch.from_numpy, (x, dy, w, b))
    tm, ts = torch.from_numpy(mean.astype(np.float32)), torch.from_numpy(invstd.astype(np.float32))
    return best({
        "fastbn forward": lambda: fastbn.group_norm_forward(x, GROUPS, w, b),
        "torch forward": lambda: torch.native_group_norm(tx, tw, tb, N, C, S, GROUPS, 1e-5),
        "fastbn backward": lambda: fastbn.group_norm_backward(dy, x, GROUPS, w, mean, invstd),
        "torch backward": lambda: torch.ops.aten.native_group_norm_backward(tdy, tx, tm, ts, tw, N, C, S, GROUPS,
                                                                           [True, True, True]),
    }, rounds)


def batch_case(shape, rng, rounds):
    C = shape[1]
    x = rng.standard_normal(shape, dtype=np.float32)
    w, b = rng.uniform(0.5, 2, C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    tx, tw, tb, trm, trv = map(torch.from_numpy, (x, w, b, rm.copy(), rv.copy()))
    F = torch.nn.functional
    return best({
        "fastbn eval": lambda: fastbn.batch_norm(x, rm, rv, w, b),
        "torch eval": lambda: F.batch_norm(tx, trm, trv, tw, tb),
        "fastbn train": lambda: fastbn.batch_norm(x, rm, rv, w, b, True),
        "torch train": lambda: F.batch_norm(tx, trm, trv, tw, tb, True),
    }, rounds)


def row(shape, t, ops):
    cells = "".join(f"  {t['fastbn ' + op] * 1e3:8.3f} {t['torch ' + op] * 1e3:8.3f} "
                    f"{t['torch ' + op] / t['fastbn ' + op]:5.2f}x" for op in ops)
    return f"{str(shape):18s} {int(np.prod(shape[2:])):5d}{cells}"


def main(threads, rounds):
    fastbn.set_num_threads(threads)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    print(f"{threads} threads, float32, ms (min of {rounds} interleaved rounds); torch / fastbn")
    print(f"GroupNorm({GROUPS}) {'S':>5}  {'forward: fastbn   torch':>30}  {'backward: fastbn   torch':>30}")
    for shape in GROUP_CASES:
        print(row(shape, group_case(shape, rng, rounds), ("forward", "backward")))
    print(f"batch norm {'S':>12}  {'eval: fastbn   torch':>30}  {'train: fastbn   torch':>30}")
    for shape in BATCH_CASES:
        print(row(shape, batch_case(shape, rng, rounds), ("eval", "train")))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2, int(sys.argv[2]) if len(sys.argv) > 2 else 30)
