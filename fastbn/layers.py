"""BatchNorm1d/2d/3d layers with PyTorch's constructor, semantics, attributes and state_dict keys.

The protocol every fastbn layer follows (one forward, one backward, per thread; no_grad;
params_and_grads) is :class:`fastbn.layers.Layer`'s; GroupNorm, LayerNorm and InstanceNorm1d/2d/3d
are in :mod:`fastbn.norm_layers`.

A layer holds NumPy arrays (CuPy arrays on ``device="cuda"``): ``weight``, ``bias`` (the affine
parameters, or None), ``running_mean``, ``running_var`` (or None), ``num_batches_tracked``.
Calling it runs the forward; ``backward(grad_output)`` returns ``grad_input`` and *sets*
``grad_weight`` and ``grad_bias``.
"""
import warnings

import numpy as np

from . import _checks as ck
from . import functional as F
from ._backends import backend_of
from ._fastpath import eval_forward as _plain_eval
from ._grad_mode import is_grad_enabled
from ._layer_base import PROTOCOL_DOC, IncompatibleKeys, Layer, _RunningStats, _wrap_int64  # noqa: F401
from ._layer_base import _resolve_device

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "Layer"]


class _BatchNorm(_RunningStats, Layer):
    _ndims = ()  # accepted input ranks
    _layout = ""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device="cpu", dtype=np.float32, *, bias=True, unbiased=True, activation=None):
        num_features = ck.count(num_features, "num_features")
        self._relu = ck.activation(activation)
        self.activation = activation
        ck.scalar(eps, "eps")
        if momentum is not None:
            ck.scalar(momentum, "momentum", 0.0, 1.0)
        dt = ck.dtype_arg(dtype)
        self.num_features = num_features
        self.eps = eps  # kept as given, so the repr matches PyTorch's (eps=0 stays 0)
        self.momentum = momentum
        self.affine = ck.flag(affine, "affine")
        self.has_bias = self.affine and ck.flag(bias, "bias")
        self.track_running_stats = ck.flag(track_running_stats, "track_running_stats")
        self.unbiased = ck.flag(unbiased, "unbiased")
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

    # ------------------------------------------------------------------ forward / backward
    def _check_input(self, x):
        be = backend_of(x)
        ndim = getattr(x, "ndim", None)
        if ndim not in self._ndims:
            shape = tuple(x.shape) if hasattr(x, "shape") else type(x).__name__
            raise ValueError(f"{type(self).__name__} expected {self._layout} input, got shape {shape}")
        if x.shape[1] != self.num_features:
            msg = (f"{type(self).__name__}({self.num_features}) expected {self.num_features} channels (axis 1), "
                   f"got shape {tuple(x.shape)}")
            if self._holds_arrays():
                raise ValueError(msg)
            # nothing of the layer's is per channel: PyTorch normalizes any channel count (silently)
            warnings.warn(msg + "; num_features is not used because the layer has no parameters or running "
                          "statistics", stacklevel=4)
        dt = self.dtype
        if self._holds_arrays():
            ck.kernel_dtype(x, dt, type(self).__name__)
        else:  # nothing to hold a dtype: the input's, as in the functional API
            dt = ck.float_dtype(x, "input")
        self._check_backend(be)
        return be, ck.ncs_view(be, x, ck.storage_dtype(be, x, dt))

    def forward(self, input, *, out=None, update_running_stats=True):
        """Normalize ``input``; ``out=``: an array to receive the output (it may be ``input``).
        Saves this forward for ``backward`` (per thread) unless inside ``fastbn.no_grad()``;
        ``update_running_stats=False`` leaves the running statistics alone in training mode."""
        if (not self.training and self.track_running_stats and self._cuda is None and out is not input
                and type(input) is np.ndarray and input.dtype is self.dtype and input.ndim in self._ndims
                and (update_running_stats is True or update_running_stats is False)):
            # the plain evaluation call, checked in C (None: anything else, for the full checks); an
            # out= over the input's memory takes Layer.forward, which saves a copy of the input
            done = _plain_eval(input, self.running_mean, self.running_var, self.weight, self.bias, self.eps, out,
                               self._relu, False)
            if done is not None:
                y, mean, invstd = done
                if is_grad_enabled():
                    self._save(False, (input, self.dtype, None, self._saved_weight(True), mean, invstd, False,
                                       self._saved_bias(True, self.dtype, self.num_features)))
                return y
        return Layer.forward(self, input, out=out, update_running_stats=update_running_stats)

    __call__ = forward

    def _forward(self, input, checked, out, update, saved_input, record):
        be, x3 = checked
        batch_stats = self.training or not self.track_running_stats
        update = update and self.training and self.track_running_stats
        with self._updating(update):
            factor = 0.0
            if update:
                factor = self._update_factor()
            use_buffers = (not self.training and self.track_running_stats) or update
            rm, rv = (self.running_mean, self.running_var) if use_buffers else (None, None)
            # the input's channels: the layer's own where it holds arrays (checked), any count where not
            C, dt = x3.shape[1], self.dtype if self._holds_arrays() else ck.compute_dtype(x3.dtype)
            with self._on_device():
                if rm is not None:
                    ck.vector(rm, "running_mean", be, (C,), None, writable=update)
                    ck.vector(rv, "running_var", be, (C,), None, writable=update)
                w = ck.param(self.weight, "weight", be, (C,), dt, 1.0)
                b = ck.param(self.bias, "bias", be, (C,), dt, 0.0)
                y, mean, invstd = F.forward(be, input, x3, rm, rv, w, b, batch_stats,
                                            ck.scalar(factor, "momentum", 0.0, 1.0), ck.scalar(self.eps, "eps"), out,
                                            self.unbiased, self._relu)
            if update:
                self.num_batches_tracked = _wrap_int64(self.num_batches_tracked + 1)
        if saved_input is not input:  # an in-place forward: backward reads the copy
            x3 = ck.ncs_view(be, saved_input, x3.dtype)
        return y, (saved_input, dt, x3, self._saved_weight(record), mean, invstd, batch_stats, self._saved_bias(record, dt, C))

    def _saved_bias(self, record, dt, C):
        """With the activation, the bias that ReLU's mask is recomputed with in backward (a copy, as
        the weight: an update between forward and backward must not change the mask); else None."""
        if not self._relu:
            return None
        if self.bias is None:
            return self._xp.zeros(C, dtype=dt)
        return self.bias.copy() if record else self.bias

    def _backward(self, be, grad_output, payload, out):
        x, dt, x3, weight, mean, invstd, batch_stats, bias = payload
        if x3 is None:  # saved by the plain evaluation call
            x3 = ck.ncs_view(be, x, dt)
        with self._on_device():
            C = x3.shape[1]
            w = ck.param(weight, "weight", be, (C,), dt, 1.0)
            b = None if bias is None else ck.param(bias, "bias", be, (C,), dt, 0.0)
            g3 = ck.kernel_view(be, grad_output, x, x3, "grad_output")
            return F.backward(be, x, x3, g3, w, mean, invstd, batch_stats, out, b)

    def extra_repr(self):
        act = "" if self.activation is None else f", activation={self.activation!r}"
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"bias={self.has_bias}, track_running_stats={self.track_running_stats}{act}")


