"""CUDA sources and the GPU backend's CPU-only behaviour (no GPU, no CuPy needed).

- every ``.cu`` under fastbn/_cuda compiles with ``nvcc --ptx`` for sm_80 and sm_90, with its
  kernel templates instantiated for float, double and __half (the name expressions the backend
  asks NVRTC for), without warnings, and ``ptxas`` assembles the PTX;
- the backend's kernel list and launch constants match the source;
- without CuPy: ``import fastbn`` does not import CuPy, the CPU path works, asking for
  ``device="cuda"`` raises an ImportError that says what to install, ``status()`` says
  "unavailable"; with a CuPy that finds no driver/GPU, RuntimeErrors that say what to check;
- the kernels *run*, on the CPU: the emulated CuPy of tests/cuda_emulator/ compiles the CUDA
  source with g++ against its emulation of the CUDA builtins (each CUDA thread a fiber,
  ``__syncthreads`` a barrier, warp shuffles an exchange between barriers, deadlocks reported),
  in a subprocess; tests/cuda_emulator/check_emulator.py checks the emulator on kernels with
  known results, tests/cuda_emulator/check_kernels.py compares the backend's results with the
  CPU backend on every work-splitting path, tests/cuda_emulator/check_activation.py the fused
  ReLU and float16 storage against PyTorch; then all of tests/test_gpu.py runs against the
  emulator.  This checks the indexing, the reductions, the Python launch code (argument types
  against the kernel signatures) and the GPU tests themselves where no GPU is available.  It
  cannot check speed, the memory model or NVRTC itself: tests/test_gpu.py on a real GPU does.
  tests/cuda_emulator/README.md says what the emulator does, and how to run it alone.
"""
import os
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

import cuda_emulator
import fastbn
from fastbn._backends import cuda as _cupy_backend

CUDA_DIR = os.path.join(os.path.dirname(fastbn.__file__), "_cuda")
CU_FILES = sorted(f for f in os.listdir(CUDA_DIR) if f.endswith(".cu"))
ARCHS = ["sm_80", "sm_90"]
# The kernels' element types (C++ name, Itanium mangling): the backend's CTYPES.
TYPES = [("float", "f"), ("double", "d"), ("__half", "6__half")]
# Subprocesses must import the fastbn this process imported (the installed package in CI, where
# the source tree's fastbn/ is not built), from a neutral working directory.
PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(fastbn.__file__)))
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def _env(*paths, **extra):
    return dict(os.environ, PYTHONPATH=os.pathsep.join([*paths, PKG_PARENT]), **extra)

_TEMPLATE_KERNEL = re.compile(
    r"template\s*<\s*typename\s+T\s*(?:,\s*int\s+ACT\s*)?>\s*__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(")
# the kernels with the activation mode as a second template argument: template <typename T, int ACT>
_ACT_KERNEL = re.compile(
    r"template\s*<\s*typename\s+T\s*,\s*int\s+ACT\s*>\s*__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(")


def _nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on the PATH (install the CUDA toolkit to compile-check the CUDA sources)")
    return nvcc


def _template_kernels(source):
    return _TEMPLATE_KERNEL.findall(source)


