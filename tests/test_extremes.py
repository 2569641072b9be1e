"""Inputs at the edge of the element type's range: finite statistics must give finite outputs.

A float32 channel [3.4e38, -3.4e38, -3.4e38, -3.4e38] has a finite mean (-1.7e38) and invstd, but
x - mean overflows float32 at x = 3.4e38, although (x - mean) * invstd is 1.732: the kernels
normalize such a channel (|mean| past FBN_WIDE in fastbn/_coefs.h) with x and the mean halved.
"""
import numpy as np
import pytest

import fastbn
from fastbn import _kernels

BIG = np.float32(3.4e38)
PATHS = ("ranges", "columns", "slices")


def _extreme_input():
    """(4, 3, 1) float32: the extreme channel, one of ordinary values, and one with a large mean
    (1e35) whose x - mean does not overflow, side by side in the same rows."""
    x = np.empty((4, 3, 1), np.float32)
    x[:, 0, 0] = [BIG, -BIG, -BIG, -BIG]
    x[:, 1, 0] = [0.5, -1.0, 2.0, 0.25]
    x[:, 2, 0] = np.float32(1e35) * np.array([1.0, 1.5, 0.5, 1.25], np.float32)
    return x


def _reference(x, dy, w, b, eps):
    """float64 forward (training) and backward, written plainly; (y, dx, mean, invstd)."""
    x64, g64 = x.astype(np.float64), dy.astype(np.float64)
    mean = x64.mean(axis=(0, 2))
    invstd = 1.0 / np.sqrt(x64.var(axis=(0, 2)) + eps)
    xhat = (x64 - mean[:, None]) * invstd[:, None]
    y = xhat * w[:, None] + b[:, None]
    n = x.shape[0] * x.shape[2]
    gsum = g64.sum(axis=(0, 2))
    gxhat = (g64 * xhat).sum(axis=(0, 2))
    dx = (w * invstd)[:, None] * (g64 - gsum[:, None] / n - xhat * (gxhat / n)[:, None])
    return y, dx, mean, invstd


@pytest.mark.parametrize("path", PATHS)
def test_training_forward_and_backward_stay_finite(path):
    x = _extreme_input()
    C = x.shape[1]
    w = np.array([1.0, 2.0, -0.5], np.float32)
    b = np.array([0.0, 1.0, 3.0], np.float32)
    dy = np.array([[1.0, -2.0, 0.5, 3.0]] * C, np.float32).T[:, :, None].copy()
    # dx of the wide channels then of the order of 1 (with dy of 1, the float32 kx of the backward's
    # coefficients, about dy / std**2, would underflow)
    dy[:, 0] *= np.float32(1e38)
    dy[:, 2] *= np.float32(1e34)
    y_ref, dx_ref, mean_ref, invstd_ref = _reference(x, dy, w.astype(np.float64), b.astype(np.float64), 1e-5)
    assert np.isclose(y_ref[0, 0, 0], 1.7320508, rtol=1e-6)

    y = np.empty_like(x)
    mean, var, invstd = np.empty(C), np.empty(C), np.empty(C)
    p = _kernels.PATHS[path]
    _kernels.forward_train(x, y, w, b, 1e-5, mean, var, invstd, 1, p)
    assert np.isfinite(mean).all() and np.isfinite(invstd).all()
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-12)
    np.testing.assert_allclose(invstd, invstd_ref, rtol=1e-12)
    assert np.isfinite(y).all(), y[:, :, 0]
    np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-5)

    dx = np.empty_like(x)
    gw, gb = np.empty(C), np.empty(C)
    _kernels.backward(dy, x, dx, w, mean, invstd, True, gw, gb, 1, p)
    assert np.isfinite(dx).all(), dx[:, :, 0]
    for c in range(C):  # float32 coefficients of the extreme channel are subnormal: a few digits less
        np.testing.assert_allclose(dx[:, c], dx_ref[:, c], rtol=1e-4, atol=1e-4 * np.abs(dx_ref[:, c]).max(),
                                   err_msg=f"channel {c}")


@pytest.mark.parametrize("path", PATHS)
def test_eval_forward_with_a_wide_mean_stays_finite(path):
    x = _extreme_input()
    C = x.shape[1]
    w, b = np.ones(C, np.float32), np.zeros(C, np.float32)
    y_ref, _, mean, invstd = _reference(x, x, w.astype(np.float64), b.astype(np.float64), 1e-5)
    y = np.empty_like(x)
    _kernels.forward_eval(x, y, w, b, mean, invstd, 1, _kernels.PATHS[path])
    assert np.isfinite(y).all(), y[:, :, 0]
    np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("spatial", [1, 64])
def test_public_api_on_the_issue_channel(spatial):
    """The channel of the report, through fastbn.batch_norm (spatial 1: an (N, C) matrix; 64: a
    feature map on the RANGES path); y[0] is (x - mean) * invstd = sqrt(3)."""
    x = np.repeat(np.array([BIG, -BIG, -BIG, -BIG], np.float32).reshape(4, 1, 1), spatial, axis=2)
    rm, rv = np.zeros(1, np.float32), np.ones(1, np.float32)
    y = fastbn.batch_norm(x, rm, rv, training=True)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y[:, 0, 0], [np.sqrt(3), -1 / np.sqrt(3), -1 / np.sqrt(3), -1 / np.sqrt(3)],
                               rtol=1e-5)


