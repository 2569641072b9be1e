"""Layer calls on small batches of many features, fastbn against PyTorch at the same thread count.

    python bench/small_batch.py [threads]

A `BatchNorm1d` on an (N, C) batch much wider than tall (an MLP's hidden layer at inference or
with a small batch) takes fastbn's SLICES split (see fastbn/_kernels.pyx).  Prints microseconds per
call, the minimum over interleaved rounds (one sample of each implementation per round), for the
evaluation forward, the training forward and forward + backward.  Needs torch.
"""
import sys
import time

import numpy as np
import torch

import fastbn

SHAPES = [(1, 4096), (1, 16384), (8, 16384), (16, 8192), (4, 32768), (32, 4096), (64, 2048), (256, 4096)]


def per_call(fn, seconds=2e-3):
    """Seconds per call of fn, timed over enough calls to take about ``seconds``."""
    fn()
    n, t = 1, 0.0
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t = time.perf_counter() - t0
        if t >= seconds:
            return t / n
        n *= 2


def main(threads):
    fastbn.set_num_threads(threads)
    torch.set_num_threads(threads)
    print(f"{threads} threads; microseconds per layer call, min of 15 interleaved rounds; fastbn / torch")
    print(f"{'shape':<12} {'eval':>15} {'train':>15} {'train + backward':>18}")
    for shape in SHAPES:
        rng = np.random.default_rng(0)
        x = rng.standard_normal(shape, dtype=np.float32)
        dy = rng.standard_normal(shape, dtype=np.float32)
        ours, theirs = fastbn.BatchNorm1d(shape[1]), torch.nn.BatchNorm1d(shape[1])
        tx, tdy = torch.from_numpy(x).requires_grad_(True), torch.from_numpy(dy)

        def fb_train_backward():
            ours(x)
            ours.backward(dy)

        def tb_train_backward():
            torch.autograd.grad(theirs(tx), [tx, theirs.weight, theirs.bias], tdy)

        def forward_of(layer, inp):
            def run():
                with torch.no_grad():
                    layer(inp)
            return run

        cases = {"eval": None, "train": None, "train + backward": None}
        best = {}
        for _ in range(15):
            for case in cases:
                training = case != "eval"
                ours.train(training)
                theirs.train(training)
                if shape[0] == 1 and training:  # one value per channel: no training
                    continue
                pair = ((forward_of(ours, x), forward_of(theirs, tx)) if case != "train + backward"
                        else (fb_train_backward, tb_train_backward))
                for who, fn in zip(("fastbn", "torch"), pair):
                    t = per_call(fn)
                    best[case, who] = min(best.get((case, who), t), t)
        cells = [f"{best[c, 'fastbn'] * 1e6:6.1f} / {best[c, 'torch'] * 1e6:6.1f}" if (c, "fastbn") in best
                 else f"{'-':>15}" for c in cases]
        print(f"{str(shape):<12} {cells[0]:>15} {cells[1]:>15} {cells[2]:>18}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else fastbn.get_num_threads())
