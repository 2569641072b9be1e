"""The CUDA backend (CuPy arrays) against the CPU backend, on a real GPU.

Every test here is marked ``gpu`` and skipped, with the reason, where CuPy is missing or finds no
usable GPU.  The CPU backend (NumPy arrays, already tested against a float64 reference and
PyTorch) is the reference: same inputs, same operation, results compared within a tolerance
that covers the different summation orders.  Each work-splitting path of the GPU kernels is
forced through ``_cupy_backend.tuning`` (like ``_cpu.tuning``), and PyTorch's CUDA batch norm
is compared too where torch has CUDA.

Run on a GPU machine: ``pip install "fastbn[cuda]" && pytest tests/test_gpu.py -m gpu``.
Set ``FASTBN_GPU_BIG=1`` to also run the > 2**31-element test (needs ~20 GB of GPU memory).
"""
import os

import numpy as np
import pytest

import fastbn
from fastbn._backends import cuda as _cupy_backend


def _gpu_skip_reason():
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken install
        return f'CuPy is not installed or does not import ({exc}); pip install "fastbn[cuda]"'
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return f"CuPy finds no usable CUDA driver/GPU ({exc})"
    if count < 1:
        return "CuPy finds no CUDA GPU"
    return None


_SKIP = _gpu_skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_SKIP is not None, reason=f"no GPU: {_SKIP}")]

if _SKIP is None:
    import cupy as cp
else:
    cp = None

SEED = 1234
# (path, unit): unit 0 lets the backend size the partials; the small units cut every channel
# into many partials (and 97 rows / 1000 elements are not multiples of any block size).
PATHS = [("auto", 0), ("channels", 0), ("units", 0), ("units", 1000), ("columns", 0), ("columns", 97)]
PATH_IDS = ["-".join([p] + ([str(u)] if u else [])) for p, u in PATHS]
SHAPES = [
    (8, 300, 7, 7),      # many channels: one block per channel
    (16, 1, 64, 64),     # C = 1 with many elements: the two-stage path
    (8, 3, 120, 100),    # C = 3, like an RGB input
    (512, 64),           # spatial size 1 (BatchNorm1d on (N, C)): the columns path
    (4099, 3),           # tall and narrow, N not a multiple of anything
    (6, 5, 1, 1),        # 4-D with spatial size 1
    (3, 7, 1000),        # BatchNorm1d on (N, C, L)
]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]
DTYPES = [np.float32, np.float64]
# Tolerances against the CPU backend: both accumulate in double, so the statistics agree to
# double rounding; outputs in the input dtype agree to a few ulps.
STAT_RTOL = 1e-12
OUT_TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


# ---------------------------------------------------------------------------------- helpers
@pytest.fixture
def gpu_path():
    """``gpu_path(path, unit)`` forces a GPU work-splitting path for the rest of the test."""
    saved = dict(_cupy_backend.tuning)

    def force(path, unit=0):
        _cupy_backend.tuning.update(path=path, unit=unit)

    yield force
    _cupy_backend.tuning.clear()
    _cupy_backend.tuning.update(saved)


@pytest.fixture
def rng():
    return np.random.default_rng(SEED)


def _data(rng, shape, dtype, offset=0.5, scale=2.0):
    x = rng.standard_normal(shape) * scale + offset
    if len(shape) > 1:
        x = x + np.arange(shape[1]).reshape((1, -1) + (1,) * (len(shape) - 2))
    return x.astype(dtype)


def _params(rng, C, dtype):
    w = (rng.uniform(0.5, 2.0, C) * rng.choice([-1.0, 1.0], C)).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    rm = rng.standard_normal(C).astype(dtype)
    rv = rng.uniform(0.5, 2.0, C).astype(dtype)
    return w, b, rm, rv


def _g(a):
    """A copy on the GPU."""
    return None if a is None else cp.asarray(a)


def _close(gpu, cpu, tol, what=""):
    assert isinstance(gpu, cp.ndarray), f"{what}: expected a cupy array, got {type(gpu)}"
    got, want = gpu.get().astype(np.float64), np.asarray(cpu, dtype=np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert np.isfinite(got).all() == np.isfinite(want).all(), what
    scale = max(1.0, float(np.max(np.abs(want), initial=0.0)))
    err = float(np.max(np.abs(got - want), initial=0.0))
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.1e} * {scale:.3g}"


