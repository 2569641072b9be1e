"""The CPU backend: NumPy arrays, fastbn's Cython kernels on fastbn's own thread pool.

The protocol is described in :mod:`fastbn._backends`; the arrays reaching the kernels here are
C-contiguous (N, C, S) arrays that fastbn._checks has already validated.
"""
import contextlib

import numpy as np

from .. import _alloc, _kernels, _machine, _openmp
from . import formulas

xp = np
name = "cpu"
kind = "NumPy (CPU)"

# The kernels' byte thresholds follow this machine's caches (read once, at import).
_kernels.tune_for(_machine.CACHES["l2"], _machine.CACHES["l3_effective"])

# Tests force a work-splitting path ("ranges", "columns"), a unit size and
# streaming stores (stream: -1 decide by size, 0 off, 1 on) here.
tuning = {"path": "auto", "unit": 0, "stream": -1}

# The half types the kernels read and write in place, computing in float32 (see fastbn/_simd.h).
native_halves = frozenset({"bfloat16", "float16"})

_HOST = contextlib.nullcontext()
_PATHS = _kernels.PATHS


# ---------------------------------------------------------------- arrays
def is_array(a):
    return isinstance(a, np.ndarray)


def writeable(a):
    return a.flags.writeable


def aligned(a):
    """NumPy's flag for element-aligned memory (a view at an odd byte offset is not)."""
    return a.flags.aligned


relation = _alloc.relation  # 0 apart, 1 the same bytes, 2 a partial overlap (by bounds, in C)
overlapping = _alloc.overlapping  # bit i: arrays[i] may share memory with out


def contiguous(a, dtype):
    """``a`` if it is C-contiguous, aligned and of ``dtype`` (native byte order), else such a copy."""
    flags = a.flags
    if flags.c_contiguous and flags.aligned and a.dtype == dtype:
        return a
    return np.array(a, dtype=dtype, order="C")  # ascontiguousarray would keep a misaligned buffer


def check_device(x, arrays):
    """Every NumPy array is on the host."""


def device(x):
    return _HOST


def empty(x3, shape):
    """A new C-contiguous array of ``shape`` (as many elements as ``x3``, its dtype), from
    fastbn's caching allocator (see fastbn._alloc)."""
    return _alloc.empty_like(x3, shape)


def norm_kernels(what):
    from .. import _norm_kernels

    return _norm_kernels


def threads():
    return _openmp.get_num_threads()


# ---------------------------------------------------------------- batch norm
def plan():
    """The kernels' trailing arguments: threads, work-splitting path, unit, streaming stores."""
    return _openmp.get_num_threads(), _PATHS[tuning["path"]], tuning["unit"], tuning["stream"]


def forward_train(x, y, weight, bias, eps, relu=False):
    """Write the normalized x (through ReLU when relu) into y; return the batch (mean, biased var,
    invstd), float64."""
    C = x.shape[1]
    mean, var, invstd = np.empty(C), np.empty(C), np.empty(C)
    _kernels.forward_train(x, y, weight, bias, eps, mean, var, invstd, *plan(), relu)
    return mean, var, invstd


def _kernel_ready(a, b):
    """Running buffers the kernels can update in place: both float32 or both float64, in native
    byte order, C-contiguous and aligned; anything else (views, mixed dtypes, half buffers) goes
    through the formulas."""
    dt = a.dtype
    if dt is not b.dtype and (dt != b.dtype or not dt.isnative):
        return False
    if dt.type is not np.float32 and dt.type is not np.float64:
        return False
    fa, fb = a.flags, b.flags
    return fa.c_contiguous and fb.c_contiguous and fa.aligned and fb.aligned and dt.isnative


def update_running(running_mean, running_var, mean, var, momentum, n, unbiased=True):
    """running = (1 - momentum) * running + momentum * batch (see formulas.update_running)."""
    if unbiased and _kernel_ready(running_mean, running_var):
        _kernels.update_running(running_mean, running_var, mean, var, momentum, n)
    else:
        formulas.update_running(np, running_mean, running_var, mean, var, momentum, n, unbiased)


def eval_stats(running_mean, running_var, eps):
    """(running_mean, 1 / sqrt(running_var + eps)) as float64 vectors, for forward_eval."""
    if _kernel_ready(running_mean, running_var):
        C = running_mean.shape[0]
        mean, invstd = np.empty(C), np.empty(C)
        _kernels.eval_stats(running_mean, running_var, eps, mean, invstd, _openmp.get_num_threads())
        return mean, invstd
    return formulas.eval_stats(np, running_mean, running_var, eps)


def forward_eval(x, y, weight, bias, mean, invstd, relu=False):
    """Write (x - mean) * invstd * weight + bias (through ReLU when relu) into y."""
    _kernels.forward_eval(x, y, weight, bias, mean, invstd, *plan(), relu)


def forward_eval_running(x, y, weight, bias, running_mean, running_var, eps, relu=False):
    """eval_stats, then forward_eval with them, in one kernel call where the buffers allow; returns
    (mean, invstd) as eval_stats."""
    if _kernel_ready(running_mean, running_var):
        return _kernels.forward_eval_running(x, y, weight, bias, running_mean, running_var, eps, *plan(), relu)
    mean, invstd = eval_stats(running_mean, running_var, eps)
    forward_eval(x, y, weight, bias, mean, invstd, relu)
    return mean, invstd


def backward(dy, x, dx, weight, mean, invstd, training, bias=None, output=None):
    """Write grad_input into dx; return (grad_weight, grad_bias), float64.  Through the fused ReLU
    when ``bias`` (the forward's: its output is recomputed from x) or ``output`` (the forward's
    output) is given."""
    C = x.shape[1]
    gw, gb = np.empty(C), np.empty(C)
    _kernels.backward(dy, x, dx, weight, mean, invstd, training, gw, gb, *plan(), bias, output)
    return gw, gb
