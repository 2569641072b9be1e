"""Group, layer and instance normalization on NumPy arrays, with ``torch.nn.functional``'s names
and semantics (``group_norm``, ``layer_norm``, ``instance_norm``), plus ``*_forward`` variants that
also return the saved statistics and ``*_backward`` variants that return
``(grad_input, grad_weight, grad_bias)``, as :mod:`fastbn.functional` does for batch norm.

Validation is here; the arithmetic is in the Cython kernels of ``fastbn._norm_kernels`` (statistics
in float64, never ``E[x^2] - E[x]^2``; one fused normalize + affine pass).  Saved statistics are
float64: ``save_mean`` and ``save_invstd = 1 / sqrt(var + eps)`` per normalized row.  CuPy arrays
run on the GPU (fastbn._backends.cuda_norms: the batch-norm CUDA kernels on views of the input).
"""
import math
import numbers

import numpy as np

from . import _checks as ck
from ._backends import backend_of
from ._fastpath import group_backward as _plain_group_backward, group_forward as _plain_group
from ._fastpath import layer_backward as _plain_layer_backward, layer_forward as _plain_layer

__all__ = [
    "group_norm", "group_norm_forward", "group_norm_backward",
    "layer_norm", "layer_norm_forward", "layer_norm_backward",
    "instance_norm", "instance_norm_forward", "instance_norm_backward",
]


def _input(x, what, name="input"):
    """Check x as a float array of a backend with these kernels: (backend, kernels, contiguous x)."""
    be = backend_of(x)
    kernels = be.norm_kernels(what)
    dt = ck.float_dtype(x, name)
    return be, kernels, be.contiguous(x, dt)


def _vector(v, name, be, n, dt, shape=None, what=None):
    """A weight/bias/statistics argument as a contiguous vector of ``n`` values of ``dt``
    (``what``: what its shape comes from, for ck.vector's message)."""
    return ck.vector(v, name, be, (n,) if shape is None else tuple(shape), dt, what=what)


def _param(v, name, be, x, n, dt, default, shape=None, what=None):
    """``v`` as _vector gives it, or ``default`` everywhere on x's device where it is None."""
    if v is not None:
        return _vector(v, name, be, n, dt, shape, what)
    with be.device(x):
        return be.xp.full(n, default, dtype=dt)


def _zeros(be, x, shape):
    """float64 zeros (statistics, gradients) on x's device."""
    with be.device(x):
        return be.xp.zeros(shape)


def _on_device(be, x, *named):
    """Raise before any kernel runs unless every ``(name, array)`` the caller gave (None: skipped)
    is on the device of x, the caller's input (the GPU's rule; NumPy arrays always are)."""
    be.check_device(x, tuple((n, a) for n, a in named if a is not None and be.is_array(a)))


# ---------------------------------------------------------------- group norm
def _group_shape(x, num_groups, what="group_norm"):
    if x.ndim < 2:
        raise ValueError(f"{what} expects input of at least 2 dimensions (N, C, *), got shape {tuple(x.shape)}")
    G = ck.integer(num_groups, "num_groups", 1)
    C = x.shape[1]
    if C % G:
        raise ValueError(f"num_groups must divide the number of channels: input has {C} channels (axis 1), "
                         f"num_groups={G}")
    N = x.shape[0]
    S = math.prod(x.shape[2:])
    return N, C, G, S


def group_norm_forward(input, num_groups, weight=None, bias=None, eps=1e-5, *, out=None):
    """Like :func:`group_norm`, and also return ``(output, save_mean, save_invstd)``: float64
    statistics of shape ``(N, num_groups)`` for :func:`group_norm_backward`."""
    done = _plain_group(input, num_groups, weight, bias, eps, out)  # the plain call, checked in C
    if done is not None:
        return done
    be, k, x = _input(input, "group_norm")
    N, C, G, S = _group_shape(input, num_groups)
    if N * (C // G) * S == 1:  # PyTorch's check, on the (N * C / G, G, *spatial) view it normalizes
        raise ValueError(f"expected more than 1 value per channel when training, got input of shape "
                         f"{tuple(input.shape)} with num_groups={G} (N * C / num_groups * spatial size is 1)")
    eps = ck.scalar(eps, "eps")
    w = _param(weight, "weight", be, x, C, x.dtype, 1.0)
    b = _param(bias, "bias", be, x, C, x.dtype, 0.0)
    _on_device(be, input, ("weight", weight), ("bias", bias), ("out", out))
    y, y1, target = ck.prepare_out(be, out, input, x)
    mean, var, invstd = (_zeros(be, x, (N, G)) for _ in range(3))
    if x.size:
        k.group_forward(x, y1, *ck.apart(be, out, w, b), G, max(S, 1), eps, mean, var, invstd, be.threads())
    return ck.finish(y, target), mean, invstd


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, *, out=None):
    """Group normalization (``torch.nn.functional.group_norm``): the C channels of ``input``
    (N, C, *) split into ``num_groups`` groups of consecutive channels, each (sample, group)
    normalized by its own mean and biased variance, then ``* weight[c] + bias[c]``."""
    return group_norm_forward(input, num_groups, weight, bias, eps, out=out)[0]


