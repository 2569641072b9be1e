"""The CPU backend: NumPy arrays, fastbn's Cython/OpenMP kernels.

A backend module provides ``xp`` (its array module), ``is_array(a)`` and the three operations
below on C-contiguous (N, C, S) arrays that fastbn.functional has already validated.
fastbn._cupy_backend provides the same names for CuPy arrays.
"""
import numpy as np

from . import _kernels, _openmp

xp = np
name = "cpu"

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


def forward_eval(x, y, weight, bias, mean, invstd):
    """Write (x - mean) * invstd * weight + bias into y."""
    _kernels.forward_eval(x, y, weight, bias, mean, invstd, *_plan())


def backward(dy, x, dx, weight, mean, invstd, training):
    """Write grad_input into dx; return (grad_weight, grad_bias), float64."""
    C = x.shape[1]
    gw, gb = np.empty(C), np.empty(C)
    _kernels.backward(dy, x, dx, weight, mean, invstd, training, gw, gb, *_plan())
    return gw, gb
