"""Every argument check of fastbn's public functions, in one place.

The public functions (fastbn.functional, fastbn.norms, fastbn.sync) and the layers run these once
per call, before anything is written, and then hand the checked arrays to an internal entry
point that does not check again; so a call that raises changes nothing, and the caller's input
is never written unless it is passed as ``out=`` on purpose.
"""
import math
import numbers

import numpy as np

from ._backends import backend_of

FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_F32, _F64 = FLOATS


def dtype_arg(dtype):
    """A layer's ``dtype=`` argument (None: PyTorch's default, float32)."""
    dt = np.dtype(np.float32 if dtype is None else dtype)
    if dt not in FLOATS:
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


def refuse_matrix_and_masked(a, name):
    """NumPy subclasses whose data means something else: np.matrix (always 2-D) and masked arrays
    (the kernels would ignore the mask)."""
    if type(a) is not np.ndarray and isinstance(a, (np.matrix, np.ma.MaskedArray)):
        what = "np.matrix" if isinstance(a, np.matrix) else "a masked array (its mask would be ignored)"
        raise TypeError(f"{name} must be a numpy.ndarray, got {what}; pass np.asarray(...) of it")


def float_dtype(a, name):
    """The native float32/float64 dtype the kernels use for ``a``: its own, or float32 for the
    half types (float16, and ml_dtypes' bfloat16), which are read through a float32 copy, as are
    arrays in non-native byte order; TypeError for anything else."""
    dt = a.dtype
    if dt is _F32 or dt is _F64 or dt in FLOATS:
        return dt
    if dt.kind == "f" and dt.itemsize in (4, 8):  # non-native byte order
        return dt.newbyteorder("=")
    if half_dtype(dt):
        return _F32
    hint = "; cast it with .astype(np.float32) or .astype(np.float64)" if dt.kind == "f" else ""
    raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got dtype {dt}{hint}")


def storage_dtype(be, x, dt):
    """The dtype the batch-norm kernels read ``x`` in: its own half type (float16, bfloat16), in
    native byte order, where the backend's kernels take it in place (``be.native_halves``), computing
    in float32; else ``dt`` (float_dtype's, through a float32 copy for a half type)."""
    xd = x.dtype
    if xd.itemsize == 2 and xd.isnative and xd.name in be.native_halves and half_dtype(xd):
        return xd
    return dt


def compute_dtype(dt):
    """The dtype of the weight, bias and coefficients for data of dtype ``dt``: float32 for the half
    types, as PyTorch's mixed-precision batch norm keeps its parameters; else ``dt``."""
    return _F32 if dt.itemsize == 2 else dt


def half_dtype(dt):
    """Whether ``dt`` is float16 or bfloat16 (whose conversions come from the ml_dtypes package:
    TypeError, naming it, where it is missing)."""
    if dt.kind == "f" and dt.itemsize == 2:
        return True
    if dt.name != "bfloat16":
        return False
    try:
        import ml_dtypes  # noqa: F401  (registers bfloat16's casts to and from float32)
    except ImportError:
        raise TypeError("fastbn reads bfloat16 arrays through the ml_dtypes package, which is not installed: "
                        "pip install 'fastbn[bfloat16]' (or ml_dtypes), or cast with .astype(np.float32)") from None
    return True


ACTIVATIONS = (None, "relu")


def activation(value):
    """The ``activation`` argument: None, or ``"relu"`` for the fused ReLU; returns whether it is ReLU."""
    if value is None:
        return False
    if isinstance(value, str) and value == "relu":
        return True
    raise ValueError(f"activation must be None or 'relu', got {value!r}")


def flag(value, name):
    """A boolean argument: True/False (or NumPy's bool); anything else is TypeError, as PyTorch's
    ``training="False"`` is (a string or a number would otherwise silently mean True)."""
    if value is True or value is False:
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__} {value!r}")


