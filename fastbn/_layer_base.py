"""The protocol every fastbn layer follows (:class:`Layer`): modes, parameters and their
gradients, per-thread saved forwards, checkpoints with PyTorch's keys."""
import contextlib
import math
import threading
from collections import namedtuple

import numpy as np

from . import _checks as ck
from ._backends import backend_of, cpu
from ._grad_mode import is_grad_enabled

# What load_state_dict returns, as PyTorch's: the keys it expected and did not find, and the ones
# it did not expect (both empty after a strict load, which raises otherwise).
IncompatibleKeys = namedtuple("IncompatibleKeys", "missing_keys unexpected_keys")

PROTOCOL_DOC = """
    The layer protocol (every fastbn layer):

    - ``layer(x)`` (``forward``) returns the output and, unless inside :func:`fastbn.no_grad`,
      saves what ``backward`` needs -- per Python thread: a layer shared by threads gives each
      thread the gradient of its own forward.
    - ``layer.backward(grad_output)`` returns ``grad_input`` for *this thread's last forward* and
      sets ``grad_weight``/``grad_bias`` (set, not accumulated).  One forward, one backward: a
      backward consumes the saved forward, and a second backward raises ``RuntimeError``.
    - A forward that needs no backward (evaluation, monitoring, a finite-difference probe) goes
      inside ``with fastbn.no_grad():``: it saves nothing and leaves the pending forward alone.
      Without it, a later forward *replaces* the pending one, and where the API cannot know which
      of them you mean, the backward raises ``RuntimeError`` instead of silently returning the
      gradient of the wrong call: a backward in another mode (``train()``/``eval()``) than the
      last forward's, and an evaluation-mode forward that replaced a pending training-mode one.
      (A training forward replaces a pending evaluation one silently: a validation pass between
      training steps, each forward followed by its backward, is the common case.)
    - The weight is copied when the forward is saved, so updating the parameters in place before
      the backward does not change its gradient.  Do not modify the *input* in place between the
      forward and the backward (pass ``out=`` for an in-place forward instead).
    - ``params_and_grads()`` gives ``[(param, grad), ...]`` for an update loop
      (``for p, g in layer.params_and_grads(): p -= lr * g``); ``named_parameters()`` the names.
    - ``forward(..., update_running_stats=False)`` leaves the running statistics (and
      ``num_batches_tracked``) untouched in training mode; ``no_grad`` does not, as PyTorch's.
"""

# A thread's pending forward: its mode, what backward needs, and whether it is an evaluation
# forward that replaced a pending training one (directly or through other evaluation forwards).
_Saved = namedtuple("_Saved", "training payload replaced_training")
_NO_LOCK = contextlib.nullcontext()  # (reusable: it holds nothing)


def _wrap_int64(n):
    """n as PyTorch's int64 counter holds it: wrapped around after 2**63 - 1."""
    return (n + 2**63) % 2**64 - 2**63


class _PerThread(threading.local):
    """A layer's state of one thread: its pending forward and last gradients (class-level
    defaults, so that a first look from a thread is an attribute read, not a caught error)."""
    saved = None
    grads = None


_HOST = contextlib.nullcontext()  # reusable: the CPU layers' device context


def _resolve_device(device):
    """A layer's ``device`` argument: ``("cpu", None)`` for NumPy arrays, ``(device,
    cuda.CudaDevice)`` for ``"cuda"`` / ``"cuda:N"`` (CuPy arrays on that GPU)."""
    if device is None or device == "cpu":
        return "cpu", None
    if isinstance(device, str) and (device == "cuda" or device.startswith("cuda:")):
        from ._backends import cuda

        index = device[5:]  # after "cuda:"
        if device != "cuda" and not (index.isascii() and index.isdigit()):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N' with N a device number, got {device!r}")
        return device, cuda.device_module(int(index) if index else None)
    raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


