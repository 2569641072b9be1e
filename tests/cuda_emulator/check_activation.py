"""The CUDA backend's fused ReLU and float16 storage on the emulator, against PyTorch (CPU).

    PYTHONPATH=. python tests/cuda_emulator/check_activation.py     (needs torch; from a built tree)

Run as a script, this file's folder comes first on ``sys.path``, so ``import cupy`` imports the
emulated CuPy.  On every work-splitting path (each forced, the plan's first kernel checked), in
float32, float64 and float16 (float32 weight and bias):

- ``relu(batch_norm(x))`` forward, training and eval (``forward_eval`` and
  ``forward_eval_running``), against ``torch.relu(F.batch_norm(...))``;
- its backward with ``bias=`` (the activation's input recomputed from x) and with ``output=``
  (read from the forward's output), against torch's autograd; the two variants must agree bit for
  bit (the recomputed mask is the forward's), and the gradients must differ from those without
  the activation (the data has negatives: the mask matters);
- eval-mode inputs with NaN, +-inf and an output of exactly -0: the forward keeps NaN and -0, the
  backward passes the gradient through a NaN and stops it at -0 and below, and grad_input stays
  finite wherever torch's is;
- float16: the forward within one float16 ulp of a float64 reference computed from the upcast
  input, and within one ulp of torch's float16 batch norm.
Exits non-zero, with the case and the errors, at the first disagreement.
tests/test_cuda_activation.py runs it.
"""
import numpy as np
import torch
import torch.nn.functional as F

import cupy
from fastbn._backends import cuda as be

EPS = 1e-5
# (shape (N, C, S), path, unit, the stage-1 kernel of the forward, of the backward)
CASES = [
    ((6, 4, 35), "channels", 0, "bn_forward_channels", "bn_backward_channels"),
    ((3, 9, 7), "units", 5, "bn_moments_units", "bn_grad_sums_units"),           # units cross rows
    ((2, 1, 9000), "units", 0, "bn_moments_units", "bn_grad_sums_units"),        # C = 1, large S
    ((2, 1, 9000), "channels", 0, "bn_forward_channels", "bn_backward_channels"),
    ((300, 40, 1), "columns", 9, "bn_moments_columns", "bn_grad_sums_columns"),  # S = 1, 2 tiles
    ((70, 1, 1), "columns", 0, "bn_moments_columns", "bn_grad_sums_columns"),    # C = 1, S = 1
    ((5, 40, 9), "auto", 0, "bn_forward_channels", "bn_backward_channels"),
]
# dtype, relative tolerance (to max(1, |ref|)) of the outputs and grad_input against torch, and of
# grad_weight and grad_bias (float32: torch sums in float32, fastbn in double)
DTYPES = [(np.float32, (3e-6, 3e-5)), (np.float64, (1e-12, 1e-12)), (np.float16, (4e-3, 4e-3))]


def check(ok, *what):
    """An assert that ``python -O`` keeps."""
    if not ok:
        raise AssertionError(what)


def first_launch(n0, name, dt, act=None):
    """The first kernel launched since launch n0 is name<ctype> (name<ctype, act> for a backward
    kernel with the activation mode as its template argument)."""
    ctype = be.CTYPES[np.dtype(dt)]
    want = f"{name}<{ctype}>" if act is None else f"{name}<{ctype}, {act}>"
    check(cupy.launches[n0][0] == want, want, cupy.launches[n0:n0 + 3])


