"""The parts of CuPy that fastbn uses, on the CPU: the emulated ``cupy`` package.

Put tests/cuda_emulator on ``PYTHONPATH`` and ``import cupy`` imports this (see ../README.md).

- Arrays (``ndarray``) wrap NumPy arrays: host memory plays device memory.  Operators, ufuncs and
  module functions are NumPy's, with the results wrapped; like CuPy, an implicit conversion to
  NumPy raises, ``.get()`` / ``asnumpy`` copy to the host, and mixing a NumPy array into a ufunc
  raises.  Each array remembers the device that was current when it was made.
- ``cuda``: devices (``FAKE_CUPY_DEVICES``, default 1, each with ``FAKE_CUPY_SMS``
  multiprocessors, default 2; a negative count makes ``getDeviceCount`` fail like a machine
  without a driver), the current device as a context manager, events timed on the host (kernels
  run synchronously), a memory pool that holds nothing.
- ``RawModule`` / ``RawKernel`` (in ``_raw.py``): the CUDA source compiled with g++ and run on
  fibers; every launch is appended to ``launches`` as (kernel name, grid, block).
"""
import os
import time
import types

import numpy as _np
from numpy.lib.mixins import NDArrayOperatorsMixin

__version__ = "99.0.0-emulated"
_N_DEVICES = int(os.environ.get("FAKE_CUPY_DEVICES", "1"))
_SMS = int(os.environ.get("FAKE_CUPY_SMS", "2"))
_current = [0]
launches = []  # (kernel name, grid, block) of every launch, for tests that check the plan


def _unwrap(v):
    if isinstance(v, ndarray):
        return v._a
    if isinstance(v, (list, tuple)):
        return type(v)(_unwrap(x) for x in v)
    if isinstance(v, dict):
        return {k: _unwrap(x) for k, x in v.items()}
    return v


def _wrap(v):
    if isinstance(v, _np.ndarray):
        return ndarray(v)
    if isinstance(v, tuple):
        return tuple(_wrap(x) for x in v)
    if isinstance(v, list):
        return [_wrap(x) for x in v]
    return v


class _Flags:
    """CuPy's flags: only these three (no writeable, no aligned, unlike NumPy's)."""

    def __init__(self, f):
        self.c_contiguous, self.f_contiguous, self.owndata = f.c_contiguous, f.f_contiguous, f.owndata


class _Data:
    def __init__(self, a):
        self.ptr = a.__array_interface__["data"][0]


class ndarray(NDArrayOperatorsMixin):
    def __init__(self, a, device=None):
        self._a = a
        self._dev = _current[0] if device is None else device

    # attributes
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    flags = property(lambda self: _Flags(self._a.flags))
    strides = property(lambda self: self._a.strides)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    data = property(lambda self: _Data(self._a))
    device = property(lambda self: cuda.Device(self._dev))
    T = property(lambda self: ndarray(self._a.T, self._dev))

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        for v in inputs + tuple(kwargs.get("out", ())):
            if isinstance(v, _np.ndarray):
                raise TypeError("Unsupported type <class 'numpy.ndarray'>")
        res = getattr(ufunc, method)(*_unwrap(inputs), **_unwrap(kwargs))
        if "out" in kwargs:
            return kwargs["out"][0] if len(kwargs["out"]) == 1 else kwargs["out"]
        return _wrap(res)

    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()`")

    def __getitem__(self, key):
        r = self._a[_unwrap(key)]
        return ndarray(r, self._dev) if isinstance(r, _np.ndarray) else ndarray(_np.asarray(r), self._dev)

    def __setitem__(self, key, value):
        self._a[_unwrap(key)] = _unwrap(value)

    def __len__(self):
        return len(self._a)

    def __repr__(self):
        return f"array({self._a!r}, device={self._dev})"

    def __float__(self):
        return float(self._a)

    def __int__(self):
        return int(self._a)

    def __bool__(self):
        return bool(self._a)

    def get(self):
        return self._a.copy()

    def item(self):
        return self._a.item()

    def __getattr__(self, attr):  # reshape, astype, copy, sum, ... : NumPy's, results wrapped
        f = getattr(self._a, attr)
        if not callable(f):
            return _wrap(f)

        def method(*args, **kwargs):
            return _wrap(f(*_unwrap(args), **_unwrap(kwargs)))

        return method


def __getattr__(attr):  # module functions: NumPy's, results wrapped (asnumpy/get excepted)
    f = getattr(_np, attr)
    if not callable(f) or isinstance(f, type):
        return f

    def func(*args, **kwargs):
        return _wrap(f(*_unwrap(args), **_unwrap(kwargs)))

    return func


def asarray(a, dtype=None):
    if isinstance(a, ndarray):
        return a if dtype is None or a.dtype == dtype else a.astype(dtype)
    return ndarray(_np.array(a, dtype=dtype, copy=True))


def array(a, dtype=None, copy=True):
    return ndarray(_np.array(_unwrap(a), dtype=dtype, copy=True))


def asnumpy(a):
    return a.get() if isinstance(a, ndarray) else _np.asarray(a)


def may_share_memory(a, b):
    return _np.may_share_memory(_unwrap(a), _unwrap(b))


# ---------------------------------------------------------------- cuda
class _Device:
    def __init__(self, index=None):
        self.id = _current[0] if index is None else int(index)
        if not 0 <= self.id < _N_DEVICES:
            raise RuntimeError(f"cudaErrorInvalidDevice: invalid device ordinal {self.id}")
        self.attributes = {"MultiProcessorCount": _SMS}
        self.compute_capability = "80"
        self._stack = []

    def __enter__(self):
        self._stack.append(_current[0])
        _current[0] = self.id
        return self

    def __exit__(self, *exc):
        _current[0] = self._stack.pop()

    def __eq__(self, other):
        return isinstance(other, _Device) and other.id == self.id

    def __hash__(self):
        return self.id

    def synchronize(self):
        pass


def _get_device_count():
    if _N_DEVICES < 0:
        raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")
    return _N_DEVICES


class _Event:  # host timing: kernels run synchronously here
    def __init__(self, *args, **kwargs):
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()

    def synchronize(self):
        pass


def _get_elapsed_time(start, end):
    return (end.t - start.t) * 1e3


class _MemoryPool:
    def free_all_blocks(self):
        pass


def get_default_memory_pool():
    return _MemoryPool()


runtime = types.SimpleNamespace(
    getDeviceCount=_get_device_count,
    getDevice=lambda: _current[0],
    getDeviceProperties=lambda i: {"name": b"Emulated GPU (CPU threads)", "major": 8, "minor": 0},
)
cuda = types.SimpleNamespace(Device=_Device, runtime=runtime, Event=_Event, get_elapsed_time=_get_elapsed_time)


# RawModule and RawKernel use the arrays and devices above.
from ._raw import RawKernel, RawModule  # noqa: E402, F401