# ---------------------------------------------------------------------------------- functional
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_forward_train_and_backward_match_cpu(gpu_path, rng, path, shape, dtype):
    gpu_path(*path)
    x = _data(rng, shape, dtype)
    C = shape[1]
    w, b, rm, rv = _params(rng, C, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    tol = OUT_TOL[np.dtype(dtype)]

    rm_c, rv_c = rm.copy(), rv.copy()
    y_c, mean_c, invstd_c = fastbn.batch_norm_forward(x, rm_c, rv_c, w, b, training=True, momentum=0.3)
    rm_g, rv_g = _g(rm), _g(rv)
    y_g, mean_g, invstd_g = fastbn.batch_norm_forward(_g(x), rm_g, rv_g, _g(w), _g(b), training=True, momentum=0.3)
    assert y_g.dtype == dtype and y_g.shape == shape
    _close(y_g, y_c, tol, "output")
    _close(mean_g, mean_c, STAT_RTOL, "mean")
    _close(invstd_g, invstd_c, 1e-10, "invstd")
    _close(rm_g, rm_c, tol, "running_mean")
    _close(rv_g, rv_c, tol, "running_var")

    dx_c, gw_c, gb_c = fastbn.batch_norm_backward(dy, x, w, mean_c, invstd_c, training=True)
    dx_g, gw_g, gb_g = fastbn.batch_norm_backward(_g(dy), _g(x), _g(w), mean_g, invstd_g, training=True)
    _close(dx_g, dx_c, tol * 10, "grad_input")
    _close(gw_g, gw_c, tol, "grad_weight")
    _close(gb_g, gb_c, tol, "grad_bias")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("path", [("auto", 0), ("units", 97), ("columns", 97)], ids=["auto", "units-97", "columns-97"])
def test_eval_forward_and_backward_match_cpu(gpu_path, rng, path, shape, dtype):
    gpu_path(*path)
    x = _data(rng, shape, dtype)
    w, b, rm, rv = _params(rng, shape[1], dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    tol = OUT_TOL[np.dtype(dtype)]

    y_c, mean_c, invstd_c = fastbn.batch_norm_forward(x, rm, rv, w, b, training=False)
    y_g, mean_g, invstd_g = fastbn.batch_norm_forward(_g(x), _g(rm), _g(rv), _g(w), _g(b), training=False)
    _close(y_g, y_c, tol, "eval output")
    _close(invstd_g, invstd_c, 1e-14, "invstd")

    dx_c, gw_c, gb_c = fastbn.batch_norm_backward(dy, x, w, mean_c, invstd_c, training=False)
    dx_g, gw_g, gb_g = fastbn.batch_norm_backward(_g(dy), _g(x), _g(w), mean_g, invstd_g, training=False)
    _close(dx_g, dx_c, tol, "eval grad_input")
    _close(gw_g, gw_c, tol, "eval grad_weight")
    _close(gb_g, gb_c, tol, "eval grad_bias")


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_eval_backward_does_not_read_the_input_or_the_mean(gpu_path, rng, path):
    """dx = dy * weight * invstd with fixed statistics: a NaN or inf in x, or a NaN running mean,
    must not reach dx (x * 0 is NaN), as on the CPU and in PyTorch."""
    gpu_path(*path)
    x = _data(rng, (6, 3, 20, 20), np.float32)
    x[1, 0, 2, 3], x[4, 0, 0, 0] = np.nan, np.inf
    w, b, rm, rv = _params(rng, 3, np.float32)
    rm[1] = np.nan
    dy = rng.standard_normal(x.shape).astype(np.float32)
    _, mean, invstd = fastbn.batch_norm_forward(x, rm, rv, w, b, training=False)
    dx_c = fastbn.batch_norm_backward(dy, x, w, mean, invstd, training=False)[0]
    dx_g = fastbn.batch_norm_backward(_g(dy), _g(x), _g(w), _g(mean), _g(invstd), training=False)[0]
    assert np.isfinite(dx_c).all()
    _close(dx_g, dx_c, OUT_TOL[np.dtype(np.float32)], "eval grad_input")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_auto_plan_on_realistic_shapes(rng, dtype):
    """The shapes of the benchmark, smaller batch: whatever split the GPU's size picks."""
    for shape in [(8, 64, 56, 56), (32, 256, 14, 14), (256, 1024), (4, 3, 224, 224)]:
        x = _data(rng, shape, dtype)
        w, b, _, _ = _params(rng, shape[1], dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        tol = OUT_TOL[np.dtype(dtype)]
        y_c, m_c, i_c = fastbn.batch_norm_forward(x, None, None, w, b, training=True)
        y_g, m_g, i_g = fastbn.batch_norm_forward(_g(x), None, None, _g(w), _g(b), training=True)
        _close(y_g, y_c, tol, f"{shape} output")
        _close(m_g, m_c, STAT_RTOL, f"{shape} mean")
        dx_c, gw_c, gb_c = fastbn.batch_norm_backward(dy, x, w, m_c, i_c)
        dx_g, gw_g, gb_g = fastbn.batch_norm_backward(_g(dy), _g(x), _g(w), m_g, i_g)
        _close(dx_g, dx_c, tol * 10, f"{shape} grad_input")
        _close(gw_g, gw_c, tol, f"{shape} grad_weight")
        _close(gb_g, gb_c, tol, f"{shape} grad_bias")


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_in_place_and_out(gpu_path, rng, path):
    gpu_path(*path)
    for shape in [(4, 3, 50, 7), (300, 5)]:
        x = _data(rng, shape, np.float32)
        w, b, _, _ = _params(rng, shape[1], np.float32)
        y_c = fastbn.batch_norm(x, None, None, w, b, training=True)
        xg = _g(x)
        res = fastbn.batch_norm(xg, None, None, _g(w), _g(b), training=True, out=xg)
        assert res is xg
        _close(xg, y_c, 1e-5, "in place")
        out = cp.empty_like(xg)
        res = fastbn.batch_norm(_g(x), None, None, _g(w), _g(b), training=True, out=out)
        assert res is out
        _close(out, y_c, 1e-5, "out=")
        # the backward's out=: a buffer, and grad_output itself
        dy = rng.standard_normal(shape).astype(np.float32)
        _, m_c, i_c = fastbn.batch_norm_forward(x, None, None, w, b, training=True)
        dx_c = fastbn.batch_norm_backward(dy, x, w, m_c, i_c)[0]
        res = fastbn.batch_norm_backward(_g(dy), _g(x), _g(w), _g(m_c), _g(i_c), out=out)[0]
        assert res is out
        _close(out, dx_c, 1e-4, "backward out=")
        dyg = _g(dy)
        res = fastbn.batch_norm_backward(dyg, _g(x), _g(w), _g(m_c), _g(i_c), out=dyg)[0]
        assert res is dyg
        _close(dyg, dx_c, 1e-4, "backward in place")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(4, 6, 5, 7), (3, 4, 9), (2, 3, 2, 3, 4)], ids=["4d", "3d", "5d"])
def test_channels_last_runs_in_place_and_keeps_its_layout(rng, shape, training):
    """A channels-last CuPy view (of a C-contiguous (N, *spatial, C) array) against the CPU result
    of the same values; the output and grad_input keep the layout."""
    nd = len(shape)
    to_last, back = (0, *range(2, nd), 1), (0, nd - 1, *range(1, nd - 1))
    x = np.ascontiguousarray(_data(rng, shape, np.float32).transpose(to_last))
    dy = np.ascontiguousarray(rng.standard_normal(shape).astype(np.float32).transpose(to_last))
    w, b, rm, rv = _params(rng, shape[1], np.float32)
    xc, dyc = x.transpose(back), dy.transpose(back)
    y_c, mean_c, invstd_c = fastbn.batch_norm_forward(xc, rm.copy(), rv.copy(), w, b, training=training)
    xg, dyg = _g(x).transpose(back), _g(dy).transpose(back)
    rm_g, rv_g = _g(rm), _g(rv)
    y_g, mean_g, invstd_g = fastbn.batch_norm_forward(xg, rm_g, rv_g, _g(w), _g(b), training=training)
    _close(y_g, y_c, 1e-5, "y")
    assert y_g.transpose(to_last).flags.c_contiguous, "the output keeps the channels-last layout"
    dx_c, gw_c, gb_c = fastbn.batch_norm_backward(dyc, xc, w, mean_c, invstd_c, training=training)
    dx_g, gw_g, gb_g = fastbn.batch_norm_backward(dyg, xg, _g(w), mean_g, invstd_g, training=training)
    _close(dx_g, dx_c, 1e-5, "dx")
    _close(gw_g, gw_c, 1e-5, "grad_weight")
    assert dx_g.transpose(to_last).flags.c_contiguous


def test_non_contiguous_and_strided_parameters(rng):
    x = _data(rng, (6, 10, 5, 4), np.float64)
    xt = np.swapaxes(x, 2, 3)                       # not C-contiguous
    w = rng.standard_normal(20)[::2]                # strided weight
    b = rng.standard_normal(10)
    y_c, m_c, i_c = fastbn.batch_norm_forward(xt, None, None, w, b, training=True)
    y_g, m_g, i_g = fastbn.batch_norm_forward(cp.swapaxes(_g(x), 2, 3), None, None, _g(np.ascontiguousarray(w))[:],
                                              _g(b), training=True)
    _close(y_g, y_c, 1e-12, "non-contiguous input")
    wg = cp.asarray(rng.standard_normal(20))
    wg[::2] = _g(w)
    y_g2 = fastbn.batch_norm(cp.swapaxes(_g(x), 2, 3), None, None, wg[::2], _g(b), training=True)
    _close(y_g2, y_c, 1e-12, "strided weight")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_large_mean_keeps_precision(rng, dtype):
    """Mean 1e4, std 1: the hi/lo mean split keeps the output accurate in float32 too."""
    x = (1e4 + rng.standard_normal((16, 2, 4096))).astype(dtype)
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=(0, 2), keepdims=True)
    ref = (x64 - mean) / np.sqrt(((x64 - mean) ** 2).mean(axis=(0, 2), keepdims=True) + 1e-5)
    for path in ("channels", "units"):
        saved = dict(_cupy_backend.tuning)
        _cupy_backend.tuning.update(path=path, unit=1000)
        try:
            y = fastbn.batch_norm(_g(x), None, None, training=True)
        finally:
            _cupy_backend.tuning.update(saved)
        _close(y, ref, 1e-4 if dtype == np.float32 else 1e-9, f"{path} large mean")


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (8, 3, 64, 64), (300, 64)], ids=["rows-of-20", "rows-of-4096", "columns"])
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_float64_variance_keeps_full_precision_far_from_zero(gpu_path, rng, path, shape):
    """mean / std = 1e8: the moments are shifted by a value of the channel, so the merged means
    carry no rounding of the mean's magnitude and the variance keeps double precision."""
    gpu_path(*path)
    x = rng.standard_normal(shape) + 1e8
    _, _, invstd = fastbn.batch_norm_forward(_g(x), None, None, training=True, eps=1e-300)
    axes = (0,) + tuple(range(2, x.ndim))
    xl = x.astype(np.longdouble)
    var = ((xl - xl.mean(axis=axes, keepdims=True)) ** 2).mean(axis=axes).astype(np.float64)
    np.testing.assert_allclose(1.0 / invstd.get() ** 2, var, rtol=1e-13)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_float64_spread_beyond_1e154_gives_the_cpu_result(gpu_path, path):
    """var = inf gives invstd = 0 and outputs 0 (CPU and PyTorch); the first merge into an empty
    accumulator used to compute d * d * 0 = inf * 0 = NaN."""
    gpu_path(*path)
    x = np.array([[0.0], [1e155]])
    y_c, _, invstd_c = fastbn.batch_norm_forward(x, None, None, training=True)
    y_g, _, invstd_g = fastbn.batch_norm_forward(_g(x), None, None, training=True)
    np.testing.assert_array_equal(invstd_g.get(), invstd_c)
    np.testing.assert_array_equal(y_g.get(), y_c)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_out_sharing_memory_with_the_parameters_is_still_right(gpu_path, rng, path):
    """The channels kernels read weight, bias (and the saved statistics) while other blocks write
    the output: a weight that lives inside out's buffer must be read before it is overwritten."""
    gpu_path(*path)
    x = _data(rng, (4, 3, 5), np.float64)
    dy = rng.standard_normal(x.shape)
    w, b = np.array([1.5, 1.2, 1.8]), np.array([0.1, 0.2, 0.3])
    y_c, mean_c, invstd_c = fastbn.batch_norm_forward(x, None, None, w, b, training=True)
    dx_c = fastbn.batch_norm_backward(dy, x, w, mean_c, invstd_c)[0]
    buf = cp.zeros(60)
    out = buf.reshape(x.shape)
    wg, bg = buf[5:8], buf[20:23]
    wg[...], bg[...] = _g(w), _g(b)
    _close(fastbn.batch_norm(_g(x), None, None, wg, bg, training=True, out=out), y_c, 1e-12, "forward")
    buf[...] = 0
    wg[...] = _g(w)
    mean_g, invstd_g = buf[40:43], buf[50:53]
    mean_g[...], invstd_g[...] = _g(mean_c), _g(invstd_c)
    _close(fastbn.batch_norm_backward(_g(dy), _g(x), wg, mean_g, invstd_g, out=out)[0], dx_c, 1e-12, "backward")


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_infinite_running_mean_gives_infinite_outputs_in_eval(gpu_path, path):
    """x - inf is -inf (CPU and PyTorch); splitting an infinite mean into high and low parts gave NaN."""
    gpu_path(*path)
    x = np.ones((6, 4, 3), np.float32)
    rm, rv = np.array([np.inf, -np.inf, 1e39, 0.0]), np.ones(4)
    y = fastbn.batch_norm(_g(x), _g(rm), _g(rv), training=False).get()
    np.testing.assert_array_equal(y, fastbn.batch_norm(x, rm, rv, training=False))
    assert np.isinf(y[:, :3]).all()