def _instantiations(source):
    """(kernel, C++ template arguments, mangled template arguments) of every kernel the backend
    asks NVRTC for: each template for each type, and each ACT for the activation kernels."""
    acts = set(_ACT_KERNEL.findall(source))
    out = []
    for k in _template_kernels(source):
        for t, mt in TYPES:
            if k in acts:
                out += [(k, f"{t}, {a}", f"{mt}Li{a}E") for a in _cupy_backend.ACTS]
            else:
                out.append((k, t, mt))
    return out


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
    """nvcc --ptx, all warnings as errors, every template instantiated for float, double and __half."""
    nvcc = _nvcc()
    kernels = _template_kernels(_read(cu))
    inst = _instantiations(_read(cu))
    # Taking each instantiation's address makes nvcc compile it, as NVRTC does for the backend's
    # name expressions ("bn_apply<float>", "bn_grad_input<__half, 1>", ...).
    refs = "\n".join(f"    (void)&{k}<{t}>;" for k, t, _ in inst)
    wrapper = tmp_path / f"instantiate_{cu}"
    wrapper.write_text(f'#include "{os.path.join(CUDA_DIR, cu)}"\nvoid fastbn_instantiate_all()\n{{\n{refs}\n}}\n')
    ptx = tmp_path / f"{cu}.{arch}.ptx"
    cmd = [nvcc, "--ptx", f"-arch={arch}", "-std=c++17", "-Werror", "all-warnings", "-o", str(ptx), str(wrapper)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}{r.stderr}"
    assert not (r.stdout + r.stderr).strip(), f"nvcc printed warnings:\n{r.stdout}{r.stderr}"
    entries = re.findall(r"\.entry\s+(\w+)", ptx.read_text())
    plain = len(re.findall(r"^\s*__global__", _read(cu), re.M)) - len(kernels)  # kernels that are no templates
    assert len(entries) == len(inst) + plain
    for k, _, mt in inst:  # mangled as _Z<len><name>I{f,d,6__half}E... or _Z<len><name>IfLi1EE...
        assert any(e.startswith(f"_Z{len(k)}{k}I{mt}E") for e in entries), (k, mt, entries)
    ptxas = shutil.which("ptxas") or os.path.join(os.path.dirname(nvcc), "ptxas")
    if os.path.exists(ptxas):  # assemble too: register limits from __launch_bounds__, no errors
        r = subprocess.run([ptxas, f"-arch={arch}", "-o", str(tmp_path / "out.cubin"), str(ptx)],
                           capture_output=True, text=True)
        assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr


def test_backend_kernel_list_and_constants_match_the_source():
    src = _read("batch_norm.cu")
    assert sorted(_template_kernels(src)) == sorted(_cupy_backend.KERNELS)
    assert sorted(_ACT_KERNEL.findall(src)) == sorted(_cupy_backend.ACT_KERNELS)
    assert sorted(_cupy_backend._name_expressions("float").values()) == sorted(
        f"{k}<{t}>" for k, t, _ in _instantiations(src) if t.split(",")[0] == "float")
    assert _cupy_backend.ACTS == (0, 1, 2)
    for name in ("NONE", "RECOMPUTE", "OUTPUT"):  # the backend's modes are the source's
        value = re.search(rf"FBN_ACT_{name} = (\d)", _read("batch_norm_device.cuh")).group(1)
        assert getattr(_cupy_backend, f"ACT_{name}") == int(value), name
    assert sorted(_cupy_backend.CTYPES.values()) == sorted(t for t, _ in TYPES)
    assert _cupy_backend.native_halves == frozenset({"float16"})

    def define(name):
        return int(re.search(rf"#define\s+{name}\s+(\d+)", src).group(1))

    assert define("FBN_GPU_THREADS") == _cupy_backend.BLOCK
    assert (define("FBN_COL_X"), define("FBN_COL_Y")) == _cupy_backend.COLUMN_BLOCK
    assert define("FBN_MERGE_WARPS") == _cupy_backend.MERGE_WARPS
    includes = re.findall(r"^\s*#\s*include.*$", src, re.M)
    # NVRTC has no host headers: fastbn's own files are spliced in; cuda_fp16.h comes from the include
    # path CuPy gives NVRTC (under a guard: the emulator defines __half itself)
    assert includes == ['#include "../_coefs.h"', "#include <cuda_fp16.h>", '#include "batch_norm_device.cuh"'], includes
    assert re.search(r"#if defined\(__CUDACC__\) \|\| defined\(__CUDACC_RTC__\)\n#include <cuda_fp16.h>\n#endif", src)
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
    code = ("import sys; import fastbn, fastbn._backends.cuda as b; import numpy as np\n"
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


LAYER_MAKERS = {"BatchNorm2d": lambda d: fastbn.BatchNorm2d(4, device=d),
                "GroupNorm": lambda d: fastbn.GroupNorm(2, 4, device=d),
                "LayerNorm": lambda d: fastbn.LayerNorm(4, device=d),
                "InstanceNorm2d": lambda d: fastbn.InstanceNorm2d(4, device=d)}


@pytest.mark.parametrize("make", LAYER_MAKERS.values(), ids=LAYER_MAKERS.keys())
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_layer_without_cupy_says_what_to_install(no_cupy, device, make):
    with pytest.raises(ImportError, match="CuPy") as info:
        make(device)
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

    assert fastbn._backends.backend_of(np.zeros(2)) is fastbn._backends.cpu
    with pytest.raises(TypeError, match="numpy"):
        fastbn._backends.backend_of([1.0, 2.0])


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
@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """The environment and a neutral working directory for a subprocess on the emulated CuPy."""
    reason = cuda_emulator.unavailable()
    if reason:
        pytest.skip(f"cannot emulate the CUDA kernels: {reason}")
    root = tmp_path_factory.mktemp("cuda_emulator")
    cwd = root / "cwd"
    cwd.mkdir()
    # two emulated devices, so that the suite's two-GPU test (devices checked before any kernel) runs;
    # the compiled kernels go to root/build, not into the source tree
    env = dict(os.environ, **cuda_emulator.environment(root / "build", devices=2, sms=2, pythonpath=[PKG_PARENT]))
    return types.SimpleNamespace(env=env, cwd=str(cwd))


def _run(cmd, emulator, timeout=600):
    try:
        return subprocess.run(cmd, cwd=emulator.cwd, env=emulator.env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(cmd[:3])}... did not finish in {timeout} s")


def test_cpu_emulator_runs_known_kernels_and_refuses_bad_launches(emulator):
    """The emulator itself: indices, shuffles, barriers and shared memory on kernels with known
    results (tests/cuda_emulator/probes.cu), deadlocks reported, and bad launches refused."""
    r = _run([sys.executable, cuda_emulator.CHECK_EMULATOR], emulator)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"emulator: ok, \d+ launches", r.stdout), r.stdout + r.stderr


