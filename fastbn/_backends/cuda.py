"""The CUDA backend: CuPy arrays, fastbn's own kernels (fastbn/_cuda/batch_norm.cu).

Provides the backend protocol of :mod:`fastbn._backends` plus ``status()`` for ``fastbn info``
and ``device_module(index)`` for the layers' ``device="cuda[:N]"``.

CuPy is optional: this module imports without it, and imports CuPy on first use (``xp`` is a
lazy module attribute).  The CUDA source is compiled by NVRTC through ``cupy.RawModule`` the
first time a dtype is used on a device, then kept (CuPy also caches the binary on disk).

Work splitting (``tuning["path"]``, forced by the tests like ``cpu.tuning``):
``"channels"`` one block per channel does statistics and the normalize in one launch (many
channels); ``"units"`` many blocks per channel write partial results that a merge kernel
combines, then an elementwise kernel applies them (few channels with many elements each: C = 1,
3, 64 on a big GPU); ``"columns"`` the same for spatial size 1, reading the (N, C) matrix a row
of 32 channels at a time.  ``tuning["unit"]`` forces the partial size (elements per unit, or
rows per row range for ``"columns"``).

Activation: ``relu=True`` makes the forward functions write ``relu(batch_norm(x))`` in the same
pass; ``backward(..., bias=...)`` or ``backward(..., output=...)`` gates the gradient by that
ReLU (its input recomputed from x with the forward's coefficients, or read from the forward's
output) inside the same passes.  float16 (``native_halves``): the kernels load and store half
elements and compute in float, with float32 weight, bias and coefficients.
"""
import os
import re
import sys
import threading

import numpy as np

from . import formulas

name = "cuda"
kind = "CuPy (GPU)"

# Tests force a work-splitting path ("channels", "units", "columns") and a unit size here.
tuning = {"path": "auto", "unit": 0}
PATHS = ("auto", "channels", "units", "columns")

SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_cuda", "batch_norm.cu")
# The kernel templates of SOURCE; each is compiled for float, double and __half, and those in
# ACT_KERNELS (template <typename T, int ACT>) also for each activation mode ACT_*.
KERNELS = (
    "bn_forward_channels", "bn_moments_units", "bn_moments_columns", "bn_merge_moments",
    "bn_eval_coefs", "bn_apply",
    "bn_backward_channels", "bn_grad_sums_units", "bn_grad_sums_columns", "bn_merge_grad",
    "bn_grad_input",
)
ACT_KERNELS = ("bn_backward_channels", "bn_grad_sums_units", "bn_grad_sums_columns", "bn_grad_input")
CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double", np.dtype(np.float16): "__half"}
# The dtype names whose arrays the kernels take directly (besides float32 and float64): float16
# elements are loaded as float, computed in float (statistics in double) and stored rounded to
# nearest even; weight, bias and the coefficients are float32 for them.
native_halves = frozenset({"float16"})
# The activation's modes in the backward kernels (FBN_ACT_* in batch_norm_device.cuh).
ACT_NONE, ACT_RECOMPUTE, ACT_OUTPUT = 0, 1, 2
ACTS = (ACT_NONE, ACT_RECOMPUTE, ACT_OUTPUT)
OPTIONS = ("-std=c++17",)

BLOCK = 256              # FBN_GPU_THREADS in the source
COLUMN_BLOCK = (32, 8)   # FBN_COL_X, FBN_COL_Y
MERGE_WARPS = 4          # FBN_MERGE_WARPS
MIN_UNIT = 8192          # fewest elements per block worth a partial of their own
MIN_ROWS = 256           # fewest rows per row range on the columns path
BLOCKS_PER_SM = 4        # how many blocks per SM the splits aim for
MAX_GRID = 65535         # grid-stride kernels never need more blocks than this

INSTALL = 'pip install "fastbn[cuda]"'
WHEEL = "cupy-cuda12x, for NVIDIA drivers with CUDA 12 or newer"

