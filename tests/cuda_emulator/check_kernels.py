"""fastbn's CUDA backend on the emulator against its CPU backend, on every work-splitting path.

    PYTHONPATH=. python tests/cuda_emulator/check_kernels.py     (from a source tree built in place)

Run as a script, this file's folder comes first on ``sys.path``, so ``import cupy`` imports the
emulated CuPy.  For each case the forced plan must launch the expected stage-1 kernel; then the
statistics, the output (in place), the eval output and the training and eval gradients must agree
with the CPU backend's (relative 2e-6 in float32, 1e-12 in float64); then a layer on
``device="cuda"`` must track a CPU layer over two steps, state dict included.  Exits non-zero, with
the case and the errors, at the first disagreement.  tests/test_cuda_sources.py runs it.
"""
import numpy as np

import cupy
import fastbn
from fastbn._backends import cpu as _cpu, cuda as be

# (shape, path, unit, the stage-1 kernel the plan must pick)
CASES = [
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
DTYPES = [(np.float32, "float", 2e-6), (np.float64, "double", 1e-12)]  # dtype, C++ type, relative tolerance


def check(ok, *what):
    """An assert that ``python -O`` keeps."""
    if not ok:
        raise AssertionError(what)


def check_paths(rng):
    """Every case in both dtypes; returns (runs, worst relative error)."""
    runs, worst = 0, 0.0
    for shape, path, unit, first in CASES:
        be.tuning.update(path=path, unit=unit)
        for dt, ctype, tol in DTYPES:
            C = shape[1]
            x = (rng.standard_normal(shape) * 2 + 3 + np.arange(C).reshape(1, -1, 1)).astype(dt)
            w, b = rng.standard_normal(C).astype(dt), rng.standard_normal(C).astype(dt)
            dy = rng.standard_normal(shape).astype(dt)
            y = np.empty_like(x)
            m, v, i = _cpu.forward_train(x, y, w, b, 1e-5)
            n0 = len(cupy.launches)
            gx = cupy.asarray(x)
            gm, gv, gi = be.forward_train(gx, gx, cupy.asarray(w), cupy.asarray(b), 1e-5)  # in place
            check(cupy.launches[n0][0] == f"{first}<{ctype}>", shape, path, cupy.launches[n0:])
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
            check(not bad, shape, path, unit, np.dtype(dt).name, bad)
            runs += 1
            worst = max(worst, max(errs.values()))
    return runs, worst


def check_layer(rng):
    """The whole stack: a layer on device="cuda" against the CPU layer, two steps, state dict."""
    be.tuning.update(path="auto", unit=0)
    cpu, gpu = fastbn.BatchNorm2d(3), fastbn.BatchNorm2d(3, device="cuda")
    for step in range(2):
        x = rng.standard_normal((4, 3, 20, 20)).astype(np.float32)
        dy = rng.standard_normal(x.shape).astype(np.float32)
        check(abs(gpu(cupy.asarray(x)).get() - cpu(x)).max() < 1e-5, "forward", step)
        check(abs(gpu.backward(cupy.asarray(dy)).get() - cpu.backward(dy)).max() < 1e-5, "backward", step)
    sd_gpu, sd_cpu = gpu.state_dict(), cpu.state_dict()
    check(all(isinstance(a, np.ndarray) for a in sd_gpu.values()), sd_gpu)
    check(all(abs(sd_gpu[k] - sd_cpu[k]).max() < 1e-6 for k in sd_cpu), sd_gpu, sd_cpu)
    gpu.to("cpu")
    check(isinstance(gpu.running_mean, np.ndarray), type(gpu.running_mean))


def main():
    check(cupy.__version__.endswith("-emulated"), f"this needs the emulated CuPy, not CuPy {cupy.__version__}")
    rng = np.random.default_rng(7)
    runs, worst = check_paths(rng)
    check_layer(rng)
    print(f"emulated kernels: {runs} cases, {len(cupy.launches)} launches, worst relative error {worst:.2e}")


if __name__ == "__main__":
    main()