def test_kernels_run_correctly_in_the_cpu_emulator(emulator):
    """The CUDA kernels, emulated on the CPU, agree with the CPU backend on every path."""
    r = _run([sys.executable, cuda_emulator.CHECK_KERNELS], emulator)
    assert r.returncode == 0, r.stdout + r.stderr
    done = re.search(r"emulated kernels: (\d+) cases, (\d+) launches", r.stdout)
    assert done, r.stdout + r.stderr
    assert int(done.group(1)) >= 22 and int(done.group(2)) > 0, r.stdout  # 11 cases x 2 dtypes at least


def test_relu_and_float16_kernels_in_the_cpu_emulator(emulator):
    """The fused ReLU (forward, and backward with bias= and output=) and float16 storage, emulated,
    against PyTorch (CPU) on every path, in float32, float64 and float16
    (tests/cuda_emulator/check_activation.py)."""
    pytest.importorskip("torch", reason="the activation's reference is PyTorch (CPU)")
    r = _run([sys.executable, cuda_emulator.CHECK_ACTIVATION], emulator)
    assert r.returncode == 0, r.stdout + r.stderr
    done = re.search(r"emulated activation: (\d+) cases, (\d+) launches", r.stdout)
    assert done, r.stdout + r.stderr
    assert int(done.group(1)) >= 30 and int(done.group(2)) > 0, r.stdout  # 7 cases x 3 dtypes + 9 special


def test_gpu_suite_passes_in_the_cpu_emulator(emulator):
    """tests/test_gpu.py (the real-GPU tests) against the emulated kernels."""
    r = _run([sys.executable, "-m", "pytest", os.path.join(TESTS_DIR, "test_gpu.py"), "-q", "-x",
              "-p", "no:cacheprovider", "-m", "gpu"], emulator)
    tail = (r.stdout + r.stderr)[-3000:]
    assert r.returncode == 0, tail
    assert " passed" in tail and "failed" not in tail, tail


@pytest.mark.parametrize("mode", [[], ["--norms"]], ids=["batch-norm", "norms"])
def test_gpu_bench_runs_in_the_cpu_emulator(emulator, mode):
    """bench/gpu_bench.py, for the first GPU that runs it: every row of its table on tiny shapes
    (the emulator's times mean nothing)."""
    bench = os.path.join(os.path.dirname(TESTS_DIR), "bench", "gpu_bench.py")
    r = _run([sys.executable, bench, *mode, "--shapes", "3,8,2,5", "--rounds", "1", "--repeat", "1"], emulator)
    assert r.returncode == 0, r.stdout + r.stderr
    ops = ["GroupNorm(8) forward", "GroupNorm(8) backward", "LayerNorm(5) backward", "InstanceNorm forward"] if mode \
        else ["train forward", "eval forward", "backward", "backward + relu"]
    for op in ops:
        assert re.search(rf"^  {re.escape(op)} +(copy|fastbn)", r.stdout, re.M), (op, r.stdout)
    assert r.stdout.count("fastbn") >= len(ops), r.stdout
