"""BatchNorm1d/2d/3d layers with PyTorch's constructor, semantics, attributes and state_dict keys.

The protocol every fastbn layer follows (one forward, one backward, per thread; no_grad;
params_and_grads) is :class:`fastbn.layers.Layer`'s; GroupNorm, LayerNorm and InstanceNorm1d/2d/3d
are in :mod:`fastbn.norm_layers`.

A layer holds NumPy arrays (CuPy arrays on ``device="cuda"``): ``weight``, ``bias`` (the affine
parameters, or None), ``running_mean``, ``running_var`` (or None), ``num_batches_tracked``.
Calling it runs the forward; ``backward(grad_output)`` returns ``grad_input`` and *sets*
``grad_weight`` and ``grad_bias``.
"""
import contextlib
import numbers

import numpy as np

from . import functional as F
from ._layer_base import PROTOCOL_DOC, IncompatibleKeys, Layer  # noqa: F401 (IncompatibleKeys: API)

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "Layer"]


def _resolve_device(device):
    """'cpu' -> None (NumPy); 'cuda' / 'cuda:N' -> (cupy module, device id)."""
    if device is None or device == "cpu":
        return "cpu", None
    if isinstance(device, str) and (device == "cuda" or device.startswith("cuda:")):
        from . import _cupy_backend

        index = device[5:]  # after "cuda:"
        if device != "cuda" and not (index.isascii() and index.isdigit()):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N' with N a device number, got {device!r}")
        return device, _cupy_backend.device_module(int(index) if index else None)
    raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


