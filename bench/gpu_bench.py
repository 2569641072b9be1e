#!/usr/bin/env python
"""GPU benchmark: fastbn's CUDA kernels against PyTorch (cuDNN), a naive CuPy expression and a copy.

Run on a machine with a CUDA GPU, CuPy (``pip install "fastbn[cuda]"``) and, for the PyTorch
column, a CUDA build of torch::

    python bench/gpu_bench.py                       # (64,64,56,56) and (256,256,14,14), float32
    python bench/gpu_bench.py --shapes 32,3,224,224 --dtype float64 --json gpu.json
    python bench/gpu_bench.py --dtype float16       # float16 elements, float32 weight and bias
    python bench/gpu_bench.py --norms               # group, layer and instance norm (issue 13's shapes)

Times are CUDA-event medians: each round launches an operation ``repeat`` times back to back
between two events (so launch overhead counts when it is what limits the rate, as it does for a
user), and the median over ``rounds`` rounds is reported per call.  Batch norm is memory-bound,
so every row also shows its effective bandwidth and its time as a multiple of a device copy of
the input (``y[...] = x`` via ``cupy.copyto``).  GB/s counts the least traffic the operation
needs: forward reads x and writes y (2 arrays), backward reads dy and x and writes dx (3 arrays).

Rows:
  copy            cupy.copyto(y, x): the bandwidth yardstick
  fastbn          the public API (fastbn.batch_norm_forward / batch_norm / batch_norm_backward),
                  including its small per-channel CuPy ops (running-statistics update, casts)
  fastbn kernels  fastbn._backends.cuda called directly with preallocated outputs: the CUDA
                  kernels alone
  torch           torch.nn.functional.batch_norm on CUDA (cuDNN where torch picks it); backward
                  is torch.autograd.grad through it
  naive cupy      the textbook CuPy expression (x.mean, x.var, broadcasting), several kernels

Operations: the training forward, the evaluation forward and the backward, then the same with a
ReLU after the batch norm ("+ relu": fastbn's fused kernels, relu=True and backward(bias=...),
against torch's relu(batch_norm) and its autograd, and the naive expression with cupy.maximum).
A row whose implementation does not take the dtype or the activation (the public API before it
routes them) is left out, with a note.

``--norms``: group, layer and instance norm instead (fastbn's public calls, which run the batch-norm
kernels on views of the input: fastbn/_backends/cuda_norms.py), forward and backward, against a
copy and torch.nn.functional's (autograd for the backward), on issue 13's shapes unless --shapes
is given (then GroupNorm(32), LayerNorm over the last dimension and InstanceNorm on each).
"""
import argparse
import json
import math
import os
import statistics
import sys

import numpy as np

try:
    import cupy as cp
except ImportError as exc:
    sys.exit(f'gpu_bench needs CuPy ({exc}); install it with pip install "fastbn[cuda]"')

try:
    import fastbn
except ImportError:  # run from a source checkout with the extensions built in place
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fastbn
from fastbn._backends import cuda as _cupy_backend

EPS = 1e-5
MOMENTUM = 0.1


def _torch():
    try:
        import torch
    except ImportError:
        return None, "torch is not installed"
    if not torch.cuda.is_available():
        return None, f"torch {torch.__version__} has no CUDA"
    return torch, None


# ---------------------------------------------------------------- timing
def sync():
    cp.cuda.Device().synchronize()


def time_op(fn, rounds, repeat=None, min_round_s=2e-3):
    """Median seconds per call of fn over ``rounds`` rounds of ``repeat`` calls, by CUDA events."""
    for _ in range(3):  # warm-up: compilation, memory pools, cuDNN heuristics
        fn()
    sync()
    start, end = cp.cuda.Event(), cp.cuda.Event()

    def one_round(n):
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return cp.cuda.get_elapsed_time(start, end) * 1e-3 / n

    if repeat is None:  # enough calls per round for ~2 ms between the events
        repeat = max(3, min(1000, math.ceil(min_round_s / max(one_round(3), 1e-7))))
    return statistics.median(one_round(repeat) for _ in range(rounds)), repeat