@pytest.mark.parametrize("unit", [64, 128, 192])
def test_ranges_that_start_mid_channel_find_the_wide_one(unit):
    """RANGES tasks check their own channels for a wide mean, wrapping around C: with rows of 64
    elements and ranges of 1, 2 or 3 rows, the wide channel falls at every position of a range."""
    x = np.repeat(_extreme_input(), 64, axis=2)
    C = x.shape[1]
    w, b = np.ones(C, np.float32), np.zeros(C, np.float32)
    y_ref, dx_ref, _, _ = _reference(x, x, w.astype(np.float64), b.astype(np.float64), 1e-5)
    y = np.empty_like(x)
    mean, var, invstd = np.empty(C), np.empty(C), np.empty(C)
    _kernels.forward_train(x, y, w, b, 1e-5, mean, var, invstd, 2, _kernels.PATHS["ranges"], unit)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-5)


def _gpu_skip_reason():
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken install
        return f'CuPy is not installed or does not import ({exc}); pip install "fastbn[cuda]"'
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return f"CuPy finds no usable CUDA driver/GPU ({exc})"
    return None if count >= 1 else "CuPy finds no CUDA GPU"


@pytest.mark.gpu
@pytest.mark.parametrize("path,spatial", [("channels", 1), ("channels", 64), ("units", 64), ("columns", 1)])
def test_cuda_kernels_on_the_issue_channel(path, spatial, monkeypatch):
    """The CUDA source normalizes as the CPU does (fbn_normalize, FBN_WIDE in _coefs.h)."""
    reason = _gpu_skip_reason()
    if reason:
        pytest.skip(f"no GPU: {reason}")
    import cupy

    from fastbn import _cupy_backend

    monkeypatch.setitem(_cupy_backend.tuning, "path", path)
    x = np.repeat(_extreme_input(), spatial, axis=2)
    C = x.shape[1]
    w, b = np.ones(C, np.float32), np.zeros(C, np.float32)
    dy = np.repeat(np.array([[1.0, -2.0, 0.5, 3.0]] * C, np.float32).T[:, :, None], spatial, axis=2)
    dy[:, 0] *= np.float32(1e38)  # as in the CPU test: dx of the order of 1
    dy[:, 2] *= np.float32(1e34)
    y_ref, dx_ref, _, _ = _reference(x, dy, w.astype(np.float64), b.astype(np.float64), 1e-5)
    y, mean, invstd = fastbn.batch_norm_forward(cupy.asarray(x), cupy.zeros(C, np.float32), cupy.ones(C, np.float32),
                                                cupy.asarray(w), cupy.asarray(b), training=True)
    dx = fastbn.batch_norm_backward(cupy.asarray(dy), cupy.asarray(x), cupy.asarray(w), mean, invstd)[0]
    y, dx = cupy.asnumpy(y), cupy.asnumpy(dx)
    assert np.isfinite(y).all() and np.isfinite(dx).all()
    np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-5)
    for c in range(C):
        np.testing.assert_allclose(dx[:, c], dx_ref[:, c], rtol=1e-4, atol=1e-4 * np.abs(dx_ref[:, c]).max())


def _row_reference(x, dy, axes, eps=1e-5):
    """float64 normalization over ``axes`` (the rows of group/layer/instance norm), forward and
    backward with unit weight: (y, dx)."""
    x64, g64 = x.astype(np.float64), dy.astype(np.float64)
    mean = x64.mean(axis=axes, keepdims=True)
    invstd = 1.0 / np.sqrt(x64.var(axis=axes, keepdims=True) + eps)
    xhat = (x64 - mean) * invstd
    dx = invstd * (g64 - g64.mean(axis=axes, keepdims=True) - xhat * (g64 * xhat).mean(axis=axes, keepdims=True))
    return xhat, dx


@pytest.mark.parametrize("dtype,big", [(np.float32, 3.4e38)])
@pytest.mark.parametrize("norm", ["group", "layer", "instance"])
def test_norm_rows_near_the_largest_value(norm, dtype, big):
    """A float32 row [big, -big, -big, -big] (its mean -big/2, past FBN_WIDE) normalizes to 1.732
    and -0.577 and back-propagates finite gradients, next to ordinary rows, in group, layer and
    instance norm (rows of 4, and long rows cut into pieces).  float64 has no such case: a
    spread wide enough to overflow x - mean makes the variance itself overflow double."""
    rng = np.random.default_rng(5)
    for length in (4, 40000):
        x = rng.standard_normal((2, 3, length)).astype(dtype)
        x[0, 1, :] = -dtype(big)
        x[0, 1, ::4] = dtype(big)
        dy = rng.standard_normal(x.shape).astype(dtype)
        if norm == "group":
            y, m, s = fastbn.group_norm_forward(x, 3)
            dx, gw, gb = fastbn.group_norm_backward(dy, x, 3, None, m, s)
            axes = (2,)
        elif norm == "layer":
            y, m, s = fastbn.layer_norm_forward(x, (length,))
            dx, gw, gb = fastbn.layer_norm_backward(dy, x, (length,), None, m, s)
            axes = (2,)
        else:
            y, m, s = fastbn.instance_norm_forward(x)
            dx, gw, gb = fastbn.instance_norm_backward(dy, x, None, m, s)
            axes = (2,)
        want_y, want_dx = _row_reference(x, dy, axes)
        assert np.isfinite(y).all() and np.isfinite(dx).all() and np.isfinite(gw).all()
        tol = 1e-5 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(y, want_y, rtol=tol, atol=tol)
        np.testing.assert_allclose(dx, want_dx, rtol=1e-3 if dtype == np.float32 else 1e-9, atol=tol)


