"""The emulator against kernels whose results are known (probes.cu), and its launch checks.

    python tests/cuda_emulator/check_emulator.py

Needs NumPy and g++, not fastbn.  Checks, for float and double:
- 2-D thread and block indices and sizes reach every thread, numbered as CUDA numbers them;
- __shfl_down_sync: one shuffle by any offset (a lane past the warp's end keeps its value) and a
  shuffle-tree warp sum;
- __syncthreads and __shared__: a block sum gathered across a barrier;
- scalars of every width arrive intact;
- a barrier that only some threads reach is reported as a deadlock, and the next launch works;
- float16 storage: __half2float on every half, __float2half_rn on every float32 value next to a
  rounding boundary (each half, each midpoint between two, one float ulp either side), on the
  specials and on random bit patterns, bit for bit against NumPy's casts (NaNs: a NaN of the sign);
- launches that a GPU or the kernel's signature would refuse are refused: a Python int for an
  int, an int64 for an int, a double array for a float pointer, a non-contiguous array, an array
  on another device, a block that is not whole warps or over 1024 threads, a missing argument.
Exits non-zero at the first failure.  tests/test_cuda_sources.py runs it.
"""
import os

os.environ.setdefault("FAKE_CUPY_DEVICES", "2")  # for the array-on-another-device check

import numpy as np  # noqa: E402

import cupy  # noqa: E402

PROBES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "probes.cu")
KERNELS = ["probe_indices", "probe_shuffle", "probe_shared", "probe_deadlock", "probe_scalars"]


def check(ok, *what):
    """An assert that ``python -O`` keeps."""
    if not ok:
        raise AssertionError(what)


def refused(kernel, grid, block, args, match):
    """The launch must be refused before it runs, with a message that contains ``match``."""
    n = len(cupy.launches)
    try:
        kernel(grid, block, args)
    except AssertionError as exc:
        check(match in str(exc), f"refused for another reason: {exc}", match)
    else:
        raise AssertionError(f"{kernel.name} ran with grid {grid}, block {block}: expected a refusal ({match})")
    check(len(cupy.launches) == n, "a refused launch was recorded")


def check_dtype(ctype, dt):
    with open(PROBES, encoding="utf-8") as f:
        module = cupy.RawModule(code=f.read(), name_expressions=[f"{k}<{ctype}>" for k in KERNELS])
    k = {name: module.get_function(f"{name}<{ctype}>") for name in KERNELS}
    rng = np.random.default_rng(3)

    # indices: a (3, 2) grid of (32, 2) blocks
    grid, block = (3, 2), (32, 2)
    out = cupy.zeros(6 * 64 * 8, dtype=np.int32)
    k["probe_indices"](grid, block, (out,))
    got = out.get().reshape(2, 3, 2, 32, 8)  # [by][bx][ty][tx]
    want = np.empty_like(got)
    for by, bx, ty, tx in np.ndindex(2, 3, 2, 32):
        want[by, bx, ty, tx] = (tx, ty, bx, by, 32, 2, 3, 2)
    check((got == want).all(), "indices", ctype)

    # shuffles: 4 blocks of 64 threads
    x = rng.standard_normal(256).astype(dt)
    for offset in (1, 5, 16, 31):
        sums, shifted = cupy.zeros(8, dtype=dt), cupy.zeros(256, dtype=dt)
        k["probe_shuffle"]((4,), (64,), (cupy.asarray(x), sums, shifted, np.int32(offset)))
        lanes = x.reshape(8, 32)
        want = np.concatenate([lanes[:, offset:], lanes[:, 32 - offset:]], axis=1) if offset < 32 else lanes
        check((shifted.get().reshape(8, 32) == want).all(), "shuffle by", offset, ctype)
        check(np.allclose(sums.get(), lanes.sum(axis=1), rtol=1e-6), "warp sums", ctype)

    # shared memory across a barrier: 3 blocks of 256 threads, the last one partly past n
    n = 700
    x = rng.standard_normal(n).astype(dt)
    sums = cupy.zeros(3, dtype=dt)
    k["probe_shared"]((3,), (256,), (cupy.asarray(x), sums, np.int64(n)))
    want = [x[i * 256:(i + 1) * 256].sum() for i in range(3)]
    check(np.allclose(sums.get(), want, rtol=1e-6), "block sums", sums.get(), want, ctype)

    # scalars of each width
    out = cupy.zeros(1, dtype=dt)
    k["probe_scalars"]((1,), (32,), (out, np.int32(-7), np.int64(2**40), np.float32(0.5), np.float64(0.25)))
    check(out.get()[0] == dt(2**40 - 7 + 0.75), "scalars", out.get(), ctype)

    # a deadlock is reported, and the emulator recovers from it
    try:
        k["probe_deadlock"]((1,), (64,), (cupy.zeros(64, dtype=dt),))
    except RuntimeError as exc:
        check("deadlock" in str(exc), str(exc))
    else:
        raise AssertionError("a barrier that half the block never reaches was not reported")
    out = cupy.zeros(32, dtype=dt)
    k["probe_deadlock"]((1,), (32,), (out,))  # one warp: every thread reaches the barrier
    check((out.get() == 1).all(), "after a deadlock", ctype)

    # launches that must be refused
    wrong = np.float32 if dt is np.float64 else np.float64
    out = cupy.zeros(1, dtype=dt)
    good = (out, np.int32(1), np.int64(2), np.float32(3), np.float64(4))
    refused(k["probe_scalars"], (1,), (32,), (out, 1) + good[2:], "expected int32, got int")
    refused(k["probe_scalars"], (1,), (32,), (out, np.int64(1)) + good[2:], "expected int32, got int64")
    refused(k["probe_scalars"], (1,), (32,), good[:3] + (3.0,) + good[4:], "expected float32, got float")
    refused(k["probe_scalars"], (1,), (32,), (cupy.zeros(1, dtype=wrong),) + good[1:], "dtype")
    refused(k["probe_scalars"], (1,), (32,), (cupy.zeros((2, 2), dtype=dt)[:, 0],) + good[1:], "not contiguous")
    with cupy.cuda.Device(1):
        elsewhere = cupy.zeros(1, dtype=dt)
    refused(k["probe_scalars"], (1,), (32,), (elsewhere,) + good[1:], "on device 1")
    refused(k["probe_scalars"], (1,), (33,), good, "whole warps")
    refused(k["probe_scalars"], (1,), (2048,), good, "whole warps")
    refused(k["probe_scalars"], (1,), (32,), good[:4], "4 arguments")
    refused(k["probe_scalars"], (0,), (32,), good, "grid")