# ---------------------------------------------------------------- the operations
class Case:
    """One shape and dtype: the arrays (CuPy and torch views of the same data) and the ops."""

    def __init__(self, shape, dtype, torch, seed=0):
        rng = np.random.default_rng(seed)
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        C = shape[1]
        self.axes = (0,) + tuple(range(2, len(shape)))
        self.bshape = (1, C) + (1,) * (len(shape) - 2)
        self.n = math.prod(shape) // C
        pdt = np.float32 if self.dtype == np.float16 else dtype  # parameters: float32 for float16 (mixed)
        host = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
        self.x = cp.asarray(host)
        self.dy = cp.asarray(rng.standard_normal(shape).astype(dtype))
        self.w = cp.asarray(rng.uniform(0.5, 2, C).astype(pdt))
        self.b = cp.asarray(rng.standard_normal(C).astype(pdt))
        self.rm = cp.zeros(C, dtype=pdt)
        self.rv = cp.ones(C, dtype=pdt)
        self.y = cp.empty_like(self.x)
        self.dx = cp.empty_like(self.x)
        self.x3 = self.x.reshape(shape[0], C, -1)
        self.y3, self.dy3, self.dx3 = (a.reshape(self.x3.shape) for a in (self.y, self.dy, self.dx))
        # what the backward needs: the batch statistics of x
        self.mean, _, self.invstd = _cupy_backend.forward_train(self.x3, self.y3, self.w, self.b, EPS)
        self.torch = torch
        if torch is not None:
            # Separate torch tensors (same values): autograd and torch's allocator stay torch's own.
            self.tx = torch.as_tensor(host, device="cuda").requires_grad_(True)
            self.tdy = torch.as_tensor(self.dy.get(), device="cuda")
            self.tw = torch.as_tensor(self.w.get(), device="cuda").requires_grad_(True)
            self.tb = torch.as_tensor(self.b.get(), device="cuda").requires_grad_(True)
            self.trm = torch.zeros(C, device="cuda", dtype=self.tx.dtype)
            self.trv = torch.ones(C, device="cuda", dtype=self.tx.dtype)
            self.ty = torch.nn.functional.batch_norm(self.tx, self.trm, self.trv, self.tw, self.tb, True, MOMENTUM, EPS)
            self.tyr = torch.relu(self.ty)

    def nbytes(self):
        return self.x.nbytes

    # copy
    def copy(self):
        cp.copyto(self.y, self.x)

    # training forward
    def fastbn_train(self):
        return fastbn.batch_norm_forward(self.x, self.rm, self.rv, self.w, self.b, training=True, momentum=MOMENTUM)

    def kernels_train(self):
        return _cupy_backend.forward_train(self.x3, self.y3, self.w, self.b, EPS)

    def torch_train(self):
        return self.torch.nn.functional.batch_norm(self.tx, self.trm, self.trv, self.tw, self.tb, True, MOMENTUM, EPS)

    def naive_train(self):
        m = self.x.mean(axis=self.axes, keepdims=True)
        v = self.x.var(axis=self.axes, keepdims=True)
        return (self.x - m) / cp.sqrt(v + EPS) * self.w.reshape(self.bshape) + self.b.reshape(self.bshape)

    # evaluation forward
    def fastbn_eval(self):
        return fastbn.batch_norm(self.x, self.rm, self.rv, self.w, self.b, training=False)

    def kernels_eval(self):
        _cupy_backend.forward_eval(self.x3, self.y3, self.w, self.b, self.mean, self.invstd)

    def torch_eval(self):
        with self.torch.no_grad():
            return self.torch.nn.functional.batch_norm(self.tx, self.trm, self.trv, self.tw, self.tb, False,
                                                       MOMENTUM, EPS)

    def naive_eval(self):
        scale = self.w / cp.sqrt(self.rv + EPS)
        return (self.x - self.rm.reshape(self.bshape)) * scale.reshape(self.bshape) + self.b.reshape(self.bshape)

    # backward (training mode)
    def fastbn_backward(self):
        return fastbn.batch_norm_backward(self.dy, self.x, self.w, self.mean, self.invstd, training=True)

    def kernels_backward(self):
        return _cupy_backend.backward(self.dy3, self.x3, self.dx3, self.w, self.mean, self.invstd, True)

    def torch_backward(self):
        return self.torch.autograd.grad(self.ty, (self.tx, self.tw, self.tb), self.tdy, retain_graph=True)

    def naive_backward(self):
        bs = self.bshape
        m = self.x.mean(axis=self.axes, keepdims=True)
        invstd = 1 / cp.sqrt(self.x.var(axis=self.axes, keepdims=True) + EPS)
        xhat = (self.x - m) * invstd
        gb = self.dy.sum(axis=self.axes)
        gw = (self.dy * xhat).sum(axis=self.axes)
        dx = self.w.reshape(bs) * invstd * (self.dy - gb.reshape(bs) / self.n - xhat * gw.reshape(bs) / self.n)
        return dx, gw, gb

    # with a ReLU after the batch norm (fastbn: the fused kernels; the public API has no rows yet)
    def kernels_train_relu(self):
        return _cupy_backend.forward_train(self.x3, self.y3, self.w, self.b, EPS, relu=True)

    def torch_train_relu(self):
        return self.torch.relu(self.torch_train())

    def naive_train_relu(self):
        return cp.maximum(self.naive_train(), 0)

    def kernels_backward_relu(self):  # the gate recomputed from x with the forward's coefficients
        return _cupy_backend.backward(self.dy3, self.x3, self.dx3, self.w, self.mean, self.invstd, True, bias=self.b)

    def torch_backward_relu(self):
        return self.torch.autograd.grad(self.tyr, (self.tx, self.tw, self.tb), self.tdy, retain_graph=True)

    def naive_backward_relu(self):
        bs = self.bshape
        m = self.x.mean(axis=self.axes, keepdims=True)
        invstd = 1 / cp.sqrt(self.x.var(axis=self.axes, keepdims=True) + EPS)
        xhat = (self.x - m) * invstd
        g = cp.where(xhat * self.w.reshape(bs) + self.b.reshape(bs) <= 0, 0, self.dy)
        gb = g.sum(axis=self.axes)
        gw = (g * xhat).sum(axis=self.axes)
        dx = self.w.reshape(bs) * invstd * (g - gb.reshape(bs) / self.n - xhat * gw.reshape(bs) / self.n)
        return dx, gw, gb


