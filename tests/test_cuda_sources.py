"""CUDA sources and the GPU backend's CPU-only behaviour (no GPU, no CuPy needed).

- every ``.cu`` under fastbn/_cuda compiles with ``nvcc --ptx`` for sm_80 and sm_90, with its
  kernel templates instantiated for float and double (the name expressions the backend asks
  NVRTC for), without warnings, and ``ptxas`` assembles the PTX;
- the backend's kernel list and launch constants match the source;
- without CuPy: ``import fastbn`` does not import CuPy, the CPU path works, asking for
  ``device="cuda"`` raises an ImportError that says what to install, ``status()`` says
  "unavailable"; with a CuPy that finds no driver/GPU, RuntimeErrors that say what to check;
- the kernels *run*, on the CPU: an emulated CuPy (``_FAKE_CUPY`` below) compiles the CUDA
  source with g++ against a small emulation header (each CUDA thread a fiber, ``__syncthreads``
  a barrier, warp shuffles an exchange between barriers, deadlocks reported) and the backend's
  results are compared with the CPU backend on every work-splitting path; then all of
  tests/test_gpu.py runs against the emulator.  This checks the indexing, the reductions, the
  Python launch code (argument types against the kernel signatures) and the GPU tests
  themselves where no GPU is available.  It cannot check speed, the memory model or NVRTC
  itself: tests/test_gpu.py on a real GPU does.

To run anything else against the emulator: ``PYTHONPATH=. python tests/test_cuda_sources.py DIR``
writes the emulated ``cupy`` package into DIR; then ``PYTHONPATH=DIR pytest tests/test_gpu.py``.
"""
import os
import re
import shutil
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

import fastbn
from fastbn import _cupy_backend

CUDA_DIR = os.path.join(os.path.dirname(fastbn.__file__), "_cuda")
CU_FILES = sorted(f for f in os.listdir(CUDA_DIR) if f.endswith(".cu"))
ARCHS = ["sm_80", "sm_90"]
# Subprocesses must import the fastbn this process imported (the installed package in CI, where
# the source tree's fastbn/ is not built), from a neutral working directory.
PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(fastbn.__file__)))
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def _env(*paths, **extra):
    return dict(os.environ, PYTHONPATH=os.pathsep.join([*paths, PKG_PARENT]), **extra)

_TEMPLATE_KERNEL = re.compile(
    r"template\s*<\s*typename\s+T\s*>\s*__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(")


def _nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on the PATH (install the CUDA toolkit to compile-check the CUDA sources)")
    return nvcc


def _template_kernels(source):
    return _TEMPLATE_KERNEL.findall(source)


def _read(name):
    with open(os.path.join(CUDA_DIR, name), encoding="utf-8") as f:
        return f.read()


# ---------------------------------------------------------------------------------- nvcc
def test_there_is_cuda_source():
    assert "batch_norm.cu" in CU_FILES
    assert os.path.abspath(_cupy_backend.SOURCE) == os.path.join(os.path.abspath(CUDA_DIR), "batch_norm.cu")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cu", CU_FILES)
def test_nvcc_compiles_every_kernel(tmp_path, cu, arch):
    """nvcc --ptx, all warnings as errors, every template instantiated for float and double."""
    nvcc = _nvcc()
    kernels = _template_kernels(_read(cu))
    # Taking each instantiation's address makes nvcc compile it, as NVRTC does for the backend's
    # name expressions ("bn_apply<float>", ...).
    refs = "\n".join(f"    (void)&{k}<{t}>;" for k in kernels for t in ("float", "double"))
    wrapper = tmp_path / f"instantiate_{cu}"
    wrapper.write_text(f'#include "{os.path.join(CUDA_DIR, cu)}"\nvoid fastbn_instantiate_all()\n{{\n{refs}\n}}\n')
    ptx = tmp_path / f"{cu}.{arch}.ptx"
    cmd = [nvcc, "--ptx", f"-arch={arch}", "-std=c++17", "-Werror", "all-warnings", "-o", str(ptx), str(wrapper)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}{r.stderr}"
    assert not (r.stdout + r.stderr).strip(), f"nvcc printed warnings:\n{r.stdout}{r.stderr}"
    entries = re.findall(r"\.entry\s+(\w+)", ptx.read_text())
    assert len(entries) == 2 * len(kernels) + len(re.findall(r"^\s*__global__", _read(cu), re.M)) - len(kernels)
    for k in kernels:  # mangled as _Z<len><name>I{f,d}...
        for t in "fd":
            assert any(e.startswith(f"_Z{len(k)}{k}I{t}E") for e in entries), (k, t, entries)
    ptxas = shutil.which("ptxas") or os.path.join(os.path.dirname(nvcc), "ptxas")
    if os.path.exists(ptxas):  # assemble too: register limits from __launch_bounds__, no errors
        r = subprocess.run([ptxas, f"-arch={arch}", "-o", str(tmp_path / "out.cubin"), str(ptx)],
                           capture_output=True, text=True)
        assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr


