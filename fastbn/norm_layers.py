"""GroupNorm, LayerNorm and InstanceNorm1d/2d/3d layers with PyTorch's constructors, semantics and
``state_dict`` keys, on the layer protocol of :class:`fastbn.layers.Layer` (per-thread saved
forwards, ``backward`` returning grad_input and setting ``grad_weight``/``grad_bias``,
``params_and_grads``, ``fastbn.no_grad``).  NumPy arrays, or CuPy arrays with ``device="cuda"``
(fastbn._backends.cuda_norms)."""
import warnings

import numpy as np

from . import _checks as ck
from . import norms
from ._backends import backend_of
from ._layer_base import PROTOCOL_DOC, Layer, _resolve_device, _RunningStats, state_dict_version

__all__ = ["GroupNorm", "LayerNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]


class _Norm(Layer):
    def _check_dtype(self, x):
        be = backend_of(x)
        self._check_backend(be)
        if self._holds_arrays():
            ck.kernel_dtype(x, self.dtype, type(self).__name__)
        return be, x

    def _arrays(self, device, **shapes):
        """Set the device and create the arrays ``name=(shape, fill value)`` on it (None: skipped)."""
        self.device, self._cuda = _resolve_device(device)
        with self._on_device():
            for name, spec in shapes.items():
                setattr(self, name, None if spec is None else self._xp.full(spec[0], spec[1], dtype=self.dtype))


class GroupNorm(_Norm):
    """Group norm over (N, C, *) inputs: ``GroupNorm(num_groups, num_channels, eps=1e-5,
    affine=True, device="cpu", dtype=np.float32, *, bias=True)``, PyTorch's constructor and
    ``state_dict`` keys (``weight``, ``bias``).  The same in training and eval mode (no running
    statistics).
    """
    __doc__ += PROTOCOL_DOC

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, device="cpu", dtype=np.float32, *, bias=True):
        G = ck.count(num_groups, "num_groups")
        C = ck.count(num_channels, "num_channels")
        if G == 0 or C % G:
            raise ValueError(f"num_channels ({C}) must be divisible by num_groups ({G})")
        ck.scalar(eps, "eps")
        self.num_groups, self.num_channels, self.eps = G, C, eps
        self.affine = ck.flag(affine, "affine")
        self.has_bias = self.affine and ck.flag(bias, "bias")
        self.dtype = ck.dtype_arg(dtype)
        self._arrays(device, weight=(C, 1) if self.affine else None, bias=(C, 0) if self.has_bias else None)
        self._init_layer()

    def _check_input(self, x):
        checked = self._check_dtype(x)
        if x.ndim < 2 or x.shape[1] != self.num_channels:
            msg = (f"GroupNorm({self.num_groups}, {self.num_channels}) expected (N, {self.num_channels}, *) input, "
                   f"got shape {tuple(x.shape)}")
            if x.ndim < 2 or self.affine:
                raise ValueError(msg)
            # no per-channel parameters: PyTorch normalizes any channel count num_groups divides (silently)
            warnings.warn(msg + "; num_channels is not used because affine=False", stacklevel=4)
        return checked

    def _forward(self, input, checked, out, update, saved_input, record):
        y, mean, invstd = norms.group_norm_forward(input, self.num_groups, self.weight, self.bias, self.eps, out=out)
        return y, (saved_input, self._saved_weight(record), mean, invstd)

    def _backward(self, be, grad_output, payload, out):
        x, w, mean, invstd = payload
        return norms.group_norm_backward(grad_output, x, self.num_groups, w, mean, invstd, out=out)

    def extra_repr(self):
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, bias={self.has_bias}"


class LayerNorm(_Norm):
    """Layer norm over the last ``len(normalized_shape)`` dimensions: ``LayerNorm(normalized_shape,
    eps=1e-5, elementwise_affine=True, bias=True, device="cpu", dtype=np.float32)``, PyTorch's
    constructor and ``state_dict`` keys (``weight`` and ``bias`` of shape ``normalized_shape``).
    """
    __doc__ += PROTOCOL_DOC

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, device="cpu", dtype=np.float32):
        self.normalized_shape = norms._normalized_shape(normalized_shape)
        if not self.normalized_shape:
            raise ValueError("normalized_shape must have at least one dimension, got ()")
        ck.scalar(eps, "eps")
        self.eps = eps
        self.elementwise_affine = ck.flag(elementwise_affine, "elementwise_affine")
        self.has_bias = self.elementwise_affine and ck.flag(bias, "bias")
        self.dtype = ck.dtype_arg(dtype)
        shape = self.normalized_shape
        self._arrays(device, weight=(shape, 1) if self.elementwise_affine else None,
                     bias=(shape, 0) if self.has_bias else None)
        self._init_layer()

    def _check_input(self, x):
        checked = self._check_dtype(x)
        k = len(self.normalized_shape)
        if x.ndim < k or tuple(x.shape[x.ndim - k:]) != self.normalized_shape:
            raise ValueError(f"LayerNorm({self.normalized_shape}) expected input ending in {self.normalized_shape}, "
                             f"got shape {tuple(x.shape)}")
        return checked

    def _forward(self, input, checked, out, update, saved_input, record):
        y, mean, invstd = norms.layer_norm_forward(input, self.normalized_shape, self.weight, self.bias, self.eps,
                                                   out=out)
        return y, (saved_input, self._saved_weight(record), mean, invstd)

    def _backward(self, be, grad_output, payload, out):
        x, w, mean, invstd = payload
        return norms.layer_norm_backward(grad_output, x, self.normalized_shape, w, mean, invstd, out=out)

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, bias={self.has_bias}"