class _BatchNorm(Layer):
    _ndims = ()  # accepted input ranks
    _layout = ""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device="cpu", dtype=np.float32, *, bias=True):
        if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral) or num_features < 0:
            raise ValueError(f"num_features must be a non-negative integer, got {num_features!r}")
        F._check_scalar(eps, "eps")
        if momentum is not None:
            F._check_scalar(momentum, "momentum", 0.0, 1.0)
        dt = np.dtype(np.float32 if dtype is None else dtype)  # None: PyTorch's default dtype
        if dt not in F._FLOATS:
            raise TypeError(f"dtype must be float32 or float64, got {dt}")
        self.num_features = int(num_features)
        self.eps = eps  # kept as given, so the repr matches PyTorch's (eps=0 stays 0)
        self.momentum = momentum
        self.affine = bool(affine)
        self.has_bias = bool(affine and bias)
        self.track_running_stats = bool(track_running_stats)
        self.dtype = dt
        self.device, self._cuda = _resolve_device(device)
        xp = self._xp
        C = self.num_features
        with self._on_device():
            self.weight = xp.ones(C, dtype=dt) if self.affine else None
            self.bias = xp.zeros(C, dtype=dt) if self.has_bias else None
            if self.track_running_stats:
                self.running_mean = xp.zeros(C, dtype=dt)
                self.running_var = xp.ones(C, dtype=dt)
                self.num_batches_tracked = 0
            else:
                self.running_mean = self.running_var = self.num_batches_tracked = None
        self._init_layer()

    @property
    def _xp(self):
        return np if self._cuda is None else self._cuda.xp

    def _on_device(self):
        """A context in which new arrays land on the layer's device (its GPU; nothing on the CPU)."""
        return contextlib.nullcontext() if self._cuda is None else self._cuda.device

    # ------------------------------------------------------------------ buffers
    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked = 0

    def reset_parameters(self):
        self.reset_running_stats()
        if self.weight is not None:
            self.weight[...] = 1
        if self.bias is not None:
            self.bias[...] = 0

    # ------------------------------------------------------------------ forward / backward
    def _check_input(self, x):
        be = F.backend_of(x)
        ndim = getattr(x, "ndim", None)
        if ndim not in self._ndims:
            shape = tuple(x.shape) if hasattr(x, "shape") else type(x).__name__
            raise ValueError(f"{type(self).__name__} expected {self._layout} input, got shape {shape}")
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) expected {self.num_features} channels "
                f"(axis 1), got shape {tuple(x.shape)}"
            )
        if x.dtype != self.dtype and not (x.dtype.kind == "f" and x.dtype.newbyteorder("=") == self.dtype):
            hint = f" or build the layer with dtype=np.{x.dtype.name}" if x.dtype in F._FLOATS else ""
            raise TypeError(f"{type(self).__name__} holds {self.dtype} parameters, got input of dtype {x.dtype}; "
                            f"cast the input{hint}")
        if (be is F._cpu) != (self._cuda is None):
            where = "CuPy (GPU)" if be is not F._cpu else "NumPy (CPU)"
            raise TypeError(f"{type(self).__name__} lives on device {self.device!r} but got a {where} array; "
                            f"move the layer with .to(...) or the array")

    def _forward(self, input, out, update, saved_input, record):
        batch_stats = self.training or not self.track_running_stats
        update = update and self.training and self.track_running_stats
        factor = 0.0
        if update:
            factor = 1.0 / (self.num_batches_tracked + 1) if self.momentum is None else self.momentum
        use_buffers = (not self.training and self.track_running_stats) or update
        y, mean, invstd = F.batch_norm_forward(
            input, self.running_mean if use_buffers else None, self.running_var if use_buffers else None,
            self.weight, self.bias, batch_stats, factor, self.eps, out=out)
        if update:
            self.num_batches_tracked += 1
        return y, (saved_input, self._saved_weight(record), mean, invstd, batch_stats)

    def _backward(self, grad_output, payload, out):
        x, weight, mean, invstd, batch_stats = payload
        return F.batch_norm_backward(grad_output, x, weight, mean, invstd, training=batch_stats, out=out)

    # ------------------------------------------------------------------ devices
    def to(self, device):
        """Move parameters and buffers to ``'cpu'`` or ``'cuda[:N]'``; returns the layer."""
        device, cuda = _resolve_device(device)
        state = {n: getattr(self, n) for n in self._state_names() if n != "num_batches_tracked"}
        for name, value in state.items():
            host = value.get() if self._cuda is not None else value
            setattr(self, name, cuda.to_device(host) if cuda is not None else np.array(host))
        self.device, self._cuda = device, cuda
        self._forget()
        return self

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"bias={self.has_bias}, track_running_stats={self.track_running_stats}")


class BatchNorm1d(_BatchNorm):
    """Batch norm over (N, C) or (N, C, L) inputs.

    ``BatchNorm1d(num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
    device="cpu", dtype=np.float32, *, bias=True)``, PyTorch's constructor and ``state_dict`` keys.
    Training mode normalizes with the batch statistics and updates the running ones; eval mode
    uses the running ones.
    """
    __doc__ += PROTOCOL_DOC

    _ndims = (2, 3)
    _layout = "2-D or 3-D (N, C) or (N, C, L)"


class BatchNorm2d(_BatchNorm):
    """Batch norm over (N, C, H, W) inputs.

    ``BatchNorm2d(num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
    device="cpu", dtype=np.float32, *, bias=True)``, PyTorch's constructor and ``state_dict`` keys.
    Training mode normalizes with the batch statistics and updates the running ones; eval mode
    uses the running ones.
    """
    __doc__ += PROTOCOL_DOC

    _ndims = (4,)
    _layout = "4-D (N, C, H, W)"


class BatchNorm3d(_BatchNorm):
    """Batch norm over (N, C, D, H, W) inputs.

    ``BatchNorm3d(num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
    device="cpu", dtype=np.float32, *, bias=True)``, PyTorch's constructor and ``state_dict`` keys.
    Training mode normalizes with the batch statistics and updates the running ones; eval mode
    uses the running ones.
    """
    __doc__ += PROTOCOL_DOC

    _ndims = (5,)
    _layout = "5-D (N, C, D, H, W)"