def check_half():
    """The emulated __half2float and __float2half_rn against NumPy's float16 casts."""
    with open(PROBES, encoding="utf-8") as f:
        module = cupy.RawModule(code=f.read(), name_expressions=["probe_half<__half>"])
    k = module.get_function("probe_half<__half>")
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = np.sort(halves[np.isfinite(halves)].astype(np.float32))
    mids = ((finite[1:].astype(np.float64) + finite[:-1]) / 2).astype(np.float32)  # exact in float32
    points = np.concatenate([finite, mids, [np.float32(65520), np.float32(2.0**-25)]]).astype(np.float32)
    near = np.concatenate([points, np.nextafter(points, np.float32(np.inf)), np.nextafter(points, np.float32(-np.inf))])
    rng = np.random.default_rng(5)
    specials = np.array([np.inf, -np.inf, np.nan, -np.nan, 1e-45, -1e-45, 1e-38, 3.4e38, -3.4e38, 65504, 65519.996,
                         -65520, 1e5, 0.0, -0.0], dtype=np.float32)
    f32 = np.concatenate([near, specials, rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32)
                          .view(np.float32)]).astype(np.float32)
    h = cupy.zeros(f32.size, dtype=np.float16)
    g = cupy.zeros(halves.size, dtype=np.float32)
    k((64,), (256,), (cupy.asarray(f32), h, np.int64(f32.size), cupy.asarray(halves), g, np.int64(halves.size)))
    with np.errstate(over="ignore", invalid="ignore"):
        want_h, want_g = f32.astype(np.float16), halves.astype(np.float32)
    got_h, got_g = h.get(), g.get()
    for got, want, what in ((got_h, want_h, "float -> half"), (got_g, want_g, "half -> float")):
        nan = np.isnan(want)
        check((np.isnan(got) == nan).all(), what, "NaN")
        check((np.signbit(got[nan]) == np.signbit(want[nan])).all(), what, "NaN sign")
        wrong = np.flatnonzero(got[~nan].view(np.uint16 if got.dtype == np.float16 else np.uint32)
                               != want[~nan].view(np.uint16 if got.dtype == np.float16 else np.uint32))
        src = (f32 if what.startswith("float") else halves)[~nan]
        check(wrong.size == 0, what, [(src[i], got[~nan][i], want[~nan][i]) for i in wrong[:5]])


def main():
    check(cupy.__version__.endswith("-emulated"), f"this needs the emulated CuPy, not CuPy {cupy.__version__}")
    for ctype, dt in (("float", np.float32), ("double", np.float64)):
        check_dtype(ctype, dt)
    check_half()
    print(f"emulator: ok, {len(cupy.launches)} launches")


if __name__ == "__main__":
    main()