class NormCase:
    """One norm on one shape: fastbn's forward and backward, torch's, a copy (the same rows as Case)."""

    def __init__(self, kind, shape, dtype, torch, seed=0):
        rng = np.random.default_rng(seed)
        self.kind, self.shape, self.dtype, self.torch = kind, tuple(shape), np.dtype(dtype), torch
        host = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
        self.x, self.y = cp.asarray(host), cp.empty(shape, dtype)
        self.dy = cp.asarray(rng.standard_normal(shape).astype(dtype))
        pshape = shape[-1:] if kind == "layer" else shape[1:2]
        self.w = cp.asarray(rng.uniform(0.5, 2, pshape).astype(dtype))
        self.b = cp.asarray(rng.standard_normal(pshape).astype(dtype))
        self.arg = {"group": min(32, shape[1]), "layer": pshape, "instance": None}[kind]
        self.saved = self._fastbn_forward()[1:]
        if torch is not None:
            self.tx = torch.as_tensor(host, device="cuda").requires_grad_(True)
            self.tdy = torch.as_tensor(self.dy.get(), device="cuda")
            self.tw = torch.as_tensor(self.w.get(), device="cuda").requires_grad_(True)
            self.tb = torch.as_tensor(self.b.get(), device="cuda").requires_grad_(True)
            self.ty = self._torch_forward()

    def title(self):
        if self.kind == "group":
            return f"GroupNorm({self.arg})"
        return f"LayerNorm({self.arg[0]})" if self.kind == "layer" else "InstanceNorm"

    def nbytes(self):
        return self.x.nbytes

    def copy(self):
        cp.copyto(self.y, self.x)

    def _fastbn_forward(self):
        if self.kind == "group":
            return fastbn.group_norm_forward(self.x, self.arg, self.w, self.b, out=self.y)
        if self.kind == "layer":
            return fastbn.layer_norm_forward(self.x, self.arg, self.w, self.b, out=self.y)
        return fastbn.instance_norm_forward(self.x, None, None, self.w, self.b, out=self.y)

    def fastbn_forward(self):
        return self._fastbn_forward()[0]

    def fastbn_backward(self):
        m, s = self.saved
        if self.kind == "group":
            return fastbn.group_norm_backward(self.dy, self.x, self.arg, self.w, m, s)
        if self.kind == "layer":
            return fastbn.layer_norm_backward(self.dy, self.x, self.arg, self.w, m, s)
        return fastbn.instance_norm_backward(self.dy, self.x, self.w, m, s)

    def _torch_forward(self):
        F = self.torch.nn.functional
        if self.kind == "group":
            return F.group_norm(self.tx, self.arg, self.tw, self.tb, EPS)
        if self.kind == "layer":
            return F.layer_norm(self.tx, self.arg, self.tw, self.tb, EPS)
        return F.instance_norm(self.tx, None, None, self.tw, self.tb, True, MOMENTUM, EPS)

    def torch_forward(self):
        with self.torch.no_grad():
            return self._torch_forward()

    def torch_backward(self):
        return self.torch.autograd.grad(self.ty, (self.tx, self.tw, self.tb), self.tdy, retain_graph=True)

    def check(self):
        out = {}
        if self.torch is not None:
            out["forward vs torch"] = _diff(self.fastbn_forward(), self.torch_forward())
            for name, a, b in zip(("dx", "dw", "db"), self.fastbn_backward(), self.torch_backward()):
                out[f"backward {name} vs torch"] = _diff(a, b)
        return out