def test_backend_kernel_list_and_constants_match_the_source():
    src = _read("batch_norm.cu")
    assert sorted(_template_kernels(src)) == sorted(_cupy_backend.KERNELS)

    def define(name):
        return int(re.search(rf"#define\s+{name}\s+(\d+)", src).group(1))

    assert define("FBN_GPU_THREADS") == _cupy_backend.BLOCK
    assert (define("FBN_COL_X"), define("FBN_COL_Y")) == _cupy_backend.COLUMN_BLOCK
    assert define("FBN_MERGE_WARPS") == _cupy_backend.MERGE_WARPS
    includes = re.findall(r"^\s*#\s*include.*$", src, re.M)
    assert includes == ['#include "../_coefs.h"', '#include "batch_norm_device.cuh"'], "NVRTC: no host headers"
    assert '#include "' not in _cupy_backend._read_source(), "_coefs.h is spliced in"


# ---------------------------------------------------------------------------------- without CuPy
@pytest.fixture
def no_cupy(monkeypatch):
    """A machine without CuPy, also where CuPy is installed: ``import cupy`` raises ImportError."""
    _cupy_backend._reset()
    monkeypatch.setitem(sys.modules, "cupy", None)
    yield
    _cupy_backend._reset()


def test_import_fastbn_does_not_import_cupy(tmp_path):
    code = ("import sys; import fastbn, fastbn._cupy_backend as b; import numpy as np\n"
            "assert 'cupy' not in sys.modules, 'importing fastbn imported cupy'\n"
            "x = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32)\n"
            "fastbn.BatchNorm1d(3)(x)\n"
            "assert 'cupy' not in sys.modules, 'the CPU path imported cupy'\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_import_fastbn_with_cupy_blocked(tmp_path):
    code = ("import sys; sys.modules['cupy'] = None\n"
            "import fastbn, numpy as np\n"
            "from fastbn import __main__ as m\n"
            "print(fastbn.batch_norm(np.ones((2, 3, 4), np.float32), None, None, training=True).shape)\n"
            "print(m._cuda_status())\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "(2, 3, 4)"
    assert r.stdout.splitlines()[1].startswith("unavailable"), r.stdout


def test_cpu_path_works_without_cupy(no_cupy):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 4, 6, 6)).astype(np.float32)
    bn = fastbn.BatchNorm2d(4)
    y = bn(x)
    assert isinstance(y, np.ndarray) and y.shape == x.shape
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    dx = bn.backward(np.ones_like(x))
    assert isinstance(dx, np.ndarray)
    assert "cupy" not in {type(v).__module__.split(".")[0] for v in bn.state_dict().values()}


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_layer_without_cupy_says_what_to_install(no_cupy, device):
    with pytest.raises(ImportError, match="CuPy") as info:
        fastbn.BatchNorm2d(4, device=device)
    msg = str(info.value)
    assert "fastbn[cuda]" in msg and "cupy-cuda12x" in msg, msg
    assert isinstance(info.value.__cause__, ImportError)  # chained: the original error is kept


def test_moving_a_layer_to_cuda_without_cupy_leaves_it_on_the_cpu(no_cupy):
    bn = fastbn.BatchNorm1d(3)
    with pytest.raises(ImportError, match="fastbn\\[cuda\\]"):
        bn.to("cuda")
    assert bn.device == "cpu" and isinstance(bn.weight, np.ndarray)
    bn(np.ones((4, 3), np.float32))


def test_backend_without_cupy(no_cupy):
    s = _cupy_backend.status()
    assert s.startswith("unavailable: ") and "CuPy" in s and "fastbn[cuda]" in s, s
    assert _cupy_backend.available() is False
    assert _cupy_backend.is_array(np.zeros(3)) is False
    assert _cupy_backend.name == "cuda"
    with pytest.raises(ImportError, match="fastbn\\[cuda\\]"):
        _cupy_backend.xp
    with pytest.raises(ImportError, match="CuPy"):
        _cupy_backend.device_module(0)
    with pytest.raises(AttributeError):
        _cupy_backend.no_such_name


