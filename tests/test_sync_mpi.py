"""SyncBatchNorm under real MPI: ``mpiexec -n 2`` and ``-n 3`` run tests/mpi_sync_worker.py
(exactness against one process on the global batch, bad input raising on every rank) and
tests/mpi_fault_worker.py (a rank failing outside the layer ends the run instead of hanging).
Skipped, with the reason, where mpi4py or mpiexec is missing (``pip install ".[mpi]"``)."""
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _mpiexec():
    # the mpich wheel puts mpiexec next to the interpreter, which need not be on PATH
    local = Path(sys.executable).with_name("mpiexec")
    return str(local) if local.exists() else shutil.which("mpiexec")


MPIEXEC = _mpiexec()
pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None,
                       reason='mpi4py is not installed (pip install ".[mpi]")'),
    pytest.mark.skipif(MPIEXEC is None, reason='no mpiexec found (pip install ".[mpi]" brings mpich\'s)'),
]


def run_mpi(n, *args, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # the worker imports the fastbn these tests import (an installed one, or this source tree)
    import fastbn

    root = str(Path(fastbn.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    # its own process group: on a timeout, the ranks go too (killing mpiexec alone would orphan them)
    proc = subprocess.Popen([MPIEXEC, "-n", str(n), sys.executable, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=str(HERE), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"mpiexec -n {n} {' '.join(args)} ran past {timeout} s (killed):\n{out}\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("ranks", [2, 3])
def test_sync_batchnorm_under_mpiexec(ranks):
    res = run_mpi(ranks, str(HERE / "mpi_sync_worker.py"))
    assert res.returncode == 0, res.stdout + res.stderr
    for r in range(ranks):
        assert f"rank {r} ok" in res.stdout, res.stdout + res.stderr


def test_a_rank_failing_outside_the_layer_aborts_the_run_instead_of_hanging():
    res = run_mpi(2, "-m", "mpi4py", str(HERE / "mpi_fault_worker.py"), timeout=60)
    assert res.returncode != 0
    assert "rank 1 fails before the forward" in res.stderr
    assert "got past the collective" not in res.stdout


EXAMPLE = HERE.parent / "examples" / "ddp_digits.py"


@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None,
                    reason='scikit-learn is not installed (pip install ".[examples]")')
@pytest.mark.skipif(not EXAMPLE.exists(), reason="examples/ddp_digits.py is not in this checkout")
def test_ddp_digits_example_curves_match():
    res = run_mpi(2, str(EXAMPLE), "--steps", "8", "--hidden", "16", timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "curves match" in res.stdout, res.stdout
