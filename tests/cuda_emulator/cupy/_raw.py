"""``RawModule`` and ``RawKernel`` of the emulated CuPy: CUDA C++ compiled with g++, run on fibers.

``RawModule(code=..., name_expressions=["bn_apply<float>", "bn_grad_input<__half, 1>", ...])`` compiles, on the first
``get_function``, one shared library from

    cuda_builtins.h       the CUDA builtins as plain C++ (threadIdx, __syncthreads, shuffles, ...)
    the code              as given: what NVRTC would compile
    launch.h              plus one EMU_KERNEL(...) line per name expression: the exported entry
                          points (each kernel's signature, and a launch)
    scheduler.cpp         the fibers, barriers and deadlock detection

into ``FAKE_CUPY_BUILD`` (default: ``<tempdir>/fake_cupy_build``), keyed by a hash of all of it, so
a second run loads the library it built before.  ``FAKE_CUPY_ASAN=1`` builds it with
AddressSanitizer (the process must then run with libasan preloaded).

``RawKernel.__call__(grid, block, args)`` checks the launch as strictly as a GPU would refuse it
(grid and block limits, block size a multiple of 32), then each argument against the kernel's C++
signature, which real CuPy does not do: a pointer parameter takes a C-contiguous array of exactly
its element type on the current device, an ``int`` takes ``numpy.int32``, a ``long long``
``numpy.int64``, a ``float``/``double`` ``numpy.float32``/``numpy.float64`` (a Python int or float
passed by mistake is an error, not a silent conversion).
"""
import ctypes
import hashlib
import os
import re
import subprocess
import tempfile

import numpy as _np

from . import _current, launches, ndarray

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/cuda_emulator
SOURCES = ("cuda_builtins.h", "launch.h", "scheduler.cpp")
BUILD = os.environ.get("FAKE_CUPY_BUILD") or os.path.join(tempfile.gettempdir(), "fake_cupy_build")
# -U_FORTIFY_SOURCE: glibc's checked longjmp refuses to jump between the fibers' stacks.
FLAGS = ["-std=c++17", "-O1", "-shared", "-fPIC", "-fvisibility=hidden", "-U_FORTIFY_SOURCE", "-Wall",
         "-Wno-unknown-pragmas"]
_CODES = {"i": (_np.int32, ctypes.c_int32), "q": (_np.int64, ctypes.c_int64),
          "f": (_np.float32, ctypes.c_float), "d": (_np.float64, ctypes.c_double),
          "e": (_np.float16, None)}  # __half: pointer parameters only
_EXPR = re.compile(r"(\w+)<(float|double|__half)(?:, (\d+))?>")  # kernel<T> or kernel<T, N>
_SUFFIX = {"float": "f32", "double": "f64", "__half": "f16"}


def _suffix(t, n):
    """The exported symbols' suffix of kernel<t> ("f32") or kernel<t, n> ("f32_1")."""
    return _SUFFIX[t] + ("" if n is None else f"_{n}")


