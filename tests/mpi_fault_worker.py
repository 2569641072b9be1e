"""Run by tests/test_sync_mpi.py with ``mpiexec -n 2 python -m mpi4py``: rank 1 raises in user code
before the collective; mpi4py's handler aborts every rank instead of leaving rank 0 waiting."""
import numpy as np
from mpi4py import MPI

from fastbn import SyncBatchNorm

if MPI.COMM_WORLD.Get_rank() == 1:
    raise RuntimeError("rank 1 fails before the forward")
SyncBatchNorm(3, dtype=np.float64)(np.ones((4, 3)))  # would wait for rank 1 forever
print("rank 0 got past the collective", flush=True)
