"""Synchronized batch norm across processes: :class:`SyncBatchNorm` over MPI (mpi4py), and the
engine-neutral pieces it is built from.

Data-parallel training gives each process (rank) a slice of the batch.  Plain batch norm then
normalizes each slice with its own statistics; :class:`SyncBatchNorm` normalizes with the
statistics of the global batch, so that its output, running statistics, ``grad_input``,
``grad_weight`` and ``grad_bias`` equal a single-process ``BatchNorm*d`` on the concatenated
batch, for any split (uneven, a rank with an empty batch).

The protocol (any engine: MPI, torch.distributed's gloo, Ray collectives)
--------------------------------------------------------------------------
Every rank calls, in this order, with one all-gather per forward and one per backward::

    stats = local_stats(x)                                  # (C, 3) float64: count, mean, M2
    merged = merge_stats(all_gather(stats))                 # every rank's, in rank order
    y, mean, invstd = normalize(x, merged, weight, bias, eps)
    update_running(running_mean, running_var, merged, momentum)   # optional, same on every rank
    ...
    sums = local_grad_sums(grad_output, x, mean)            # (C, 2) float64: sum dy, sum dy*(x-mean)
    total = merge_grad_sums(all_gather(sums))               # every rank's, in rank order
    grad_input, grad_weight, grad_bias = finish_backward(grad_output, x, weight, mean, invstd, total,
                                                         count=merged[0, 0])

``merge_stats`` applies Chan's pairwise formula to (count, mean, M2), never sums of squares, in
the order given, so ranks that pass the same stack in the same order get bit-identical
statistics; ``merge_grad_sums`` adds in the order given for the same reason.  (An all-reduce
would also do for the sums, but its order of additions is the engine's: the gather keeps them
identical everywhere.)  ``grad_weight`` and ``grad_bias`` come out *global* (the whole batch's),
identical on every rank: a data-parallel loop must not all-reduce them again.

Faults
------
:class:`SyncBatchNorm` runs its local part (checks, local reduction) before the collective and
catches what it raises (any ``Exception``): that rank still takes part in the collective, with a
header that says it failed (and its channel count and dtype), and re-raises its own error
afterwards; every other rank raises a ``RuntimeError`` naming it, and no rank changes its running
statistics.  The same holds for the backward, whose forward state then stays for a retry.  Ranks that disagree on the channel count or the
dtype all raise the same ``ValueError`` from the same collective, and so does a global batch of
one value per channel.  No rank is left waiting.  A rank that raises *outside* the layer (in the
user's code before the forward) cannot be seen by the others, which then wait in the collective:
run scripts as ``mpiexec -n N python -m mpi4py script.py``, whose handler calls ``MPI_Abort`` on an
unhandled exception and so ends every rank.
"""
import collections
import math
import numbers

import numpy as np

from . import _checks as ck
from . import _kernels
from ._backends import cpu
from ._grad_mode import is_grad_enabled
from ._layer_base import _wrap_int64
from .layers import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm

# What a training forward saves for its backward (the layer protocol's per-thread payload).
_SyncPayload = collections.namedtuple("_SyncPayload", "x x3 weight mean invstd count")

__all__ = ["SyncBatchNorm", "local_stats", "merge_stats", "normalize", "update_running",
           "local_grad_sums", "merge_grad_sums", "finish_backward"]

# A dtype on the wire: 32 or 64 (float32, float64), -1 for anything else or unknown.
_DTYPE_CODES = {np.dtype(np.float32): 32, np.dtype(np.float64): 64}
_CODE_NAMES = {32: "float32", 64: "float64", -1: "unknown"}


def _plan():
    # the CPU backend's (threads, path, unit); streaming stores are for the apply only
    return cpu.plan()


def _cpu_ncs(x, name="input"):
    be, x3 = ck.as_ncs(x, name)
    if be is not cpu:  # SyncBatchNorm is a CPU layer
        raise TypeError(f"SyncBatchNorm's pieces run on NumPy arrays; got a {type(x).__module__} array for {name}")
    return x3