class RawKernel:
    def __init__(self, lib, name, t, n=None):
        suffix = _suffix(t, n)
        self.name = f"{name}<{t}>" if n is None else f"{name}<{t}, {n}>"
        sig = getattr(lib, f"emu_sig_{name}_{suffix}")
        sig.restype = ctypes.c_char_p
        self.sig = sig().decode().rstrip(",").split(",")
        self._fn = getattr(lib, f"emu_launch_{name}_{suffix}")
        self._fn.restype = ctypes.c_int

    def __call__(self, grid, block, args, shared_mem=0):
        grid, block = tuple(grid) + (1, 1), tuple(block) + (1, 1)
        _check(all(isinstance(g, int) and g >= 1 for g in grid[:3]), f"{self.name}: grid {grid[:3]}")
        _check(all(isinstance(b, int) and b >= 1 for b in block[:3]), f"{self.name}: block {block[:3]}")
        _check(grid[0] < 2**31 and grid[1] <= 65535 and grid[2] == 1, f"{self.name}: grid {grid[:3]} too big")
        _check(block[0] * block[1] <= 1024 and block[2] == 1 and block[0] * block[1] % 32 == 0,
               f"{self.name}: block {block[:3]}: at most 1024 threads, 2-D, whole warps")
        _check(len(args) == len(self.sig), f"{self.name}: {len(args)} arguments for signature {self.sig}")
        keep, ptrs = [], []
        for i, (code, a) in enumerate(zip(self.sig, args)):
            where = f"{self.name} argument {i}"
            if code.startswith("P"):
                _check(isinstance(a, ndarray), f"{where}: expected an array, got {type(a)}")
                _check(a.dtype == _CODES[code[1]][0], f"{where}: dtype {a.dtype} for {code}")
                _check(a.flags.c_contiguous, f"{where}: not contiguous")
                _check(a._dev == _current[0], f"{where}: array on device {a._dev}, launch on {_current[0]}")
                v = ctypes.c_void_p(a.data.ptr)
            else:
                want, ct = _CODES[code]
                _check(ct is not None, f"{where}: the emulator passes {code} by pointer only")
                _check(type(a) is want, f"{where}: expected {want.__name__}, got {type(a).__name__} {a!r}")
                v = ct(a)
            keep.append(v)
            ptrs.append(ctypes.cast(ctypes.pointer(v), ctypes.c_void_p))
        arr = (ctypes.c_void_p * len(ptrs))(*ptrs)
        launches.append((self.name, grid[:2], block[:2]))
        dims = [ctypes.c_uint(d) for d in (grid[0], grid[1], block[0], block[1])]
        if self._fn(*dims, arr):
            raise RuntimeError(f"{self.name}: deadlock, threads wait at a barrier the others never reach")


class RawModule:
    def __init__(self, code=None, *, options=(), name_expressions=None, **kwargs):
        self.code, self.options, self.exprs = code, tuple(options), list(name_expressions or ())
        self._lib = None

    def _compile(self):
        if self._lib is not None:
            return
        entries = []
        for e in self.exprs:
            m = _EXPR.fullmatch(e)
            _check(m, f"the emulator compiles kernel<T> or kernel<T, N> name expressions (T float, double or "
                      f"__half), not {e!r}")
            targs = m.group(2) if m.group(3) is None else f"{m.group(2)}, {m.group(3)}"
            entries.append(f"EMU_KERNEL({m.group(1)}, {_suffix(m.group(2), m.group(3))}, {targs})")
        flags = FLAGS + (["-fsanitize=address", "-fno-omit-frame-pointer"] if os.environ.get("FAKE_CUPY_ASAN") else [])
        key = hashlib.sha256()
        for part in [self.code, *entries, *flags] + [_read(os.path.join(HERE, s)) for s in SOURCES]:
            key.update(part.encode() + b"\0")
        stem = os.path.join(BUILD, f"emu_{key.hexdigest()[:16]}")
        so = stem + ".so"
        if not os.path.exists(so):
            os.makedirs(BUILD, exist_ok=True)
            # The code in a file of its own, so that the compiler's messages give its line numbers.
            _write(stem + ".cu", self.code)
            _write(stem + ".cpp", "\n".join(['#include "cuda_builtins.h"', f'#include "{os.path.basename(stem)}.cu"',
                                             '#include "launch.h"', *entries, ""]))
            tmp = f"{so}.{os.getpid()}.tmp"
            cmd = ["g++", *flags, "-I", HERE, os.path.join(HERE, "scheduler.cpp"), stem + ".cpp", "-o", tmp]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode or r.stderr.strip():
                raise RuntimeError(f"emulated compile failed/warned: {' '.join(cmd)}\n{r.stderr}")
            os.replace(tmp, so)
        self._lib = ctypes.CDLL(so)

    def get_function(self, expr):
        self._compile()
        m = _EXPR.fullmatch(expr)
        _check(expr in self.exprs, f"{expr} is not among the name expressions {self.exprs}")
        return RawKernel(self._lib, m.group(1), m.group(2), m.group(3))


def _check(ok, message):
    """Refuses a launch, also under ``python -O`` (which drops asserts)."""
    if not ok:
        raise AssertionError(message)


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _write(path, text):
    """Writes whole files only: another process may be compiling the same module."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
