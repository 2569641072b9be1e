"""What fastbn's test modules import: a plain float64 NumPy reference, random inputs,
``assert_close`` with its tolerances, and ``switched_on`` for the kernels' test switches.

The reference is written independently of fastbn (no shared code, not even an import):
batch statistics over every axis but 1, biased variance for normalizing, unbiased for the
running buffers, and the textbook batch-norm backward.

Test modules ``from _helpers import ...`` (pytest puts tests/ on ``sys.path``, as it does for
conftest.py); the fixtures stay in conftest.py, which nothing imports by name.
"""
import numpy as np
import pytest

# Tolerances against the float64 reference (absolute, on O(1) outputs).
TOL = {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-11}


# ---------------------------------------------------------------------------------- reference
def _axes(x):
    return (0,) + tuple(range(2, x.ndim))


def _bshape(x):
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


def ref_stats(x):
    """Batch mean and biased variance per channel, float64, two-pass."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=_axes(x))
    var = ((x - mean.reshape(_bshape(x))) ** 2).mean(axis=_axes(x))
    return mean, var


def ref_forward(x, weight=None, bias=None, mean=None, var=None, eps=1e-5):
    """Float64 batch norm of x; batch statistics when ``mean`` is None, else the given ones.

    Returns (y, mean, var, invstd), all float64.
    """
    x64 = np.asarray(x, dtype=np.float64)
    if mean is None:
        mean, var = ref_stats(x64)
    mean = np.asarray(mean, dtype=np.float64)
    var = np.asarray(var, dtype=np.float64)
    invstd = 1.0 / np.sqrt(var + eps)
    shp = _bshape(x64)
    y = (x64 - mean.reshape(shp)) * invstd.reshape(shp)
    if weight is not None:
        y = y * np.asarray(weight, dtype=np.float64).reshape(shp)
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64).reshape(shp)
    return y, mean, var, invstd


def ref_running_update(running_mean, running_var, x, momentum):
    """The running buffers after one training step on x (float64)."""
    mean, var = ref_stats(x)
    n = x.size // x.shape[1]
    rm = (1 - momentum) * np.asarray(running_mean, np.float64) + momentum * mean
    rv = (1 - momentum) * np.asarray(running_var, np.float64) + momentum * var * n / (n - 1)
    return rm, rv


def ref_backward(dy, x, weight=None, mean=None, var=None, eps=1e-5, training=True):
    """Float64 gradients (grad_input, grad_weight, grad_bias) of batch norm.

    training=True: the forward used x's batch statistics (``mean``/``var`` ignored);
    training=False: the forward used the constant ``mean``/``var``.
    """
    x64 = np.asarray(x, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    C = x64.shape[1]
    w = np.ones(C) if weight is None else np.asarray(weight, dtype=np.float64)
    if training:
        mean, var = ref_stats(x64)
    mean = np.asarray(mean, np.float64)
    invstd = 1.0 / np.sqrt(np.asarray(var, np.float64) + eps)
    shp, axes = _bshape(x64), _axes(x64)
    xhat = (x64 - mean.reshape(shp)) * invstd.reshape(shp)
    gb = dy.sum(axis=axes)
    gw = (dy * xhat).sum(axis=axes)
    if training:
        m = x64.size // C
        dx = (w * invstd).reshape(shp) * (dy - (gb / m).reshape(shp) - xhat * (gw / m).reshape(shp))
    else:
        dx = dy * (w * invstd).reshape(shp)
    return dx, gw, gb


# ---------------------------------------------------------------------------------- helpers
def random_input(rng, shape, dtype=np.float32, scale=2.0, offset=0.5):
    """Normal data with per-channel offsets, so channels differ."""
    x = rng.standard_normal(shape) * scale + offset
    if len(shape) > 1 and shape[1] > 0:
        x = x + np.arange(shape[1]).reshape((1, -1) + (1,) * (len(shape) - 2))
    return x.astype(dtype)


def random_params(rng, C, dtype=np.float32):
    """(weight, bias, running_mean, running_var) of length C."""
    w = rng.uniform(0.5, 2.0, C) * rng.choice([-1.0, 1.0], C)
    b = rng.standard_normal(C)
    rm = rng.standard_normal(C)
    rv = rng.uniform(0.5, 2.0, C)
    return tuple(a.astype(dtype) for a in (w, b, rm, rv))


def assert_close(actual, expected, dtype=None, tol=None, rel=True):
    """max |actual - expected| <= tol * max(1, max |expected|) (when rel); any NaN fails."""
    actual = np.asarray(actual)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if tol is None:
        tol = TOL[np.dtype(dtype if dtype is not None else actual.dtype)]
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0))) if rel else 1.0
    err = float(np.max(np.abs(actual.astype(np.float64) - expected), initial=0.0))
    assert err <= tol * scale, f"max error {err:.3e} > {tol:.1e} * {scale:.3g}"


# ---------------------------------------------------------------------------------- kernel switches
def switched_on(switch, why):
    """For a fixture (``yield from``): a kernel switch turned on for the test and restored after it.
    ``switch`` returns its state and sets it when given a bool (fastbn._kernels.short_inline,
    fastbn._norm_kernels.row_pairs, ...); where it will not turn on (no AVX-512 on this CPU, or a
    build without those loops) the test is skipped with ``why``."""
    before = switch()
    if not switch(True):
        switch(before)
        pytest.skip(why)
    try:
        yield switch
    finally:
        switch(before)