NORM_SHAPES = [("group", (32, 64, 56, 56)), ("group", (8, 256, 28, 28)), ("layer", (64, 197, 768)),
               ("instance", (16, 64, 64, 64))]


def run_norm_case(case, rounds, repeat):
    rows = []
    t_copy, _ = time_op(case.copy, rounds, repeat)
    for op, arrays in (("forward", 2), ("backward", 3)):
        impls = [("copy", None), ("fastbn", getattr(case, f"fastbn_{op}"))]
        if case.torch is not None:
            impls.append(("torch", getattr(case, f"torch_{op}")))
        times = {impl: t_copy if fn is None else time_op(fn, rounds, repeat)[0] for impl, fn in impls}
        for impl, t in times.items():
            rows.append({"op": f"{case.title()} {op}", "impl": impl, "us": t * 1e6,
                         "GB/s": (2 if impl == "copy" else arrays) * case.nbytes() / t / 1e9, "x copy": t / t_copy,
                         "torch/this": times["torch"] / t if "torch" in times else None, "naive/this": None})
    return rows


OPS = [  # (title, method suffix, arrays of traffic)
    ("train forward", "train", 2),
    ("eval forward", "eval", 2),
    ("backward", "backward", 3),
    ("train + relu", "train_relu", 2),
    ("backward + relu", "backward_relu", 3),
]


def _diff(a, b):
    a = a.get() if isinstance(a, cp.ndarray) else a.detach().cpu().numpy() if hasattr(a, "detach") else a
    b = b.get() if isinstance(b, cp.ndarray) else b.detach().cpu().numpy() if hasattr(b, "detach") else b
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def check(case):
    """Max abs differences of fastbn's kernels against torch and the naive expression (a sanity
    check), without and with the ReLU."""
    out = {}
    case.kernels_train()
    y = case.y.copy()
    out["train forward vs naive"] = _diff(y, case.naive_train())
    gw, gb = case.kernels_backward()
    dx = case.dx.copy()
    out["backward dx vs naive"] = _diff(dx, case.naive_backward()[0])
    case.kernels_train_relu()
    yr = case.y.copy()
    out["train + relu vs naive"] = _diff(yr, case.naive_train_relu())
    gwr = case.kernels_backward_relu()[0]
    dxr = case.dx.copy()
    out["backward + relu dx vs naive"] = _diff(dxr, case.naive_backward_relu()[0])
    if case.torch is not None:
        ty = case.torch_train()
        case.trm.zero_()
        case.trv.fill_(1)
        out["train forward vs torch"] = _diff(y, ty)
        tdx, tgw, tgb = case.torch_backward()
        out["backward dx vs torch"] = _diff(dx, tdx)
        out["backward dw vs torch"] = _diff(gw, tgw)
        tdx, tgw, tgb = case.torch_backward_relu()
        out["backward + relu dx vs torch"] = _diff(dxr, tdx)
        out["backward + relu dw vs torch"] = _diff(gwr, tgw)
    return out