_lock = threading.Lock()
_cupy = None             # the cupy module, once imported
_source = None
_modules = {}            # (device id, dtype char) -> {kernel name: cupy.RawKernel}
_sm_counts = {}          # device id -> multiprocessor count


# ---------------------------------------------------------------- CuPy, lazily
def _import_cupy():
    """The cupy module; ImportError (chained) with what to install when it cannot be imported."""
    global _cupy
    if _cupy is None:
        try:
            import cupy
        except ImportError as exc:
            raise ImportError(
                f"fastbn's GPU backend needs CuPy, which could not be imported ({exc}); install it with: "
                f"{INSTALL} (which installs {WHEEL})"
            ) from exc
        _cupy = cupy
    return _cupy


def available():
    """True if CuPy can be imported (says nothing about a GPU being there: see :func:`status`)."""
    try:
        _import_cupy()
    except Exception:
        return False
    return True


def _reset():
    """Forget the imported CuPy and the compiled kernels (tests simulate a machine without CuPy)."""
    global _cupy, _source
    with _lock:
        _cupy = None
        _source = None
        _modules.clear()
        _sm_counts.clear()


def __getattr__(attr):  # PEP 562: ``cuda.xp`` imports CuPy on first access
    if attr == "xp":
        return _import_cupy()
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def is_array(a):
    if type(a).__module__.split(".")[0] != "cupy":
        return False
    try:
        return isinstance(a, _import_cupy().ndarray)
    except ImportError:
        return False


def writeable(a):
    return True  # CuPy has no read-only arrays


def aligned(a):
    return True  # CuPy allocates aligned memory and has no byte-offset views of it


def relation(a, b):
    """0: a and b share no memory; 1: the same start and shape (in place); 2: a partial overlap."""
    cp = _import_cupy()
    if not cp.may_share_memory(a, b):
        return 0
    return 1 if a.data.ptr == b.data.ptr and a.shape == b.shape and a.strides == b.strides else 2


def overlapping(out, arrays):
    """A bit mask: bit i set where ``arrays[i]`` (or None) may share memory with ``out``."""
    cp = _import_cupy()
    return sum(1 << i for i, a in enumerate(arrays) if a is not None and cp.may_share_memory(out, a))


def contiguous(a, dtype):
    """``a`` if it is C-contiguous and of ``dtype``, else such a copy (on the current device)."""
    if a.flags.c_contiguous and a.dtype == dtype:
        return a
    return _import_cupy().ascontiguousarray(a, dtype=dtype)


def device(x):
    """x's GPU as the current device, so that arrays created meanwhile land next to x."""
    return x.device


def empty(x3, shape):
    """A new C-contiguous array of ``shape`` (x3's dtype and size) from CuPy's memory pool, on
    the current device."""
    return _import_cupy().empty(shape, dtype=x3.dtype)


def norm_kernels(what):
    """Group, layer and instance norm's kernels (fastbn._backends.cuda_norms)."""
    from . import cuda_norms

    return cuda_norms


def threads():
    """The CPU thread count the norm kernels take (the GPU's kernels ignore it)."""
    return 1


def _version(cp):
    return ".".join(str(cp.__version__).split(".")[:2])


def _device_name(cp, index):
    props = cp.cuda.runtime.getDeviceProperties(index)
    dev_name = props["name"]
    if isinstance(dev_name, bytes):
        dev_name = dev_name.decode(errors="replace")
    return dev_name, props.get("major"), props.get("minor")