def test_results_are_deterministic(rng, gpu_path):
    for path in PATHS:
        gpu_path(*path)
        x = _g(_data(rng, (32, 4, 33, 33), np.float32))
        dy = _g(rng.standard_normal((32, 4, 33, 33)).astype(np.float32))
        a = fastbn.batch_norm_forward(x, None, None, training=True)
        b = fastbn.batch_norm_forward(x, None, None, training=True)
        for u, v in zip(a, b):
            assert bool((u == v).all()), path
        ga = fastbn.batch_norm_backward(dy, x, None, a[1], a[2])
        gb = fastbn.batch_norm_backward(dy, x, None, a[1], a[2])
        for u, v in zip(ga, gb):
            assert bool((u == v).all()), path


def test_empty_inputs():
    x = cp.zeros((0, 3, 4), dtype=cp.float32)
    rm, rv = cp.zeros(3, cp.float32), cp.ones(3, cp.float32)
    y = fastbn.batch_norm(x, rm, rv, training=True)
    assert y.shape == (0, 3, 4)
    assert bool((rm == 0).all()) and bool((rv == 1).all())
    y = fastbn.batch_norm(x, rm, rv, training=False)
    assert y.shape == (0, 3, 4)
    x = cp.zeros((4, 0, 5), dtype=cp.float64)
    assert fastbn.batch_norm(x, None, None, training=True).shape == (4, 0, 5)
    dx, gw, gb = fastbn.batch_norm_backward(x, x, None, cp.zeros(0), cp.zeros(0))
    assert dx.shape == (4, 0, 5) and gw.shape == (0,)


