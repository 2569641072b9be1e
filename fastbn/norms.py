"""Group, layer and instance normalization on NumPy arrays, with ``torch.nn.functional``'s names
and semantics (``group_norm``, ``layer_norm``, ``instance_norm``), plus ``*_forward`` variants that
also return the saved statistics and ``*_backward`` variants that return
``(grad_input, grad_weight, grad_bias)``, as :mod:`fastbn.functional` does for batch norm.

Validation is here; the arithmetic is in the Cython kernels of ``fastbn._norm_kernels`` (statistics
in float64, never ``E[x^2] - E[x]^2``; one fused normalize + affine pass).  Saved statistics are
float64: ``save_mean`` and ``save_invstd = 1 / sqrt(var + eps)`` per normalized row.  CuPy arrays
raise NotImplementedError (these norms have no CUDA kernels yet; fastbn never copies a GPU array
to the host behind your back).
"""
import math
import numbers

import numpy as np

from . import _openmp
from . import functional as F

__all__ = [
    "group_norm", "group_norm_forward", "group_norm_backward",
    "layer_norm", "layer_norm_forward", "layer_norm_backward",
    "instance_norm", "instance_norm_forward", "instance_norm_backward",
]


def _kernels():
    from . import _norm_kernels

    return _norm_kernels


def _host_input(x, what, name="input"):
    """Check that x is a float NumPy array; return its kernel dtype."""
    be = F.backend_of(x)
    if be is not F._cpu:
        raise NotImplementedError(
            f"{what} has no CUDA (CuPy) backend yet: fastbn only runs it on NumPy arrays, and does not copy "
            f"GPU arrays to the host silently; pass cupy.asnumpy({name}) explicitly if that is what you want")
    return F._float_dtype(x, name)


def _contig(x, dt):
    if x.flags.c_contiguous and x.dtype == dt and x.flags.aligned:
        return x
    return np.array(x, dtype=dt, order="C")


def _vector(v, name, n, dt, shape=None):
    """A weight/bias/statistics argument as a contiguous vector of ``n`` values of ``dt``."""
    shape = (n,) if shape is None else tuple(shape)
    if not isinstance(v, np.ndarray):
        if type(v).__module__.split(".")[0] == "cupy":
            raise NotImplementedError(f"{name} is a CuPy array: these norms run on NumPy arrays only")
        raise TypeError(f"{name} must be a numpy array of shape {shape}, got {type(v).__module__}.{type(v).__name__}")
    F._refuse_matrix_and_masked(v, name)
    F._float_dtype(v, name)
    if tuple(v.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got shape {tuple(v.shape)}")
    return _contig(v, dt).reshape(n)


def _int(value, name, low):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")
    return int(value)


def _out(out, x, dt, *reads):
    """The array the kernel writes (shape of x, contiguous), and whether to copy it into out."""
    if out is None:
        return np.empty(x.shape, dtype=dt), False
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy array, got {type(out).__name__}")
    F._refuse_matrix_and_masked(out, "out")
    if tuple(out.shape) != tuple(x.shape) or out.dtype != dt:
        raise ValueError(f"out must have the input's shape {tuple(x.shape)} and dtype {dt}, "
                         f"got shape {tuple(out.shape)} and dtype {out.dtype}")
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    if out.flags.c_contiguous and out.flags.aligned and all(
            not np.may_share_memory(out, a) or out.__array_interface__["data"][0] == a.__array_interface__["data"][0]
            for a in reads):
        # out may be one of the inputs exactly (in place): every pass reads an element before it
        # writes it, at the same place.  A partial overlap goes through a temporary instead.
        return out, False
    return np.empty(x.shape, dtype=dt), True


def _finish(out, y, copy_back):
    if copy_back:
        out[...] = y
        return out
    return y


def _eps(eps):
    return F._check_scalar(eps, "eps")


def _threads():
    return _openmp.get_num_threads()


# ---------------------------------------------------------------- group norm
def _group_shape(x, num_groups, what="group_norm"):
    if x.ndim < 2:
        raise ValueError(f"{what} expects input of at least 2 dimensions (N, C, *), got shape {tuple(x.shape)}")
    G = _int(num_groups, "num_groups", 1)
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
    dt = _host_input(input, "group_norm")
    N, C, G, S = _group_shape(input, num_groups)
    eps = _eps(eps)
    w = np.ones(C, dt) if weight is None else _vector(weight, "weight", C, dt)
    b = np.zeros(C, dt) if bias is None else _vector(bias, "bias", C, dt)
    x = _contig(input, dt)
    y, copy_back = _out(out, input, dt, x)
    mean, var, invstd = np.zeros((N, G)), np.zeros((N, G)), np.zeros((N, G))
    if x.size:
        _kernels().group_forward(x, y, w, b, G, max(S, 1), eps, mean, var, invstd, _threads())
    return _finish(out, y, copy_back), mean, invstd


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, *, out=None):
    """Group normalization (``torch.nn.functional.group_norm``): the C channels of ``input``
    (N, C, *) split into ``num_groups`` groups of consecutive channels, each (sample, group)
    normalized by its own mean and biased variance, then ``* weight[c] + bias[c]``."""
    return group_norm_forward(input, num_groups, weight, bias, eps, out=out)[0]