def status():
    """One line for ``python -m fastbn info``: "available: <GPU>, CuPy x.y" or "unavailable: <why>"."""
    try:
        cp = _import_cupy()
    except ImportError as exc:
        cause = exc.__cause__
        if isinstance(cause, ModuleNotFoundError) and cause.name == "cupy":
            return f"unavailable: CuPy is not installed; {INSTALL} adds it ({WHEEL})"
        return f"unavailable: CuPy is installed but does not import ({cause or exc}); reinstall it: {INSTALL} ({WHEEL})"
    except Exception as exc:  # a broken install can raise anything
        return f"unavailable: importing CuPy failed ({type(exc).__name__}: {exc}); reinstall it: {INSTALL} ({WHEEL})"
    try:
        version = _version(cp)
    except Exception:
        version = "?"
    try:
        count = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return (f"unavailable: CuPy {version} is installed but finds no CUDA driver or GPU ({exc}); "
                f"check that `nvidia-smi` lists a GPU and that the driver supports CUDA 12")
    if count < 1:
        return f"unavailable: CuPy {version} is installed but finds no CUDA GPU (check `nvidia-smi`)"
    try:
        index = cp.cuda.runtime.getDevice()
        dev_name, major, minor = _device_name(cp, index)
        more = f", {count} GPUs" if count > 1 else ""
        return f"available: {dev_name} (device {index}, compute capability {major}.{minor}{more}), CuPy {version}"
    except Exception as exc:
        return f"unavailable: CuPy {version} found {count} GPU(s) but could not query them ({exc})"


# ---------------------------------------------------------------- devices (for the layers)
class CudaDevice:
    """What the layers need of a GPU: ``backend`` (this module), ``xp`` (cupy), ``device`` and
    ``to_device(numpy_array)``."""

    def __init__(self, cp, index):
        self.backend = sys.modules[__name__]
        self.xp = cp
        self.index = index
        self.device = cp.cuda.Device(index)

    def to_device(self, value):
        """A copy of ``value`` (a NumPy array) on this device."""
        with self.device:
            return self.xp.array(value, copy=True)

    def __repr__(self):
        return f"CudaDevice(cuda:{self.index})"


def device_module(index=None):
    """The GPU ``index`` (None: the current one) for ``device="cuda[:N]"``.

    ImportError without CuPy, RuntimeError without a usable GPU/driver, ValueError for an index
    that does not exist.
    """
    cp = _import_cupy()
    try:
        count = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:
        raise RuntimeError(
            f"CuPy {_version(cp)} is installed but CUDA is not usable ({exc}); check that `nvidia-smi` lists "
            f"a GPU and that the NVIDIA driver supports CUDA 12 (the cupy-cuda12x wheel)"
        ) from exc
    if count < 1:
        raise RuntimeError("CuPy finds no CUDA GPU on this machine (check `nvidia-smi`); use device='cpu'")
    if index is None:
        try:
            index = cp.cuda.runtime.getDevice()
        except Exception as exc:
            raise RuntimeError(f"could not query the current CUDA device ({exc})") from exc
    if not 0 <= index < count:
        raise ValueError(f"device 'cuda:{index}' does not exist: this machine has {count} CUDA device(s)")
    return CudaDevice(cp, index)


# ---------------------------------------------------------------- kernels
def _read_source():
    """SOURCE with the files it includes spliced in (fastbn/_coefs.h, shared with the CPU kernels,
    and _cuda/batch_norm_device.cuh): NVRTC compiles a string, and is given no include path."""
    global _source
    if _source is None:
        def splice(match):
            with open(os.path.join(os.path.dirname(SOURCE), match.group(1)), encoding="utf-8") as f:
                return f.read()

        with open(SOURCE, encoding="utf-8") as f:
            _source = re.sub(r'^#include "([^"]+)"\n', splice, f.read(), flags=re.M)
    return _source


def _name_expressions(t):
    """{key: name expression} of every kernel for the C++ type t: key kernel name, or (kernel name,
    ACT) for ACT_KERNELS ("bn_grad_input<float, 1>")."""
    exprs = {}
    for kn in KERNELS:
        if kn in ACT_KERNELS:
            exprs.update({(kn, a): f"{kn}<{t}, {a}>" for a in ACTS})
        else:
            exprs[kn] = f"{kn}<{t}>"
    return exprs