# ---------------------------------------------------------------------------------- the protocol
def local_stats(x):
    """This rank's per-channel moments of ``x`` (N, C, *spatial): a (C, 3) float64 array of
    rows (count, mean, M2), M2 the sum of squared deviations from the mean.  An empty batch gives
    rows of zeros."""
    x3 = _cpu_ncs(x)
    return _local_stats3(x3)


def _local_stats3(x3):
    N, C, S = x3.shape
    out = np.zeros((C, 3))
    if x3.size:
        mean, m2 = np.empty(C), np.empty(C)
        _moments_into(x3, mean, m2)
        out[:, 0] = N * S
        out[:, 1] = mean
        out[:, 2] = m2
    return out


def _moments_into(x3, mean, m2):
    threads, path, unit, _ = _plan()
    _kernels.sync_moments(x3, mean, m2, threads, path, unit)


def merge_stats(stack):
    """Merge per-rank (count, mean, M2) rows, a sequence of (C, 3) arrays or an (R, C, 3) array, in
    the order given, with Chan's formula; returns the (C, 3) float64 (count, mean, M2) of the
    union.  Empty ranks (count 0) are skipped exactly."""
    stack = np.ascontiguousarray(stack, dtype=np.float64)
    if stack.ndim != 3 or stack.shape[2] != 3 or stack.shape[0] == 0:
        raise ValueError(f"merge_stats expects an (R, C, 3) stack of (count, mean, M2) rows, R >= 1, got shape {stack.shape}")
    out = _merge(stack[:, :, 0], stack[:, :, 1], stack[:, :, 2], 1.0)
    return np.stack(out[:3], axis=1)


def _merge(n, mean, m2, eps):
    """sync_merge of (R, C) views: (count, mean, M2, var, invstd), (C,) float64 each."""
    out = np.empty((5, n.shape[1]))
    _kernels.sync_merge(n, mean, m2, eps, *out)
    return out


def _count_of(merged):
    """The global count of merged (C, 3) rows: the same non-negative whole number in every row."""
    if merged.shape[0] == 0:
        return 0
    counts = merged[:, 0]
    first = counts[0]
    if not (np.isfinite(first) and first >= 0 and first == math.floor(first)) or (counts != first).any():
        raise ValueError(f"the merged statistics' counts (column 0) must be one non-negative whole number for "
                         f"every channel, got {counts.tolist()[:8]}")
    return int(first)


def _check_count(count, shape):
    if count == 1:
        raise ValueError(f"expected more than 1 value per channel when training, got a global batch of 1 value "
                         f"per channel (input of shape {tuple(shape)} on this rank)")


def _check_local_count(count, x3):
    """The global batch holds this rank's: count >= its values per channel."""
    local = x3.shape[0] * x3.shape[2]
    if count < local:
        raise ValueError(f"the global count must be at least this rank's {local} values per channel, got {count}")


def _statistics(merged, eps):
    count = _count_of(merged)
    mean = np.ascontiguousarray(merged[:, 1])
    var = merged[:, 2] / count if count else np.zeros(merged.shape[0])
    invstd = 1.0 / np.sqrt(var + eps)
    return count, mean, var, invstd


def _check_merged(merged, C):
    """merge_stats' (C, 3) array (C = -1: any number of channels)."""
    merged = np.asarray(merged, dtype=np.float64)
    if merged.ndim != 2 or merged.shape[1] != 3 or (C >= 0 and merged.shape[0] != C):
        channels = f"({C}, 3) for the input's {C} channels" if C >= 0 else "(C, 3)"
        raise ValueError(f"the merged statistics must have shape {channels}, got shape {merged.shape}")
    return merged