def _grad_args(grad_output, input, what):
    be, k, x = _input(input, what)
    return be, k, x.dtype, ck.like_input(be, grad_output, input, x, "grad_output"), x


def _stats(v, name, be, shape, what=None):
    return _vector(v, name, be, math.prod(shape), np.float64, shape, what)


def _group_backward(grad_output, input, G, weight, save_mean, save_invstd, training, out, what):
    be, k, dt, g, x = _grad_args(grad_output, input, what)
    if G is None:  # instance norm: a group a channel, also for no channels (num_groups cannot be 0)
        N, C, S = _instance_shape(input, what)
        G = C
    else:
        N, C, G, S = _group_shape(input, G, what)
    training = ck.flag(training, "use_input_stats")
    w = _param(weight, "weight", be, x, C, dt, 1.0)
    rows = "(N, C)" if what.startswith("instance") else "(N, num_groups)"
    mean = _stats(save_mean, "save_mean", be, (N, G), rows)
    invstd = _stats(save_invstd, "save_invstd", be, (N, G), rows)
    _on_device(be, input, ("grad_output", grad_output), ("weight", weight), ("save_mean", save_mean),
               ("save_invstd", save_invstd), ("out", out))
    dx, dx1, target = ck.prepare_out(be, out, input, x, g)
    gw = gb = _zeros(be, x, C)
    if x.size:  # (0 * inf after an eps=0 forward on a constant group makes grad_weight NaN, as in PyTorch)
        w, m, istd = ck.apart(be, out, w, mean, invstd)
        gw, gb = k.group_backward(g, x, dx1, w, G, max(S, 1), m, istd, training, be.threads())
    return ck.finish(dx, target), gw.astype(dt), gb.astype(dt)


def group_norm_backward(grad_output, input, num_groups, weight, save_mean, save_invstd, *, out=None):
    """Gradients of :func:`group_norm` from the statistics :func:`group_norm_forward` returned:
    ``(grad_input, grad_weight, grad_bias)``, the parameter gradients in the input's dtype (float32
    for a float16 or bfloat16 input; also when ``weight`` is None).  ``out=`` receives grad_input."""
    done = _plain_group_backward(grad_output, input, num_groups, weight, save_mean, save_invstd, out)
    if done is not None:  # the plain call, checked in C
        return done
    return _group_backward(grad_output, input, num_groups, weight, save_mean, save_invstd, True, out,
                           "group_norm_backward")


# ---------------------------------------------------------------- layer norm
def _normalized_shape(normalized_shape):
    if isinstance(normalized_shape, numbers.Integral) and not isinstance(normalized_shape, bool):
        return (int(normalized_shape),)
    try:
        shape = tuple(normalized_shape)
    except TypeError:
        raise TypeError(f"normalized_shape must be an int or a tuple of ints, got {normalized_shape!r}") from None
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 0:
            raise TypeError(f"normalized_shape must be an int or a tuple of non-negative ints, got {normalized_shape!r}")
    return tuple(int(d) for d in shape)


def _layer_shape(x, normalized_shape):
    shape = _normalized_shape(normalized_shape)
    k = len(shape)
    if k == 0:
        raise ValueError("normalized_shape must have at least one dimension, got ()")
    if x.ndim < k or tuple(x.shape[x.ndim - k:]) != shape:
        raise ValueError(f"layer_norm normalizes the last dimensions {shape} (normalized_shape), "
                         f"but the input has shape {tuple(x.shape)}")
    return shape, tuple(x.shape[:x.ndim - k]), math.prod(shape)


