"""Folding an evaluation-mode batch norm into the convolution or linear layer before it.

In inference, ``bn(conv(x))`` with fixed statistics is one affine map per output channel, so it
can be folded into the convolution's (or linear layer's) weight and bias:
``w' = w * gamma / sqrt(var + eps)`` (per output channel) and
``b' = (b - mean) * gamma / sqrt(var + eps) + beta``.  The names and arguments are PyTorch's
(``torch.nn.utils.fusion``); the arithmetic is done in float64 and the results are cast to the
dtypes of the weight and bias given (the weight's when there is no bias), so they equal
PyTorch's to float rounding.  NumPy arrays in, NumPy arrays out (new arrays; nothing is written).
"""
import numbers

import numpy as np

__all__ = ["fuse_conv_bn_weights", "fuse_linear_bn_weights", "fuse_conv_bn_eval", "fuse_linear_bn_eval"]


def _float_array(a, name, ndim=None):
    if not isinstance(a, np.ndarray) or a.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point numpy array, got {type(a).__name__}"
                        + (f" of dtype {a.dtype}" if isinstance(a, np.ndarray) else ""))
    if ndim is not None and a.ndim not in ndim:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndim))} dimensions, got shape {a.shape}")
    return a


def _bn_scale_shift(C, bn_rm, bn_rv, bn_eps, bn_w, bn_b):
    """(gamma / sqrt(var + eps), beta, mean) as float64 vectors, every argument checked.  Each batch
    norm vector has C values, or 1 (a batch norm over one feature, which PyTorch's arithmetic
    broadcasts over the C outputs, as its fuse_linear_bn_eval allows)."""
    vectors = {}
    for name, v, default in (("bn_rm", bn_rm, None), ("bn_rv", bn_rv, None), ("bn_w", bn_w, 1.0), ("bn_b", bn_b, 0.0)):
        if v is None and default is not None:
            vectors[name] = np.full(1, default)
            continue
        _float_array(v, name)
        if v.shape not in ((C,), (1,)):
            raise ValueError(f"{name} must have shape ({C},), one value per output channel (or (1,), one "
                             f"for all), got {v.shape}")
        vectors[name] = v.astype(np.float64)
    if isinstance(bn_eps, bool) or not isinstance(bn_eps, numbers.Real) or not bn_eps >= 0:
        raise ValueError(f"bn_eps must be a non-negative number, got {bn_eps!r}")
    scale = vectors["bn_w"] / np.sqrt(vectors["bn_rv"] + float(bn_eps))
    return scale, vectors["bn_b"], vectors["bn_rm"]


def _fused_bias(b, C, scale, shift, mean, weight_dtype, name):
    if b is None:  # as PyTorch: zeros like the running mean (so one value for a one-feature norm)
        dtype, b64 = weight_dtype, np.zeros(mean.shape)
    else:
        _float_array(b, name)
        if b.shape != (C,):
            raise ValueError(f"{name} must have shape ({C},), one value per output channel, got {b.shape}")
        dtype, b64 = b.dtype, b.astype(np.float64)
    return ((b64 - mean) * scale + shift).astype(dtype)


def fuse_conv_bn_weights(conv_w, conv_b, bn_rm, bn_rv, bn_eps, bn_w, bn_b, transpose=False):
    """(weight, bias) of a convolution followed by an evaluation-mode batch norm, folded into one.

    ``conv_w``: (C_out, C_in / groups, *kernel), or for a transposed convolution (``transpose=True``)
    (C_in, C_out / groups, *kernel), whose axis 1 holds the output channels; ``conv_b``: (C_out,)
    or None; the batch norm's running mean and variance, eps, and weight and bias (None: 1 and 0)."""
    _float_array(conv_w, "conv_w", ndim=(2, 3, 4, 5))
    if not isinstance(transpose, (bool, np.bool_)):
        raise TypeError(f"transpose must be a bool, got {transpose!r}")
    C = conv_w.shape[1] if transpose else conv_w.shape[0]
    scale, shift, mean = _bn_scale_shift(C, bn_rm, bn_rv, bn_eps, bn_w, bn_b)
    shape = (1, -1) + (1,) * (conv_w.ndim - 2) if transpose else (-1,) + (1,) * (conv_w.ndim - 1)
    w = (conv_w.astype(np.float64) * np.broadcast_to(scale, (C,)).reshape(shape)).astype(conv_w.dtype)
    return w, _fused_bias(conv_b, C, scale, shift, mean, conv_w.dtype, "conv_b")


def fuse_linear_bn_weights(linear_w, linear_b, bn_rm, bn_rv, bn_eps, bn_w, bn_b):
    """(weight, bias) of a linear layer (``y = x @ w.T + b``, w of shape (C_out, C_in)) followed by
    an evaluation-mode batch norm over its C_out outputs, folded into one."""
    _float_array(linear_w, "linear_w", ndim=(2,))
    C = linear_w.shape[0]
    scale, shift, mean = _bn_scale_shift(C, bn_rm, bn_rv, bn_eps, bn_w, bn_b)
    w = (linear_w.astype(np.float64) * np.broadcast_to(scale, (C,))[:, None]).astype(linear_w.dtype)
    return w, _fused_bias(linear_b, C, scale, shift, mean, linear_w.dtype, "linear_b")


def _eval_layer(bn):
    from .layers import _BatchNorm

    if not isinstance(bn, _BatchNorm):
        raise TypeError(f"bn must be a fastbn BatchNorm1d/2d/3d layer, got {type(bn).__name__}")
    if bn.training:
        raise ValueError("bn is in training mode: folding uses the running statistics, call bn.eval() first")
    if bn.running_mean is None:
        raise ValueError("bn has no running statistics (track_running_stats=False): there is nothing to fold")
    host = [a.get() if hasattr(a, "get") else a for a in (bn.running_mean, bn.running_var, bn.weight, bn.bias)]
    return host[0], host[1], bn.eps, host[2], host[3]


def fuse_conv_bn_eval(conv_w, conv_b, bn, transpose=False):
    """fuse_conv_bn_weights with the statistics and parameters of ``bn``, a fastbn batch-norm
    layer in evaluation mode."""
    return fuse_conv_bn_weights(conv_w, conv_b, *_eval_layer(bn), transpose=transpose)


def fuse_linear_bn_eval(linear_w, linear_b, bn):
    """fuse_linear_bn_weights with the statistics and parameters of ``bn``, a fastbn batch-norm
    layer in evaluation mode."""
    return fuse_linear_bn_weights(linear_w, linear_b, *_eval_layer(bn))