def _grad_args(grad_output, input, what):
    dt = _host_input(input, what)
    if not isinstance(grad_output, np.ndarray):
        _host_input(grad_output, what, "grad_output")
        raise TypeError(f"grad_output must be a numpy array, got {type(grad_output).__name__}")
    if tuple(grad_output.shape) != tuple(input.shape):
        raise ValueError(f"grad_output must have the input's shape {tuple(input.shape)}, got {tuple(grad_output.shape)}")
    if F._float_dtype(grad_output, "grad_output") != dt:
        raise TypeError(f"grad_output must have the input's dtype {dt}, got {grad_output.dtype}")
    return dt, _contig(grad_output, dt), _contig(input, dt)


def _stats(v, name, shape):
    return _vector(v, name, math.prod(shape), np.float64, shape)


def _group_backward(grad_output, input, G, weight, save_mean, save_invstd, training, out, what):
    dt, g, x = _grad_args(grad_output, input, what)
    N, C, G, S = _group_shape(input, G, what)
    w = np.ones(C, dt) if weight is None else _vector(weight, "weight", C, dt)
    mean = _stats(save_mean, "save_mean", (N, G))
    invstd = _stats(save_invstd, "save_invstd", (N, G))
    dx, copy_back = _out(out, input, dt, x, g)
    sums = np.zeros((N, C, 2))
    if x.size:
        _kernels().group_backward(g, x, dx, w, G, max(S, 1), mean, invstd, bool(training), sums, _threads())
    gb = sums[:, :, 0].sum(axis=0)
    gw = (sums[:, :, 1].reshape(N, G, C // G) * invstd.reshape(N, G, 1)).reshape(N, C).sum(axis=0)
    return _finish(out, dx, copy_back), gw.astype(dt), gb.astype(dt)


def group_norm_backward(grad_output, input, num_groups, weight, save_mean, save_invstd, *, out=None):
    """Gradients of :func:`group_norm` from the statistics :func:`group_norm_forward` returned:
    ``(grad_input, grad_weight, grad_bias)``, the parameter gradients in the input's dtype (also
    when ``weight`` is None).  ``out=`` receives grad_input."""
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
    dt = _host_input(input, "layer_norm")
    shape, lead, L = _layer_shape(input, normalized_shape)
    eps = _eps(eps)
    w = np.ones(L, dt) if weight is None else _vector(weight, "weight", L, dt, shape)
    b = np.zeros(L, dt) if bias is None else _vector(bias, "bias", L, dt, shape)
    x = _contig(input, dt)
    y, copy_back = _out(out, input, dt, x)
    mean, var, invstd = np.zeros(lead), np.zeros(lead), np.zeros(lead)
    if x.size:
        _kernels().layer_forward(x, y, w, b, L, eps, mean, var, invstd, _threads())
    elif L == 0:
        mean[...] = np.nan
        invstd[...] = np.nan
    return _finish(out, y, copy_back), mean, invstd


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None):
    """Layer normalization (``torch.nn.functional.layer_norm``): each slice over the last
    ``len(normalized_shape)`` dimensions normalized by its own mean and biased variance, then
    ``* weight + bias`` elementwise (``weight``/``bias`` of shape ``normalized_shape``)."""
    return layer_norm_forward(input, normalized_shape, weight, bias, eps, out=out)[0]


def layer_norm_backward(grad_output, input, normalized_shape, weight, save_mean, save_invstd, *, out=None):
    """Gradients of :func:`layer_norm`: ``(grad_input, grad_weight, grad_bias)``, the parameter
    gradients of shape ``normalized_shape`` in the input's dtype."""
    dt, g, x = _grad_args(grad_output, input, "layer_norm_backward")
    shape, lead, L = _layer_shape(input, normalized_shape)
    w = np.ones(L, dt) if weight is None else _vector(weight, "weight", L, dt, shape)
    mean = _stats(save_mean, "save_mean", lead)
    invstd = _stats(save_invstd, "save_invstd", lead)
    dx, copy_back = _out(out, input, dt, x, g)
    if x.size:
        gw, gb = _kernels().layer_backward(g, x, dx, w, L, mean, invstd, _threads())
    else:
        gw, gb = np.zeros(L), np.zeros(L)
    return _finish(out, dx, copy_back), gw.astype(dt).reshape(shape), gb.astype(dt).reshape(shape)


# ---------------------------------------------------------------- instance norm
def _instance_shape(x, what):
    if x.ndim < 3:
        raise ValueError(f"{what} expects input of at least 3 dimensions (N, C, *spatial), got shape {tuple(x.shape)}"
                         f" (the layers take an unbatched (C, *spatial) input)")
    return x.shape[0], x.shape[1], math.prod(x.shape[2:])


def instance_norm_forward(input, running_mean=None, running_var=None, weight=None, bias=None,
                          use_input_stats=True, momentum=0.1, eps=1e-5, *, out=None):
    """Like :func:`instance_norm`, and also return ``(output, save_mean, save_invstd)``: float64
    statistics of shape ``(N, C)`` for :func:`instance_norm_backward` (with
    ``use_input_stats=False``, the running statistics broadcast over N)."""
    dt = _host_input(input, "instance_norm")
    N, C, S = _instance_shape(input, "instance_norm")
    eps = _eps(eps)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be arrays or both be None")
    use_input_stats = bool(use_input_stats)
    if not use_input_stats and running_mean is None:
        raise ValueError("instance_norm needs running_mean and running_var when use_input_stats=False")
    w = np.ones(C, dt) if weight is None else _vector(weight, "weight", C, dt)
    b = np.zeros(C, dt) if bias is None else _vector(bias, "bias", C, dt)
    if running_mean is not None:
        for name, buf in (("running_mean", running_mean), ("running_var", running_var)):
            if not isinstance(buf, np.ndarray):
                _vector(buf, name, C, dt)  # raises the right error
            F._float_dtype(buf, name)
            if buf.shape != (C,):
                raise ValueError(f"{name} must have shape ({C},) to match the input's {C} channels, got shape {buf.shape}")
            if use_input_stats and not buf.flags.writeable:
                raise ValueError(f"{name} is read-only, but instance_norm with use_input_stats=True updates it in place")
    if use_input_stats:
        momentum = F._check_scalar(momentum, "momentum", 0.0, 1.0)
        if S <= 1 and input.size:
            raise ValueError(f"expected more than 1 spatial element when training, got input of shape {tuple(input.shape)}")
    x = _contig(input, dt)
    y, copy_back = _out(out, input, dt, x)
    if out is not None and running_mean is not None:
        for name, buf in (("running_mean", running_mean), ("running_var", running_var)):
            if np.may_share_memory(out, buf):
                raise ValueError(f"out shares memory with {name}; pass a separate out")
    mean, var, invstd = np.zeros((N, C)), np.zeros((N, C)), np.zeros((N, C))
    k = _kernels()
    if use_input_stats:
        if x.size:
            k.group_forward(x, y, w, b, C, S, eps, mean, var, invstd, _threads())
            if running_mean is not None and N > 0:
                # As PyTorch: each instance's statistics update a copy of the buffers (unbiased
                # variance), and the buffers become the copies' mean over the batch.
                running_mean[...] = (1.0 - momentum) * running_mean.astype(np.float64) + momentum * mean.mean(axis=0)
                running_var[...] = ((1.0 - momentum) * running_var.astype(np.float64)
                                    + momentum * (var * (S / (S - 1))).mean(axis=0))
    else:
        rm = np.asarray(running_mean, dtype=np.float64)
        mean[...] = rm
        invstd[...] = 1.0 / np.sqrt(np.asarray(running_var, dtype=np.float64) + eps)
        if x.size:
            k.group_apply(x, y, w, b, C, S, mean, invstd, _threads())
    return _finish(out, y, copy_back), mean, invstd


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
    if isinstance(input, np.ndarray):
        _instance_shape(input, "instance_norm_backward")
    elif hasattr(input, "ndim"):
        _host_input(input, "instance_norm_backward")
    return _group_backward(grad_output, input, getattr(input, "shape", (0, 1))[1] or 1, weight, save_mean,
                           save_invstd, use_input_stats, out, "instance_norm_backward")