def _unbatched_out(be, out, x):
    """out= for an unbatched input x, as the functional API's view of it (with N = 1): out[None],
    after the check that out has x's own shape (a batched one would pass for x[None])."""
    if out is None or not be.is_array(out):
        return out  # (the functional API names what it is)
    if tuple(out.shape) != tuple(x.shape):
        raise ValueError(f"out must have the input's shape {tuple(x.shape)}, got shape {tuple(out.shape)}")
    return out[None]


class _InstanceNorm(_RunningStats, _Norm):
    _ndim = 0  # the batched rank; one less is an unbatched input

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=False, track_running_stats=False,
                 device="cpu", dtype=np.float32, *, bias=True):
        C = self.num_features = ck.count(num_features, "num_features")
        ck.scalar(eps, "eps")
        if momentum is not None:
            ck.scalar(momentum, "momentum", 0.0, 1.0)
        self.eps, self.momentum = eps, momentum
        self.affine = ck.flag(affine, "affine")
        self.has_bias = self.affine and ck.flag(bias, "bias")
        self.track_running_stats = ck.flag(track_running_stats, "track_running_stats")
        self.dtype = ck.dtype_arg(dtype)
        track = self.track_running_stats
        self._arrays(device, weight=(C, 1) if self.affine else None, bias=(C, 0) if self.has_bias else None,
                     running_mean=(C, 0) if track else None, running_var=(C, 1) if track else None)
        # in the state_dict, as PyTorch's; never counted (nor there)
        self.num_batches_tracked = 0 if track else None
        self._init_layer()

    def _check_input(self, x):
        checked = self._check_dtype(x)
        n = self._ndim
        if x.ndim not in (n - 1, n):
            raise ValueError(f"{type(self).__name__} expected {n - 1}-D (unbatched) or {n}-D input, got shape "
                             f"{tuple(x.shape)}")
        C = x.shape[x.ndim - n + 1]
        if C != self.num_features:
            msg = (f"{type(self).__name__}({self.num_features}) expected {self.num_features} channels, got shape "
                   f"{tuple(x.shape)}")
            if self.affine or self.track_running_stats:
                raise ValueError(msg)
            warnings.warn(msg + "; num_features is not used because affine=False", stacklevel=4)
        return checked

    def _forward(self, input, checked, out, update, saved_input, record):
        be = checked[0]
        unbatched = input.ndim == self._ndim - 1
        x = input[None] if unbatched else input
        o = _unbatched_out(be, out, input) if unbatched else out
        use_input_stats = self.training or not self.track_running_stats
        buffers = self.track_running_stats and (not use_input_stats or update)
        momentum = 0.0 if self.momentum is None else self.momentum  # PyTorch: momentum=None keeps them
        with self._updating(buffers and use_input_stats):
            y, mean, invstd = norms.instance_norm_forward(
                x, self.running_mean if buffers else None, self.running_var if buffers else None, self.weight,
                self.bias, use_input_stats, momentum, self.eps, out=o)
        if unbatched:
            y = out if out is not None else y[0]
        return y, (saved_input, self._saved_weight(record), mean, invstd, use_input_stats)

    def _backward(self, be, grad_output, payload, out):
        x, w, mean, invstd, use_input_stats = payload
        if x.ndim == self._ndim - 1:
            o = _unbatched_out(be, out, x)
            dx, gw, gb = norms.instance_norm_backward(grad_output[None], x[None], w, mean, invstd, use_input_stats,
                                                      out=o)
            return (out if out is not None else dx[0]), gw, gb
        return norms.instance_norm_backward(grad_output, x, w, mean, invstd, use_input_stats, out=out)

    def load_state_dict(self, state_dict, strict=True):
        """As ``Layer.load_state_dict``; running statistics for a layer without them are refused even
        with ``strict=False`` in a dict without PyTorch's version metadata (a plain dict, such as
        one of NumPy arrays), as PyTorch refuses them there (a checkpoint from before PyTorch 0.4,
        or from a layer that tracked them); PyTorch's own ``state_dict()`` carries the version, and
        its running statistics are then unexpected keys like any other, as in PyTorch."""
        if not self.track_running_stats and state_dict_version(state_dict) is None:
            found = [k for k in ("running_mean", "running_var") if k in state_dict]
            if found:
                raise ValueError(f"load_state_dict for {type(self).__name__}: unexpected running stats buffer(s) "
                                 f"{found} for a layer with track_running_stats=False; remove them from the dict, or "
                                 f"build the layer with track_running_stats=True to use them")
        return super().load_state_dict(state_dict, strict)

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"bias={self.has_bias}, track_running_stats={self.track_running_stats}")


_IN_DOC = """Instance norm over {shape} inputs (or unbatched ones without N): ``{name}(num_features,
    eps=1e-5, momentum=0.1, affine=False, track_running_stats=False, device="cpu", dtype=np.float32,
    *, bias=True)``, PyTorch's constructor and ``state_dict`` keys.  Each (sample, channel) is
    normalized by its own statistics in training mode (or always, without running statistics);
    with ``track_running_stats`` the running buffers follow the batch's mean of the per-instance
    statistics (unbiased variance) and eval mode normalizes with them.
    """


class InstanceNorm1d(_InstanceNorm):
    __doc__ = _IN_DOC.format(shape="(N, C, L)", name="InstanceNorm1d") + PROTOCOL_DOC
    _ndim = 3


class InstanceNorm2d(_InstanceNorm):
    __doc__ = _IN_DOC.format(shape="(N, C, H, W)", name="InstanceNorm2d") + PROTOCOL_DOC
    _ndim = 4


class InstanceNorm3d(_InstanceNorm):
    __doc__ = _IN_DOC.format(shape="(N, C, D, H, W)", name="InstanceNorm3d") + PROTOCOL_DOC
    _ndim = 5