class Layer:
    """Base of fastbn's layers.  Subclasses set ``_check_input`` (checks what is the layer's own:
    rank, features, dtype, device; returns ``(backend, contiguous input)`` for ``_forward``),
    ``_forward`` (returns the output and the payload saved for backward, whose first item is the
    input) and ``_backward`` (returns grad_input, grad_weight, grad_bias)."""

    _param_names = ("weight", "bias")
    _cuda = None  # _resolve_device's: None on the CPU

    @property
    def _xp(self):
        return np if self._cuda is None else self._cuda.xp

    @property
    def _backend(self):
        return cpu if self._cuda is None else self._cuda.backend

    def _on_device(self):
        """A context in which new arrays land on the layer's device (its GPU; nothing on the CPU)."""
        return _HOST if self._cuda is None else self._cuda.device

    def _check_backend(self, be):
        """Raise unless arrays of backend ``be`` are the layer's own kind."""
        if be is not self._backend:
            raise TypeError(f"{type(self).__name__} lives on device {self.device!r} but got a {be.kind} array; "
                            f"move the layer with .to(...) or the array")

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

    def _init_layer(self):
        self.training = True
        self._local = _PerThread()  # this thread's pending forward and gradients
        self._last_grads = {"weight": None, "bias": None}  # the last backward's, on any thread
        self._stats_lock = threading.Lock()  # one running-statistics update at a time (_updating)

    # ------------------------------------------------------------------ pickling / copying
    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_local", None)  # saved forwards are per thread and do not travel
        state.pop("_stats_lock", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = _PerThread()
        self._stats_lock = threading.Lock()

    # ------------------------------------------------------------------ modes and parameters
    def train(self, mode=True):
        if not isinstance(mode, bool):
            raise ValueError(f"train(mode) expects a bool, got {mode!r}")  # PyTorch's exception
        self.training = mode
        return self

    def eval(self):
        return self.train(False)

    def reset_parameters(self):
        """Weight to 1 and bias to 0, and the running statistics reset where the layer has them."""
        self._reset_buffers()
        if self.weight is not None:
            self.weight[...] = 1
        if self.bias is not None:
            self.bias[...] = 0

    def _reset_buffers(self):
        """Reset the layer's buffers: none here (see _RunningStats)."""

    def named_parameters(self):
        """``[(name, array), ...]`` of the affine parameters that exist (``"weight"``, ``"bias"``)."""
        return [(n, getattr(self, n)) for n in self._param_names if getattr(self, n) is not None]

    def parameters(self):
        """The affine parameters (``[weight, bias]``, the ones that exist), for an optimizer loop."""
        return [p for _, p in self.named_parameters()]

    def params_and_grads(self):
        """``[(param, grad), ...]`` from this thread's last backward, so that an SGD step is
        ``for p, g in layer.params_and_grads(): p -= lr * g`` (in place on the parameters).
        Raises RuntimeError before any backward."""
        pairs = []
        for name, p in self.named_parameters():
            g = self._get_grad(name)
            if g is None:
                raise RuntimeError(f"{type(self).__name__}.params_and_grads(): no gradient for {name} yet; "
                                   f"call backward() after a forward first")
            pairs.append((p, g))
        return pairs

    def _get_grad(self, name):
        grads = self._local.grads
        return grads[name] if grads is not None else self._last_grads[name]

    def _set_grad(self, name, value):
        grads = self._local.__dict__.setdefault("grads", {"weight": None, "bias": None})
        grads[name] = value
        self._last_grads[name] = value

    grad_weight = property(lambda self: self._get_grad("weight"), lambda self, v: self._set_grad("weight", v),
                           doc="grad of weight from this thread's last backward (else the last of any thread), or None")
    grad_bias = property(lambda self: self._get_grad("bias"), lambda self, v: self._set_grad("bias", v),
                         doc="grad of bias from this thread's last backward (else the last of any thread), or None")

    def _forget(self):
        """Drop every thread's saved forward and gradients (parameters moved or reloaded)."""
        self._local = _PerThread()
        self._last_grads = {"weight": None, "bias": None}

    # ------------------------------------------------------------------ forward / backward
    def forward(self, input, *, out=None, update_running_stats=True):
        """Normalize ``input``; ``out=``: an array to receive the output (it may be ``input``).
        Saves this forward for ``backward`` (per thread) unless inside ``fastbn.no_grad()``;
        ``update_running_stats=False`` leaves the running statistics alone in training mode."""
        checked = self._check_input(input)
        update = ck.flag(update_running_stats, "update_running_stats")
        record = is_grad_enabled()
        saved_input = input
        if record and out is not None and checked[0].is_array(out) and checked[0].overlapping(out, (input,)):
            saved_input = input.copy(order="K")  # an in-place forward overwrites the input backward needs
        y, payload = self._forward(input, checked, out, update, saved_input, record)
        if record:
            self._save(self.training, payload)
        return y

    def _save(self, training, payload):
        """Save this thread's forward for backward, replacing the pending one (see _Saved)."""
        prev = self._local.saved
        replaced = not training and prev is not None and (prev.training or prev.replaced_training)
        self._local.saved = _Saved(training, payload, replaced)

    def __call__(self, input, *, out=None, update_running_stats=True):
        return self.forward(input, out=out, update_running_stats=update_running_stats)

    def _pending(self):
        saved = self._local.saved
        name = type(self).__name__
        if saved is None:
            raise RuntimeError(f"{name}.backward() needs a forward() first on this thread (each forward allows one "
                               f"backward; forwards inside fastbn.no_grad() save nothing)")
        if saved.training != self.training:
            then, now = ("training", "eval") if saved.training else ("eval", "training")
            raise RuntimeError(
                f"{name}.backward() in {now} mode, but this thread's last forward ran in {then} mode: it replaced "
                f"any earlier forward, so the gradient would be that of the {then}-mode call, probably not the one "
                f"you mean. Run forwards that need no backward (monitoring, evaluation) inside fastbn.no_grad(), "
                f"or switch the mode back before the forward you differentiate")
        if saved.replaced_training:
            raise RuntimeError(
                f"{name}.backward() after an eval-mode forward that replaced this thread's pending training-mode "
                f"forward: which of the two to differentiate is not clear, so neither is. Run forwards that need no "
                f"backward (monitoring, evaluation) inside fastbn.no_grad(), or call backward before them")
        return saved.payload

    def backward(self, grad_output, *, out=None):
        """Return grad_input for this thread's last forward, and set ``grad_weight``/``grad_bias``.
        ``out=``: an array to receive grad_input.  Consumes the saved forward (one forward, one
        backward); raises RuntimeError where it would use a forward you probably did not mean."""
        payload = self._pending()
        x = payload[0]
        be = backend_of(x)
        if not be.is_array(grad_output):
            backend_of(grad_output)  # a TypeError naming what it is, unless an array of another backend
            raise TypeError(f"grad_output must be a {be.kind} array like the forward's input, "
                            f"got {type(grad_output).__module__}.{type(grad_output).__name__}")
        if tuple(grad_output.shape) != tuple(x.shape):
            raise ValueError(f"grad_output must match the forward's input: shape {tuple(x.shape)}, "
                             f"got {type(grad_output).__name__} of shape {tuple(grad_output.shape)}")
        dx, gw, gb = self._backward(be, grad_output, payload, out)
        self._local.saved = None
        self.grad_weight = gw if self.weight is not None else None
        self.grad_bias = gb if self.bias is not None else None
        return dx

    def _holds_arrays(self):
        """Whether the layer has parameters or buffers; one without any (PyTorch's default
        InstanceNorm, affine=False BatchNorm without running statistics) takes an input of either
        float type, as PyTorch's does, and computes in the input's precision."""
        return any(getattr(self, n, None) is not None for n in ("weight", "bias", "running_mean", "running_var"))

    def _saved_weight(self, record):
        """A copy of the weight for a saved forward (the weight itself when nothing is saved)."""
        return self.weight.copy() if record and self.weight is not None else self.weight

    # ------------------------------------------------------------------ checkpoints
    def _state_names(self):
        names = [n for n in self._param_names if getattr(self, n) is not None]
        if getattr(self, "track_running_stats", False):
            names += ["running_mean", "running_var", "num_batches_tracked"]
        return names

    def state_dict(self):
        """PyTorch's keys, NumPy arrays (copies, also from the GPU)."""
        state = {}
        for name in self._state_names():
            value = getattr(self, name)
            if name == "num_batches_tracked":
                state[name] = np.array(_wrap_int64(value), dtype=np.int64)
            else:
                state[name] = value.get() if self._cuda is not None else value.copy()
        return state

    def load_state_dict(self, state_dict, strict=True):
        """Load PyTorch-keyed arrays (e.g. ``{k: v.numpy() for k, v in torch_module.state_dict().items()}``).

        Everything is checked before anything is written, so a bad dict changes nothing.  Returns
        ``IncompatibleKeys(missing_keys, unexpected_keys)``, as PyTorch does.
        """
        names = self._state_names()
        # PyTorch loads a dict without num_batches_tracked and keeps the layer's own count when the
        # dict has no version metadata or one below 2 (a checkpoint from before the count existed,
        # or a plain dict of arrays); from its own state_dict() (version 2) the key is missing.
        version = state_dict_version(state_dict)
        optional = ("num_batches_tracked",) if version is None or version < 2 else ()
        missing = [n for n in names if n not in state_dict and n not in optional]
        unexpected = [k for k in state_dict if k not in names]
        if strict and (missing or unexpected):
            raise ValueError(f"load_state_dict for {type(self).__name__}: missing keys {missing}, unexpected keys {unexpected}")
        staged = {}
        for name in names:
            if name not in state_dict:
                continue
            value = state_dict[name]
            if type(value).__module__.split(".")[0] == "cupy":
                value = value.get()
            elif hasattr(value, "detach"):  # a torch tensor; a Parameter that requires grad, too
                value = value.detach()
            try:
                value = np.asarray(value)
            except ValueError as e:  # e.g. a ragged nested list
                raise ValueError(f"{name} is not an array: {e}") from None
            if name == "num_batches_tracked":
                staged[name] = _loaded_count(value)
                continue
            # PyTorch casts what it loads (copy_); so does this, from any real type
            if value.dtype.kind not in "biuf":
                raise TypeError(f"{name} must be an array of real numbers (float, int or bool), got dtype {value.dtype}")
            target = getattr(self, name)
            want = tuple(target.shape)
            if value.shape != want:
                raise ValueError(f"{name} must have shape {want}, got shape {value.shape}")
            if not backend_of(target).writeable(target):
                raise ValueError(f"the layer's {name} is read-only, so it cannot be loaded into; "
                                 f"give the layer a writeable array first")
            staged[name] = value
        for name, value in staged.items():
            if name == "num_batches_tracked":
                self.num_batches_tracked = value
            else:
                with self._on_device():
                    getattr(self, name)[...] = self._xp.asarray(value, dtype=self.dtype)
        return IncompatibleKeys(missing, unexpected)

    def __repr__(self):
        return f"{type(self).__name__}({self.extra_repr()})"


def state_dict_version(state_dict):
    """The version in PyTorch's metadata of a ``state_dict()`` (its ``_metadata[""]["version"]``),
    or None: a plain dict, such as one of NumPy arrays, carries none."""
    metadata = getattr(state_dict, "_metadata", None)
    root = metadata.get("") if isinstance(metadata, dict) else None
    return root.get("version") if isinstance(root, dict) else None


def _loaded_count(value):
    """num_batches_tracked from a state_dict value: an integer (or an integral float, or bool) of
    shape () or (1,) (PyTorch loads a one-element value into a 0-d buffer), in int64's range."""
    v = None
    if value.shape in ((), (1,)) and value.dtype.kind in "biuf":
        v = value.reshape(()).item()
        if isinstance(v, float):
            v = int(v) if math.isfinite(v) and v.is_integer() else None
    if v is None or not -2**63 <= int(v) < 2**63:
        raise ValueError(f"num_batches_tracked must be a scalar integer in int64's range, got {value!r}")
    return int(v)


class _RunningStats:
    """The running statistics of BatchNorm*d and InstanceNorm*d (mixed into their Layer)."""

    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked = 0

    def _reset_buffers(self):
        self.reset_running_stats()

    def _updating(self, update):
        """The context of a forward that updates the running statistics in place (``update``): one
        at a time, so that threads sharing the layer lose no update (the buffers' read-modify-write,
        and with momentum=None the factor read from num_batches_tracked and its increment)."""
        return self._stats_lock if update else _NO_LOCK

    def _update_factor(self):
        """The weight of this batch in the running statistics: ``momentum``, or with momentum=None
        1 / (num_batches_tracked + 1), the cumulative average (which a loaded count below 0 cannot
        give: PyTorch divides by zero or goes on with a negative factor)."""
        if self.momentum is not None:
            return self.momentum
        if self.num_batches_tracked < 0:
            raise ValueError(f"momentum=None averages over num_batches_tracked + 1 batches, which needs "
                             f"num_batches_tracked >= 0, got {self.num_batches_tracked}")
        return 1.0 / (self.num_batches_tracked + 1)


Layer.__doc__ += PROTOCOL_DOC
