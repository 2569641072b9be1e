"""BatchNorm1d/2d/3d layers with PyTorch's constructor, semantics, attributes and state_dict keys.

A layer holds NumPy arrays (CuPy arrays on ``device="cuda"``): ``weight``, ``bias`` (the affine
parameters, or None), ``running_mean``, ``running_var`` (or None), ``num_batches_tracked``.
Calling it runs the forward; ``backward(grad_output)`` returns ``grad_input`` and *sets*
``grad_weight`` and ``grad_bias``.
"""
import contextlib
import numbers
from collections import namedtuple

import numpy as np

from . import functional as F

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]

# What load_state_dict returns, as PyTorch's: the keys it expected and did not find, and the ones
# it did not expect (both empty after a strict load, which raises otherwise).
IncompatibleKeys = namedtuple("IncompatibleKeys", "missing_keys unexpected_keys")


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


class _BatchNorm:
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
        self.grad_weight = self.grad_bias = None
        self.training = True
        self._saved = None

    @property
    def _xp(self):
        return np if self._cuda is None else self._cuda.xp

    def _on_device(self):
        """A context in which new arrays land on the layer's device (its GPU; nothing on the CPU)."""
        return contextlib.nullcontext() if self._cuda is None else self._cuda.device

    # ------------------------------------------------------------------ modes and parameters
    def train(self, mode=True):
        if not isinstance(mode, bool):
            raise ValueError(f"train(mode) expects a bool, got {mode!r}")  # PyTorch's exception
        self.training = mode
        return self

    def eval(self):
        return self.train(False)

    def parameters(self):
        """The affine parameters (``[weight, bias]``, the ones that exist), for an optimizer loop."""
        return [p for p in (self.weight, self.bias) if p is not None]

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

    def forward(self, input, *, out=None):
        self._check_input(input)
        batch_stats = self.training or not self.track_running_stats
        factor = 0.0
        if self.training and self.track_running_stats:
            factor = 1.0 / (self.num_batches_tracked + 1) if self.momentum is None else self.momentum
        use_buffers = not self.training or self.track_running_stats
        saved_input = input
        if out is not None and F.backend_of(input).is_array(out) and self._xp.may_share_memory(out, input):
            # An in-place forward (out=input) overwrites the input that backward() needs.
            saved_input = input.copy()
        y, mean, invstd = F.batch_norm_forward(
            input, self.running_mean if use_buffers else None, self.running_var if use_buffers else None,
            self.weight, self.bias, batch_stats, factor, self.eps, out=out)
        if self.training and self.track_running_stats:
            self.num_batches_tracked += 1
        self._saved = (saved_input, self.weight, mean, invstd, batch_stats)
        return y

    __call__ = forward

    def backward(self, grad_output, *, out=None):
        """Return grad_input for the last forward, and set ``grad_weight``/``grad_bias``.
        ``out=``: an array to receive grad_input, as in :func:`fastbn.batch_norm_backward`."""
        if self._saved is None:
            raise RuntimeError("backward() needs a forward() first (each forward allows one backward)")
        x, weight, mean, invstd, batch_stats = self._saved
        if F.backend_of(grad_output) is not F.backend_of(x):
            where = "CuPy (GPU)" if F.backend_of(x) is not F._cpu else "NumPy (CPU)"
            raise TypeError(f"grad_output must be a {where} array like the forward's input, "
                            f"got {type(grad_output).__module__}.{type(grad_output).__name__}")
        if tuple(grad_output.shape) != tuple(x.shape):
            raise ValueError(f"grad_output must match the forward's input: shape {tuple(x.shape)}, "
                             f"got {type(grad_output).__name__} of shape {tuple(getattr(grad_output, 'shape', ()))}")
        dx, gw, gb = F.batch_norm_backward(grad_output, x, weight, mean, invstd, training=batch_stats, out=out)
        self.grad_weight = gw if self.weight is not None else None
        self.grad_bias = gb if self.bias is not None else None
        self._saved = None
        return dx

    # ------------------------------------------------------------------ checkpoints
    def _state_names(self):
        names = [n for n in ("weight", "bias") if getattr(self, n) is not None]
        if self.track_running_stats:
            names += ["running_mean", "running_var", "num_batches_tracked"]
        return names

    def state_dict(self):
        """PyTorch's keys, NumPy arrays (copies, also from the GPU)."""
        state = {}
        for name in self._state_names():
            value = getattr(self, name)
            if name == "num_batches_tracked":
                state[name] = np.array(value, dtype=np.int64)
            else:
                state[name] = value.get() if self._cuda is not None else value.copy()
        return state

    def load_state_dict(self, state_dict, strict=True):
        """Load PyTorch-keyed arrays (e.g. ``{k: v.numpy() for k, v in torch_bn.state_dict().items()}``).

        Everything is checked before anything is written, so a bad dict changes nothing.  Returns
        ``IncompatibleKeys(missing_keys, unexpected_keys)``, as PyTorch does.
        """
        names = self._state_names()
        # PyTorch loads a dict without num_batches_tracked (a checkpoint from before it existed)
        # and keeps the layer's own count; so does this.
        missing = [n for n in names if n not in state_dict and n != "num_batches_tracked"]
        unexpected = [k for k in state_dict if k not in names]
        if strict and (missing or unexpected):
            raise ValueError(f"load_state_dict for {type(self).__name__}: missing keys {missing}, unexpected keys {unexpected}")
        C = self.num_features
        staged = {}
        for name in names:
            if name not in state_dict:
                continue
            value = state_dict[name]
            if type(value).__module__.split(".")[0] == "cupy":
                value = value.get()
            try:
                value = np.asarray(value)
            except ValueError as e:  # e.g. a ragged nested list
                raise ValueError(f"{name} is not an array: {e}") from None
            if name == "num_batches_tracked":
                if value.shape != () or value.dtype.kind not in "iu" or not 0 <= int(value) < 2**63:
                    raise ValueError(f"num_batches_tracked must be a scalar integer from 0 to 2**63 - 1, got {value!r}")
                staged[name] = int(value)
                continue
            if value.dtype.kind != "f":
                raise TypeError(f"{name} must be a float array, got dtype {value.dtype}")
            if value.shape != (C,):
                raise ValueError(f"{name} must have shape ({C},), got shape {value.shape}")
            staged[name] = value
        for name, value in staged.items():
            if name == "num_batches_tracked":
                self.num_batches_tracked = value
            else:
                with self._on_device():
                    getattr(self, name)[...] = self._xp.asarray(value, dtype=self.dtype)
        return IncompatibleKeys(missing, unexpected)

    # ------------------------------------------------------------------ devices
    def to(self, device):
        """Move parameters and buffers to ``'cpu'`` or ``'cuda[:N]'``; returns the layer."""
        device, cuda = _resolve_device(device)
        state = {n: getattr(self, n) for n in self._state_names() if n != "num_batches_tracked"}
        for name, value in state.items():
            host = value.get() if self._cuda is not None else value
            setattr(self, name, cuda.to_device(host) if cuda is not None else np.array(host))
        self.device, self._cuda = device, cuda
        self._saved = None
        self.grad_weight = self.grad_bias = None
        return self

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"bias={self.has_bias}, track_running_stats={self.track_running_stats}")

    def __repr__(self):
        return f"{type(self).__name__}({self.extra_repr()})"


class BatchNorm1d(_BatchNorm):
    """Batch norm over (N, C) or (N, C, L) inputs."""

    _ndims = (2, 3)
    _layout = "2-D or 3-D (N, C) or (N, C, L)"


class BatchNorm2d(_BatchNorm):
    """Batch norm over (N, C, H, W) inputs."""

    _ndims = (4,)
    _layout = "4-D (N, C, H, W)"


class BatchNorm3d(_BatchNorm):
    """Batch norm over (N, C, D, H, W) inputs."""

    _ndims = (5,)
    _layout = "5-D (N, C, D, H, W)"