def test_nan_propagates(rng):
    x = _data(rng, (4, 3, 10), np.float32)
    x[1, 1, 3] = np.nan
    y = fastbn.batch_norm(_g(x), None, None, training=True).get()
    assert np.isnan(y[:, 1]).all()
    assert np.isfinite(y[:, [0, 2]]).all()


# ---------------------------------------------------------------------------------- relu, float16
def _relu_reference(x, w, b, dy, gate, mean=None, invstd=None):
    """float64 relu(batch_norm(x)) and its gradients (dx, dw, db): from the batch statistics of x
    where mean is None (training), else from (mean, invstd) (evaluation).  ``gate`` is where the
    gradient stops (the GPU's own output <= 0: a float64 mask would flip where z is within
    rounding of 0)."""
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    training = mean is None
    if training:
        mean = x64.mean(axis=(0, 2))
        invstd = 1 / np.sqrt(x64.var(axis=(0, 2)) + 1e-5)
    n = x.shape[0] * x.shape[2]
    col = (1, -1, 1)
    xhat = (x64 - mean.reshape(col)) * invstd.reshape(col)
    y = np.maximum(xhat * w.reshape(col) + b.reshape(col), 0)
    g = np.where(gate, 0.0, dy64)
    db, dw = g.sum(axis=(0, 2)), (g * xhat).sum(axis=(0, 2))
    k = (w.astype(np.float64) * invstd).reshape(col)
    if training:
        dx = k * (g - db.reshape(col) / n - xhat * dw.reshape(col) / n)
    else:
        dx = k * g
    return y, dx, dw, db, mean, invstd