def normalize(x, merged, weight=None, bias=None, eps=1e-5, *, out=None):
    """Normalize ``x`` with given (global) statistics: ``merged`` is merge_stats' (C, 3) array.

    Returns ``(output, mean, invstd)``, the last two (C,) float64 for :func:`finish_backward`.
    Raises, on every rank alike, when the global batch holds one value per channel."""
    x3 = _cpu_ncs(x)
    C = x3.shape[1]
    eps = ck.scalar(eps, "eps")
    if not eps > 0:
        raise ValueError(f"eps must be positive in training, got {eps!r}")
    merged = _check_merged(merged, C)
    count, mean, var, invstd = _statistics(merged, eps)
    _check_local_count(count, x3)
    _check_count(count, x.shape)
    y = _normalize3(x, x3, mean, invstd, weight, bias, out)
    return y, mean, invstd


def _normalize3(x, x3, mean, invstd, weight, bias, out, prepared=None):
    # prepared: ck.prepare_out's (y, y3, target), where the caller checked out= already
    C, dt = x3.shape[1], x3.dtype
    w = ck.param(weight, "weight", cpu, (C,), dt, 1.0)
    b = ck.param(bias, "bias", cpu, (C,), dt, 0.0)
    y, y3, target = prepared or ck.prepare_out(cpu, out, x, x3)
    if y3.size:
        w, b = ck.apart(cpu, out, w, b)
        _kernels.sync_normalize(x3, y3, w, b, mean, invstd, *cpu.plan())
    return ck.finish(y, target)


def update_running(running_mean, running_var, merged, momentum):
    """``running = (1 - momentum) * running + momentum * batch`` with the merged statistics, the
    variance unbiased with the global count; in place (nothing happens for an empty global batch)."""
    merged = _check_merged(merged, -1)
    C = merged.shape[0]
    for name, buf in (("running_mean", running_mean), ("running_var", running_var)):  # as batch_norm's
        ck.vector(buf, name, cpu, (C,), None, writable=True, what=f"the merged statistics' {C} channels")
    count, mean, var, _ = _statistics(merged, 1.0)
    momentum = ck.scalar(momentum, "momentum", 0.0, 1.0)
    if count:
        _check_count(count, ())
        cpu.update_running(running_mean, running_var, mean, var, momentum, count)


def local_grad_sums(grad_output, x, mean):
    """This rank's per-channel (sum dy, sum dy * (x - mean)) with the global ``mean``: a (C, 2)
    float64 array (zeros for an empty batch)."""
    x3, g3 = _pair(grad_output, x)
    mean = ck.vector(mean, "mean", cpu, (x3.shape[1],), np.float64)
    return _local_grad_sums3(g3, x3, mean)


def _pair(grad_output, x):
    x3 = _cpu_ncs(x)
    return x3, ck.like_input(cpu, grad_output, x, x3, "grad_output")


def _local_grad_sums3(g3, x3, mean):
    C = x3.shape[1]
    sdy, sdyx = np.zeros(C), np.zeros(C)
    _grad_sums_into(g3, x3, mean, sdy, sdyx)
    return np.stack([sdy, sdyx], axis=1)


def _grad_sums_into(g3, x3, mean, sdy, sdyx):
    # sdy, sdyx: zeros, written only for a non-empty batch
    if x3.size:
        threads, path, unit, _ = _plan()
        _kernels.sync_grad_sums(g3, x3, mean, sdy, sdyx, threads, path, unit)


def merge_grad_sums(stack):
    """Add per-rank (C, 2) gradient sums in the order given (a sequence or an (R, C, 2) array)."""
    stack = np.asarray(stack, dtype=np.float64)
    if stack.ndim != 3 or stack.shape[2] != 2 or stack.shape[0] == 0:
        raise ValueError(f"merge_grad_sums expects an (R, C, 2) stack of (sum dy, sum dy*(x-mean)) rows, R >= 1, "
                         f"got shape {stack.shape}")
    total = stack[0].copy()
    for r in range(1, stack.shape[0]):
        total += stack[r]
    return total


