"""Batch norm written plainly in NumPy, once: the float64 reference and the naive implementation.

With the default ``dtype=np.float64`` every function casts its arrays to float64 first and is
*the* reference: ``fastbn info``'s self-check and the bench's result check compare fastbn with
it.  With ``dtype=None`` the same formulas run in the inputs' own dtype, without a cast, and are
the bench's "numpy" implementation (the textbook code a user would write, timed next to fastbn).

The formulas follow PyTorch: training normalizes with the batch mean and *biased* variance over
every axis but 1, and updates the running buffers with the *unbiased* one; evaluation normalizes
with the running buffers.  (tests/conftest.py keeps its own, independent reference.)
"""
import numpy as np


def axes(x):
    """The axes batch norm reduces over: all but the channel axis 1."""
    return (0,) + tuple(range(2, x.ndim))


def bcast(x):
    """Shape that broadcasts a (C,) vector over axis 1 of x."""
    return (1, -1) + (1,) * (x.ndim - 2)


def _cast(dtype, *arrays):
    return arrays if dtype is None else tuple(np.asarray(a).astype(dtype, copy=False) for a in arrays)


def batch_stats(x, dtype=np.float64):
    """(mean, biased variance) per channel."""
    (x,) = _cast(dtype, x)
    return x.mean(axis=axes(x)), x.var(axis=axes(x))


def saved_stats(x, eps, dtype=np.float64):
    """The batch (mean, 1/sqrt(var + eps)) that a training forward saves for the backward."""
    mean, var = batch_stats(x, dtype)
    return mean, 1 / np.sqrt(var + eps)


def normalize(x, weight, bias, mean, var, eps, dtype=np.float64, out=None):
    """(x - mean) / sqrt(var + eps) * weight + bias; ``out``: write it there in place instead."""
    x, weight, bias, mean, var = _cast(dtype, x, weight, bias, mean, var)
    sh = bcast(x)
    if out is None:
        return (x - mean.reshape(sh)) / np.sqrt(var.reshape(sh) + eps) * weight.reshape(sh) + bias.reshape(sh)
    np.subtract(x, mean.reshape(sh), out=out)
    np.multiply(out, (weight / np.sqrt(var + eps)).reshape(sh), out=out)
    np.add(out, bias.reshape(sh), out=out)
    return out


def forward_train(x, weight, bias, running_mean, running_var, momentum, eps, dtype=np.float64):
    """Training forward: (y, mean, biased var) of the batch; the running buffers, when not None,
    are updated in place with the batch mean and unbiased variance (in their own dtype: pass
    float64 copies for the reference)."""
    (x,) = _cast(dtype, x)
    mean, var = batch_stats(x, None)
    y = normalize(x, weight, bias, mean, var, eps, dtype)
    if running_mean is not None:
        n = x.size // x.shape[1]
        running_mean[...] = (1 - momentum) * running_mean + momentum * mean
        running_var[...] = (1 - momentum) * running_var + momentum * var * (n / (n - 1))
    return y, mean, var


def forward_eval(x, weight, bias, running_mean, running_var, eps, dtype=np.float64, out=None):
    """Evaluation forward with the running statistics."""
    return normalize(x, weight, bias, running_mean, running_var, eps, dtype, out)


def backward(dy, x, weight, mean, invstd, dtype=np.float64):
    """Training-mode backward from the saved mean and invstd: (grad_input, grad_weight, grad_bias)."""
    dy, x, weight, mean, invstd = _cast(dtype, dy, x, weight, mean, invstd)
    ax, sh = axes(x), bcast(x)
    m = x.size // x.shape[1]
    xhat = (x - mean.reshape(sh)) * invstd.reshape(sh)
    gb = dy.sum(axis=ax)
    gw = (dy * xhat).sum(axis=ax)
    dx = (weight * invstd / m).reshape(sh) * (m * dy - gb.reshape(sh) - xhat * gw.reshape(sh))
    return dx, gw, gb
