"""Group, layer and instance norm: fastbn against a copy and PyTorch CPU, at 2 threads (issue 13).

    PYTHONPATH=. python bench/norms_bench.py [--rounds 7] [--threads 2] [--dtype float32]

Each round times every implementation once per operation, in a shuffled order (short interleaved
A/B samples, so that a neighbour's load spoils both sides alike); the table reports the minimum
over rounds of the median of a few calls, after 0.3 s of warm-up calls each (PyTorch's
first dozen calls on a new shape ran 25x slower than the rest here).  Yardsticks as in ``fastbn bench``: the training
forward against ``x.copy()`` (read x, write y), the backward against a copy too (it moves 1.5x the
bytes: read dy and x, write dx).  Targets (issue 13): forward <= 1.6x copy and >= 2x PyTorch,
backward >= 1.5x PyTorch.  Timings on a shared machine are noisy: rerun before trusting a ratio.
"""
import argparse
import random
import time

import numpy as np

import fastbn

CASES = [
    ("GroupNorm(32)", (32, 64, 56, 56), "group", 32),
    ("GroupNorm(32)", (8, 256, 28, 28), "group", 32),
    ("LayerNorm(768)", (64, 197, 768), "layer", (768,)),
    ("InstanceNorm2d", (16, 64, 64, 64), "instance", None),
]


def _timeit(fn, calls, stat="median"):
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts) if stat == "median" else np.min(ts))


def _impls(kind, shape, arg, dtype):
    import torch
    import torch.nn.functional as TF

    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    if kind == "layer":
        pshape = arg
    else:
        pshape = (shape[1],)
    w = (1 + 0.1 * rng.standard_normal(pshape)).astype(dtype)
    b = (0.1 * rng.standard_normal(pshape)).astype(dtype)
    xt, gt = torch.from_numpy(x), torch.from_numpy(g)
    wt, bt = torch.from_numpy(w), torch.from_numpy(b)
    if kind == "group":
        fwd = lambda: fastbn.group_norm_forward(x, arg, w, b)
        saved = fwd()
        bwd = lambda: fastbn.group_norm_backward(g, x, arg, w, saved[1], saved[2])
        tfn = lambda xx, ww, bb: TF.group_norm(xx, arg, ww, bb)
    elif kind == "layer":
        fwd = lambda: fastbn.layer_norm_forward(x, arg, w, b)
        saved = fwd()
        bwd = lambda: fastbn.layer_norm_backward(g, x, arg, w, saved[1], saved[2])
        tfn = lambda xx, ww, bb: TF.layer_norm(xx, arg, ww, bb)
    else:
        fwd = lambda: fastbn.instance_norm_forward(x, None, None, w, b)
        saved = fwd()
        bwd = lambda: fastbn.instance_norm_backward(g, x, w, saved[1], saved[2])
        tfn = lambda xx, ww, bb: TF.instance_norm(xx, None, None, ww, bb, True)

    def torch_fwd():
        with torch.no_grad():
            tfn(xt, wt, bt)

    xr = xt.clone().requires_grad_(True)
    wr, br = wt.clone().requires_grad_(True), bt.clone().requires_grad_(True)
    yr = tfn(xr, wr, br)

    def torch_bwd():  # the backward alone: the graph kept, the gradients reset
        xr.grad = wr.grad = br.grad = None
        yr.backward(gt, retain_graph=True)

    return {
        "forward": {"copy": x.copy, "fastbn": fwd, "torch": torch_fwd},
        "backward": {"copy": x.copy, "fastbn": bwd, "torch": torch_bwd},
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--cases", default="", help="comma-separated case indices (default: all)")
    ap.add_argument("--stat", default="median", choices=["median", "min"],
                    help="per round: the median of the calls, or their minimum (the best case: on a loaded machine "
                         "PyTorch's OpenMP team waits for a busy core, which the median shows)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    fastbn.set_num_threads(args.threads)
    cases = CASES if not args.cases else [CASES[int(i)] for i in args.cases.split(",")]
    print(f"threads={args.threads} dtype={args.dtype} rounds={args.rounds} (min over rounds of the {args.stat} of "
          f"{args.calls} calls; a shared CPU: noisy)")
    print(f"{'case':16} {'shape':18} {'op':9} {'copy ms':>8} {'fastbn ms':>9} {'torch ms':>9} {'x copy':>7} {'torch/fastbn':>12}")
    rows = []
    for title, shape, kind, arg in cases:
        impls = _impls(kind, shape, arg, np.dtype(args.dtype))
        for op, fns in impls.items():
            best = {k: float("inf") for k in fns}
            for fn in fns.values():  # warm up: PyTorch's first dozen calls on a shape are slow (5-8 ms
                t_end = time.perf_counter() + 0.3  # instead of 0.2 on (8, 256, 28, 28) here)
                while time.perf_counter() < t_end:
                    fn()
            for _ in range(args.rounds):
                order = list(fns)
                random.shuffle(order)
                for k in order:
                    fns[k]()  # warm
                    best[k] = min(best[k], _timeit(fns[k], args.calls, args.stat))
            xc = best["fastbn"] / best["copy"]
            vt = best["torch"] / best["fastbn"]
            rows.append((title, shape, op, xc, vt))
            print(f"{title:16} {str(shape):18} {op:9} {best['copy'] * 1e3:8.2f} {best['fastbn'] * 1e3:9.2f} "
                  f"{best['torch'] * 1e3:9.2f} {xc:7.2f} {vt:12.2f}")
    return rows


if __name__ == "__main__":
    main()