def _kernels(device_id, dtype):
    """The compiled kernels for one device and dtype, memoized: {kernel name or (name, ACT): kernel}."""
    key = (device_id, dtype.char)
    k = _modules.get(key)
    if k is not None:
        return k
    with _lock:
        k = _modules.get(key)
        if k is None:
            cp = _import_cupy()
            t = CTYPES[dtype]
            exprs = _name_expressions(t)
            module = cp.RawModule(code=_read_source(), options=OPTIONS, name_expressions=list(exprs.values()))
            try:
                with cp.cuda.Device(device_id):
                    k = {key: module.get_function(e) for key, e in exprs.items()}
            except Exception as exc:
                raise RuntimeError(
                    f"compiling fastbn's CUDA kernels ({os.path.basename(SOURCE)}, {t}) with NVRTC failed: {exc}\n"
                    f"CuPy needs NVRTC from a CUDA 12 toolkit (or, with CuPy >= 14, pip install \"cupy-cuda12x[ctk]\")"
                ) from exc
            _modules[key] = k
    return k


def _sm_count(cp, device_id):
    n = _sm_counts.get(device_id)
    if n is None:
        n = int(cp.cuda.Device(device_id).attributes["MultiProcessorCount"])
        _sm_counts[device_id] = n
    return n


def _i(v):
    return np.int64(v)