class BatchNorm1d(_BatchNorm):
    """Batch norm over (N, C) or (N, C, L) inputs.

    ``BatchNorm1d(num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
    device="cpu", dtype=np.float32, *, bias=True, unbiased=True, activation=None)``, PyTorch's
    constructor and ``state_dict`` keys.  Training mode normalizes with the batch statistics and
    updates the running ones; eval mode uses the running ones.  ``unbiased=False`` puts the biased
    batch variance into ``running_var`` (ONNX, Keras); ``activation="relu"`` fuses the ReLU of a
    Conv -> BN -> ReLU block into the same pass, forward and backward.
    """
    __doc__ += PROTOCOL_DOC

    _ndims = (2, 3)
    _layout = "2-D or 3-D (N, C) or (N, C, L)"


class BatchNorm2d(_BatchNorm):
    """Batch norm over (N, C, H, W) inputs.

    ``BatchNorm2d(num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
    device="cpu", dtype=np.float32, *, bias=True, unbiased=True, activation=None)``, PyTorch's
    constructor and ``state_dict`` keys.  Training mode normalizes with the batch statistics and
    updates the running ones; eval mode uses the running ones.  ``unbiased=False`` puts the biased
    batch variance into ``running_var`` (ONNX, Keras); ``activation="relu"`` fuses the ReLU of a
    Conv -> BN -> ReLU block into the same pass, forward and backward.
    """
    __doc__ += PROTOCOL_DOC

    _ndims = (4,)
    _layout = "4-D (N, C, H, W)"


class BatchNorm3d(_BatchNorm):
    """Batch norm over (N, C, D, H, W) inputs.

    ``BatchNorm3d(num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
    device="cpu", dtype=np.float32, *, bias=True, unbiased=True, activation=None)``, PyTorch's
    constructor and ``state_dict`` keys.  Training mode normalizes with the batch statistics and
    updates the running ones; eval mode uses the running ones.  ``unbiased=False`` puts the biased
    batch variance into ``running_var`` (ONNX, Keras); ``activation="relu"`` fuses the ReLU of a
    Conv -> BN -> ReLU block into the same pass, forward and backward.
    """
    __doc__ += PROTOCOL_DOC

    _ndims = (5,)
    _layout = "5-D (N, C, D, H, W)"
