"""Batch normalization on NumPy (or CuPy) arrays, with ``torch.nn.functional.batch_norm``'s semantics.

This module validates and dispatches; the arithmetic lives in the backends (``_cpu`` for NumPy,
``_cupy_backend`` for CuPy).  Every check runs before any state changes, so a call that raises
leaves the running buffers as they were, and the caller's input is never written (unless it is
passed as ``out=`` on purpose).
"""
import functools
import math
import numbers

import numpy as np

from . import _alloc, _cpu

__all__ = ["batch_norm", "batch_norm_forward", "batch_norm_backward"]

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def backend_of(a):
    """The backend module for an array: ``_cpu`` for NumPy, ``_cupy_backend`` for CuPy."""
    if type(a) is np.ndarray:  # the common case, cheaply
        return _cpu
    if isinstance(a, np.ndarray):
        _refuse_matrix_and_masked(a, "input")
        return _cpu
    if type(a).__module__.split(".")[0] == "cupy":
        from . import _cupy_backend

        return _cupy_backend
    raise TypeError(f"expected a numpy.ndarray (or cupy.ndarray), got {type(a).__module__}.{type(a).__name__}")


def _refuse_matrix_and_masked(a, name):
    """NumPy subclasses whose data means something else: np.matrix (always 2-D) and masked arrays
    (the kernels would ignore the mask)."""
    if type(a) is not np.ndarray and isinstance(a, (np.matrix, np.ma.MaskedArray)):
        what = "np.matrix" if isinstance(a, np.matrix) else "a masked array (its mask would be ignored)"
        raise TypeError(f"{name} must be a numpy.ndarray, got {what}; pass np.asarray(...) of it")


def _float_dtype(a, name):
    dt = a.dtype
    if dt in _FLOATS:
        return dt
    if dt.kind == "f" and dt.itemsize in (4, 8):  # non-native byte order
        return dt.newbyteorder("=")
    hint = "; cast it with .astype(np.float32) or .astype(np.float64)" if dt.kind == "f" else ""
    raise TypeError(f"{name} must be float32 or float64, got dtype {dt}{hint}")


