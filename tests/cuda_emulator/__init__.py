"""A CPU emulator of CuPy and of the CUDA features fastbn's kernels use (see README.md).

Two things live in this folder:

- ``cupy/``: the emulated CuPy package.  A process imports it when this folder is on its
  ``PYTHONPATH``; the test process never does (it would shadow a real CuPy, and a kernel that
  writes out of bounds would corrupt it), only the subprocesses that ``environment`` sets up.
- this package, ``cuda_emulator``, which the tests import: where the emulator is, whether it can
  run here, and the environment for such a subprocess.
"""
import os
import shutil
import subprocess

DIR = os.path.dirname(os.path.abspath(__file__))
# the scripts that the tests run: the emulator on kernels with known results (probes.cu), and
# fastbn's CUDA backend on the emulator against its CPU backend on every work-splitting path
CHECK_EMULATOR = os.path.join(DIR, "check_emulator.py")
CHECK_KERNELS = os.path.join(DIR, "check_kernels.py")
# the fused ReLU and float16 storage against PyTorch (CPU), on every path
CHECK_ACTIVATION = os.path.join(DIR, "check_activation.py")

_PROBE = "#include <ucontext.h>\n#include <csetjmp>\nint main() { ucontext_t c; return getcontext(&c); }\n"


def unavailable():
    """Why the emulator cannot run on this machine, or None where it can."""
    gxx = shutil.which("g++")
    if gxx is None:
        return "g++ is not on the PATH"
    r = subprocess.run([gxx, "-std=c++17", "-x", "c++", "-", "-o", os.devnull], input=_PROBE, capture_output=True,
                       text=True)
    return None if r.returncode == 0 else "g++ cannot build a <ucontext.h> program"


def environment(build, *, devices=1, sms=2, pythonpath=()):
    """The variables to add to a subprocess's environment so that ``import cupy`` imports the
    emulator, with ``devices`` emulated GPUs of ``sms`` multiprocessors each, compiling the kernels
    into the folder ``build``; ``pythonpath`` follows the emulator on ``PYTHONPATH``."""
    return {"PYTHONPATH": os.pathsep.join([DIR, *map(str, pythonpath)]), "FAKE_CUPY_DEVICES": str(devices),
            "FAKE_CUPY_SMS": str(sms), "FAKE_CUPY_BUILD": str(build)}