def finish_backward(grad_output, x, weight, mean, invstd, sums, count, *, out=None):
    """The training backward of this rank's slice from the global sums (merge_grad_sums' (C, 2)
    array) and the global count: ``grad_input = weight * invstd * (dy - sum_dy / count - (x - mean) *
    invstd**2 * sum_dyx / count)``.  Returns ``(grad_input, grad_weight, grad_bias)``, the last two
    the global batch's (identical on every rank), in the input's dtype."""
    x3, g3 = _pair(grad_output, x)
    C = x3.shape[1]
    mean = ck.vector(mean, "mean", cpu, (C,), np.float64)
    invstd = ck.vector(invstd, "invstd", cpu, (C,), np.float64)
    sums = np.asarray(sums, dtype=np.float64)
    if sums.shape != (C, 2):
        raise ValueError(f"sums must have shape ({C}, 2), got {sums.shape}")
    if (isinstance(count, bool) or not isinstance(count, numbers.Real) or not math.isfinite(count) or count < 0
            or count != math.floor(count)):
        raise ValueError(f"count must be a non-negative whole number, got {count!r}")
    _check_local_count(count, x3)
    return _finish_backward3(grad_output, x, g3, x3, weight, mean, invstd, np.ascontiguousarray(sums[:, 0]),
                             np.ascontiguousarray(sums[:, 1]), float(count), out)


def _finish_backward3(grad_output, x, g3, x3, weight, mean, invstd, sdy, sdyx, count, out, prepared=None):
    # sdy, sdyx: the global sums, contiguous (C,) float64; prepared: ck.prepare_out's (dx, dx3,
    # target), where the caller checked out= already
    C, dt = x3.shape[1], x3.dtype
    w = ck.param(weight, "weight", cpu, (C,), dt, 1.0)
    dx, dx3, target = prepared or ck.prepare_out(cpu, out, x, x3, g3)
    if x3.size:
        gw, gb = np.empty(C), np.empty(C)
        w, mean, invstd = ck.apart(cpu, out, w, mean, invstd)
        _kernels.sync_backward_apply(g3, x3, dx3, w, mean, invstd, sdy, sdyx, count, gw, gb, *cpu.plan())
    else:  # the same arithmetic as the kernel's (_finish_grad), so every rank gets the same bits
        gw, gb = sdyx * invstd, sdy.copy()
    return ck.finish(dx, target), gw.astype(dt), gb.astype(dt)


# ---------------------------------------------------------------------------------- the layer
def _world():
    try:
        from mpi4py import MPI
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("SyncBatchNorm without comm= uses mpi4py's MPI.COMM_WORLD, and mpi4py is not installed: "
                          "pip install 'fastbn[mpi]' (mpi4py and an MPI), or pass comm=") from e
    return MPI.COMM_WORLD


