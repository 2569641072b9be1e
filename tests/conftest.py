"""pytest's side of fastbn's tests: which fastbn they import, and the fixtures.

Only what pytest itself uses lives here (fixtures, the import check).  What the test modules
import (the float64 reference, input generators, ``assert_close``, ``TOL``) is in
tests/_helpers.py: ``from _helpers import ...``.
"""
import os
import sys

import numpy as np
import pytest

# `python -m pytest` puts the working directory first on sys.path.  In a source tree (a clone, an
# unpacked sdist) whose fastbn/ is not built, that would import the unbuilt sources instead of
# the installed package: drop that entry, so the tests run against what pip installed.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SRC = os.path.join(_ROOT, "fastbn")
if os.path.isdir(_SRC) and not any(f.startswith("_openmp.") and f.endswith((".so", ".pyd")) for f in os.listdir(_SRC)):
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]
try:
    import fastbn
except ImportError as exc:
    raise ImportError(f"fastbn is not installed or not built ({exc}): `pip install .` installs it, "
                      "`python setup.py build_ext --inplace` builds it in this source tree") from exc
from fastbn import _kernels
from fastbn._backends import cpu as _cpu

SEED = 20240611

# Every work-splitting path of the CPU kernels, with unit sizes that cut channels into many
# pieces (7 and 97 are not multiples of any SIMD width).  "columns" and "slices" treat any input
# as an (N, C*S) matrix when forced (on their own the kernels take them for spatial sizes below
# 32), so forcing them on larger spatial sizes runs the column loops on wide rows; "slices" with
# unit 3 takes the rows 3 at a time.  The third entry forces the streaming (non-temporal) stores
# on (1) that otherwise only big outputs use; None leaves the kernels' own choice.  (These small
# inputs run on one thread: tests/test_threads.py splits big ones between two.)
PATHS = [("auto", 0, None), ("ranges", 0, None), ("ranges", 7, None), ("ranges", 97, None),
         ("columns", 0, None), ("slices", 0, None), ("slices", 3, None), ("ranges", 0, 1), ("ranges", 7, 1),
         ("columns", 0, 1), ("slices", 3, 1)]
PATH_IDS = ["-".join([p] + ([str(u)] if u else []) + (["stream"] if s else [])) for p, u, s in PATHS]


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture
def rng():
    """A fresh generator with a fixed seed for every test."""
    return np.random.default_rng(SEED)


@pytest.fixture
def force_path():
    """``force_path(path, unit=0, stream=None)`` forces a kernel work-splitting path (and, unless
    stream is None, streaming stores on or off) for the rest of the test."""
    saved = dict(_cpu.tuning)

    def force(path, unit=0, stream=None):
        _cpu.tuning.clear()
        _cpu.tuning.update(saved)
        _cpu.tuning.update(path=path, unit=unit)
        if stream is not None:
            _cpu.tuning["stream"] = stream

    yield force
    _cpu.tuning.clear()
    _cpu.tuning.update(saved)


@pytest.fixture(params=PATHS, ids=PATH_IDS)
def kernel_path(request, force_path):
    """Runs the test once per kernel path (unit size, streaming stores); yields (path, unit, stream)."""
    force_path(*request.param)
    yield request.param


@pytest.fixture
def threads():
    """``threads(n)`` sets fastbn's thread count for the rest of the test, then restores it.  It
    also lets every call use all n threads, however small its input (the kernels otherwise keep
    inputs under 2 x MIN_PER_THREAD elements on the calling thread)."""
    original, threshold = fastbn.get_num_threads(), _kernels.thread_threshold()

    def set_threads(n):
        fastbn.set_num_threads(n)
        _kernels.thread_threshold(1)
        assert fastbn.get_num_threads() == n

    yield set_threads
    fastbn.set_num_threads(original)
    _kernels.thread_threshold(threshold)