def test_numpy_arrays_never_reach_the_cuda_backend(no_cupy):
    from fastbn import functional

    assert functional.backend_of(np.zeros(2)) is fastbn.functional._cpu
    with pytest.raises(TypeError, match="numpy"):
        functional.backend_of([1.0, 2.0])


# ---------------------------------------------------------------------------------- a CuPy without a GPU
def _stub_cupy(get_device_count):
    """A module standing in for an installed CuPy whose CUDA runtime behaves as given."""
    cp = types.ModuleType("cupy")
    cp.__version__ = "13.4.1"
    cp.ndarray = type("ndarray", (), {})
    cp.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=get_device_count,
                                                                  getDevice=lambda: 0))
    return cp


class _CUDARuntimeError(RuntimeError):
    pass


def _no_driver():
    raise _CUDARuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version")


@pytest.fixture
def stub_cupy(monkeypatch):
    def install(get_device_count):
        _cupy_backend._reset()
        monkeypatch.setitem(sys.modules, "cupy", _stub_cupy(get_device_count))

    yield install
    _cupy_backend._reset()


def test_cupy_without_driver(stub_cupy):
    stub_cupy(_no_driver)
    s = _cupy_backend.status()
    assert s.startswith("unavailable: ") and "13.4" in s and "driver" in s, s
    with pytest.raises(RuntimeError, match="nvidia-smi") as info:
        fastbn.BatchNorm2d(2, device="cuda")
    assert isinstance(info.value.__cause__, _CUDARuntimeError)


def test_cupy_without_gpu(stub_cupy):
    stub_cupy(lambda: 0)
    assert _cupy_backend.status().startswith("unavailable: ")
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        fastbn.BatchNorm1d(2, device="cuda:0")


def test_status_never_raises(monkeypatch):
    class Exploding(types.ModuleType):
        def __getattr__(self, attr):
            raise OSError("libcudart.so.12: cannot open shared object file")

    _cupy_backend._reset()
    monkeypatch.setitem(sys.modules, "cupy", Exploding("cupy"))
    try:
        s = _cupy_backend.status()
    finally:
        _cupy_backend._reset()
    assert s.startswith("unavailable: "), s


def test_tuning_path_is_checked():
    with pytest.raises(ValueError, match="tuning"):
        saved = dict(_cupy_backend.tuning)
        _cupy_backend.tuning["path"] = "diagonal"
        try:
            _cupy_backend._plan(None, 0, 3, 5, 10)
        finally:
            _cupy_backend.tuning.update(saved)