def scalar(value, name, low=0.0, high=math.inf):
    """A real number in [low, high], as a float."""
    if type(value) is float and low <= value <= high:  # the common case, cheaply
        return value
    try:
        ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and low <= float(value) <= high
    except OverflowError:  # an int beyond float's range
        ok = False
    if not ok:
        rule = f"a real number in [{low}, {high}]" if high != math.inf else f"a real number >= {low}"
        wrong_type = isinstance(value, bool) or not isinstance(value, numbers.Real)
        raise (TypeError if wrong_type else ValueError)(f"{name} must be {rule}, got {value!r}")
    return float(value)


def integer(value, name, low=0):
    """An integer >= low (not a bool), as an int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")
    return int(value)


def count(value, name):
    """A non-negative integer constructor argument: TypeError for another type (a bool, a float,
    a string: PyTorch's layers raise TypeError there too), ValueError for a negative one."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a non-negative integer, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def device_of(x):
    """A context in which new arrays land on ``x``'s device (nothing changes for NumPy arrays)."""
    return backend_of(x).device(x)


def as_ncs(x, name="input", native_half=False):
    """Validate x as an (N, C, *spatial) float array; return (backend, the kernels' view of it:
    see :func:`ncs_view`).  native_half: kernels that read the half types in place (batch norm's)
    get them as they are where the backend can (:func:`storage_dtype`)."""
    be = backend_of(x)
    dt = float_dtype(x, name)
    if native_half:
        dt = storage_dtype(be, x, dt)
    if x.ndim < 2:
        raise ValueError(f"expected {name} of at least 2 dimensions (N, C, *spatial), got shape {tuple(x.shape)}")
    return be, ncs_view(be, x, dt)


def _to_last(ndim):
    """The axes of an (N, C, *spatial) array with the channels moved last: (N, *spatial, C)."""
    return (0, *range(2, ndim), 1)


def _from_last(ndim):
    return (0, ndim - 1, *range(1, ndim - 1))


def ncs_view(be, x, dt):
    """The kernels' contiguous view (or copy) in ``dt`` of an (N, C, *spatial) array already
    checked: (N, C, S) for C-contiguous memory, and (N * S, C, 1) for channels-last memory (a
    transposed view of a C-contiguous (N, *spatial, C) array, as ``x.transpose(0, 3, 1, 2)``),
    which the kernels read in place: the same per-channel statistics, over N * S rows of C."""
    N, C = x.shape[0], x.shape[1]
    S = math.prod(x.shape[2:])
    if x.ndim >= 3 and S > 1 and not x.flags.c_contiguous:
        t = x.transpose(_to_last(x.ndim))
        if t.flags.c_contiguous and t.dtype == dt and be.aligned(t):
            return t.reshape(N * S, C, 1)
    return be.contiguous(x, dt).reshape(N, C, S)


def _channels_last(x, x3):
    """Whether ``x3`` (from ncs_view) is the channels-last view of ``x``."""
    return x3.shape[0] != x.shape[0]


def kernel_view(be, a, x, x3, name):
    """``a`` (grad_output: the backend and shape of the input ``x``) as the kernels read it: the
    layout of ``x3`` (ncs_view of x), in x3's dtype; a copy only where a's memory differs."""
    refuse_matrix_and_masked(a, name)
    dt = x3.dtype
    # the input's own dtype, either byte order, whatever type the kernels read it in (a half input
    # of batch norm in place, of the other norms through float32): as PyTorch's backward kernels
    if a.dtype is not x.dtype:  # (the common case in one test: NumPy's builtin dtypes are singletons)
        float_dtype(a, name)  # a TypeError for anything but the float types
        if a.dtype.newbyteorder("=") != x.dtype.newbyteorder("="):
            raise TypeError(f"{name} must have the input's dtype {x.dtype.newbyteorder('=')}, got {a.dtype}")
    if _channels_last(x, x3):
        a = a.transpose(_to_last(a.ndim))
    return be.contiguous(a, dt).reshape(x3.shape)


def new_output(be, x, x3):
    """A new output for ``x``: (the array to return, of x's shape and memory layout, and the
    kernels' view of it, of x3's shape)."""
    if _channels_last(x, x3):
        y = be.empty(x3, (x.shape[0], *x.shape[2:], x.shape[1]))
        return y.transpose(_from_last(x.ndim)), y.reshape(x3.shape)
    y = be.empty(x3, x.shape)
    return y, y.reshape(x3.shape)


def kernel_dtype(x, dtype, owner):
    """A layer's input dtype check: ``x`` must hold ``dtype`` (either byte order), or a half type
    (float16, bfloat16) for a float32 layer, as PyTorch's mixed-precision batch norm takes."""
    if x.dtype == dtype or (x.dtype.itemsize == 2 and dtype == _F32 and half_dtype(x.dtype)):
        return
    if not (x.dtype.kind == "f" and x.dtype.newbyteorder("=") == dtype):
        hint = f" or build the layer with dtype=np.{x.dtype.name}" if x.dtype in FLOATS else ""
        raise TypeError(f"{owner} holds {dtype} parameters, got input of dtype {x.dtype}; cast the input{hint}")


def like_input(be, a, x, x3, name):
    """``a`` (grad_output) checked against the input ``x``: the same backend, shape and dtype;
    returned as :func:`kernel_view` gives it."""
    if not be.is_array(a):
        backend_of(a)  # a TypeError naming what it is, unless it is an array of another backend
        raise TypeError(f"{name} must be a {be.kind} array like the input, got {type(a).__module__}.{type(a).__name__}")
    if tuple(a.shape) != tuple(x.shape):
        raise ValueError(f"{name} must have the input's shape {tuple(x.shape)}, got {tuple(a.shape)}")
    return kernel_view(be, a, x, x3, name)


def vector(v, name, be, shape, dtype, writable=False, what=None):
    """Check a parameter or statistics array of ``shape`` (weight, bias, running buffers, saved
    statistics).  With a ``dtype``, return it as a flat contiguous, aligned array of that dtype (a
    copy where needed); without (running buffers, updated in place), return ``v`` itself.
    ``what``: what the shape comes from, for the message (default: the input's channels)."""
    if type(v) is np.ndarray and be.xp is np and v.shape == shape:  # the common case, cheaply:
        dt = v.dtype  # a contiguous vector of a native float dtype (builtin dtypes are singletons)
        if (dt is dtype if dtype is not None else (dt is _F32 or dt is _F64)) and len(shape) == 1:
            flags = v.flags
            if flags.c_contiguous and flags.aligned and (flags.writeable or not writable):
                return v
    if not be.is_array(v):
        raise TypeError(
            f"{name} must be a {be.xp.__name__} array of shape {shape} on the same device as the input, "
            f"got {type(v).__module__}.{type(v).__name__}"
        )
    refuse_matrix_and_masked(v, name)
    float_dtype(v, name)
    if tuple(v.shape) != shape:
        if what is None and len(shape) == 1:
            what = f"the input's {shape[0]} channels"
        raise ValueError(f"{name} must have shape {shape}{' to match ' + what if what else ''}, "
                         f"got shape {tuple(v.shape)}")
    if writable and not be.writeable(v):
        raise ValueError(f"{name} is read-only, but training updates it in place")
    if dtype is None:
        return v
    # The kernels read these as flat contiguous, aligned arrays of one dtype (a strided view such
    # as w[::2] would otherwise be rejected deep in Cython).
    v = be.contiguous(v, dtype)
    return v if len(shape) == 1 else v.reshape(math.prod(shape))


def param(v, name, be, shape, dtype, default):
    """An optional affine parameter: ``vector(...)``, or ``default`` (1 or 0) everywhere when None."""
    if v is None:
        return be.xp.full(math.prod(shape), default, dtype=dtype)
    return vector(v, name, be, shape, dtype)


def prepare_out(be, out, x, x3, *reads):
    """(The array the kernel's result lands in, of x's shape; the kernels' view of it, which
    they write; the ``out`` to copy it into afterwards, or None): pass the first and last to
    :func:`finish`.  ``x`` is the caller's input, ``x3`` and ``reads`` the arrays the kernel
    reads (ncs_view's layout): ``out`` may be one of them exactly (the kernels work elementwise:
    every pass reads an element before it writes it, at the same place), but not overlap one
    partly.  An ``out`` of another byte order or layout gets the result copied in; so does the
    result of a half-precision ``x`` (float16, bfloat16) read through a float32 copy (where the
    backend has no kernels for it), computed in float32 and rounded once, into ``out`` or a new
    array of x's dtype and layout."""
    # a half-precision x read through a float32 copy: the result is rounded to x's half type after
    half = x.dtype.itemsize == 2 and x3.dtype.itemsize != 2 and half_dtype(x.dtype)
    if out is None:  # a new result is in native byte order, whatever the input's (as NumPy's)
        y, y3 = new_output(be, x, x3)
        return y, y3, (be.xp.empty_like(x, dtype=x.dtype.newbyteorder("=")) if half else None)
    if not be.is_array(out):
        raise TypeError(f"out must be a {be.xp.__name__} array, got {type(out).__name__}")
    refuse_matrix_and_masked(out, "out")
    want = (x.dtype if half else x3.dtype).newbyteorder("=")
    if tuple(out.shape) != tuple(x.shape) or out.dtype.newbyteorder("=") != want:
        raise ValueError(
            f"out must have the input's shape {tuple(x.shape)} and dtype {want} (either byte order), "
            f"got shape {tuple(out.shape)} and dtype {out.dtype}"
        )
    if not be.writeable(out):
        raise ValueError("out is read-only")
    # as PyTorch; an empty out has no elements to share (NumPy 2 gives every empty array 0 strides)
    if out.size and 0 in out.strides and any(st == 0 and n > 1 for st, n in zip(out.strides, out.shape)):
        raise ValueError(f"out has elements that share one memory location (strides {out.strides}), so the "
                         f"results would overwrite each other")
    o = out.transpose(_to_last(out.ndim)) if _channels_last(x, x3) else out
    if out.dtype == x3.dtype and o.flags.c_contiguous and be.aligned(out):
        o3 = o.reshape(x3.shape)
        # Writing over an input array itself is fine (elementwise); a partial overlap is not.
        if be.relation(o3, x3) < 2 and all(be.relation(o3, a) < 2 for a in reads):
            return out, o3, None
    return (*new_output(be, x, x3), out)


def finish(y, target):
    """What the call returns: ``y`` (prepare_out's first), copied (and rounded) into ``target``
    where that is an ``out`` the kernel could not write directly, or a half-precision result."""
    if target is None:
        return y
    target[...] = y
    return target


def apart(be, out, *vectors):
    """The per-channel vectors a kernel reads, each copied where it shares memory with ``out``: the
    kernels read a channel's vectors while other threads (CPU SLICES) or blocks (GPU) write other
    channels' outputs, so a vector inside ``out`` could be overwritten before it is read."""
    if out is None or not be.overlapping(out, vectors):
        return vectors
    mask = be.overlapping(out, vectors)
    return tuple(v.copy() if mask >> i & 1 else v for i, v in enumerate(vectors))


def out_apart_from(be, out, buffers):
    """Refuse an ``out`` that shares memory with a running buffer updated after out is written."""
    if out is None or not be.overlapping(out, tuple(buf for _, buf in buffers)):
        return
    for name, buf in buffers:
        if buf is not None and be.overlapping(out, (buf,)):
            raise ValueError(f"out shares memory with {name}, which training updates after writing out; "
                             f"pass a separate out")