def run_case(case, rounds, repeat, has_torch):
    rows = []
    t_copy, _ = time_op(case.copy, rounds, repeat)
    for title, op, arrays in OPS:
        impls = [("copy", case.copy), ("fastbn", getattr(case, f"fastbn_{op}", None)),
                 ("fastbn kernels", getattr(case, f"kernels_{op}"))]
        if has_torch:
            impls.append(("torch", getattr(case, f"torch_{op}")))
        impls.append(("naive cupy", getattr(case, f"naive_{op}")))
        times = {}
        for impl, fn in impls:
            if fn is None:
                continue
            try:
                times[impl] = t_copy if impl == "copy" else time_op(fn, rounds, repeat)[0]
            except (TypeError, ValueError, NotImplementedError, RuntimeError) as exc:  # e.g. a dtype not routed yet
                print(f"  note: {title} / {impl} left out: {type(exc).__name__}: {exc}")
        impls = [(impl, fn) for impl, fn in impls if impl in times]
        for impl, _ in impls:
            t = times[impl]
            traffic = 2 if impl == "copy" else arrays
            rows.append({
                "op": title, "impl": impl, "us": t * 1e6, "GB/s": traffic * case.nbytes() / t / 1e9,
                "x copy": t / t_copy,
                "torch/this": times["torch"] / t if "torch" in times else None,
                "naive/this": times["naive cupy"] / t if "naive cupy" in times else None,
            })
    return rows


def device_line():
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    sms = dev.attributes["MultiProcessorCount"]
    return f"{name} (device {dev.id}, {sms} SMs, compute capability {props['major']}.{props['minor']})"


def print_table(shape, dtype, rows, checks, nbytes):
    print(f"\nshape {shape} {dtype}, {nbytes / 1e6:.1f} MB per array")
    print("  check: " + ", ".join(f"{k} {v:.1e}" for k, v in checks.items()))
    ow = max(16, max((len(r["op"]) + 2 for r in rows), default=0))
    head = f"  {'operation':<{ow}}{'impl':<16}{'time (us)':>10}{'GB/s':>8}{'x copy':>9}{'vs torch':>10}{'vs naive':>10}"
    print(head)
    print("  " + "-" * (len(head) - 2))
    last = None
    for r in rows:
        op = r["op"] if r["op"] != last else ""
        last = r["op"]
        vt = f"{r['torch/this']:.2f}x" if r["torch/this"] is not None else "-"
        vn = f"{r['naive/this']:.2f}x" if r["naive/this"] is not None else "-"
        print(f"  {op:<{ow}}{r['impl']:<16}{r['us']:>10.1f}{r['GB/s']:>8.0f}{r['x copy']:>8.2f}x{vt:>10}{vn:>10}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=None,
                   help="comma-separated shapes (N,C,...) (default: 64,64,56,56 256,256,14,14; with --norms, "
                        "issue 13's four cases)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16"],
                   help="element dtype; float16 takes float32 weight and bias (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=15, help="timed rounds per measurement; the median is shown")
    p.add_argument("--repeat", type=int, default=None, help="calls per round (default: enough for ~2 ms)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--norms", action="store_true", help="group, layer and instance norm instead of batch norm")
    args = p.parse_args(argv)

    torch, why_not = _torch()
    print(f"device: {device_line()}")
    print(f"CuPy {cp.__version__}, fastbn {fastbn.__version__}, backend: {_cupy_backend.status()}")
    if torch is not None:
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        print(f"torch {torch.__version__}, cuDNN {cudnn} (enabled: {torch.backends.cudnn.enabled})")
    else:
        print(f"torch column skipped: {why_not}")
    print("times: median of CUDA-event rounds, per call; GB/s: least traffic (fwd 2 arrays, bwd 3 arrays)")

    results = {"device": device_line(), "cupy": cp.__version__, "fastbn": fastbn.__version__,
               "torch": None if torch is None else torch.__version__, "cases": []}
    if args.shapes is None and args.norms:
        cases = [(s, [kind]) for kind, s in NORM_SHAPES]
    else:
        cases = [(tuple(int(v) for v in text.split(",")), ["group", "layer", "instance"])
                 for text in args.shapes or ["64,64,56,56", "256,256,14,14"]]
    for shape, kinds in cases:
        if args.norms:
            for kind in kinds:
                case = NormCase(kind, shape, args.dtype, torch)
                checks, rows = case.check(), run_norm_case(case, args.rounds, args.repeat)
                print_table(shape, args.dtype, rows, checks, case.nbytes())
                results["cases"].append({"shape": shape, "dtype": args.dtype, "norm": kind, "checks": checks,
                                         "rows": rows})
                del case
            continue
        case = Case(shape, args.dtype, torch)
        checks = check(case)
        rows = run_case(case, args.rounds, args.repeat, torch is not None)
        print_table(shape, args.dtype, rows, checks, case.nbytes())
        results["cases"].append({"shape": shape, "dtype": args.dtype, "checks": checks, "rows": rows})
        del case
        cp.get_default_memory_pool().free_all_blocks()
        if torch is not None:
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