# ---------------------------------------------------------------------------------- emulated run
_EMULATED_CHECKS = r'''
import sys
import numpy as np
import cupy
import fastbn
from fastbn import _cpu, _cupy_backend as be

rng = np.random.default_rng(7)
CASES = [  # shape, path, unit, the stage-1 kernel the plan must pick
    ((5, 40, 9), "auto", 0, "bn_forward_channels"),     # C >= 2 * SMs: fused, one block per channel
    ((2, 1, 20000), "auto", 0, "bn_moments_units"),     # C = 1, many elements: two-stage
    ((3, 3, 6000), "auto", 0, "bn_moments_units"),
    ((3000, 3, 1), "auto", 0, "bn_moments_columns"),    # spatial size 1: columns
    ((300, 70, 1), "auto", 0, "bn_moments_columns"),    # more than one 32-column tile
    ((6, 4, 35), "channels", 0, "bn_forward_channels"),
    ((9, 33, 1), "channels", 0, "bn_forward_channels"),
    ((3, 9, 7), "units", 5, "bn_moments_units"),        # units cross row boundaries
    ((2, 5, 1), "units", 1, "bn_moments_units"),
    ((70, 45, 1), "columns", 9, "bn_moments_columns"),
    ((2, 1, 3), "columns", 1, "bn_moments_units"),      # columns needs S == 1: falls back to units
]
worst = 0.0
for shape, path, unit, first in CASES:
    be.tuning.update(path=path, unit=unit)
    for dt, tol in ((np.float32, 2e-6), (np.float64, 1e-12)):
        C = shape[1]
        x = (rng.standard_normal(shape) * 2 + 3 + np.arange(C).reshape(1, -1, 1)).astype(dt)
        w, b = rng.standard_normal(C).astype(dt), rng.standard_normal(C).astype(dt)
        dy = rng.standard_normal(shape).astype(dt)
        y = np.empty_like(x)
        m, v, i = _cpu.forward_train(x, y, w, b, 1e-5)
        n0 = len(cupy.launches)
        gx = cupy.asarray(x)
        gm, gv, gi = be.forward_train(gx, gx, cupy.asarray(w), cupy.asarray(b), 1e-5)  # in place
        assert cupy.launches[n0][0] == f"{first}<{np.dtype(dt).name.replace('float32', 'float').replace('float64', 'double')}>", (shape, path, cupy.launches[n0:])
        errs = {"mean": abs(gm.get() - m).max() / max(1, abs(m).max()), "var": abs(gv.get() - v).max() / v.max(),
                "invstd": abs(gi.get() - i).max() / i.max(), "y": abs(gx.get() - y).max()}
        ye = np.empty_like(x)
        _cpu.forward_eval(x, ye, w, b, m, i)
        gye = cupy.empty_like(gx)
        be.forward_eval(cupy.asarray(x), gye, cupy.asarray(w), cupy.asarray(b), cupy.asarray(m), cupy.asarray(i))
        errs["eval y"] = abs(gye.get() - ye).max()
        for training in (True, False):
            dx = np.empty_like(x)
            gw, gb = _cpu.backward(dy, x, dx, w, m, i, training)
            gdx = cupy.empty_like(gx)
            ggw, ggb = be.backward(cupy.asarray(dy), cupy.asarray(x), gdx, cupy.asarray(w), cupy.asarray(m),
                                   cupy.asarray(i), training)
            errs[f"dx {training}"] = abs(gdx.get() - dx).max() / max(1, abs(dx).max())
            errs[f"dw {training}"] = abs(ggw.get() - gw).max() / max(1, abs(gw).max())
            errs[f"db {training}"] = abs(ggb.get() - gb).max() / max(1, abs(gb).max())
        bad = {k: e for k, e in errs.items() if not e <= tol}
        assert not bad, (shape, path, unit, np.dtype(dt).name, bad)
        worst = max(worst, max(errs.values()))

# the whole stack: functional API and a layer on device="cuda", against the CPU layer
be.tuning.update(path="auto", unit=0)
cpu, gpu = fastbn.BatchNorm2d(3), fastbn.BatchNorm2d(3, device="cuda")
for step in range(2):
    x = rng.standard_normal((4, 3, 20, 20)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    assert abs(gpu(cupy.asarray(x)).get() - cpu(x)).max() < 1e-5
    assert abs(gpu.backward(cupy.asarray(dy)).get() - cpu.backward(dy)).max() < 1e-5
sd_gpu, sd_cpu = gpu.state_dict(), cpu.state_dict()
assert all(isinstance(a, np.ndarray) for a in sd_gpu.values())
assert all(abs(sd_gpu[k] - sd_cpu[k]).max() < 1e-6 for k in sd_cpu), (sd_gpu, sd_cpu)
gpu.to("cpu")
assert isinstance(gpu.running_mean, np.ndarray)
print(f"emulated kernels: {len(cupy.launches)} launches, worst relative error {worst:.2e}")
'''


def _emulator_available():
    gxx = shutil.which("g++")
    if gxx is None:
        return "g++ is not on the PATH"
    probe = "#include <ucontext.h>\n#include <csetjmp>\nint main() { ucontext_t c; return getcontext(&c); }\n"
    r = subprocess.run([gxx, "-std=c++17", "-x", "c++", "-", "-o", os.devnull], input=probe, capture_output=True,
                       text=True)
    return None if r.returncode == 0 else "g++ cannot build a <ucontext.h> program"


def write_fake_cupy(directory):
    """Write the emulated ``cupy`` package into ``directory``; returns the directory."""
    os.makedirs(os.path.join(directory, "cupy"), exist_ok=True)
    with open(os.path.join(directory, "cupy", "__init__.py"), "w", encoding="utf-8") as f:
        f.write(_FAKE_CUPY)
    return directory


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """Environment variables that make a subprocess import the emulated CuPy."""
    reason = _emulator_available()
    if reason:
        pytest.skip(f"cannot emulate the CUDA kernels: {reason}")
    root = tmp_path_factory.mktemp("fake_cupy")
    write_fake_cupy(str(root))
    os.makedirs(str(root / "build") + "_cwd")
    # two emulated devices, so that the suite's two-GPU test (devices checked before any kernel) runs
    return _env(str(root), FAKE_CUPY_SMS="2", FAKE_CUPY_DEVICES="2", FAKE_CUPY_BUILD=str(root / "build"))