@pytest.mark.parametrize("path", PATHS)
def test_no_channels_on_every_kernel_path(path):
    """(N, 0, S): the public API returns early, the kernels must too (a per-range channel counter
    once divided by C = 0 before looking at the empty range)."""
    x = np.zeros((2, 0, 4), np.float32)
    y, dx = np.empty_like(x), np.empty_like(x)
    w = b = np.zeros(0, np.float32)
    mean, var, invstd, gw, gb = (np.empty(0) for _ in range(5))
    p = _kernels.PATHS[path]
    _kernels.forward_train(x, y, w, b, 1e-5, mean, var, invstd, 1, p)
    _kernels.forward_eval(x, y, w, b, mean, invstd, 1, p)
    _kernels.backward(x, x, dx, w, mean, invstd, True, gw, gb, 1, p)


def _norm_pair(norm, x, eps=1e-5):
    """(forward's (y, mean, invstd), backward(dy) -> dx) of a norm on (4, 6, 5) input x."""
    if norm == "batch":
        y, m, s = fastbn.batch_norm_forward(x, None, None, training=True, eps=eps)
        return (y, m, s), lambda dy: fastbn.batch_norm_backward(dy, x, None, m, s)[0]
    if norm == "group":
        y, m, s = fastbn.group_norm_forward(x, 2, eps=eps)
        return (y, m, s), lambda dy: fastbn.group_norm_backward(dy, x, 2, None, m, s)[0]
    if norm == "layer":
        y, m, s = fastbn.layer_norm_forward(x, (6, 5), eps=eps)
        return (y, m, s), lambda dy: fastbn.layer_norm_backward(dy, x, (6, 5), None, m, s)[0]
    y, m, s = fastbn.instance_norm_forward(x, eps=eps)
    return (y, m, s), lambda dy: fastbn.instance_norm_backward(dy, x, None, m, s)[0]


@pytest.mark.parametrize("norm,dtype,scale", [
    (norm, dtype, scale) for norm in ("batch", "group", "layer", "instance")
    for dtype, scale in ((np.float64, 1e110), (np.float64, 1e150), (np.float32, 1e22), (np.float32, 1e30))
    if not (norm == "batch" and dtype == np.float32)])  # float32 batch norm: its documented limit
def test_grad_input_of_a_steep_spread_keeps_its_x_term(norm, dtype, scale):
    """The norms are scale-invariant: dx(s * x, dy) = dx(x, dy) / s.  The coefficient of x - mean
    in grad_input is about |dy| / std**2; computed as invstd**3 * sum, it underflowed double past
    std 1e103 and float32's coefficients past std 1e19, and dx came out 5-45% off (PyTorch's float64
    stays exact there).  float32 batch norm past std 1e19 keeps that limit (docs/numerics.md)."""
    rng = np.random.default_rng(3)
    x1 = rng.standard_normal((4, 6, 5))
    dy = rng.standard_normal(x1.shape)
    want = _norm_pair(norm, x1, eps=1e-300)[1](dy) / scale
    x = (x1 * scale).astype(dtype)
    got = _norm_pair(norm, x)[1](dy.astype(dtype))
    tol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("norm", ["batch", "group", "layer", "instance"])
def test_a_float64_variance_past_doubles_range_gives_nan_not_the_bias(norm):
    """float64 data with a spread past 1.3e154 has a variance past double's range; 1 / sqrt(inf)
    = 0 made every output the bias (0 here) without a sign.  The invstd is NaN instead, so are
    the outputs (PyTorch's group and layer norm give NaN too); a spread just inside still
    normalizes exactly."""
    x = np.resize([1e307, -1e307, 3e306, -5e306], (4, 6, 5))
    (y, m, s), _ = _norm_pair(norm, x)
    assert np.isnan(s).all() and np.isnan(y).all()
    x1 = np.random.default_rng(4).standard_normal((4, 6, 5))
    (y, m, s), _ = _norm_pair(norm, x1 * 1e153)
    (y1, _, _), _ = _norm_pair(norm, x1, eps=1e-300)
    np.testing.assert_allclose(y, y1, rtol=0, atol=1e-13)