def layer_norm_forward(input, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None):
    """Like :func:`layer_norm`, and also return ``(output, save_mean, save_invstd)``: float64
    statistics of shape ``input.shape[:-len(normalized_shape)]`` for :func:`layer_norm_backward`."""
    done = _plain_layer(input, normalized_shape, weight, bias, eps, out)  # the plain call, checked in C
    if done is not None:
        return done
    be, k, x = _input(input, "layer_norm")
    shape, lead, L = _layer_shape(input, normalized_shape)
    eps = ck.scalar(eps, "eps")
    w = _param(weight, "weight", be, x, L, x.dtype, 1.0, shape, "normalized_shape")
    b = _param(bias, "bias", be, x, L, x.dtype, 0.0, shape, "normalized_shape")
    _on_device(be, input, ("weight", weight), ("bias", bias), ("out", out))
    y, y1, target = ck.prepare_out(be, out, input, x)
    mean, var, invstd = (_zeros(be, x, lead) for _ in range(3))
    if x.size:
        k.layer_forward(x, y1, *ck.apart(be, out, w, b), L, eps, mean, var, invstd, be.threads())
    elif L == 0:
        mean[...] = np.nan
        invstd[...] = np.nan
    return ck.finish(y, target), mean, invstd


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None):
    """Layer normalization (``torch.nn.functional.layer_norm``): each slice over the last
    ``len(normalized_shape)`` dimensions normalized by its own mean and biased variance, then
    ``* weight + bias`` elementwise (``weight``/``bias`` of shape ``normalized_shape``)."""
    return layer_norm_forward(input, normalized_shape, weight, bias, eps, out=out)[0]


def layer_norm_backward(grad_output, input, normalized_shape, weight, save_mean, save_invstd, *, out=None):
    """Gradients of :func:`layer_norm`: ``(grad_input, grad_weight, grad_bias)``, the parameter
    gradients of shape ``normalized_shape`` in the input's dtype (float32 for a float16 or bfloat16
    input)."""
    done = _plain_layer_backward(grad_output, input, normalized_shape, weight, save_mean, save_invstd, out)
    if done is not None:  # the plain call, checked in C
        return done
    be, k, dt, g, x = _grad_args(grad_output, input, "layer_norm_backward")
    shape, lead, L = _layer_shape(input, normalized_shape)
    w = _param(weight, "weight", be, x, L, dt, 1.0, shape, "normalized_shape")
    mean = _stats(save_mean, "save_mean", be, lead, "the input's leading dimensions")
    invstd = _stats(save_invstd, "save_invstd", be, lead, "the input's leading dimensions")
    _on_device(be, input, ("grad_output", grad_output), ("weight", weight), ("save_mean", save_mean),
               ("save_invstd", save_invstd), ("out", out))
    dx, dx1, target = ck.prepare_out(be, out, input, x, g)
    if x.size:
        w, m, istd = ck.apart(be, out, w, mean, invstd)
        gw, gb = k.layer_backward(g, x, dx1, w, L, m, istd, be.threads())
    else:
        gw, gb = _zeros(be, x, L), _zeros(be, x, L)
    return ck.finish(dx, target), gw.astype(dt).reshape(shape), gb.astype(dt).reshape(shape)


# ---------------------------------------------------------------- instance norm
def _instance_shape(x, what):
    if x.ndim < 2:  # (N, C) has one spatial element: only use_input_stats=False takes it, as in PyTorch
        raise ValueError(f"{what} expects input of at least 2 dimensions (N, C, *spatial), got shape {tuple(x.shape)}"
                         f" (the layers take an unbatched (C, *spatial) input)")
    return x.shape[0], x.shape[1], math.prod(x.shape[2:])