def err(got, want):
    """max |got - want| / max(1, |want|), NaNs required in the same places."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    check(got.shape == want.shape, got.shape, want.shape)
    nan = np.isnan(want)
    check((np.isnan(got) == nan).all(), "NaNs in other places")
    if nan.all():
        return 0.0
    with np.errstate(invalid="ignore"):  # inf - inf where both are the same infinity
        d = np.abs(got[~nan] - want[~nan])
    d[np.isinf(want[~nan]) & (got[~nan] == want[~nan])] = 0
    return float(d.max(initial=0.0)) / max(1.0, float(np.abs(want[~nan][np.isfinite(want[~nan])]).max(initial=0)))


def pdt(dt):
    return np.float32 if dt is np.float16 else dt


def torch_relu_bn(x, w, b, dy, training, rm=None, rv=None):
    """torch.relu(F.batch_norm(...)) and its gradients (x, w, b) in x's dtype."""
    tx = torch.tensor(x, requires_grad=True)
    tw, tb = torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)
    trm = None if rm is None else torch.tensor(rm)
    trv = None if rv is None else torch.tensor(rv)
    y = torch.relu(F.batch_norm(tx, trm, trv, tw, tb, training=training, eps=EPS))
    y.backward(torch.tensor(dy))
    return y.detach().numpy(), tx.grad.numpy(), tw.grad.numpy(), tb.grad.numpy()


def gpu_backward(dy, x, w, mean, invstd, training, **act):
    dx = cupy.empty(x.shape, dtype=x.dtype)
    kw = {k: cupy.asarray(v) for k, v in act.items()}
    gw, gb = be.backward(cupy.asarray(dy), cupy.asarray(x), dx, cupy.asarray(w), mean, invstd, training, **kw)
    return dx.get(), gw.get(), gb.get()