class SyncBatchNorm(_BatchNorm):
    """Batch norm over the global batch of all ranks, for any (N, C, *spatial) input.

    ``comm``: an mpi4py communicator (``MPI.COMM_WORLD`` when None, imported on first use), or any
    object with ``allgather(obj) -> list`` of every rank's ``obj`` in rank order.  Training costs
    one ``allgather`` per forward (3 + 2C float64: a header with the rank's channel count, dtype
    and batch size, then its C means and C M2s) and one per backward (2 + 2C: channels and a
    status, then the two sums).  They go through mpi4py's object ``allgather`` (of the arrays' bytes),
    which exchanges the message sizes before the data: ranks whose layers disagree on C are then
    reported by the header check instead of overrunning a fixed-size buffer, at ~5 us more than a
    buffer ``Allgather`` (measured at 2 ranks: 8 against 3 us).
    Evaluation uses the running statistics (or, without them, the local batch, as PyTorch) and no
    communication.  ``backward`` returns this rank's ``grad_input`` and sets ``grad_weight`` and
    ``grad_bias`` to the *global* batch's, identical on every rank: leave them out of a gradient
    all-reduce.  Parameters, buffers and ``state_dict`` are those of ``BatchNorm*d``.  Ranks that
    share a machine share its cores: give each ``fastbn.set_num_threads(cores // ranks)``.
    """

    _ndims = tuple(range(2, 65))
    _layout = "(N, C, *spatial)"

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, comm=None,
                 dtype=np.float32, *, bias=True, unbiased=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device="cpu", dtype=dtype,
                         bias=bias, unbiased=unbiased)
        self._comm = comm

    @property
    def comm(self):
        if self._comm is None:
            self._comm = _world()
        return self._comm

    @comm.setter
    def comm(self, value):
        self._comm = value

    def to(self, device):
        if device not in ("cpu", None):
            raise ValueError(f"SyncBatchNorm runs on the CPU (NumPy arrays) only, got device {device!r}")
        return self

    # ------------------------------------------------------------------ forward
    def _local_check(self, x):
        """The checks of the layer's input: returns the (N, C, S) view."""
        if not isinstance(x, np.ndarray):
            raise TypeError(f"SyncBatchNorm expects a NumPy array, got {type(x).__module__}.{type(x).__name__}")
        if x.ndim < 2:
            raise ValueError(f"SyncBatchNorm expected (N, C, *spatial) input, got shape {x.shape}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"SyncBatchNorm({self.num_features}) expected {self.num_features} channels (axis 1), "
                             f"got shape {x.shape}")
        x3 = _cpu_ncs(x)
        if x3.dtype != self.dtype:
            raise TypeError(f"SyncBatchNorm holds {self.dtype} parameters, got input of dtype {x.dtype}")
        return x3

    def forward(self, input, *, out=None, update_running_stats=True):
        """As BatchNorm*d's forward; in training a collective: every rank must call it.  Its checks
        run inside the collective, so that a rank with bad input still takes part (and every rank
        raises) instead of leaving the others waiting."""
        if not self.training:  # running statistics, or the local batch's: no communication
            return super().forward(input, out=out, update_running_stats=update_running_stats)
        record = is_grad_enabled()
        # the ranks fail together, and a failed forward changes no state on any of them (as
        # BatchNorm*d's): the pending forward stays, so a backward still differentiates it everywhere
        y, payload = self._sync_forward(input, out, update_running_stats, record)
        if record:
            self._save(True, payload)
        return y

    __call__ = forward

    def _sync_forward(self, input, out, update_running_stats, record):
        err = None
        C = self.num_features
        try:
            update = ck.flag(update_running_stats, "update_running_stats") and self.track_running_stats
            factor = self._update_factor() if update else 0.0  # (a bad count fails on every rank)
            if not self.eps > 0:  # as BatchNorm*d in training: a constant channel would divide by zero
                raise ValueError(f"eps must be positive in training, got {self.eps!r}")
            x3 = self._local_check(input)
            prepared = ck.prepare_out(cpu, out, input, x3)  # a bad out= fails here, before the collective
            # the message: [channels, dtype, count | means (C) | M2s (C)], the kernel writing its part
            wire = np.zeros(3 + 2 * C)
            wire[:3] = (C, _DTYPE_CODES[x3.dtype], x3.shape[0] * x3.shape[2])
            if x3.size:
                _moments_into(x3, wire[3:3 + C], wire[3 + C:])
        except Exception as e:  # still take part in the collective, flagged as failed (count -1)
            err = e
            wire = np.array([_channels_of(input), _dtype_code_of(input), -1.0])
        parts = self.comm.allgather(wire.tobytes())  # bytes: cheaper to pickle than an array
        # The common case in few NumPy calls (the interpreter's memory is cold after the kernel):
        # every rank sent as many bytes, and the headers agree and report no failure.
        stack = _stack_if_uniform(parts)
        hdr = stack[:, :3].tolist() if stack is not None else None
        if err is not None or hdr is None or any(h[:2] != hdr[0][:2] or h[2] < 0 for h in hdr):
            _check_headers([np.frombuffer(p)[:3].tolist() for p in parts], err)  # raises on every rank
            raise AssertionError("unreachable: the headers disagree")  # pragma: no cover
        count = int(sum(int(h[2]) for h in hdr))
        _check_count(count, input.shape)
        counts = np.broadcast_to(stack[:, 2:3], (stack.shape[0], C))
        _, mean, _, var, invstd = _merge(counts, stack[:, 3:3 + C], stack[:, 3 + C:], self.eps)
        saved, saved3 = input, x3
        if record and out is not None and isinstance(out, np.ndarray) and cpu.overlapping(out, (input,)):
            saved = input.copy(order="K")  # an in-place forward overwrites what backward needs
            saved3 = ck.ncs_view(cpu, saved, x3.dtype)
        y = _normalize3(input, x3, mean, invstd, self.weight, self.bias, out, prepared)
        if update:
            if count:
                cpu.update_running(self.running_mean, self.running_var, mean, var, factor, count, self.unbiased)
            self.num_batches_tracked = _wrap_int64(self.num_batches_tracked + 1)
        return y, _SyncPayload(saved, saved3, self._saved_weight(record), mean, invstd, count)

    # ------------------------------------------------------------------ backward
    def backward(self, grad_output, *, out=None):
        """Return grad_input for the last forward and set ``grad_weight``/``grad_bias`` (the global
        batch's).  After a training forward this is a collective: every rank must call it."""
        try:
            payload = self._pending()  # this thread's last forward (RuntimeError where there is none)
        except RuntimeError:
            # No forward to differentiate here, or one of the other mode.  Where the other ranks are
            # in the backward's collective (this layer trains, or its last forward was a training
            # one), take part in it flagged as failed, so that every rank raises instead of waiting.
            saved = self._local.saved
            if self.training or (saved is not None and isinstance(saved.payload, _SyncPayload)):
                self.comm.allgather(np.array([self.num_features, -1.0]).tobytes())
            raise
        if not isinstance(payload, _SyncPayload):
            return super().backward(grad_output, out=out)
        x, x3, weight, mean, invstd, count = payload
        shape = x.shape
        C = x3.shape[1]
        err = None
        try:
            if not isinstance(grad_output, np.ndarray):
                raise TypeError(f"grad_output must be a NumPy array like the forward's input, "
                                f"got {type(grad_output).__module__}.{type(grad_output).__name__}")
            if tuple(grad_output.shape) != tuple(shape):
                raise ValueError(f"grad_output must match the forward's input: shape {tuple(shape)}, "
                                 f"got shape {tuple(grad_output.shape)}")
            g3 = ck.kernel_view(cpu, grad_output, x, x3, "grad_output")
            prepared = ck.prepare_out(cpu, out, x, x3, g3)  # a bad out= fails before the collective
            # the message: [channels, status | sum dy (C) | sum dy*(x-mean) (C)]
            wire = np.zeros(2 + 2 * C)
            wire[0] = C
            _grad_sums_into(g3, x3, mean, wire[2:2 + C], wire[2 + C:])
        except Exception as e:
            err, wire = e, np.array([C, -1.0])
        parts = self.comm.allgather(wire.tobytes())
        stack = _stack_if_uniform(parts)
        if err is not None:
            raise err
        if stack is None or stack.shape[1] != 2 + 2 * C or stack[:, 1].any():
            failed = [r for r, p in enumerate(parts) if len(p) != 8 * (2 + 2 * C) or np.frombuffer(p)[1] != 0]
            raise RuntimeError(f"SyncBatchNorm.backward: rank(s) {failed} failed before the collective (see their "
                               f"error); nothing was computed here, the forward's state is kept")
        total = stack[0, 2:].copy()
        for r in range(1, stack.shape[0]):  # in rank order: the same bits on every rank
            total += stack[r, 2:]
        dx, gw, gb = _finish_backward3(grad_output, x, g3, x3, weight, mean, invstd, total[:C], total[C:], float(count),
                                       out, prepared)
        self._local.saved = None
        self.grad_weight = gw if self.weight is not None else None
        self.grad_bias = gb if self.bias is not None else None
        return dx

    # ------------------------------------------------------------------ conversion
    @classmethod
    def convert_sync_batchnorm(cls, layers, comm=None):
        """SyncBatchNorm layers for fastbn ``BatchNorm1d/2d/3d`` layers: one layer, or a list, tuple
        or dict of them (anything else in it is passed through).  Each new layer holds the old
        one's arrays themselves (weight, bias, running buffers, so an optimizer's references stay
        valid), its ``num_batches_tracked``, hyperparameters and train/eval mode."""
        if isinstance(layers, _BatchNorm):
            return cls._convert_one(layers, comm)
        if isinstance(layers, dict):
            return type(layers)((k, cls._convert_one(v, comm)) for k, v in layers.items())
        if isinstance(layers, (list, tuple)):
            return type(layers)(cls._convert_one(v, comm) for v in layers)
        raise TypeError(f"convert_sync_batchnorm expects a fastbn batch-norm layer, or a list, tuple or dict of "
                        f"layers, got {type(layers).__name__}")

    @classmethod
    def _convert_one(cls, layer, comm):
        if not isinstance(layer, (BatchNorm1d, BatchNorm2d, BatchNorm3d)) or isinstance(layer, SyncBatchNorm):
            return layer
        if layer._cuda is not None:
            raise ValueError(f"convert_sync_batchnorm: SyncBatchNorm runs on the CPU; the layer is on {layer.device!r} "
                             f"(move it with .to('cpu') first)")
        new = cls(layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats, comm,
                  layer.dtype, bias=layer.has_bias, unbiased=layer.unbiased)
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            setattr(new, name, getattr(layer, name))
        new.training = layer.training
        return new