RELU_DTYPES = [np.float32, np.float64, np.float16]
RELU_TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12, np.dtype(np.float16): 4e-3}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", RELU_DTYPES, ids=["f32", "f64", "f16"])
@pytest.mark.parametrize("shape", [(6, 5, 40), (300, 40, 1)], ids=["6x5x40", "300x40"])
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_relu_forward_and_backward(gpu_path, rng, path, shape, dtype, training):
    """The backend's fused relu: forward (relu=True) and backward (bias= and output=, which must
    agree bit for bit) against a float64 reference; float16 with float32 weight and bias."""
    gpu_path(*path)
    be = _cupy_backend
    C = shape[1]
    pdt = np.float32 if dtype == np.float16 else dtype
    x = (rng.standard_normal(shape) * 2 + 0.2 * np.arange(C).reshape(1, -1, 1)).astype(dtype)
    w, b, rm, rv = (a.astype(pdt) for a in _params(rng, C, np.float64))
    dy = rng.standard_normal(shape).astype(dtype)
    y = cp.empty(shape, dtype=dtype)
    if training:
        mean, _, invstd = be.forward_train(_g(x), y, _g(w), _g(b), 1e-5, relu=True)
    else:
        mean, invstd = be.forward_eval_running(_g(x), y, _g(w), _g(b), _g(rm), _g(rv), 1e-5, relu=True)
    assert y.dtype == dtype and mean.dtype == np.float64
    yh = y.get()
    ref = _relu_reference(x, w, b, dy, yh <= 0, *(() if training else (mean.get(), invstd.get())))
    tol = RELU_TOL[np.dtype(dtype)]
    assert (yh >= 0).all() and (yh == 0).any()
    _close(y, ref[0], tol, "relu output")
    _close(mean, ref[4], 1e-12, "mean")
    grads = []
    for act in ({"bias": _g(b)}, {"output": y}):
        dx = cp.empty(shape, dtype=dtype)
        gw, gb = be.backward(_g(dy), _g(x), dx, _g(w), mean, invstd, training, **act)
        assert dx.dtype == dtype and gw.dtype == np.float64
        _close(dx, ref[1], tol * 10, f"grad_input {list(act)}")
        _close(gw, ref[2], tol, f"grad_weight {list(act)}")
        _close(gb, ref[3], tol, f"grad_bias {list(act)}")
        grads.append([a.get() for a in (dx, gw, gb)])
    for a, o in zip(*grads):
        assert np.array_equal(a.view(np.uint8), o.view(np.uint8)), "bias= and output= disagree"
    dx0 = cp.empty(shape, dtype=dtype)
    gw0, _ = be.backward(_g(dy), _g(x), dx0, _g(w), mean, invstd, training)
    assert not np.array_equal(gw0.get(), grads[0][1]), "the activation's gate changed nothing"


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_float16_forward_within_an_ulp(gpu_path, rng, path):
    """float16 elements, float32 weight and bias: the output within one float16 ulp of the float64
    result from the upcast input (or float32's own rounding of a nearly cancelling bias)."""
    gpu_path(*path)
    shape = (16, 3, 50) if path[0] != "columns" else (800, 3, 1)
    x = (rng.standard_normal(shape) * 3 + 100).astype(np.float16)
    w, b = rng.uniform(0.5, 2, 3).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    y = cp.empty(shape, dtype=np.float16)
    mean, var, _ = _cupy_backend.forward_train(_g(x), y, _g(w), _g(b), 1e-5)
    x64 = x.astype(np.float64)
    m, v = x64.mean(axis=(0, 2)), x64.var(axis=(0, 2))
    z = (x64 - m.reshape(1, -1, 1)) / np.sqrt(v.reshape(1, -1, 1) + 1e-5) * w.reshape(1, -1, 1) + b.reshape(1, -1, 1)
    ulp = np.maximum(np.spacing(np.abs(z).astype(np.float16)).astype(np.float64),
                     2.0**-22 * (np.abs(z) + np.abs(b).reshape(1, -1, 1)))
    assert (np.abs(y.get().astype(np.float64) - z) <= ulp).all()
    np.testing.assert_allclose(mean.get(), m, rtol=1e-12)
    np.testing.assert_allclose(var.get(), v, rtol=1e-9)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_public_api_relu_and_float16_match_cpu(rng, training):
    """The public functions route activation="relu" and float16 CuPy arrays to the CUDA kernels (float16
    in place, float32 parameters), as the CPU backend does: the same results to rounding."""
    shape, C = (6, 5, 9, 7), 5
    x = (rng.standard_normal(shape) * 2 + 0.3).astype(np.float16)
    dy = rng.standard_normal(shape).astype(np.float16)
    w, b = rng.uniform(0.5, 2, C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    want = fastbn.batch_norm_forward(x, rm.copy(), rv.copy(), w, b, training, activation="relu")
    grm, grv = cp.asarray(rm), cp.asarray(rv)
    got = fastbn.batch_norm_forward(cp.asarray(x), grm, grv, cp.asarray(w), cp.asarray(b), training,
                                    activation="relu")
    assert got[0].dtype == np.float16
    np.testing.assert_allclose(got[0].get().astype(np.float32), want[0].astype(np.float32), rtol=2e-3, atol=2e-3)
    dx_want = fastbn.batch_norm_backward(dy, x, w, want[1], want[2], training, activation="relu", bias=b)
    dx_got = fastbn.batch_norm_backward(cp.asarray(dy), cp.asarray(x), cp.asarray(w), got[1], got[2], training,
                                        activation="relu", bias=cp.asarray(b))
    assert dx_got[0].dtype == np.float16 and dx_got[1].dtype == np.float32
    np.testing.assert_allclose(dx_got[0].get().astype(np.float32), dx_want[0].astype(np.float32), rtol=5e-3,
                               atol=5e-3)
    np.testing.assert_allclose(dx_got[1].get(), dx_want[1], rtol=1e-3, atol=1e-3)


def test_mixing_numpy_parameters_with_cupy_input_raises(rng):
    x = _g(_data(rng, (4, 3, 5), np.float32))
    with pytest.raises(TypeError, match="cupy"):
        fastbn.batch_norm(x, None, None, np.ones(3, np.float32), training=True)
    with pytest.raises(TypeError):
        fastbn.batch_norm_backward(np.ones((4, 3, 5), np.float32), x, None, cp.zeros(3), cp.ones(3))


@pytest.mark.skipif(os.environ.get("FASTBN_GPU_BIG") != "1", reason="set FASTBN_GPU_BIG=1 (needs ~20 GB of GPU memory)")
def test_more_than_2_31_elements():
    """64-bit indexing: one channel of 2**30 + 7 float32 elements per sample, 2 channels."""
    S = 2**30 + 7
    x = cp.empty((1, 2, S), dtype=cp.float32)
    ramp = (cp.arange(S, dtype=cp.int64) % 8).astype(cp.float32)
    x[0, 0] = ramp
    x[0, 1] = -2 * ramp
    del ramp
    mean_ref, var_ref = np.empty(2), np.empty(2)
    base = np.arange(8, dtype=np.float64)
    counts = np.full(8, S // 8, dtype=np.float64)
    counts[: S % 8] += 1
    for c, k in ((0, 1.0), (1, -2.0)):
        vals = k * base
        mean_ref[c] = (counts * vals).sum() / S
        var_ref[c] = (counts * (vals - mean_ref[c]) ** 2).sum() / S
    for path in ("channels", "units"):
        saved = dict(_cupy_backend.tuning)
        _cupy_backend.tuning.update(path=path, unit=0)
        try:
            y, mean, invstd = fastbn.batch_norm_forward(x, None, None, training=True)
        finally:
            _cupy_backend.tuning.update(saved)
        np.testing.assert_allclose(mean.get(), mean_ref, rtol=1e-12)
        np.testing.assert_allclose(invstd.get(), 1 / np.sqrt(var_ref + 1e-5), rtol=1e-10)
        tail = y[0, :, S - 16:].get().astype(np.float64)
        idx = np.arange(S - 16, S) % 8
        for c, k in ((0, 1.0), (1, -2.0)):
            np.testing.assert_allclose(tail[c], (k * idx - mean_ref[c]) / np.sqrt(var_ref[c] + 1e-5), atol=1e-5)
        del y


# ---------------------------------------------------------------------------------- group, layer and instance norm
# (fastbn._backends.cuda_norms: the batch-norm kernels on views of the input; their paths forced as above)
NORM_PATHS = [("auto", 0), ("units", 97), ("columns", 97)]
NORM_IDS = ["auto", "units-97", "columns-97"]


def _outputs_close(gpu, cpu, tols, what):
    for name, g, c, tol in zip(("output", "grad_weight" if len(cpu) == 3 else "mean", "grad_bias" if len(cpu) == 3
                                else "invstd"), gpu, cpu, tols):
        _close(g, c, tol, f"{what} {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape,G", [((4, 6, 5, 7), 3), ((3, 8, 33), 8), ((16, 6), 2), ((2, 4, 1, 1), 1)],
                         ids=["4d-G3", "3d-G8", "2d-G2", "spatial-1"])
@pytest.mark.parametrize("path", NORM_PATHS, ids=NORM_IDS)
def test_group_norm_matches_cpu(gpu_path, rng, path, shape, G, dtype):
    gpu_path(*path)
    tol = OUT_TOL[np.dtype(dtype)]
    x, dy = _data(rng, shape, dtype, offset=30.0), rng.standard_normal(shape).astype(dtype)
    w, b, _, _ = _params(rng, shape[1], dtype)
    fwd_c = fastbn.group_norm_forward(x, G, w, b)
    fwd_g = fastbn.group_norm_forward(_g(x), G, _g(w), _g(b))
    _outputs_close(fwd_g, fwd_c, (tol, STAT_RTOL * 100, 1e-10), "forward")
    bwd_c = fastbn.group_norm_backward(dy, x, G, w, fwd_c[1], fwd_c[2])
    bwd_g = fastbn.group_norm_backward(_g(dy), _g(x), G, _g(w), fwd_g[1], fwd_g[2])
    _outputs_close(bwd_g, bwd_c, (tol * 10, tol * 10, tol * 10), "backward")
    xg = _g(x)  # in place, as the CPU allows
    assert fastbn.group_norm(xg, G, _g(w), _g(b), out=xg) is xg
    _close(xg, fwd_c[0], tol, "in place")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape,ns", [((4, 6, 40), (40,)), ((3, 5, 4, 6), (4, 6)), ((7, 1), (1,))],
                         ids=["last-dim", "last-two", "one-feature"])
@pytest.mark.parametrize("path", NORM_PATHS, ids=NORM_IDS)
def test_layer_norm_matches_cpu(gpu_path, rng, path, shape, ns, dtype):
    gpu_path(*path)
    tol = OUT_TOL[np.dtype(dtype)]
    x, dy = _data(rng, shape, dtype, offset=-40.0), rng.standard_normal(shape).astype(dtype)
    w, b = _params(rng, int(np.prod(ns)), dtype)[:2]
    w, b = w.reshape(ns), b.reshape(ns)
    fwd_c = fastbn.layer_norm_forward(x, ns, w, b)
    fwd_g = fastbn.layer_norm_forward(_g(x), ns, _g(w), _g(b))
    _outputs_close(fwd_g, fwd_c, (tol, STAT_RTOL * 100, 1e-10), "forward")
    bwd_c = fastbn.layer_norm_backward(dy, x, ns, w, fwd_c[1], fwd_c[2])
    gd, xg = _g(dy), _g(x)
    bwd_g = fastbn.layer_norm_backward(gd, xg, ns, _g(w), fwd_g[1], fwd_g[2], out=gd)  # in place over dy
    assert bwd_g[0] is gd
    _outputs_close(bwd_g, bwd_c, (tol * 10, tol * 10, tol * 10), "backward")
    assert fastbn.layer_norm(xg, ns, _g(w), _g(b), out=xg) is xg
    _close(xg, fwd_c[0], tol, "in place")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("path", NORM_PATHS, ids=NORM_IDS)
def test_instance_norm_matches_cpu(gpu_path, rng, path, dtype):
    gpu_path(*path)
    tol = OUT_TOL[np.dtype(dtype)]
    shape = (3, 5, 6, 7)
    x, dy = _data(rng, shape, dtype), rng.standard_normal(shape).astype(dtype)
    w, b, rm, rv = _params(rng, 5, dtype)
    rm_g, rv_g = _g(rm), _g(rv)
    fwd_c = fastbn.instance_norm_forward(x, rm, rv, w, b, momentum=0.3)
    fwd_g = fastbn.instance_norm_forward(_g(x), rm_g, rv_g, _g(w), _g(b), momentum=0.3)
    _outputs_close(fwd_g, fwd_c, (tol, STAT_RTOL * 100, 1e-10), "training forward")
    _close(rm_g, rm, tol, "running_mean")
    _close(rv_g, rv, tol, "running_var")
    bwd_c = fastbn.instance_norm_backward(dy, x, w, fwd_c[1], fwd_c[2])
    bwd_g = fastbn.instance_norm_backward(_g(dy), _g(x), _g(w), fwd_g[1], fwd_g[2])
    _outputs_close(bwd_g, bwd_c, (tol * 10, tol * 10, tol * 10), "backward")
    # on the running statistics (eval): dx = dy * weight * invstd
    fwd_c = fastbn.instance_norm_forward(x, rm, rv, w, b, use_input_stats=False)
    fwd_g = fastbn.instance_norm_forward(_g(x), rm_g, rv_g, _g(w), _g(b), use_input_stats=False)
    _outputs_close(fwd_g, fwd_c, (tol, STAT_RTOL, 1e-10), "eval forward")
    bwd_c = fastbn.instance_norm_backward(dy, x, w, fwd_c[1], fwd_c[2], use_input_stats=False)
    bwd_g = fastbn.instance_norm_backward(_g(dy), _g(x), _g(w), fwd_g[1], fwd_g[2], use_input_stats=False)
    _outputs_close(bwd_g, bwd_c, (tol * 10, tol * 10, tol * 10), "eval backward")


def test_norms_float16_and_eps0_constant_instances_match_cpu(rng):
    x = _data(rng, (2, 4, 6, 5), np.float16)
    for call in (lambda a: fastbn.group_norm(a, 2), lambda a: fastbn.layer_norm(a, (6, 5)),
                 lambda a: fastbn.instance_norm(a)):
        y_c, y_g = call(x), call(_g(x))
        assert y_g.dtype == y_c.dtype == np.float16
        _close(y_g, y_c, 1e-3, "float16")
    x = _data(rng, (2, 3, 4, 4), np.float32)
    x[1, 2] = 7.0  # a constant instance with eps=0: invstd 0 and the output the bias, as PyTorch's
    w, b = _params(rng, 3, np.float32)[:2]
    y_c, m_c, s_c = fastbn.instance_norm_forward(x, None, None, w, b, eps=0.0)
    y_g, m_g, s_g = fastbn.instance_norm_forward(_g(x), None, None, _g(w), _g(b), eps=0.0)
    _close(y_g, y_c, 1e-5, "eps=0 output")
    _close(s_g, s_c, 1e-10, "eps=0 invstd")
    assert float(s_g[1, 2]) == 0.0


def test_norms_mixing_numpy_and_cupy_raises(rng):
    x = _g(_data(rng, (4, 6, 5), np.float32))
    with pytest.raises(TypeError, match="cupy array"):
        fastbn.group_norm(x, 2, np.ones(6, np.float32))
    with pytest.raises(TypeError, match="grad_output"):
        fastbn.layer_norm_backward(np.ones((4, 6, 5), np.float32), x, 5, None, cp.zeros((4, 6)), cp.ones((4, 6)))
    if cp.cuda.runtime.getDeviceCount() < 2:
        return
    with cp.cuda.Device(1):  # an array of the other GPU: refused before any kernel runs, with its name
        w1, x1, o1 = cp.ones(6, cp.float32), cp.asarray(x.get()), cp.empty(x.shape, cp.float32)
    for call, name in ((lambda: fastbn.group_norm(x, 2, w1), "weight"),
                       (lambda: fastbn.layer_norm(x, 5, out=o1), "out"),
                       (lambda: fastbn.instance_norm(x, cp.zeros(6, cp.float32), w1), "running_mean|running_var"),
                       (lambda: fastbn.group_norm_backward(x1, x, 2, None, cp.zeros((4, 2)), cp.ones((4, 2))),
                        "grad_output")):
        with pytest.raises(ValueError, match=f"({name}) is on CUDA device 1 but the input is on device 0"):
            call()
    with cp.cuda.Device(1):  # called from its own device, the same input normalizes there
        y = fastbn.group_norm(x1, 2, w1)
        assert y.device.id == 1
    _close(y, fastbn.group_norm(x.get(), 2), 1e-5, "on device 1")


NORM_LAYERS = [(lambda **k: fastbn.GroupNorm(3, 6, **k), (4, 6, 5, 5)),
               (lambda **k: fastbn.LayerNorm((5, 5), **k), (4, 6, 5, 5)),
               (lambda **k: fastbn.InstanceNorm2d(6, affine=True, track_running_stats=True, **k), (4, 6, 5, 5)),
               (lambda **k: fastbn.InstanceNorm1d(6, **k), (6, 9))]


@pytest.mark.parametrize("make,shape", NORM_LAYERS,
                         ids=["GroupNorm", "LayerNorm", "InstanceNorm2d", "InstanceNorm1d-unbatched"])
def test_norm_layer_on_cuda_matches_cpu_layer(rng, make, shape):
    cpu, gpu = make(), make(device="cuda")
    assert gpu.device == "cuda" and all(isinstance(p, cp.ndarray) for p in gpu.parameters())
    for p in cpu.parameters():
        p[...] = rng.uniform(0.5, 2.0, p.shape)
    gpu.load_state_dict(cpu.state_dict())
    for step in range(2):
        x, dy = _data(rng, shape, np.float32), rng.standard_normal(shape).astype(np.float32)
        _close(gpu(_g(x)), cpu(x), 1e-5, f"forward step {step}")
        _close(gpu.backward(_g(dy)), cpu.backward(dy), 1e-4, f"grad_input step {step}")
        for (_, g), (_, c) in zip(gpu.params_and_grads(), cpu.params_and_grads()):
            _close(g, c, 1e-4, "parameter gradient")
    for k, v in gpu.state_dict().items():
        assert isinstance(v, np.ndarray), k
        np.testing.assert_allclose(v, cpu.state_dict()[k], rtol=1e-5, atol=1e-6, err_msg=k)
    gpu.eval()
    cpu.eval()
    x = _data(rng, shape, np.float32)
    _close(gpu(_g(x)), cpu(x), 1e-5, "eval")
    with pytest.raises(TypeError, match="NumPy"):
        gpu(x)
    gpu.to("cpu")
    np.testing.assert_allclose(gpu(x), cpu(x), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------- layers
LAYERS = [(fastbn.BatchNorm1d, (64, 5)), (fastbn.BatchNorm1d, (8, 5, 30)), (fastbn.BatchNorm2d, (4, 5, 9, 7)),
          (fastbn.BatchNorm3d, (2, 5, 3, 4, 5))]


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("cls,shape", LAYERS, ids=["1d-NC", "1d-NCL", "2d", "3d"])
def test_layer_on_cuda_matches_cpu_layer(rng, cls, shape, momentum):
    C = shape[1]
    cpu = cls(C, momentum=momentum)
    gpu = cls(C, momentum=momentum, device="cuda")
    assert gpu.device == "cuda"
    assert isinstance(gpu.weight, cp.ndarray) and isinstance(gpu.running_var, cp.ndarray)
    w, b, _, _ = _params(rng, C, np.float32)
    cpu.weight[...] = w
    cpu.bias[...] = b
    gpu.load_state_dict(cpu.state_dict())
    for step in range(3):
        x = _data(rng, shape, np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        _close(gpu(_g(x)), cpu(x), 1e-5, f"train step {step}")
        _close(gpu.backward(_g(dy)), cpu.backward(dy), 1e-4, f"grad_input step {step}")
        _close(gpu.grad_weight, cpu.grad_weight, 1e-5, "grad_weight")
        _close(gpu.grad_bias, cpu.grad_bias, 1e-5, "grad_bias")
    _close(gpu.running_mean, cpu.running_mean, 1e-5, "running_mean")
    _close(gpu.running_var, cpu.running_var, 1e-5, "running_var")
    assert gpu.num_batches_tracked == cpu.num_batches_tracked == 3
    gpu.eval()
    cpu.eval()
    x = _data(rng, shape, np.float32)
    _close(gpu(_g(x)), cpu(x), 1e-5, "eval")


def test_layer_state_dict_and_moves(rng):
    x = _data(rng, (3, 4, 5, 5), np.float32)
    ref = fastbn.BatchNorm2d(4)  # the same three training steps on the CPU
    bn = fastbn.BatchNorm2d(4, device="cuda")
    y_gpu = bn(_g(x))
    _close(y_gpu, ref(x), 1e-5, "step 1 on cuda")
    state = bn.state_dict()
    assert set(state) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    for k, v in state.items():
        assert isinstance(v, np.ndarray), (k, type(v))
    assert state["num_batches_tracked"] == 1
    _close(_g(state["running_mean"]), ref.running_mean, 1e-6, "state_dict running_mean")

    bn.to("cpu")
    assert bn.device == "cpu" and isinstance(bn.running_mean, np.ndarray) and isinstance(bn.weight, np.ndarray)
    np.testing.assert_array_equal(bn.running_mean, state["running_mean"])
    y_cpu = bn(x)
    np.testing.assert_allclose(y_cpu, ref(x), atol=1e-5)
    bn.to("cuda")
    assert bn.device == "cuda" and isinstance(bn.running_mean, cp.ndarray) and isinstance(bn.bias, cp.ndarray)
    _close(bn(_g(x)), ref(x), 1e-5, "step 3 back on cuda")
    _close(bn.running_mean, ref.running_mean, 1e-5, "running_mean after moves")
    _close(bn.running_var, ref.running_var, 1e-5, "running_var after moves")
    assert bn.num_batches_tracked == ref.num_batches_tracked == 3

    bn0 = fastbn.BatchNorm2d(4, device="cuda:0")
    bn0.load_state_dict(bn.state_dict())
    np.testing.assert_array_equal(bn0.running_var.get(), bn.running_var.get())
    bn0.load_state_dict({k: cp.asarray(v) if k != "num_batches_tracked" else v for k, v in ref.state_dict().items()})
    np.testing.assert_array_equal(bn0.running_mean.get(), ref.running_mean)


def test_layer_device_mismatch_raises(rng):
    x = _data(rng, (3, 4, 5, 5), np.float32)
    cpu = fastbn.BatchNorm2d(4)
    with pytest.raises(TypeError, match="CuPy"):
        cpu(_g(x))
    gpu = fastbn.BatchNorm2d(4, device="cuda")
    with pytest.raises(TypeError, match="NumPy"):
        gpu(x)
    gpu(_g(x))
    with pytest.raises(TypeError, match=r"grad_output must be a CuPy \(GPU\) array like the forward's input, got numpy"):
        gpu.backward(rng.standard_normal(x.shape).astype(np.float32))


def test_device_module_and_status():
    dev = _cupy_backend.device_module(None)
    assert dev.xp is cp
    a = dev.to_device(np.arange(3.0))
    assert isinstance(a, cp.ndarray) and a.device.id == dev.index
    np.testing.assert_array_equal(a.get(), np.arange(3.0))
    count = cp.cuda.runtime.getDeviceCount()
    with pytest.raises(ValueError, match="does not exist"):
        _cupy_backend.device_module(count)
    with pytest.raises(ValueError):
        fastbn.BatchNorm2d(2, device=f"cuda:{count}")
    s = _cupy_backend.status()
    assert s.startswith("available: ") and "CuPy" in s, s
    assert _cupy_backend.available()
    assert _cupy_backend.is_array(a) and not _cupy_backend.is_array(np.zeros(2))


@pytest.mark.skipif(_SKIP is None and cp.cuda.runtime.getDeviceCount() < 2, reason="needs 2 GPUs")
def test_second_gpu(rng):
    x = _data(rng, (4, 3, 6, 6), np.float32)
    ref = fastbn.BatchNorm2d(3)(x)
    bn = fastbn.BatchNorm2d(3, device="cuda:1")
    assert bn.weight.device.id == 1, "parameters of a cuda:1 layer must live on GPU 1"
    with cp.cuda.Device(1):
        y = bn(cp.asarray(x))
    assert y.device.id == 1
    _close(y, ref, 1e-5, "cuda:1")
    with cp.cuda.Device(1):
        x1 = cp.asarray(x)
    with pytest.raises(ValueError, match="device"):  # weight on GPU 0, input on GPU 1
        fastbn.batch_norm(x1, None, None, cp.ones(3, cp.float32), training=True)
    # running buffers on GPU 0, an in-place call on GPU 1: refused before the kernel overwrites x1
    before = x1.get()
    with pytest.raises(ValueError, match="running_mean is on CUDA device 0"):
        fastbn.batch_norm(x1, cp.zeros(3, cp.float32), cp.ones(3, cp.float32), training=True, out=x1)
    np.testing.assert_array_equal(x1.get(), before)


# ---------------------------------------------------------------------------------- PyTorch CUDA
def _torch_cuda():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(8, 16, 12, 12), (256, 40), (4, 3, 64, 64)], ids=["2d", "1d", "rgb"])
def test_matches_torch_cuda(rng, shape, training):
    torch = _torch_cuda()
    if torch is None:
        pytest.skip("torch with CUDA is not installed")
    C = shape[1]
    x = _data(rng, shape, np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    w, b, rm, rv = _params(rng, C, np.float32)

    tx = torch.tensor(x, device="cuda", requires_grad=True)
    tw = torch.tensor(w, device="cuda", requires_grad=True)
    tb = torch.tensor(b, device="cuda", requires_grad=True)
    trm, trv = torch.tensor(rm, device="cuda"), torch.tensor(rv, device="cuda")
    ty = torch.nn.functional.batch_norm(tx, trm, trv, tw, tb, training=training, momentum=0.2, eps=1e-5)
    ty.backward(torch.tensor(dy, device="cuda"))

    xg, rmg, rvg = _g(x), _g(rm), _g(rv)
    y, mean, invstd = fastbn.batch_norm_forward(xg, rmg, rvg, _g(w), _g(b), training=training, momentum=0.2)
    dx, gw, gb = fastbn.batch_norm_backward(_g(dy), xg, _g(w), mean, invstd, training=training)

    def t(a):
        return a.detach().cpu().numpy()

    # torch's CUDA kernels accumulate float32 statistics in float32: looser than against the CPU.
    _close(y, t(ty), 1e-4, "output")
    _close(rmg, t(trm), 1e-4, "running_mean")
    _close(rvg, t(trv), 1e-4, "running_var")
    _close(dx, t(tx.grad), 1e-3, "grad_input")
    _close(gw, t(tw.grad), 1e-3, "grad_weight")
    _close(gb, t(tb.grad), 1e-3, "grad_bias")
    # zero-copy interop works both ways
    y_from_torch = cp.from_dlpack(ty.detach())
    _close(y_from_torch, t(ty), 0, "dlpack")
