"""The plain calls, checked in C.

``batch_norm(x, running_mean, running_var, weight, bias)`` in evaluation mode spends a few
microseconds in its Python checks (fastbn._checks), which on a small input is more than the kernel
itself; after a large kernel has emptied the caches, the same checks take tens of microseconds.
:func:`eval_forward` (and the group and layer norm calls: :func:`group_forward`,
:func:`layer_forward`, :func:`group_backward`, :func:`layer_backward`) recognises, in C, the
call whose arguments need nothing from those checks -- exact NumPy arrays of one native float
dtype, C-contiguous and aligned, of matching shapes, a float ``eps >= 0``, an ``out`` of the
input's shape that is the input itself or apart from every array the kernel reads -- and runs the
kernel on it.  For anything else it returns None, and the caller runs the full checks, which give
the conversions and the error messages: this module rejects nothing, it only accepts.
"""
cimport numpy as cnp
import numpy as np

from . import _alloc, _kernels, _norm_kernels
from ._backends import cpu

cnp.import_array()

cdef object _forward_eval_running = _kernels.forward_eval_running
cdef object _empty_like = _alloc.empty_like
cdef object _plan = cpu.plan
cdef object _group_forward = _norm_kernels.group_forward
cdef object _layer_forward = _norm_kernels.layer_forward
cdef object _group_backward = _norm_kernels.group_backward
cdef object _layer_backward = _norm_kernels.layer_backward
cdef object _threads = cpu.threads


cdef inline int _plain(object a, int ndim, bint writable) noexcept:
    """The element type (NPY_FLOAT or NPY_DOUBLE) of an exact ndarray of ``ndim`` dimensions
    (at least that many when ndim < 0) that is aligned, C-contiguous and in native byte order;
    -1 for anything else."""
    if type(a) is not np.ndarray:
        return -1
    cdef cnp.ndarray arr = <cnp.ndarray>a
    cdef int nd = cnp.PyArray_NDIM(arr)
    if (nd != ndim) if ndim >= 0 else (nd < -ndim):
        return -1
    if not cnp.PyArray_ISNOTSWAPPED(arr):
        return -1
    if not cnp.PyArray_CHKFLAGS(arr, cnp.NPY_ARRAY_CARRAY if writable else cnp.NPY_ARRAY_CARRAY_RO):
        return -1
    cdef int t = cnp.PyArray_TYPE(arr)
    return t if t == cnp.NPY_FLOAT or t == cnp.NPY_DOUBLE else -1


cdef inline bint _vector(object v, int t, Py_ssize_t C) noexcept:
    return _plain(v, 1, False) == t and cnp.PyArray_DIM(<cnp.ndarray>v, 0) == C


cdef inline bint _apart(cnp.ndarray out, object a) noexcept:
    """``a``'s bytes (a contiguous array) and out's do not meet."""
    cdef char *o0 = <char *>cnp.PyArray_DATA(out)
    cdef char *o1 = o0 + cnp.PyArray_NBYTES(out)
    cdef char *a0 = <char *>cnp.PyArray_DATA(<cnp.ndarray>a)
    cdef char *a1 = a0 + cnp.PyArray_NBYTES(<cnp.ndarray>a)
    return o1 <= a0 or a1 <= o0


cdef inline bint _same_shape(cnp.ndarray a, cnp.ndarray b) noexcept:
    """Whether a and b (of the same number of dimensions) have the same shape."""
    cdef int d
    for d in range(cnp.PyArray_NDIM(a)):
        if cnp.PyArray_DIM(a, d) != cnp.PyArray_DIM(b, d):
            return False
    return True


cdef inline bint _plain_out(object out, cnp.ndarray x, int t) noexcept:
    """An ``out`` the kernels can write for input x: plain, writable, of x's shape and type, and
    x itself or apart from it."""
    if _plain(out, cnp.PyArray_NDIM(x), True) != t or not _same_shape(<cnp.ndarray>out, x):
        return False
    return _apart(out, x) or cnp.PyArray_DATA(<cnp.ndarray>out) == cnp.PyArray_DATA(x)