def as_ncs(x, name="input"):
    """Validate x as an (N, C, *spatial) float array; return (backend, contiguous (N, C, S) view)."""
    be = backend_of(x)
    dt = _float_dtype(x, name)
    if x.ndim < 2:
        raise ValueError(f"expected {name} of at least 2 dimensions (N, C, *spatial), got shape {tuple(x.shape)}")
    flags = x.flags
    if not flags.c_contiguous or x.dtype != dt or not getattr(flags, "aligned", True):
        x = _contiguous(be, x, dt)
    N, C = x.shape[0], x.shape[1]
    return be, x.reshape(N, C, x.size // (N * C) if N * C else math.prod(x.shape[2:]))


def _writeable(a):
    """NumPy's writeable flag; CuPy's flags have no such attribute (its arrays always are)."""
    return getattr(a.flags, "writeable", True)


def _aligned(a):
    """NumPy's flag for element-aligned memory (a view at an odd byte offset is not); CuPy's
    arrays always are."""
    return getattr(a.flags, "aligned", True)


def _contiguous(be, a, dtype):
    """A C-contiguous, aligned copy of ``a`` in ``dtype`` (native byte order) where ``a`` is not one."""
    if be is _cpu and not _aligned(a):
        return np.array(a, dtype=dtype, order="C")  # ascontiguousarray would keep a misaligned buffer
    return be.xp.ascontiguousarray(a, dtype=dtype)


def _channel_vector(v, name, be, C, dtype, writable=False):
    """Check a per-channel array (weight, bias, running buffers, saved statistics).  With a
    ``dtype``, return it as a contiguous, aligned vector of that dtype (a copy where needed);
    without (running buffers, updated in place), return ``v`` itself."""
    if be is _cpu and type(v) is np.ndarray and v.shape == (C,) and (v.dtype == dtype if dtype is not None else v.dtype in _FLOATS):
        flags = v.flags  # the common case, cheaply: a float NumPy vector of the right length
        if flags.c_contiguous and flags.aligned and (flags.writeable or not writable):
            return v
    if not be.is_array(v):
        raise TypeError(
            f"{name} must be a {be.xp.__name__} array of shape ({C},) on the same device as the input, "
            f"got {type(v).__module__}.{type(v).__name__}"
        )
    _refuse_matrix_and_masked(v, name)
    _float_dtype(v, name)
    if v.shape != (C,):
        raise ValueError(f"{name} must have shape ({C},) to match the input's {C} channels, got shape {tuple(v.shape)}")
    if writable and not _writeable(v):
        raise ValueError(f"{name} is read-only, but training updates it in place")
    if dtype is not None and (v.dtype != dtype or not v.flags.c_contiguous or not _aligned(v)):
        # The kernels read these as contiguous, aligned vectors of the input's dtype (a strided
        # view such as w[::2] would otherwise be rejected deep in Cython).
        v = _contiguous(be, v, dtype)
    return v


def _fill(be, C, dtype, value):
    return be.xp.full(C, value, dtype=dtype)


def _check_scalar(value, name, low=0.0, high=math.inf):
    if type(value) is float and low <= value <= high:  # the common case, cheaply
        return value
    try:
        ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and low <= float(value) <= high
    except OverflowError:  # an int beyond float's range
        ok = False
    if not ok:
        rule = f"a real number in [{low}, {high}]" if high != math.inf else f"a real number >= {low}"
        raise (TypeError if not isinstance(value, numbers.Real) else ValueError)(f"{name} must be {rule}, got {value!r}")
    return float(value)


def _new_output(be, x, x3):
    """A new output for input ``x`` (its (N, C, S) view ``x3``): (the array to return, of x's shape
    and owning its memory, and its (N, C, S) view for the kernel).  On the CPU a large one comes
    from fastbn's caching allocator (see fastbn._alloc), on the GPU from CuPy's memory pool."""
    if be is _cpu:
        y = _alloc.empty_like(x3, x.shape)
        return y, y.reshape(x3.shape)
    y3 = be.xp.empty_like(x3)
    return y3.reshape(x.shape), y3


def _prepare_out(be, out, x, x3, *more):
    """(The array to return, the (N, C, S) array the kernel writes, whether that must be copied into
    ``out`` afterwards).  ``x3`` and ``more`` are the (N, C, S) arrays the kernel reads: ``out``
    may be one of them exactly (the kernels work elementwise), but not overlap one partly."""
    if out is None:
        return (*_new_output(be, x, x3), False)
    if not be.is_array(out):
        raise TypeError(f"out must be a {be.xp.__name__} array, got {type(out).__name__}")
    _refuse_matrix_and_masked(out, "out")
    if tuple(out.shape) != tuple(x.shape) or out.dtype != x3.dtype:
        raise ValueError(
            f"out must have the input's shape {tuple(x.shape)} and dtype {x3.dtype}, "
            f"got shape {tuple(out.shape)} and dtype {out.dtype}"
        )
    if not _writeable(out):
        raise ValueError("out is read-only")
    if out.flags.c_contiguous and _aligned(out):
        o3 = out.reshape(x3.shape)
        if all(_disjoint_or_same(be, o3, a) for a in (x3, *more)):
            return out, o3, False
    return out, _new_output(be, x, x3)[1], True


def _apart(be, out, *vectors):
    """The per-channel vectors a kernel reads, each copied where it shares memory with ``out``: the
    kernels read a channel's vectors while other threads (CPU SLICES) or blocks (GPU) write other
    channels' outputs, so a vector inside ``out`` could be overwritten before it is read.  The one
    place both backends rely on for this."""
    if out is None:
        return vectors
    return tuple(v.copy() if v is not None and be.xp.may_share_memory(out, v) else v for v in vectors)


def _disjoint_or_same(be, o3, a):
    """Writing over an input array itself is fine (elementwise); a partial overlap is not."""
    if not be.xp.may_share_memory(o3, a):
        return True
    if be is _cpu:
        return o3.__array_interface__["data"][0] == a.__array_interface__["data"][0]
    return o3.data.ptr == a.data.ptr


def _training_check(x, N, S):
    if N * S == 1:
        raise ValueError(f"expected more than 1 value per channel when training, got input of shape {tuple(x.shape)}")


def _on_device_of(position, name):
    """Run the decorated function with a CuPy argument's GPU current, so every array it creates
    (outputs, statistics, defaults) lives on the input's device; NumPy arguments: unchanged."""
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            a = args[position] if len(args) > position else kwargs.get(name)
            if type(a) is not np.ndarray and type(a).__module__.split(".")[0] == "cupy":
                with a.device:
                    return fn(*args, **kwargs)
            return fn(*args, **kwargs)

        return wrapper

    return decorate


@_on_device_of(0, "input")
def batch_norm_forward(input, running_mean, running_var, weight=None, bias=None, training=False,
                       momentum=0.1, eps=1e-5, *, out=None):
    """Like :func:`batch_norm`, and also return what :func:`batch_norm_backward` needs.

    Returns ``(output, save_mean, save_invstd)``: the per-channel mean and ``1/sqrt(var + eps)``
    that normalized the input (the batch's in training, the running buffers' otherwise), as
    float64 arrays of shape ``(C,)``.
    """
    be, x3 = as_ncs(input)
    N, C, S = x3.shape
    dt = x3.dtype
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be arrays or both be None")
    training = bool(training)
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var must be given in evaluation mode (training=False)")
    eps = _check_scalar(eps, "eps")
    if training and not eps > 0:  # as PyTorch: a constant channel would divide by zero
        raise ValueError(f"eps must be positive in training, got {eps!r}")
    if training and running_mean is not None:
        if momentum is None:
            raise TypeError("momentum must be a float; for a cumulative average pass 1/num_batches "
                            "(the layers do this when momentum=None)")
        momentum = _check_scalar(momentum, "momentum", 0.0, 1.0)
    w = _fill(be, C, dt, 1.0) if weight is None else _channel_vector(weight, "weight", be, C, dt)
    b = _fill(be, C, dt, 0.0) if bias is None else _channel_vector(bias, "bias", be, C, dt)
    if running_mean is not None:
        _channel_vector(running_mean, "running_mean", be, C, None, writable=training)
        _channel_vector(running_var, "running_var", be, C, None, writable=training)
        if be is not _cpu:  # updated after the kernel has written out: check before it runs
            be.check_device(x3, (("running_mean", running_mean), ("running_var", running_var)))
    if training:
        _training_check(input, N, S)
    y, y3, copy_back = _prepare_out(be, out, input, x3)
    if training and running_mean is not None and out is not None:
        for name, buf in (("running_mean", running_mean), ("running_var", running_var)):
            if be.xp.may_share_memory(out, buf):  # the update would overwrite the output, or read it
                raise ValueError(f"out shares memory with {name}, which training updates after writing out; "
                                 f"pass a separate out")

    if training:
        if x3.size == 0:  # PyTorch: empty output, running buffers untouched (also with C = 0)
            mean, invstd = be.xp.zeros(C), be.xp.zeros(C)
        else:
            mean, var, invstd = be.forward_train(x3, y3, *_apart(be, out, w, b), eps)
            if running_mean is not None:
                be.update_running(running_mean, running_var, mean, var, momentum, N * S)
    elif y3.size:
        mean, invstd = be.forward_eval_running(x3, y3, *_apart(be, out, w, b, running_mean, running_var), eps)
    else:
        mean, invstd = be.eval_stats(running_mean, running_var, eps)

    if copy_back:
        out[...] = y3.reshape(out.shape)
    return y, mean, invstd


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, out=None):
    """Batch normalization over the channel axis 1 of ``input`` (N, C, *spatial).

    Same semantics as ``torch.nn.functional.batch_norm``: in training, normalize with the batch
    mean and biased variance and, when running buffers are given, update them in place
    (``running = (1 - momentum) * running + momentum * batch``, unbiased variance for
    ``running_var``); otherwise normalize with the running buffers.  ``out=`` receives the result
    (it may be ``input`` itself for an in-place call).
    """
    return batch_norm_forward(input, running_mean, running_var, weight, bias, training, momentum, eps, out=out)[0]