def check_case(rng, shape, path, unit, fwd_kernel, bwd_kernel, dt, tol):
    be.tuning.update(path=path, unit=unit)
    N, C, S = shape
    x = (rng.standard_normal(shape) * 2 + 0.3 * np.arange(C).reshape(1, -1, 1)).astype(dt)
    w = (rng.uniform(0.5, 2, C) * rng.choice([-1, 1], C)).astype(pdt(dt))
    b = rng.standard_normal(C).astype(pdt(dt))
    dy = rng.standard_normal(shape).astype(dt)
    errs = {}

    # training: forward with relu, then backward both ways
    n0 = len(cupy.launches)
    gy = cupy.empty(shape, dtype=dt)
    mean, var, invstd = be.forward_train(cupy.asarray(x), gy, cupy.asarray(w), cupy.asarray(b), EPS, relu=True)
    first_launch(n0, fwd_kernel, dt)
    y = gy.get()
    ty, tdx, tdw, tdb = torch_relu_bn(x, w, b, dy, True)
    errs["train y"] = err(y, ty)
    gy0 = cupy.empty(shape, dtype=dt)
    be.forward_train(cupy.asarray(x), gy0, cupy.asarray(w), cupy.asarray(b), EPS)
    y0 = gy0.get()
    check((y0 < 0).any() and (y == np.where(y0 < 0, dt(0), y0)).all(), "relu is max(y, 0) of the plain output")
    n0 = len(cupy.launches)
    by_bias = gpu_backward(dy, x, w, mean, invstd, True, bias=b)
    first_launch(n0, bwd_kernel, dt, be.ACT_RECOMPUTE)
    n0 = len(cupy.launches)
    by_out = gpu_backward(dy, x, w, mean, invstd, True, output=y)
    first_launch(n0, bwd_kernel, dt, be.ACT_OUTPUT)
    n0 = len(cupy.launches)
    plain = gpu_backward(dy, x, w, mean, invstd, True)
    first_launch(n0, bwd_kernel, dt, be.ACT_NONE)
    for got, want, what in zip(by_bias, (tdx, tdw, tdb), ("dx", "dw", "db")):
        errs[f"train {what}"] = err(got, want)
    for a, o, p, what in zip(by_bias, by_out, plain, ("dx", "dw", "db")):
        check(np.array_equal(a.view(np.uint8), o.view(np.uint8)), "bias= and output= differ", what)
        check(not np.array_equal(a, p), "the mask changed nothing", what)

    # eval: running statistics, forward_eval_running and the backward from its (mean, invstd)
    rm, rv = rng.standard_normal(C).astype(pdt(dt)), rng.uniform(0.5, 2, C).astype(pdt(dt))
    ge = cupy.empty(shape, dtype=dt)
    emean, einvstd = be.forward_eval_running(cupy.asarray(x), ge, cupy.asarray(w), cupy.asarray(b), cupy.asarray(rm),
                                             cupy.asarray(rv), EPS, relu=True)
    ye = ge.get()
    ty, tdx, tdw, tdb = torch_relu_bn(x, w, b, dy, False, rm, rv)
    errs["eval y"] = err(ye, ty)
    ge2 = cupy.empty(shape, dtype=dt)
    be.forward_eval(cupy.asarray(x), ge2, cupy.asarray(w), cupy.asarray(b), emean, einvstd, relu=True)
    check(np.array_equal(ge2.get(), ye), "forward_eval and forward_eval_running differ")
    by_bias = gpu_backward(dy, x, w, emean, einvstd, False, bias=b)
    by_out = gpu_backward(dy, x, w, emean, einvstd, False, output=ye)
    for got, want, what in zip(by_bias, (tdx, tdw, tdb), ("dx", "dw", "db")):
        errs[f"eval {what}"] = err(got, want)
    for a, o, what in zip(by_bias, by_out, ("dx", "dw", "db")):
        check(np.array_equal(a.view(np.uint8), o.view(np.uint8)), "eval: bias= and output= differ", what)

    if dt is np.float16:  # within one float16 ulp of a float64 reference from the upcast input
        x64 = x.astype(np.float64)
        m64, v64 = x64.mean(axis=(0, 2), keepdims=True), x64.var(axis=(0, 2), keepdims=True)
        z = (x64 - m64) / np.sqrt(v64 + EPS) * w.reshape(1, -1, 1) + b.reshape(1, -1, 1)
        ref = np.maximum(z, 0)
        # one float16 ulp, but where the output is tiny next to the bias (|z| < 2^-14 |b|), the float32
        # arithmetic's own rounding (a few 2^-24 (|z| + |b|), PyTorch's too) exceeds a float16 ulp
        f32 = 2.0**-22 * (np.abs(z) + np.abs(b).reshape(1, -1, 1))
        ulp = np.maximum(np.spacing(np.abs(ref).astype(np.float16)).astype(np.float64), f32)
        check((np.abs(y.astype(np.float64) - ref) <= ulp).all(), "float16 training y beyond 1 ulp of float64",
              np.abs(y - ref).max())
        loose = (f32 > np.spacing(np.abs(ref).astype(np.float16))) & (z > 0)  # the tolerance is a float16 ulp ...
        check(np.count_nonzero(loose) <= max(2, y.size // 100), "float16 tolerance", np.count_nonzero(loose))  # ... nearly everywhere
        ty16 = torch.relu(F.batch_norm(torch.tensor(x), None, None, torch.tensor(w), torch.tensor(b), training=True,
                                       eps=EPS)).numpy().astype(np.float64)
        ulp16 = np.maximum(np.spacing(np.abs(ty16).astype(np.float16)).astype(np.float64), f32)
        check((np.abs(y.astype(np.float64) - ty16) <= ulp16).all(), "float16 y beyond 1 ulp of torch's",
              [(a, c) for a, c, u in zip(y.ravel(), ty16.ravel(), ulp16.ravel()) if abs(float(a) - c) > u][:5])
        check(np.allclose(mean.get(), m64.ravel(), rtol=1e-12, atol=1e-12), "float16 batch mean")
    bad = {k: e for k, e in errs.items() if not e <= tol[k.endswith(("dw", "db"))]}
    check(not bad, shape, path, unit, np.dtype(dt).name, bad)
    return max(errs.values())


def check_specials(path, unit, dt):
    """Eval mode on NaN, +-inf and exact zeros of either sign, against torch.  Channels 3 and 4 have
    x = 0 = mean and bias +-1e-8: outputs that float16 rounds to +0 and -0 (float32 and float64 keep
    them), where the forward's relu and the backward's gate must act on the rounded value."""
    be.tuning.update(path=path, unit=unit)
    C = 5
    w = np.array([1.5, -2.0, 0.5, 2.0, 2.0], dtype=pdt(dt))
    b = np.array([0.25, -0.0, -1.0, 1e-8, -1e-8], dtype=pdt(dt))
    rm = np.array([0.5, 1.0, -2.0, 0.0, 0.0], dtype=pdt(dt))
    rv = np.array([1.0, 4.0, 0.25, 1.0, 1.0], dtype=pdt(dt))
    x = np.linspace(-3, 3, 4 * C * 5).reshape(4, C, 5).astype(dt)
    x[0, 0, 1], x[1, 2, 3], x[2, 0, 0], x[3, 2, 4] = np.nan, np.inf, -np.inf, np.nan
    x[0, 1, 2] = x[2, 1, 1] = rm[1]  # x == mean, weight < 0, bias = -0: the output is exactly -0
    x[1, 3:, 2] = x[3, 3:, 0] = 0
    dy = np.linspace(-1, 2, x.size).reshape(x.shape).astype(dt)
    gy = cupy.empty(x.shape, dtype=dt)
    mean, invstd = be.forward_eval_running(cupy.asarray(x), gy, cupy.asarray(w), cupy.asarray(b), cupy.asarray(rm),
                                           cupy.asarray(rv), EPS, relu=True)
    y = gy.get()
    ty, tdx, tdw, tdb = torch_relu_bn(x, w, b, dy, False, rm, rv)
    # fastbn's ((x - m_hi) - m_lo) * a + b is -0 there (torch's x * a + (b - mean * a) is +0): relu keeps it
    check(y[0, 1, 2] == 0 and np.signbit(y[0, 1, 2]) and ty[0, 1, 2] == 0, "-0 kept", y[0, 1, 2])
    check(np.isnan(y[0, 0, 1]) and np.isnan(y[3, 2, 4]), "NaN kept")
    if dt is np.float16:  # rounded to +0 and -0 first, then the relu: +0 and -0
        check((y[1, 3:, 2] == 0).all() and np.array_equal(np.signbit(y[1, 3:, 2]), [False, True]), y[1, 3:, 2])
    same_sign = np.signbit(y) == np.signbit(ty)
    same_sign[:, 1][x[:, 1] == rm[1]] = True
    check(err(y, ty) <= 1e-3 and same_sign.all(), "specials y", y, ty)
    for variant in ({"bias": b}, {"output": y}):
        dx, gw, gb = gpu_backward(dy, x, w, mean, invstd, False, **variant)
        check(dx[0, 1, 2] == 0 and dx[0, 0, 1] != 0 and np.isfinite(dx[0, 0, 1]), "gate at -0 and NaN", variant)
        tiny = dx[[1, 1, 3, 3], [3, 4, 3, 4], [2, 2, 0, 0]]
        check((tiny == 0).all() if dt is np.float16 else (tiny[[0, 2]] != 0).all(), "gate at +-1e-8", tiny)
        check(np.isfinite(dx).all() and np.isfinite(tdx).all(), "eval dx finite", dx)
        for got, want, what in ((dx, tdx, "dx"), (gw, tdw, "dw"), (gb, tdb, "db")):
            check(err(got, want) <= 4e-3, "specials", what, list(variant), got, want)


def main():
    check(cupy.__version__.endswith("-emulated"), f"this needs the emulated CuPy, not CuPy {cupy.__version__}")
    check(be.native_halves == {"float16"}, be.native_halves)
    rng = np.random.default_rng(11)
    runs, worst = 0, 0.0
    for shape, path, unit, fk, bk in CASES:
        for dt, tol in DTYPES:
            worst = max(worst, check_case(rng, shape, path, unit, fk, bk, dt, tol))
            runs += 1
    for path, unit in (("channels", 0), ("units", 7), ("columns", 0)):
        for dt, _ in DTYPES:
            check_specials(path, unit, dt)
            runs += 1
    print(f"emulated activation: {runs} cases, {len(cupy.launches)} launches, worst relative error {worst:.2e}")


if __name__ == "__main__":
    main()
