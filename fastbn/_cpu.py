"""The CPU backend: NumPy arrays, fastbn's Cython kernels on fastbn's own thread pool.

A backend module provides ``xp`` (its array module), ``is_array(a)`` and the operations
below on C-contiguous (N, C, S) arrays that fastbn.functional has already validated.
fastbn._cupy_backend provides the same names for CuPy arrays.
"""
import numpy as np

from . import _kernels, _machine, _openmp

xp = np
name = "cpu"

# The kernels' byte thresholds follow this machine's caches (read once, at import).
_kernels.tune_for(_machine.CACHES["l2"], _machine.CACHES["l3_effective"])

# Tests force a work-splitting path ("ranges", "columns"), a unit size and
# streaming stores (stream: -1 decide by size, 0 off, 1 on) here.
tuning = {"path": "auto", "unit": 0, "stream": -1}


def is_array(a):
    return isinstance(a, np.ndarray)


def _plan():
    return _openmp.get_num_threads(), _kernels.PATHS[tuning["path"]], tuning["unit"], tuning["stream"]


def forward_train(x, y, weight, bias, eps):
    """Write the normalized x into y; return the batch (mean, biased var, invstd), float64."""
    C = x.shape[1]
    mean, var, invstd = np.empty(C), np.empty(C), np.empty(C)
    _kernels.forward_train(x, y, weight, bias, eps, mean, var, invstd, *_plan())
    return mean, var, invstd


def _kernel_ready(a, b):
    """Running buffers the kernels can update in place: one float dtype in native byte order,
    C-contiguous and aligned; anything else (views, mixed dtypes) goes through NumPy."""
    if a.dtype != b.dtype or not a.dtype.isnative:
        return False
    fa, fb = a.flags, b.flags
    return fa.c_contiguous and fb.c_contiguous and fa.aligned and fb.aligned


def update_running(running_mean, running_var, mean, var, momentum, n):
    """running = (1 - momentum) * running + momentum * batch, with the unbiased variance."""
    if _kernel_ready(running_mean, running_var):
        _kernels.update_running(running_mean, running_var, mean, var, momentum, n)
    else:  # mixed dtypes or strided buffers: the same arithmetic, in float64, through NumPy
        running_mean[...] = (1.0 - momentum) * running_mean.astype(np.float64) + momentum * mean
        running_var[...] = (1.0 - momentum) * running_var.astype(np.float64) + momentum * (n / (n - 1)) * var


def eval_stats(running_mean, running_var, eps):
    """(running_mean, 1 / sqrt(running_var + eps)) as float64 vectors, for forward_eval."""
    if _kernel_ready(running_mean, running_var):
        C = running_mean.shape[0]
        mean, invstd = np.empty(C), np.empty(C)
        _kernels.eval_stats(running_mean, running_var, eps, mean, invstd, _openmp.get_num_threads())
        return mean, invstd
    return running_mean.astype(np.float64), 1.0 / np.sqrt(running_var.astype(np.float64) + eps)


def forward_eval(x, y, weight, bias, mean, invstd):
    """Write (x - mean) * invstd * weight + bias into y."""
    _kernels.forward_eval(x, y, weight, bias, mean, invstd, *_plan())


def forward_eval_running(x, y, weight, bias, running_mean, running_var, eps):
    """eval_stats, then forward_eval with them, in one kernel call where the buffers allow; returns
    (mean, invstd) as eval_stats."""
    if _kernel_ready(running_mean, running_var):
        return _kernels.forward_eval_running(x, y, weight, bias, running_mean, running_var, eps, *_plan())
    mean, invstd = eval_stats(running_mean, running_var, eps)
    forward_eval(x, y, weight, bias, mean, invstd)
    return mean, invstd


def backward(dy, x, dx, weight, mean, invstd, training):
    """Write grad_input into dx; return (grad_weight, grad_bias), float64."""
    C = x.shape[1]
    gw, gb = np.empty(C), np.empty(C)
    _kernels.backward(dy, x, dx, weight, mean, invstd, training, gw, gb, *_plan())
    return gw, gb
