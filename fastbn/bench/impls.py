"""The implementations timed side by side: ``make_bench(op, impl, problem)``.

A :class:`Bench` is what gets timed: ``run`` is the call (it returns the output, for backward
(dx, grad_weight, grad_bias)); ``setup``, when not None, runs untimed before each call.  Each
Bench gets its own copies of the parameters and buffers.  Optional packages (torch, onnxruntime)
are imported on first use; where one is missing, ``make_bench`` returns None and
:func:`skip_reason` says why.
"""
import contextlib
from collections import namedtuple

import numpy as np

import fastbn

from .. import _openmp
from . import native, onnxrt, reference
from .cases import OPS

# sampled once each per round, in a shuffled order; fastbn_out: the same fastbn call with out=
# (one buffer reused every call), beside the allocating one; onnxruntime: eval forward out= only
IMPLS = ("copy", "fastbn", "fastbn_out", "floor", "torch", "numpy", "onnxruntime")

Bench = namedtuple("Bench", "run setup", defaults=(None,))


def import_torch():
    """The torch module, or None when it is not installed (or does not load)."""
    try:
        import torch
    except (ImportError, OSError):
        return None
    return torch


@contextlib.contextmanager
def thread_count(n, torch=None):
    """Run fastbn (and torch, when given) on ``n`` threads inside the block; restore afterwards.

    A build without OpenMP runs on one thread, and then so does torch (same thread count).
    """
    if not _openmp.OPENMP:
        n = 1
    old = fastbn.get_num_threads()
    old_torch = torch.get_num_threads() if torch is not None else None
    fastbn.set_num_threads(n)
    if torch is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        fastbn.set_num_threads(old)
        if torch is not None:
            torch.set_num_threads(old_torch)


def fastbn_layer(x, p):
    """A fastbn BatchNorm*d for x, with the problem's parameters and running buffers (copies)."""
    layer_cls = {2: fastbn.BatchNorm1d, 3: fastbn.BatchNorm1d, 4: fastbn.BatchNorm2d, 5: fastbn.BatchNorm3d}[x.ndim]
    layer = layer_cls(x.shape[1], eps=p.eps, momentum=p.momentum, dtype=x.dtype)
    w, b, rm, rv = p.copies()
    layer.weight[...], layer.bias[...] = w, b
    layer.running_mean[...], layer.running_var[...] = rm, rv
    return layer


def torch_layer(torch, p):
    """A torch.nn.BatchNorm*d with the problem's parameters and running buffers (copies)."""
    x = p.x
    layer_cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}[x.ndim]
    dtype = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}[x.dtype]
    bn = layer_cls(x.shape[1], eps=p.eps, momentum=p.momentum, dtype=dtype)
    with torch.no_grad():
        for name, value in zip(("weight", "bias", "running_mean", "running_var"), p.copies()):
            getattr(bn, name).copy_(torch.from_numpy(value))
    return bn


def _fastbn(op, p, out=None):
    """fastbn's layer (the functional API for eval_out); ``out``: an array every call writes
    (fastbn_out), None: each call allocates its output and the loop drops it."""
    x = p.x
    if op == "eval_out":
        w, b, rm, rv = p.copies()
        out = np.empty_like(x)
        return Bench(lambda: fastbn.batch_norm(x, rm, rv, w, b, training=False, eps=p.eps, out=out))
    layer = fastbn_layer(x, p)
    if op == "train":
        layer.train()
        return Bench(lambda: layer(x, out=out))
    if op == "eval":
        layer.eval()
        return Bench(lambda: layer(x, out=out))
    dy = p.dy
    layer.train()

    def forward():  # untimed; returns None, as pytest-benchmark's setup must
        layer(x)

    def backward():
        return layer.backward(dy, out=out), layer.grad_weight, layer.grad_bias

    # the layer forgets its saved state after a backward: each timed backward needs a fresh forward
    return Bench(backward, setup=forward)


def _fastbn_out(op, p):
    """The fastbn call of ``op`` with out=; None for eval_out, which is one already."""
    return None if op == "eval_out" else _fastbn(op, p, out=np.empty_like(p.x))


def _numpy(op, p):
    """The textbook formulas of fastbn.bench.reference, in the input's dtype (no float64 cast)."""
    x = p.x
    w, b, rm, rv = p.copies()
    if op == "train":
        return Bench(lambda: reference.forward_train(x, w, b, rm, rv, p.momentum, p.eps, dtype=None)[0])
    if op == "eval":
        return Bench(lambda: reference.forward_eval(x, w, b, rm, rv, p.eps, dtype=None))
    if op == "eval_out":
        out = np.empty_like(x)
        return Bench(lambda: reference.forward_eval(x, w, b, rm, rv, p.eps, dtype=None, out=out))
    dy = p.dy
    mean, invstd = reference.saved_stats(x, p.eps, dtype=None)  # saved by the (untimed) forward
    return Bench(lambda: reference.backward(dy, x, w, mean, invstd, dtype=None))