def _channels_of(x):
    shape = getattr(x, "shape", ())
    try:
        return int(shape[1]) if len(shape) >= 2 else -1
    except (TypeError, ValueError):
        return -1


def _dtype_code_of(x):
    dt = getattr(x, "dtype", None)
    try:
        return _DTYPE_CODES.get(np.dtype(dt).newbyteorder("="), -1)
    except TypeError:
        return -1


def _stack_if_uniform(parts):
    """The gathered messages (bytes of float64) as one (R, length) array when all have the same
    length, else None."""
    if not parts[0] or not all(isinstance(p, (bytes, bytearray)) and len(p) == len(parts[0]) for p in parts):
        return None
    return np.frombuffer(b"".join(parts), dtype=np.float64).reshape(len(parts), -1)


def _check_headers(headers, err):
    """Raise, on every rank alike, for gathered forward headers [channels, dtype, count] that
    disagree (channels or dtype) or report a failure (count -1): the failed rank its own error."""
    chans = [int(h[0]) for h in headers]
    codes = [int(h[1]) for h in headers]
    known_c = {c for c in chans if c >= 0}
    known_t = {t for t in codes if t != -1}
    if len(known_c) > 1 or len(known_t) > 1:
        raise ValueError(
            "SyncBatchNorm: the ranks disagree on the input: channels per rank "
            f"{chans}, dtype per rank {[_CODE_NAMES.get(t, t) for t in codes]} (-1/unknown: not readable there)"
        ) from err
    if err is not None:
        raise err
    failed = [r for r, h in enumerate(headers) if h[2] < 0]
    if failed:
        raise RuntimeError(f"SyncBatchNorm: rank(s) {failed} failed before the collective (see their error); "
                           f"nothing was computed or updated here")