def eval_forward(x, running_mean, running_var, weight, bias, eps, out, bint relu=False, bint in_place=True):
    """``(y, save_mean, save_invstd)`` of an evaluation-mode batch norm (with the fused ReLU when
    relu) whose arguments are all plain (see the module's docstring), or None.  ``in_place``
    False: None also for an ``out`` over x's memory (a layer that saves x for its backward)."""
    cdef int t = _plain(x, -2, False)
    if t < 0 or weight is None or bias is None or type(eps) is not float or not <double>eps >= 0:
        return None
    cdef cnp.ndarray xa = <cnp.ndarray>x
    cdef Py_ssize_t N = cnp.PyArray_DIM(xa, 0), C = cnp.PyArray_DIM(xa, 1), size = cnp.PyArray_SIZE(xa)
    if size == 0:
        return None
    cdef int rt = _plain(running_mean, 1, False)
    if not (_vector(weight, t, C) and _vector(bias, t, C) and rt >= 0 and _vector(running_mean, rt, C)
            and _vector(running_var, rt, C)):
        return None
    cdef tuple shape3 = (N, C, size // (N * C))
    x3 = xa.reshape(shape3)
    if out is None:
        y = _empty_like(x3, x.shape)
    else:
        if not _plain_out(out, xa, t) or not (in_place or _apart(out, x)):
            return None
        if not (_apart(out, weight) and _apart(out, bias) and _apart(out, running_mean) and _apart(out, running_var)):
            return None
        y = out
    mean, invstd = _forward_eval_running(x3, y.reshape(shape3), weight, bias, running_mean, running_var, eps, *_plan(), relu=relu)
    return y, mean, invstd


def group_forward(x, num_groups, weight, bias, eps, out):
    """``(y, save_mean, save_invstd)`` of ``group_norm_forward`` whose arguments are all plain (an
    int ``num_groups`` that divides the channels, weight and bias plain or None, more than one
    value a group, a non-empty input), or None."""
    cdef int t = _plain(x, -2, False)
    if t < 0 or type(num_groups) is not int or type(eps) is not float or not <double>eps >= 0:
        return None
    cdef cnp.ndarray xa = <cnp.ndarray>x
    cdef Py_ssize_t N = cnp.PyArray_DIM(xa, 0), C = cnp.PyArray_DIM(xa, 1), size = cnp.PyArray_SIZE(xa), G, S
    if size == 0 or not 1 <= num_groups <= C:
        return None
    G = num_groups
    S = size // (N * C)
    if C % G or N * (C // G) * S == 1:
        return None
    w, b = _param_or(weight, t, C, 1.0, xa), _param_or(bias, t, C, 0.0, xa)
    y = _affine_out(xa, t, w, b, out)
    if y is None:
        return None
    mean, var, invstd = np.empty((N, G)), np.empty((N, G)), np.empty((N, G))  # the kernel writes every row
    _group_forward(x, y, w, b, G, S, <double>eps, mean, var, invstd, _threads())
    return y, mean, invstd


cdef Py_ssize_t _layer_dims(object x, object normalized_shape, int *t):
    """Layer norm's plain input: x plain (its element type into t) and not empty, with
    ``normalized_shape`` naming its last dimension alone (an int, or a 1-tuple of an int); that
    dimension, else -1."""
    t[0] = _plain(x, -1, False)
    if t[0] < 0:
        return -1
    if type(normalized_shape) is tuple and len(<tuple>normalized_shape) == 1:
        normalized_shape = (<tuple>normalized_shape)[0]
    cdef cnp.ndarray xa = <cnp.ndarray>x
    cdef Py_ssize_t L = cnp.PyArray_DIM(xa, cnp.PyArray_NDIM(xa) - 1)
    if type(normalized_shape) is not int or normalized_shape != L or cnp.PyArray_SIZE(xa) == 0:
        return -1
    return L


def layer_forward(x, normalized_shape, weight, bias, eps, out):
    """``(y, save_mean, save_invstd)`` of ``layer_norm_forward`` whose arguments are all plain (one
    normalized dimension, an int or a 1-tuple of an int equal to x's last, weight and bias plain
    or None, a non-empty input), or None."""
    cdef int t
    cdef Py_ssize_t L = _layer_dims(x, normalized_shape, &t)
    if L < 0 or type(eps) is not float or not <double>eps >= 0:
        return None
    cdef cnp.ndarray xa = <cnp.ndarray>x
    cdef int nd = cnp.PyArray_NDIM(xa)
    w, b = _param_or(weight, t, L, 1.0, xa), _param_or(bias, t, L, 0.0, xa)
    y = _affine_out(xa, t, w, b, out)
    if y is None:
        return None
    lead = x.shape[:nd - 1]
    mean, var, invstd = np.empty(lead), np.empty(lead), np.empty(lead)  # the kernel writes every row
    _layer_forward(x, y, w, b, L, <double>eps, mean, var, invstd, _threads())
    return y, mean, invstd


cdef object _param_or(object v, int t, Py_ssize_t n, double fill, cnp.ndarray x):
    """v where it is a plain vector of n values of type t; n values of fill in x's dtype where v is
    None (as the checked path fills a missing weight or bias); else None."""
    if v is None:
        return np.full(n, fill, dtype=(<object>x).dtype)
    return v if _vector(v, t, n) else None


cdef object _affine_out(cnp.ndarray x, int t, object weight, object bias, object out):
    """The output array for a plain call whose weight and bias _param_or gave, or None where one of
    them or ``out`` is not plain: a new one, or ``out`` (x itself, or apart from x and them)."""
    if weight is None or bias is None:
        return None
    if out is None:
        return _empty_like(x, (<object>x).shape)
    if _plain_out(out, x, t) and _apart(<cnp.ndarray>out, weight) and _apart(<cnp.ndarray>out, bias):
        return out
    return None


cdef inline bint _stats_of(object a, cnp.ndarray x, int nd) noexcept:
    """A plain float64 array of x's first nd dimensions (saved statistics)."""
    cdef int d
    if _plain(a, nd, False) != cnp.NPY_DOUBLE:
        return False
    for d in range(nd):
        if cnp.PyArray_DIM(<cnp.ndarray>a, d) != cnp.PyArray_DIM(x, d):
            return False
    return True


cdef inline bint _group_stats(object a, Py_ssize_t N, Py_ssize_t G) noexcept:
    """A plain float64 (N, G) array (group norm's saved statistics)."""
    return (_plain(a, 2, False) == cnp.NPY_DOUBLE and cnp.PyArray_DIM(<cnp.ndarray>a, 0) == N
            and cnp.PyArray_DIM(<cnp.ndarray>a, 1) == G)


cdef object _grad_out(cnp.ndarray x, int t, object g, object out, object w, object mean, object invstd):
    """The grad_input array for a plain backward (grad_output g plain, of x's shape and type), or
    None: a new one, or ``out`` (x or g itself, or apart from both, and apart from the vectors)."""
    if _plain(g, cnp.PyArray_NDIM(x), False) != t or not _same_shape(<cnp.ndarray>g, x):
        return None
    if out is None:
        return _empty_like(x, (<object>x).shape)
    if not (_plain_out(out, x, t) and (_apart(<cnp.ndarray>out, g) or
                                       cnp.PyArray_DATA(<cnp.ndarray>out) == cnp.PyArray_DATA(<cnp.ndarray>g))):
        return None
    if _apart(<cnp.ndarray>out, w) and _apart(<cnp.ndarray>out, mean) and _apart(<cnp.ndarray>out, invstd):
        return out
    return None


def group_backward(grad_output, x, num_groups, weight, save_mean, save_invstd, out):
    """``(grad_input, grad_weight, grad_bias)`` of ``group_norm_backward`` whose arguments are all
    plain (grad_output like x, weight plain or None, the saved statistics float64 (N, num_groups),
    a non-empty input), or None."""
    cdef int t = _plain(x, -2, False)
    if t < 0 or type(num_groups) is not int:
        return None
    cdef cnp.ndarray xa = <cnp.ndarray>x
    cdef Py_ssize_t N = cnp.PyArray_DIM(xa, 0), C = cnp.PyArray_DIM(xa, 1), size = cnp.PyArray_SIZE(xa), G
    if size == 0 or not 1 <= num_groups <= C:
        return None
    G = num_groups
    w = _param_or(weight, t, C, 1.0, xa)
    if C % G or w is None or not (_group_stats(save_mean, N, G) and _group_stats(save_invstd, N, G)):
        return None
    dx = _grad_out(xa, t, grad_output, out, w, save_mean, save_invstd)
    if dx is None:
        return None
    gw, gb = _group_backward(grad_output, x, dx, w, G, size // (N * C), save_mean, save_invstd, True, _threads())
    return dx, gw.astype(x.dtype), gb.astype(x.dtype)


def layer_backward(grad_output, x, normalized_shape, weight, save_mean, save_invstd, out):
    """``(grad_input, grad_weight, grad_bias)`` of ``layer_norm_backward`` whose arguments are all
    plain (one normalized dimension as in layer_forward, grad_output like x, weight plain or None,
    the saved statistics float64 of x's leading shape, a non-empty input), or None."""
    cdef int t
    cdef Py_ssize_t L = _layer_dims(x, normalized_shape, &t)
    if L < 0:
        return None
    cdef cnp.ndarray xa = <cnp.ndarray>x
    cdef int nd = cnp.PyArray_NDIM(xa)
    w = _param_or(weight, t, L, 1.0, xa)
    if w is None or not (_stats_of(save_mean, xa, nd - 1) and _stats_of(save_invstd, xa, nd - 1)):
        return None
    dx = _grad_out(xa, t, grad_output, out, w, save_mean, save_invstd)
    if dx is None:
        return None
    gw, gb = _layer_backward(grad_output, x, dx, w, L, save_mean, save_invstd, _threads())
    return dx, gw.astype(x.dtype), gb.astype(x.dtype)