def _torch(op, p):
    """torch.nn.BatchNorm*d, or None where torch has no equivalent (no out= for batch norm)."""
    torch = import_torch()
    if torch is None or op == "eval_out":
        return None
    bn = torch_layer(torch, p)
    t = torch.from_numpy(p.x)
    if op in ("train", "eval"):
        # forward only: no autograd recording, like torch.no_grad() but without a context
        # manager's cost in every call (it shows in the tiny per-call benchmark)
        bn.requires_grad_(False)
        bn.train(op == "train")
        return Bench(lambda: bn(t))
    # backward: a training-mode graph built once, replayed (retain_graph) with the same dy
    bn.train()
    t = t.requires_grad_()
    y = bn(t)
    tdy = torch.from_numpy(p.dy)
    params = [t, bn.weight, bn.bias]
    return Bench(lambda: torch.autograd.grad(y, params, tdy, retain_graph=True))


def _onnxruntime(op, p):
    """onnxruntime's BatchNormalization (inference mode) through io_binding into a preallocated
    output: an eval forward with out=; None for the other operations or without onnxruntime."""
    if op != "eval_out" or onnxrt.unavailable() is not None:
        return None
    w, b, rm, rv = p.copies()
    out = np.empty_like(p.x)
    return Bench(onnxrt.bound_eval(p.x, out, w, b, rm, rv, p.eps, fastbn.get_num_threads()))


def floor(op, p, n=None):
    """The least memory traffic of the operation's passes (fastbn.bench.native.traffic: no
    arithmetic to speak of) on fastbn's threads, allocating its output as fastbn's call does and
    writing it with streaming stores where fastbn's kernels would (they measured faster there):
    about as fast as any implementation of the operation can run on this machine (within the noise
    of a measurement: fastbn's backward on large NCHW shapes measures 0.92-1.1x the floor's time).
    A training forward needs the whole batch's statistics before it can write its first output,
    so it passes over x twice (read; read and write y); a backward passes over dy and x twice
    (read both; read both, write dx).  The second pass walks back, as fastbn's kernels do, so that
    it starts with what the cache still holds from the first."""
    n = n or fastbn.get_num_threads()
    x = p.x.reshape(-1)
    if op == "eval_out":
        out = np.empty_like(x)
        return Bench(lambda: native.traffic(x, None, out, n))
    if op == "eval":
        return Bench(lambda: native.traffic(x, None, np.empty_like(x), n))

    def two_passes(a, b=None):  # read a (and b); then read them again, backwards, into a new output
        def run():
            native.traffic(a, b, None, n)
            out = np.empty_like(x)
            native.traffic(a, b, out, n, backwards=True)
            return out
        return Bench(run)
    return two_passes(x) if op == "train" else two_passes(p.dy.reshape(-1), x)


def _copy(op, p):
    x = p.x
    if OPS[op].copy == "copyto":
        out = np.empty_like(x)
        return Bench(lambda: np.copyto(out, x))
    return Bench(x.copy)


FACTORIES = {"fastbn": _fastbn, "fastbn_out": _fastbn_out, "numpy": _numpy, "torch": _torch, "copy": _copy,
             "floor": floor, "onnxruntime": _onnxruntime}


def make_bench(op, impl, p):
    """The Bench for one operation ("train", "eval", "eval_out", "backward") of one implementation
    (one of IMPLS) on problem ``p``; None when ``impl`` cannot do ``op`` (:func:`skip_reason`)."""
    if op not in OPS:
        raise ValueError(f"unknown operation {op!r}, expected one of {list(OPS)}")
    return FACTORIES[impl](op, p)


def skip_reason(op, impl):
    """Why make_bench returns None for (op, impl)."""
    if impl == "torch" and import_torch() is None:
        return "torch is not installed (pip install 'fastbn[torch]')"
    if impl == "torch" and op == "eval_out":
        return "torch's batch norm has no out= (this group compares fastbn with np.copyto)"
    if impl == "fastbn_out" and op == "eval_out":
        return "eval_out is fastbn's out= call already"
    if impl == "onnxruntime" and op != "eval_out":
        return "onnxruntime runs the eval forward with out= (io_binding) only"
    if impl == "onnxruntime":
        return onnxrt.unavailable()
    return None


def expected(op, p):
    """What an implementation's Bench must return for ``op`` on ``p``: the float64 reference
    (fastbn.bench.reference), from the same parameters and running buffers."""
    w, b, rm, rv = (a.astype(np.float64) for a in p.copies())
    if op == "train":
        return reference.forward_train(p.x, w, b, rm, rv, p.momentum, p.eps)[0]
    if op in ("eval", "eval_out"):
        return reference.forward_eval(p.x, w, b, rm, rv, p.eps)
    mean, invstd = reference.saved_stats(p.x, p.eps)
    return reference.backward(p.dy, p.x, w, mean, invstd)


def check(result, expected, dtype):
    """None if an implementation's ``result`` (an array or a tuple of arrays) is finite and close
    to ``expected``; else a message.  Loose tolerances: this catches broken kernels, not ulps."""
    tol = 2e-3 if np.dtype(dtype) == np.float32 else 1e-8
    got = result if isinstance(result, tuple) else (result,)
    want = expected if isinstance(expected, tuple) else (expected,)
    for i, (g, w) in enumerate(zip(got, want)):
        g = np.asarray(g)
        if g.shape != w.shape:
            return f"output {i}: shape {g.shape}, expected {w.shape}"
        if not np.isfinite(g).all():
            return f"output {i}: not all finite"
        if not np.allclose(g, w, rtol=tol, atol=tol):
            err = np.abs(g.astype(np.float64) - w).max()
            return f"output {i}: differs from the float64 reference by up to {err:.3g} (tolerance {tol:g})"
    return None