@_on_device_of(1, "input")
def batch_norm_backward(grad_output, input, weight, save_mean, save_invstd, training=True, *, out=None):
    """Gradients of batch norm from the statistics :func:`batch_norm_forward` returned.

    ``training=True``: the forward normalized with batch statistics, so the gradient flows
    through the mean and variance too.  ``training=False``: the statistics were constants
    (evaluation mode), ``grad_input = grad_output * weight * save_invstd``.
    Returns ``(grad_input, grad_weight, grad_bias)``; the parameter gradients are computed even
    when ``weight`` is None (they are cheap), in the input's dtype.  ``out=`` receives grad_input
    (it may be ``grad_output`` or ``input`` itself, for an in-place call); without it a large
    grad_input comes from fastbn's caching allocator, which reuses the memory of dropped outputs
    (see fastbn._alloc), so reusing a buffer by hand no longer saves page faults.
    """
    be, x3 = as_ncs(input)
    N, C, S = x3.shape
    dt = x3.dtype
    if backend_of(grad_output) is not be:
        raise TypeError("grad_output and input must both be NumPy arrays or both CuPy arrays")
    if tuple(grad_output.shape) != tuple(input.shape):
        raise ValueError(f"grad_output must have the input's shape {tuple(input.shape)}, got {tuple(grad_output.shape)}")
    if _float_dtype(grad_output, "grad_output") != dt:
        raise TypeError(f"grad_output must have the input's dtype {dt}, got {grad_output.dtype}")
    _, g3 = as_ncs(grad_output, "grad_output")
    w = _fill(be, C, dt, 1.0) if weight is None else _channel_vector(weight, "weight", be, C, dt)
    mean = _channel_vector(save_mean, "save_mean", be, C, np.float64)
    invstd = _channel_vector(save_invstd, "save_invstd", be, C, np.float64)
    dx, dx3, copy_back = _prepare_out(be, out, input, x3, g3)
    if x3.size:
        gw, gb = be.backward(g3, x3, dx3, *_apart(be, out, w, mean, invstd), bool(training))
    else:
        gw, gb = be.xp.zeros(C), be.xp.zeros(C)
    if copy_back:
        out[...] = dx3.reshape(out.shape)
    return dx, gw.astype(dt), gb.astype(dt)
