"""Run by tests/test_sync_mpi.py under ``mpiexec -n R``: SyncBatchNorm on MPI.COMM_WORLD against a
single-process BatchNorm*d on the concatenated batch (which every rank computes itself), for
several splits (uneven, an empty rank), float32 and float64; then the bad-input cases.  Prints
``rank r ok`` when everything held; an assertion error otherwise."""
import sys

import numpy as np
from mpi4py import MPI

import fastbn
from fastbn import SyncBatchNorm

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
fastbn.set_num_threads(1)  # R processes share this machine's cores

LAYERS = {2: fastbn.BatchNorm1d, 3: fastbn.BatchNorm1d, 4: fastbn.BatchNorm2d, 5: fastbn.BatchNorm3d}
TOL = {np.float32: (2e-5, 2e-5), np.float64: (1e-12, 1e-12)}


def splits(n):
    """Splits of n samples over the ranks: even, uneven, rank 0 empty, the last rank empty."""
    out = [[n // size + (r < n % size) for r in range(size)]]
    out.append([1 + r + (size == 1) for r in range(size)])
    out.append([0] + [n // max(size - 1, 1)] * (size - 1) if size > 1 else [n])
    out.append([2] * (size - 1) + [0] if size > 1 else [n])
    return out


def close(a, b, dtype, what):
    rtol, scale = TOL[dtype]
    atol = scale * max(1.0, float(np.max(np.abs(b))) if np.size(b) else 0.0)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=f"rank {rank}: {what}")


def same_everywhere(a, what):
    bits = comm.allgather(np.ascontiguousarray(a).tobytes())
    assert all(b == bits[0] for b in bits), f"rank {rank}: {what} differs between ranks"


def check(sample, split, dtype, seed):
    rng = np.random.default_rng(seed)  # the same global batch on every rank
    n, C = sum(split), sample[0]
    xs = [(rng.standard_normal((n,) + sample) * 3 + 1).astype(dtype) for _ in range(2)]
    dys = [rng.standard_normal((n,) + sample).astype(dtype) for _ in range(2)]
    w, b = rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)
    ref = LAYERS[len(sample) + 1](C, momentum=0.3, dtype=dtype)
    layer = SyncBatchNorm(C, momentum=0.3, dtype=dtype)
    ref.weight[...] = layer.weight[...] = w
    ref.bias[...] = layer.bias[...] = b
    lo, hi = sum(split[:rank]), sum(split[:rank + 1])
    for x, dy in zip(xs, dys):
        y_ref, y = ref(x), layer(x[lo:hi])
        dx_ref, dx = ref.backward(dy), layer.backward(dy[lo:hi])
        close(y, y_ref[lo:hi], dtype, "output")
        close(dx, dx_ref[lo:hi], dtype, "grad_input")
        for name in ("grad_weight", "grad_bias", "running_mean", "running_var"):
            close(getattr(layer, name), getattr(ref, name), dtype, name)
            same_everywhere(getattr(layer, name), name)


def expect_everywhere(exc, text, fn):
    try:
        fn()
    except exc as e:
        assert text in str(e), f"rank {rank}: {e}"
    else:
        raise AssertionError(f"rank {rank}: expected {exc.__name__}")


case = 0
for sample in [(5,), (3, 7), (4, 3, 5), (2, 3, 2, 4), (64, 5, 5)]:
    for split in splits(2 * size + 1):
        for dtype in (np.float32, np.float64):
            check(sample, split, dtype, 1000 + case)
            case += 1

# bad input: every rank raises, nobody hangs
if size > 1:
    C = 5 if rank == size - 1 else 4
    expect_everywhere(ValueError, "channels per rank", lambda: SyncBatchNorm(C, dtype=np.float64)(np.ones((2, C))))
    dt = np.float32 if rank == 0 else np.float64
    expect_everywhere(ValueError, "dtype per rank", lambda: SyncBatchNorm(4, dtype=dt)(np.ones((2, 4), dt)))
expect_everywhere(ValueError, "more than 1 value per channel",
                  lambda: SyncBatchNorm(4, dtype=np.float64)(np.ones((1 if rank == 0 else 0, 4))))
comm.Barrier()
print(f"rank {rank} ok ({case} cases)", flush=True)