def _ceil(a, b):
    return -(-a // b)


def _plan(cp, device_id, C, S, NS):
    """The work split for C channels of NS elements: (path, k partials per channel, unit size)."""
    path, unit = tuning["path"], int(tuning["unit"])
    if path not in PATHS:
        raise ValueError(f"cuda.tuning['path'] must be one of {PATHS}, got {path!r}")
    auto = path == "auto"
    if path == "columns" and S != 1:
        path = "units"
    target = BLOCKS_PER_SM * _sm_count(cp, device_id)
    if auto:
        path = "columns" if S == 1 else "units"
        if path == "units" and C >= target // 2:  # enough channels to fill the GPU
            path = "channels"
    if path == "channels":
        return path, 1, NS
    if path == "columns":  # units are row ranges of an (N, C) matrix
        N = NS
        tiles = _ceil(C, COLUMN_BLOCK[0])
        R = unit if unit > 0 else max(_ceil(N, _ceil(target, tiles)), MIN_ROWS)
        return path, _ceil(N, R), R
    U = unit if unit > 0 else max(_ceil(NS, _ceil(target, C)), MIN_UNIT)
    k = _ceil(NS, U)
    if k == 1 and auto:  # one unit per channel: the fused kernel does the same in one launch
        return "channels", 1, NS
    return path, k, U


def _grid(n):
    return (max(1, min(int(n), MAX_GRID)),)


def check_device(x, arrays):
    """Raise unless every (label, array) in ``arrays`` is on the device of ``x`` (before any kernel
    runs: a call that fails must change nothing)."""
    _check_device(x.device.id, arrays)


def _check_device(dev_id, arrays):
    for label, a in arrays:
        if a.device.id != dev_id:
            raise ValueError(
                f"{label} is on CUDA device {a.device.id} but the input is on device {dev_id}; put every array on "
                f"the input's device (and call fastbn inside `with cupy.cuda.Device({dev_id}):`)"
            )


def _param_dtype(dtype):
    """The dtype of weight, bias and the coefficients for elements of ``dtype``: float32 for
    float16 (PyTorch's mixed batch norm), else ``dtype`` itself."""
    return np.dtype(np.float32) if dtype == np.float16 else np.dtype(dtype)


def _vec(cp, a, dtype=None):
    return cp.ascontiguousarray(a, dtype=dtype)


def _apply_grid(sm, total):
    return _grid(min(_ceil(total, BLOCK * 4), 32 * sm))


def forward_train(x, y, weight, bias, eps, relu=False):
    """Write the normalized x (then ReLU'd where ``relu``) into y; return the batch (mean, biased
    var, invstd), float64.  y None: the statistics alone, writing nothing else (``moments``)."""
    cp = _import_cupy()
    N, C, S = x.shape
    dev = x.device
    if y is not None:
        _check_device(dev.id, (("out", y), ("weight", weight), ("bias", bias)))
    with dev:
        mean, var, invstd = cp.empty(C), cp.empty(C), cp.empty(C)
        if C == 0 or N * S == 0:
            return mean, var, invstd
        kern = _kernels(dev.id, x.dtype)
        pdt = _param_dtype(x.dtype)
        eps = np.float64(eps)
        if y is None:  # no affine to write: unit coefficients, the reducing kernels only
            path, k, U = _split_plan(cp, dev.id, C, S, N * S)
            _statistics(cp, kern, x, path, k, U, eps, cp.ones(C, pdt), cp.zeros(C, pdt), mean, var, invstd)
            return mean, var, invstd
        w, b = _vec(cp, weight, pdt), _vec(cp, bias, pdt)  # apart from y: _checks.apart
        act = np.int32(1 if relu else 0)
        path, k, U = _plan(cp, dev.id, C, S, N * S)
        if path == "channels":
            kern["bn_forward_channels"](_grid(C), (BLOCK,),
                                        (x, y, w, b, eps, act, _i(N), _i(C), _i(S), mean, var, invstd))
            return mean, var, invstd
        coef = _statistics(cp, kern, x, path, k, U, eps, w, b, mean, var, invstd)
        _apply(cp, kern, x, y, coef, act)
    return mean, var, invstd


def _statistics(cp, kern, x, path, k, U, eps, w, b, mean, var, invstd):
    """The units or columns path's statistics of (N, C, S) x, k partials a channel: mean, var and
    invstd written; returns the forward's coefficients [m_hi | m_lo | a | b] for weight w, bias b."""
    N, C, S = x.shape
    part = cp.empty(3 * C * k)
    if path == "columns":
        gx = _ceil(C, COLUMN_BLOCK[0])
        kern["bn_moments_columns"]((gx, min(k, MAX_GRID)), COLUMN_BLOCK, (x, _i(N), _i(C), _i(U), _i(k), part))
    else:
        kern["bn_moments_units"](_grid(C * k), (BLOCK,), (x, _i(N), _i(C), _i(S), _i(k), _i(U), part))
    coef = cp.empty(4 * C, dtype=w.dtype)
    kern["bn_merge_moments"](_grid(_ceil(C, MERGE_WARPS)), (MERGE_WARPS * 32,),
                             (part, x, _i(C), _i(S), _i(k), eps, w, b, mean, var, invstd, coef))
    return coef


def _apply(cp, kern, x, y, coef, act):
    """y = ((x - m_hi) - m_lo) * a + b (then ReLU'd where act) over (N, C, S) x, coef's channels."""
    N, C, S = x.shape
    total = N * C * S
    kern["bn_apply"](_apply_grid(_sm_count(cp, x.device.id), total), (BLOCK,),
                     (x, y, coef, act, _i(C), _i(S), _i(total)))


def _split_plan(cp, dev_id, C, S, NS):
    """_plan's split for kernels that only reduce: the channels path (whose kernels also write
    the output) as units of a whole channel each."""
    path, k, U = _plan(cp, dev_id, C, S, NS)
    return ("units", 1, NS) if path == "channels" else (path, k, U)


def moments(x, eps):
    """The statistics of each channel of (N, C, S) x, (mean, biased var, invstd = 1 / sqrt(var +
    eps)) as float64 vectors, as forward_train's, writing nothing else (the group and layer norms
    of cuda_norms)."""
    return forward_train(x, None, None, None, eps)


def update_running(running_mean, running_var, mean, var, momentum, n, unbiased=True):
    """running = (1 - momentum) * running + momentum * batch (see formulas.update_running)."""
    formulas.update_running(_import_cupy(), running_mean, running_var, mean, var, momentum, n, unbiased)


def eval_stats(running_mean, running_var, eps):
    """(running_mean, 1 / sqrt(running_var + eps)) as float64 vectors, for forward_eval."""
    return formulas.eval_stats(_import_cupy(), running_mean, running_var, eps)


def forward_eval_running(x, y, weight, bias, running_mean, running_var, eps, relu=False):
    """eval_stats, then forward_eval with them; returns (mean, invstd)."""
    mean, invstd = eval_stats(running_mean, running_var, eps)
    forward_eval(x, y, weight, bias, mean, invstd, relu)
    return mean, invstd


def forward_eval(x, y, weight, bias, mean, invstd, relu=False):
    """Write (x - mean) * invstd * weight + bias (then ReLU'd where ``relu``) into y."""
    cp = _import_cupy()
    N, C, S = x.shape
    dev = x.device
    _check_device(dev.id, (("out", y), ("weight", weight), ("bias", bias), ("mean", mean), ("invstd", invstd)))
    if N * C * S == 0:
        return
    with dev:
        kern = _kernels(dev.id, x.dtype)
        pdt = _param_dtype(x.dtype)
        coef = _eval_coefs(cp, kern, C, mean, invstd, _vec(cp, weight, pdt), _vec(cp, bias, pdt))
        _apply(cp, kern, x, y, coef, np.int32(1 if relu else 0))


def _eval_coefs(cp, kern, C, mean, invstd, w, b):
    """The forward's coefficients [m_hi | m_lo | a | b] (w's dtype) from the given statistics."""
    coef = cp.empty(4 * C, dtype=w.dtype)
    kern["bn_eval_coefs"](_grid(_ceil(C, BLOCK)), (BLOCK,), (_vec(cp, mean), _vec(cp, invstd), w, b, _i(C), coef))
    return coef


def backward(dy, x, dx, weight, mean, invstd, training, bias=None, output=None):
    """Write grad_input into dx; return (grad_weight, grad_bias), float64.

    With ``bias`` (the forward's) or ``output`` (the forward's output, an (N, C, S) array like x),
    the forward had a ReLU: dy is gated by it, 0 where its input z <= 0, z recomputed from x with
    the forward's coefficients (mean, invstd, weight, bias) or z = output.  Never both."""
    cp = _import_cupy()
    N, C, S = x.shape
    dev = x.device
    _check_device(dev.id, (("grad_output", dy), ("grad_input", dx), ("weight", weight), ("save_mean", mean),
                           ("save_invstd", invstd)) + ((("bias", bias),) if bias is not None else ())
                  + ((("output", output),) if output is not None else ()))
    with dev:
        gw, gb = cp.zeros(C), cp.zeros(C)
        total = N * C * S
        if total == 0:
            return gw, gb
        kern = _kernels(dev.id, x.dtype)
        pdt = _param_dtype(x.dtype)
        w, m, istd = _vec(cp, weight, pdt), _vec(cp, mean), _vec(cp, invstd)  # apart from dx: _checks.apart
        # Stand-ins of the right types where the activation reads nothing (never read there).
        if bias is not None:
            act, b, out = ACT_RECOMPUTE, _vec(cp, bias, pdt), x
        elif output is not None:
            act, b, out = ACT_OUTPUT, w, cp.ascontiguousarray(output.reshape(x.shape), dtype=x.dtype)
        else:
            act, b, out = ACT_NONE, w, x
        NS = N * S
        train = np.int32(1 if training else 0)
        path, k, U = _plan(cp, dev.id, C, S, NS)
        if path == "channels":
            kern["bn_backward_channels", act](_grid(C), (BLOCK,),
                                              (dy, x, out, dx, w, b, m, istd, train, _i(N), _i(C), _i(S), gw, gb))
            return gw, gb
        coef = _grad_sums(cp, kern, dy, x, out, w, b, m, istd, path, k, U, train, act, gw, gb)
        _grad_input(cp, kern, dy, x, out, dx, coef, train, act)
    return gw, gb


def _grad_sums(cp, kern, dy, x, out, w, b, m, istd, path, k, U, train, act, gw, gb):
    """The units or columns path's gradient sums of (N, C, S) dy and x: grad_weight and grad_bias
    written; returns the coefficients [m_hi | m_lo | kdy | kx | kc | b] of grad_input."""
    N, C, S = x.shape
    part = cp.empty(2 * C * k)
    if path == "columns":
        gx = _ceil(C, COLUMN_BLOCK[0])
        kern["bn_grad_sums_columns", act]((gx, min(k, MAX_GRID)), COLUMN_BLOCK,
                                          (dy, x, out, w, b, m, istd, _i(N), _i(C), _i(U), _i(k), part))
    else:
        kern["bn_grad_sums_units", act](_grid(C * k), (BLOCK,),
                                        (dy, x, out, w, b, m, istd, _i(N), _i(C), _i(S), _i(k), _i(U), part))
    coef = cp.empty(6 * C, dtype=w.dtype)
    kern["bn_merge_grad"](_grid(_ceil(C, MERGE_WARPS)), (MERGE_WARPS * 32,),
                          (part, _i(C), _i(k), np.float64(N * S), train, np.int32(act), w, b, m, istd, gw, gb, coef))
    return coef


def _grad_input(cp, kern, dy, x, out, dx, coef, train, act=ACT_NONE):
    """dx = kdy * g + (((x - m_hi) - m_lo) * kx + kc) in training, g * kdy (x unread) in
    evaluation, over (N, C, S) arrays, g being dy gated by the activation act."""
    N, C, S = x.shape
    total = N * C * S
    kern["bn_grad_input", act](_apply_grid(_sm_count(cp, x.device.id), total), (BLOCK,),
                               (dy, x, out, dx, coef, train, _i(C), _i(S), _i(total)))


def channel_sums(dy, x, mean, invstd):
    """(sum dy * (x - mean) * invstd, sum dy) over each channel of (N, C, S) dy and x, float64
    vectors: batch norm's grad_weight and grad_bias, writing nothing else (cuda_norms)."""
    cp = _import_cupy()
    N, C, S = x.shape
    dev = x.device
    with dev:
        gw, gb = cp.zeros(C), cp.zeros(C)
        if N * C * S == 0:
            return gw, gb
        kern = _kernels(dev.id, x.dtype)
        one = cp.ones(C, _param_dtype(x.dtype))
        path, k, U = _split_plan(cp, dev.id, C, S, N * S)
        _grad_sums(cp, kern, dy, x, x, one, one, _vec(cp, mean), _vec(cp, invstd), path, k, U, np.int32(1), ACT_NONE,
                   gw, gb)
    return gw, gb


def grad_input(dy, x, dx, mean, kdy, kx, kc, training):
    """dx = kdy * dy + (((x - m_hi) - m_lo) * kx + kc) over (N, C, S) arrays from per-channel
    float64 vectors (rounded to the coefficients' type; kx, kc unused and x unread where not
    ``training``), the mean split as the forward's (cuda_norms: coefficients that are not batch
    norm's)."""
    cp = _import_cupy()
    N, C, S = x.shape
    dev = x.device
    if N * C * S == 0:
        return
    with dev:
        kern = _kernels(dev.id, x.dtype)
        pdt = _param_dtype(x.dtype)
        zero = cp.zeros(C, pdt)
        coef = cp.zeros(6 * C, dtype=pdt)
        coef[:4 * C] = _eval_coefs(cp, kern, C, mean, cp.zeros(C), zero, zero)  # [m_hi | m_lo | . | .]
        coef[2 * C:3 * C] = kdy
        if training:
            coef[3 * C:4 * C] = kx
            coef[4 * C:5 * C] = kc
        _grad_input(cp, kern, dy, x, x, dx, coef, np.int32(1 if training else 0))