def instance_norm_forward(input, running_mean=None, running_var=None, weight=None, bias=None,
                          use_input_stats=True, momentum=0.1, eps=1e-5, *, out=None):
    """Like :func:`instance_norm`, and also return ``(output, save_mean, save_invstd)``: float64
    statistics of shape ``(N, C)`` for :func:`instance_norm_backward` (with
    ``use_input_stats=False``, the running statistics broadcast over N)."""
    if (running_mean is None and running_var is None and use_input_stats is True and type(momentum) is float
            and 0.0 <= momentum <= 1.0 and type(eps) is float and eps > 0.0 and type(input) is np.ndarray
            and input.ndim >= 3 and math.prod(input.shape[2:]) > 1):
        # batch statistics, nothing to update: group norm with a group a channel, its plain call in C
        # (eps = 0 and one spatial element keep their rules below)
        done = _plain_group(input, input.shape[1], weight, bias, eps, out)
        if done is not None:
            return done
    be, k, x = _input(input, "instance_norm")
    dt = x.dtype
    N, C, S = _instance_shape(input, "instance_norm")
    eps = ck.scalar(eps, "eps")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be arrays or both be None")
    use_input_stats = ck.flag(use_input_stats, "use_input_stats")
    if not use_input_stats and running_mean is None:
        raise ValueError("instance_norm needs running_mean and running_var when use_input_stats=False")
    w = _param(weight, "weight", be, x, C, dt, 1.0)
    b = _param(bias, "bias", be, x, C, dt, 0.0)
    if running_mean is not None:
        for name, buf in (("running_mean", running_mean), ("running_var", running_var)):
            if not be.is_array(buf):
                _vector(buf, name, be, C, dt)  # raises the right error
            ck.vector(buf, name, be, (C,), None, writable=use_input_stats)
    if use_input_stats:  # [0, 1] where it weighs a running update (as batch_norm's); else unused
        momentum = ck.scalar(momentum, "momentum", *((0.0, 1.0) if running_mean is not None else (-math.inf, math.inf)))
        if S == 1:  # as PyTorch, also for an empty batch (an empty spatial size passes)
            raise ValueError(f"expected more than 1 spatial element when training, got input of shape {tuple(input.shape)}")
    _on_device(be, input, ("weight", weight), ("bias", bias), ("running_mean", running_mean),
               ("running_var", running_var), ("out", out))
    y, y1, target = ck.prepare_out(be, out, input, x)
    if use_input_stats:  # (otherwise the buffers are copied into mean and invstd before out is written)
        ck.out_apart_from(be, out, (("running_mean", running_mean), ("running_var", running_var)))
    mean, var, invstd = (_zeros(be, x, (N, C)) for _ in range(3))
    if use_input_stats:
        if x.size:
            k.group_forward(x, y1, *ck.apart(be, out, w, b), C, S, eps, mean, var, invstd, be.threads())
            if eps == 0.0:
                _constant_instances(be, y, var, invstd, w, b)
            if running_mean is not None and N > 0:
                # As PyTorch: each instance's statistics update a copy of the buffers (unbiased
                # variance), and the buffers become the copies' mean over the batch.
                running_mean[...] = (1.0 - momentum) * running_mean.astype(np.float64) + momentum * mean.mean(axis=0)
                running_var[...] = ((1.0 - momentum) * running_var.astype(np.float64)
                                    + momentum * (var * (S / (S - 1))).mean(axis=0))
    else:
        mean[...] = running_mean.astype(np.float64)
        with np.errstate(divide="ignore"):  # a zero variance with eps=0: inf, as 1/sqrt(0) in the kernels
            invstd[...] = 1.0 / be.xp.sqrt(running_var.astype(np.float64) + eps)
        if x.size:
            k.group_apply(x, y1, *ck.apart(be, out, w, b), C, S, mean, invstd, be.threads())
    return ck.finish(y, target), mean, invstd


def _constant_instances(be, y, var, invstd, w, b):
    """eps = 0: an instance of zero variance gets invstd 0, as in PyTorch (its batch-norm kernel,
    which instance norm runs on, takes 1 / sqrt(var + eps) as 0 when both are 0), so its output is
    (x - mean) * (0 * w) + b = 0 * w + b rather than 0 / 0; its gradient is then 0."""
    n, c = be.xp.nonzero(var == 0.0)
    if n.size:
        invstd[n, c] = 0.0
        with np.errstate(invalid="ignore"):  # an infinite weight gives NaN, as the kernel's 0 * w
            value = 0.0 * w.astype(np.float64)[c] + b.astype(np.float64)[c]
        y[n, c] = value.reshape((-1,) + (1,) * (y.ndim - 2)).astype(y.dtype)


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5, *, out=None):
    """Instance normalization (``torch.nn.functional.instance_norm``): each (sample, channel) of
    ``input`` (N, C, *spatial) normalized by its own statistics (``use_input_stats=True``; the
    running buffers, when given, are updated in place with the batch's mean of the per-instance
    mean and unbiased variance) or by the running statistics (``use_input_stats=False``)."""
    return instance_norm_forward(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps,
                                 out=out)[0]


def instance_norm_backward(grad_output, input, weight, save_mean, save_invstd, use_input_stats=True, *, out=None):
    """Gradients of :func:`instance_norm`: ``(grad_input, grad_weight, grad_bias)``.
    ``use_input_stats=False``: the statistics were constants, ``grad_input = grad_output * weight
    * save_invstd``."""
    if use_input_stats is True and type(input) is np.ndarray and input.ndim >= 2:  # as group norm's, in C
        done = _plain_group_backward(grad_output, input, input.shape[1], weight, save_mean, save_invstd, out)
        if done is not None:
            return done
    return _group_backward(grad_output, input, None, weight, save_mean, save_invstd, use_input_stats, out,
                           "instance_norm_backward")