def _run(cmd, env, timeout=600):
    try:
        return subprocess.run(cmd, cwd=env["FAKE_CUPY_BUILD"] + "_cwd", env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(cmd[:3])}... did not finish in {timeout} s")


def test_kernels_run_correctly_in_the_cpu_emulator(emulator):
    """The CUDA kernels, emulated on the CPU, agree with the CPU backend on every path."""
    r = _run([sys.executable, "-c", _EMULATED_CHECKS], emulator)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "emulated kernels:" in r.stdout


def test_gpu_suite_passes_in_the_cpu_emulator(emulator):
    """tests/test_gpu.py (the real-GPU tests) against the emulated kernels."""
    r = _run([sys.executable, "-m", "pytest", os.path.join(TESTS_DIR, "test_gpu.py"), "-q", "-x",
              "-p", "no:cacheprovider", "-m", "gpu"], emulator)
    tail = (r.stdout + r.stderr)[-3000:]
    assert r.returncode == 0, tail
    assert " passed" in tail and "failed" not in tail, tail


_FAKE_CUPY = r'''
"""A CPU stand-in for the parts of CuPy fastbn uses, to *run* fastbn's CUDA kernels without a GPU.

Arrays wrap NumPy arrays (host memory plays device memory).  RawModule compiles the CUDA source
with g++ against a small emulation header: every CUDA thread of a block is a fiber (ucontext) on
one OS thread, __syncthreads a barrier over the block's fibers, __shfl_down_sync an exchange
between two barriers of the warp's fibers; a barrier that can never complete is reported as a
deadlock instead of hanging.  Kernel arguments are checked against the kernel's C++ signature (pointer
element types, scalar widths), which real CuPy does not do.
"""
import ctypes
import hashlib
import os
import re
import subprocess
import tempfile
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

# ---------------------------------------------------------------- kernels
_HEADER = r"""
#include <cmath>
#include <csetjmp>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <ucontext.h>
#include <utility>
#include <vector>
struct emu_dim3 { unsigned x, y, z; };
static emu_dim3 threadIdx, blockIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
/* Every CUDA thread of a block is a fiber (ucontext) on one OS thread; a barrier switches to the
 * scheduler, which resumes the fibers whose barrier has been reached by everyone it waits for. */
struct emu_barrier { unsigned expected, arrived, generation; };
struct emu_fiber { ucontext_t ctx; jmp_buf jb; unsigned tid; bool started, done; int wait; unsigned gen; };
static std::vector<emu_barrier> emu_bars; /* [0]: the block, [1 + w]: warp w */
static std::vector<emu_fiber> emu_fibers;
static jmp_buf emu_sched; /* switches use _setjmp/_longjmp: no signal-mask syscalls */
static emu_fiber *emu_cur;
static double emu_shfl[32][32];
static void emu_wait(int b)
{
    emu_barrier &bar = emu_bars[b];
    emu_cur->wait = b;
    emu_cur->gen = bar.generation;
    if (++bar.arrived == bar.expected) {
        bar.arrived = 0;
        bar.generation++;
    }
    if (!_setjmp(emu_cur->jb))
        _longjmp(emu_sched, 1);
}
static inline void __syncthreads() { emu_wait(0); }
static inline double __shfl_down_sync(unsigned mask, double v, int o)
{
    unsigned t = emu_cur->tid, w = t / 32, l = t % 32;
    if (mask != 0xffffffffu) abort();
    emu_shfl[w][l] = v;
    emu_wait(1 + w);
    double r = l + o < 32 ? emu_shfl[w][l + o] : v;
    emu_wait(1 + w);
    return r;
}
static inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
static inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
"""

_FOOTER = r"""
template <typename A> struct emu_code { static std::string s() { return "?"; } };
template <> struct emu_code<int> { static std::string s() { return "i"; } };
template <> struct emu_code<long long> { static std::string s() { return "q"; } };
template <> struct emu_code<float> { static std::string s() { return "f"; } };
template <> struct emu_code<double> { static std::string s() { return "d"; } };
template <typename E> struct emu_code<E *> { static std::string s() { return "P" + emu_code<std::remove_const_t<E>>::s(); } };
template <typename... A> static const char *emu_signature(void (*)(A...))
{
    static std::string s = (std::string() + ... + (emu_code<A>::s() + ","));
    return s.c_str();
}
static void (*emu_body)(void *);
static void *emu_body_arg;
static void emu_trampoline()
{
    emu_body(emu_body_arg);
    emu_cur->done = true;
    _longjmp(emu_sched, 1);
}
template <typename... A, std::size_t... I>
static void emu_call(void (*f)(A...), void **p, std::index_sequence<I...>) { f(*static_cast<std::remove_reference_t<A> *>(p[I])...); }
template <typename... A> struct emu_launch_args { void (*f)(A...); void **p; };
template <typename... A> static void emu_invoke(void *a)
{
    auto *la = static_cast<emu_launch_args<A...> *>(a);
    emu_call(la->f, la->p, std::index_sequence_for<A...>{});
}
/* returns 0, or 1 if the block deadlocked (fibers waiting on a barrier nobody else reaches) */
template <typename... A>
static int emu_run(void (*f)(A...), unsigned gx, unsigned gy, unsigned bx, unsigned by, void **p)
{
    const size_t stack = 128 * 1024;
    static std::vector<char> stacks; /* reused: allocating and faulting in stacks per launch is slow */
    emu_launch_args<A...> la{f, p};
    emu_body = &emu_invoke<A...>;
    emu_body_arg = &la;
    blockDim = {bx, by, 1};
    gridDim = {gx, gy, 1};
    unsigned nt = bx * by;
    if (stacks.size() < (size_t)nt * stack)
        stacks.resize((size_t)nt * stack);
    emu_fibers.assign(nt, emu_fiber{});
    ucontext_t proto;
    getcontext(&proto);
    for (unsigned y = 0; y < gy; y++)
        for (unsigned x = 0; x < gx; x++) {
            blockIdx = {x, y, 0};
            emu_bars.assign(1 + nt / 32, emu_barrier{32, 0, 0});
            emu_bars[0].expected = nt;
            for (unsigned t = 0; t < nt; t++) {
                emu_fiber &fb = emu_fibers[t];
                fb.tid = t;
                fb.started = fb.done = false;
                fb.wait = -1;
                fb.ctx = proto;
                fb.ctx.uc_stack.ss_sp = stacks.data() + (size_t)t * stack;
                fb.ctx.uc_stack.ss_size = stack;
                fb.ctx.uc_link = nullptr;
                makecontext(&fb.ctx, emu_trampoline, 0);
            }
            for (unsigned left = nt; left;) {
                bool progress = false;
                for (emu_fiber &fb : emu_fibers) {
                    if (fb.done || (fb.wait >= 0 && emu_bars[fb.wait].generation == fb.gen))
                        continue;
                    fb.wait = -1;
                    threadIdx = {fb.tid % bx, fb.tid / bx, 0};
                    emu_cur = &fb;
                    if (!_setjmp(emu_sched)) {
                        if (!fb.started) {
                            fb.started = true;
                            setcontext(&fb.ctx);
                        }
                        _longjmp(fb.jb, 1);
                    }
                    progress = true;
                    left -= fb.done;
                }
                if (!progress)
                    return 1;
            }
        }
    return 0;
}
#define EMU_KERNEL(name, T, suf) \
    extern "C" const char *emu_sig_##name##_##suf() { return emu_signature(&name<T>); } \
    extern "C" int emu_launch_##name##_##suf(unsigned gx, unsigned gy, unsigned bx, unsigned by, void **p) \
    { return emu_run(&name<T>, gx, gy, bx, by, p); }
"""

_BUILD = os.environ.get("FAKE_CUPY_BUILD") or os.path.join(tempfile.gettempdir(), "fake_cupy_build")
_CODES = {"i": (_np.int32, ctypes.c_int32), "q": (_np.int64, ctypes.c_int64),
          "f": (_np.float32, ctypes.c_float), "d": (_np.float64, ctypes.c_double)}


class RawKernel:
    def __init__(self, lib, name, t):
        suf = {"float": "f32", "double": "f64"}[t]
        self.name = f"{name}<{t}>"
        sig = getattr(lib, f"emu_sig_{name}_{suf}")
        sig.restype = ctypes.c_char_p
        self.sig = sig().decode().rstrip(",").split(",")
        self._fn = getattr(lib, f"emu_launch_{name}_{suf}")
        self._fn.restype = ctypes.c_int

    def __call__(self, grid, block, args, shared_mem=0):
        grid, block = tuple(grid) + (1, 1), tuple(block) + (1, 1)
        assert all(isinstance(g, int) and g >= 1 for g in grid[:3]), grid
        assert all(isinstance(b, int) and b >= 1 for b in block[:3]), block
        assert grid[0] < 2**31 and grid[1] <= 65535 and grid[2] == 1, grid
        assert block[0] * block[1] <= 1024 and block[2] == 1 and block[0] * block[1] % 32 == 0, block
        assert len(args) == len(self.sig), f"{self.name}: {len(args)} arguments for signature {self.sig}"
        keep, ptrs = [], []
        for i, (code, a) in enumerate(zip(self.sig, args)):
            if code.startswith("P"):
                assert isinstance(a, ndarray), f"{self.name} argument {i}: expected an array, got {type(a)}"
                assert a.dtype == _CODES[code[1]][0], f"{self.name} argument {i}: dtype {a.dtype} for {code}"
                assert a.flags.c_contiguous, f"{self.name} argument {i}: not contiguous"
                assert a._dev == _current[0], f"{self.name} argument {i}: array on device {a._dev}, launch on {_current[0]}"
                v = ctypes.c_void_p(a.data.ptr)
            else:
                want, ct = _CODES[code]
                assert type(a) is want, f"{self.name} argument {i}: expected {want.__name__}, got {type(a).__name__} {a!r}"
                v = ct(a)
            keep.append(v)
            ptrs.append(ctypes.cast(ctypes.pointer(v), ctypes.c_void_p))
        arr = (ctypes.c_void_p * len(ptrs))(*ptrs)
        launches.append((self.name, grid[:2], block[:2]))
        if self._fn(ctypes.c_uint(grid[0]), ctypes.c_uint(grid[1]), ctypes.c_uint(block[0]), ctypes.c_uint(block[1]), arr):
            raise RuntimeError(f"{self.name}: deadlock, threads wait at a barrier the others never reach")


class RawModule:
    def __init__(self, code=None, *, options=(), name_expressions=None, **kwargs):
        self.code, self.options, self.exprs = code, tuple(options), list(name_expressions or ())
        self._lib = None

    def _compile(self):
        if self._lib is not None:
            return
        regs = []
        for e in self.exprs:
            m = re.fullmatch(r"(\w+)<(float|double)>", e)
            regs.append(f"EMU_KERNEL({m.group(1)}, {m.group(2)}, {'f32' if m.group(2) == 'float' else 'f64'})")
        src = _HEADER + '#line 1 "batch_norm.cu"\n' + self.code + _FOOTER + "\n".join(regs) + "\n"
        flags = ["-std=c++17", "-O1", "-shared", "-fPIC", "-U_FORTIFY_SOURCE", "-Wall", "-Wno-unknown-pragmas"]
        if os.environ.get("FAKE_CUPY_ASAN"):
            flags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
        key = hashlib.sha256((src + " ".join(flags)).encode()).hexdigest()[:16]
        os.makedirs(_BUILD, exist_ok=True)
        so = os.path.join(_BUILD, f"emu_{key}.so")
        if not os.path.exists(so):
            cpp = os.path.join(_BUILD, f"emu_{key}.cpp")
            with open(cpp, "w") as f:
                f.write(src)
            r = subprocess.run(["g++", *flags, cpp, "-o", so + ".tmp"], capture_output=True, text=True)
            if r.returncode or r.stderr.strip():
                raise RuntimeError(f"emulated compile failed/warned:\n{r.stderr}")
            os.replace(so + ".tmp", so)
        self._lib = ctypes.CDLL(so)

    def get_function(self, expr):
        self._compile()
        m = re.fullmatch(r"(\w+)<(float|double)>", expr)
        assert expr in self.exprs, expr
        return RawKernel(self._lib, m.group(1), m.group(2))
'''


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: PYTHONPATH=. python {sys.argv[0]} DIR   (writes the emulated cupy package into DIR)")
    print(f"wrote {write_fake_cupy(sys.argv[1])}/cupy; run e.g. PYTHONPATH={sys.argv[1]} pytest tests/test_gpu.py")
