"""fastbn.batch_norm / batch_norm_forward / batch_norm_backward against the float64 reference."""
import numpy as np
import pytest

import fastbn
from fastbn._backends import cpu as _cpu
from _helpers import (TOL, assert_close, random_input, random_params, ref_backward, ref_forward,
                     ref_running_update)

DTYPES = [np.float32, np.float64]
# ranks 2..5, sizes that are not multiples of any SIMD width, C=1, spatial size 1
SHAPES = [(5, 3), (33, 1), (4, 3, 7), (3, 1, 17), (2, 5, 1), (2, 3, 4, 5), (3, 2, 1, 1), (2, 2, 3, 2, 3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_train_forward_matches_reference(rng, kernel_path, shape, dtype):
    C = shape[1]
    x = random_input(rng, shape, dtype)
    w, b, rm, rv = random_params(rng, C, dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    y, save_mean, save_invstd = fastbn.batch_norm_forward(x, rm, rv, w, b, training=True, momentum=0.3, eps=1e-4)
    ref_y, ref_mean, ref_var, ref_invstd = ref_forward(x, w, b, eps=1e-4)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_close(y, ref_y, dtype)
    assert save_mean.dtype == np.float64 and save_mean.shape == (C,)
    assert save_invstd.dtype == np.float64 and save_invstd.shape == (C,)
    assert_close(save_mean, ref_mean, tol=1e-12 if dtype == np.float64 else 1e-6)
    assert_close(save_invstd, ref_invstd, tol=1e-10 if dtype == np.float64 else 1e-6)
    exp_rm, exp_rv = ref_running_update(rm0, rv0, x, 0.3)
    assert rm.dtype == dtype and rv.dtype == dtype
    assert_close(rm, exp_rm, dtype)
    assert_close(rv, exp_rv, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_eval_forward_matches_reference(rng, kernel_path, shape, dtype):
    C = shape[1]
    x = random_input(rng, shape, dtype)
    w, b, rm, rv = random_params(rng, C, dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    y, save_mean, save_invstd = fastbn.batch_norm_forward(x, rm, rv, w, b, training=False, eps=1e-3)
    ref_y, _, _, ref_invstd = ref_forward(x, w, b, rm, rv, eps=1e-3)
    assert y.dtype == x.dtype
    assert_close(y, ref_y, dtype)
    np.testing.assert_array_equal(save_mean, rm.astype(np.float64))
    assert_close(save_invstd, ref_invstd, tol=1e-12)
    # evaluation never touches the running buffers
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)


@pytest.mark.parametrize("momentum", [0.0, 0.1, 0.5, 1.0])
def test_running_stats_follow_momentum_over_several_steps(rng, momentum):
    C = 4
    rm, rv = np.zeros(C, np.float64), np.ones(C, np.float64)
    exp_rm, exp_rv = rm.copy(), rv.copy()
    for step in range(4):
        x = random_input(rng, (6, C, 5), np.float64, offset=step)
        fastbn.batch_norm(x, rm, rv, training=True, momentum=momentum)
        exp_rm, exp_rv = ref_running_update(exp_rm, exp_rv, x, momentum)
        assert_close(rm, exp_rm, tol=1e-12)
        assert_close(rv, exp_rv, tol=1e-12)
    if momentum == 0.0:
        np.testing.assert_array_equal(rm, 0.0)
        np.testing.assert_array_equal(rv, 1.0)


@pytest.mark.parametrize("buffers", ["float64", "float32-strided"])
def test_running_buffers_of_another_dtype_or_layout(rng, buffers):
    """float32 input with float64 running buffers, or strided ones: the same update as the fast
    path (float64 arithmetic), also in evaluation mode."""
    x = random_input(rng, (6, 3, 7), np.float32)
    if buffers == "float64":
        rm, rv = np.zeros(3), np.ones(3)
    else:
        rm, rv = np.zeros(6, np.float32)[::2], np.ones(6, np.float32)[::2]
    rm_c, rv_c = np.zeros(3, np.float32), np.ones(3, np.float32)
    for _ in range(3):
        fastbn.batch_norm(x, rm, rv, training=True, momentum=0.3)
        fastbn.batch_norm(x, rm_c, rv_c, training=True, momentum=0.3)
    exp_rm, exp_rv = np.zeros(3), np.ones(3)
    for _ in range(3):
        exp_rm, exp_rv = ref_running_update(exp_rm, exp_rv, x.astype(np.float64), 0.3)
    assert_close(rm, exp_rm, tol=1e-6)
    assert_close(rv, exp_rv, tol=1e-6)
    if buffers == "float32-strided":
        np.testing.assert_array_equal(rm, rm_c)
        np.testing.assert_array_equal(rv, rv_c)
    y = fastbn.batch_norm(x, rm, rv, training=False)
    assert_close(y, fastbn.batch_norm(x, rm.astype(np.float32), rv.astype(np.float32), training=False), tol=1e-6)


@pytest.mark.parametrize("buffer_dtype", [np.float32, np.float64])
def test_eval_statistics_from_running_buffers(rng, kernel_path, buffer_dtype):
    """An evaluation forward computes mean and 1/sqrt(running_var + eps) in the same kernel call as
    the normalize, from running buffers of the input's dtype or the other: the same statistics, to
    the bit, as the separate eval_stats, and the output of the reference (one thread at these
    sizes; tests/test_threads.py splits many channels between two)."""
    for shape in [(2, 40, 3), (3, 300), (5, 7, 9)]:
        x = random_input(rng, shape, np.float32)
        w, b, rm, rv = random_params(rng, shape[1], np.float32)
        rm, rv = rm.astype(buffer_dtype), rv.astype(buffer_dtype)
        y, mean, invstd = fastbn.batch_norm_forward(x, rm, rv, w, b, eps=1e-3)
        want_mean, want_invstd = _cpu.eval_stats(rm, rv, 1e-3)
        np.testing.assert_array_equal(mean, want_mean)
        np.testing.assert_array_equal(invstd, want_invstd)
        assert not np.shares_memory(mean, invstd) and mean.flags.writeable and invstd.flags.c_contiguous
        assert_close(y, ref_forward(x, w, b, rm.astype(np.float64), rv.astype(np.float64), eps=1e-3)[0], np.float32)


def test_running_var_uses_unbiased_estimate():
    # two values per channel: biased var = 1, unbiased var = 2
    x = np.array([[0.0, 10.0], [2.0, 14.0]])
    rm, rv = np.zeros(2), np.zeros(2)
    y = fastbn.batch_norm(x, rm, rv, training=True, momentum=1.0, eps=1e-300)  # eps=0: refused in training
    np.testing.assert_allclose(rm, [1.0, 12.0])
    np.testing.assert_allclose(rv, [2.0, 8.0])
    # normalized with the biased variance: exactly -1 and +1
    np.testing.assert_allclose(y, [[-1.0, -1.0], [1.0, 1.0]], atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_training_without_running_buffers(rng, dtype):
    x = random_input(rng, (4, 3, 6), dtype)
    y = fastbn.batch_norm(x, None, None, training=True)
    assert_close(y, ref_forward(x)[0], dtype)
    # normalized channels: mean 0, biased variance ~1
    axes = (0, 2)
    np.testing.assert_allclose(y.astype(np.float64).mean(axis=axes), 0, atol=1e-6)
    np.testing.assert_allclose(y.astype(np.float64).var(axis=axes), 1, rtol=1e-3)


def test_batch_norm_is_first_output_of_forward(rng):
    x = random_input(rng, (3, 4, 5), np.float64)
    w, b, rm, rv = random_params(rng, 4, np.float64)
    y1 = fastbn.batch_norm(x, rm.copy(), rv.copy(), w, b, training=True)
    y2 = fastbn.batch_norm_forward(x, rm.copy(), rv.copy(), w, b, training=True)[0]
    np.testing.assert_array_equal(y1, y2)


@pytest.mark.parametrize("weight,bias", [(False, False), (True, False), (False, True), (True, True)])
def test_optional_weight_and_bias(rng, weight, bias):
    x = random_input(rng, (5, 3, 4), np.float64)
    w, b, rm, rv = random_params(rng, 3, np.float64)
    w, b = (w if weight else None), (b if bias else None)
    for training in (True, False):
        y = fastbn.batch_norm(x, rm.copy(), rv.copy(), w, b, training=training)
        ref = ref_forward(x, w, b, *(() if training else (rm, rv)))[0]
        assert_close(y, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_backward_matches_reference(rng, kernel_path, shape, dtype, training):
    C = shape[1]
    x = random_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w, b, rm, rv = random_params(rng, C, dtype)
    _, mean, invstd = fastbn.batch_norm_forward(x, rm, rv, w, b, training=training)
    dx, gw, gb = fastbn.batch_norm_backward(dy, x, w, mean, invstd, training=training)
    ref_dx, ref_gw, ref_gb = ref_backward(dy, x, w, rm, rv, training=training)
    for got in (dx, gw, gb):
        assert got.dtype == dtype
    assert dx.shape == x.shape and gw.shape == (C,) and gb.shape == (C,)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    assert_close(dx, ref_dx, tol=tol)
    assert_close(gw, ref_gw, tol=tol)
    assert_close(gb, ref_gb, tol=tol)


def test_backward_without_weight_uses_ones(rng):
    x = random_input(rng, (4, 3, 5), np.float64)
    dy = rng.standard_normal(x.shape)
    _, mean, invstd = fastbn.batch_norm_forward(x, None, None, training=True)
    dx, gw, gb = fastbn.batch_norm_backward(dy, x, None, mean, invstd)
    dx1, gw1, gb1 = fastbn.batch_norm_backward(dy, x, np.ones(3), mean, invstd)
    np.testing.assert_array_equal(dx, dx1)
    np.testing.assert_array_equal(gw, gw1)
    ref_dx, ref_gw, ref_gb = ref_backward(dy, x)
    assert_close(dx, ref_dx)
    assert_close(gw, ref_gw)
    assert_close(gb, ref_gb)


def _loss(x, w, b, r, rm, rv, training, eps):
    y = fastbn.batch_norm(x, rm.copy(), rv.copy(), w, b, training=training, eps=eps)
    return float(np.sum(y * r))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(3, 2, 2), (4, 2)], ids=str)
def test_backward_matches_central_finite_differences(rng, shape, training):
    eps = 1e-3
    C = shape[1]
    x = random_input(rng, shape, np.float64)
    w, b, rm, rv = random_params(rng, C, np.float64)
    r = rng.standard_normal(shape)
    _, mean, invstd = fastbn.batch_norm_forward(x, rm.copy(), rv.copy(), w, b, training=training, eps=eps)
    dx, gw, gb = fastbn.batch_norm_backward(r, x, w, mean, invstd, training=training)

    h = 1e-6

    def numeric(arr):
        g = np.zeros_like(arr)
        for i in np.ndindex(arr.shape):
            old = arr[i]
            arr[i] = old + h
            up = _loss(x, w, b, r, rm, rv, training, eps)
            arr[i] = old - h
            down = _loss(x, w, b, r, rm, rv, training, eps)
            arr[i] = old
            g[i] = (up - down) / (2 * h)
        return g

    np.testing.assert_allclose(dx, numeric(x), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gw, numeric(w), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gb, numeric(b), rtol=1e-5, atol=1e-7)
    # the gradient through the batch statistics is not the eval-mode gradient
    if training:
        dx_eval = fastbn.batch_norm_backward(r, x, w, mean, invstd, training=False)[0]
        assert np.abs(dx_eval - dx).max() > 1e-3


# ---------------------------------------------------------------------------------- out= and aliasing
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_out_receives_result(rng, kernel_path, training, dtype):
    x = random_input(rng, (4, 3, 9), dtype)
    w, b, rm, rv = random_params(rng, 3, dtype)
    expected = fastbn.batch_norm(x, rm.copy(), rv.copy(), w, b, training=training)
    out = np.full_like(x, np.nan)
    res = fastbn.batch_norm(x, rm.copy(), rv.copy(), w, b, training=training, out=out)
    assert res is out
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(4, 3, 9), (17, 5), (2, 1, 3, 3)], ids=str)
def test_out_may_be_the_input(rng, kernel_path, training, shape):
    x = random_input(rng, shape, np.float32)
    w, b, rm, rv = random_params(rng, shape[1], np.float32)
    rm2, rv2 = rm.copy(), rv.copy()
    expected = fastbn.batch_norm(x, rm, rv, w, b, training=training)
    buf = x.copy()
    res = fastbn.batch_norm(buf, rm2, rv2, w, b, training=training, out=buf)
    assert res is buf
    np.testing.assert_array_equal(buf, expected)
    np.testing.assert_array_equal(rm2, rm)
    np.testing.assert_array_equal(rv2, rv)


def test_out_in_place_on_non_contiguous_input(rng):
    base = random_input(rng, (4, 3, 10), np.float64)
    view = base[:, :, ::2]
    expected = fastbn.batch_norm(view.copy(), None, None, training=True)
    untouched = base[:, :, 1::2].copy()
    res = fastbn.batch_norm(view, None, None, training=True, out=view)
    assert res is view
    assert_close(view, expected, tol=1e-14)
    np.testing.assert_array_equal(base[:, :, 1::2], untouched)


def test_out_non_contiguous_and_partially_overlapping(rng):
    x = random_input(rng, (4, 3, 5), np.float64)
    expected = fastbn.batch_norm(x, None, None, training=True)
    out_base = np.zeros((4, 3, 10))
    out = out_base[:, :, ::2]
    fastbn.batch_norm(x, None, None, training=True, out=out)
    assert_close(out, expected, tol=1e-14)
    np.testing.assert_array_equal(out_base[:, :, 1::2], 0)
    # out overlapping the input shifted by one element: the result is still the out-of-place one
    buf = np.zeros(x.size + 1)
    buf[:-1] = x.ravel()
    src = buf[:-1].reshape(x.shape)
    dst = buf[1:].reshape(x.shape)
    fastbn.batch_norm(src, None, None, training=True, out=dst)
    assert_close(dst, expected, tol=1e-14)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_out_receives_grad_input(rng, kernel_path, training, dtype):
    x = random_input(rng, (5, 3, 7), dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    w = random_params(rng, 3, dtype)[0]
    _, mean, invstd = fastbn.batch_norm_forward(x, None, None, w, training=True)
    want_dx, want_gw, want_gb = fastbn.batch_norm_backward(dy, x, w, mean, invstd, training)
    assert_close(want_dx, ref_backward(dy, x, w, training=True)[0] if training else dy * w[:, None] * invstd[:, None],
                 tol=1e-4 if dtype == np.float32 else 1e-10)
    tol = 4 * np.finfo(dtype).eps
    out = np.full_like(x, np.nan)
    dx, gw, gb = fastbn.batch_norm_backward(dy, x, w, mean, invstd, training, out=out)
    assert dx is out
    assert_close(out, want_dx, tol=tol)
    np.testing.assert_array_equal(gw, want_gw)
    np.testing.assert_array_equal(gb, want_gb)
    # in place over grad_output, and over the input (both are read elementwise)
    d = dy.copy()
    assert fastbn.batch_norm_backward(d, x, w, mean, invstd, training, out=d)[0] is d
    assert_close(d, want_dx, tol=tol)
    xi = x.copy()
    assert fastbn.batch_norm_backward(dy, xi, w, mean, invstd, training, out=xi)[0] is xi
    assert_close(xi, want_dx, tol=tol)
    # partly overlapping grad_output (shifted by one element), and a non-contiguous out
    buf = np.zeros(x.size + 1, dtype)
    buf[:-1] = dy.ravel()
    dst = buf[1:].reshape(x.shape)
    fastbn.batch_norm_backward(buf[:-1].reshape(x.shape), x, w, mean, invstd, training, out=dst)
    assert_close(dst, want_dx, tol=tol)
    big = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype)
    fastbn.batch_norm_backward(dy, x, w, mean, invstd, training, out=big[..., ::2])
    assert_close(big[..., ::2], want_dx, tol=tol)
    np.testing.assert_array_equal(big[..., 1::2], 0)


# ---------------------------------------------------------------------------------- memory layouts
def _layouts(x):
    """Non-C-contiguous arrays equal to x."""
    yield "fortran", np.asfortranarray(x)
    big = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)
    big[..., ::2] = x
    yield "strided", big[..., ::2]
    yield "negative", np.flip(np.flip(x, -1).copy(), -1)  # a view with negative strides
    yield "negative-batch", np.flip(np.flip(x, 0).copy(), 0)
    t = np.ascontiguousarray(np.swapaxes(x, 0, -1))
    yield "transposed", np.swapaxes(t, 0, -1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(6, 3, 5), (7, 4), (2, 3, 4, 3)], ids=str)
def test_non_contiguous_inputs(rng, shape, dtype):
    x = random_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w, b, rm, rv = random_params(rng, shape[1], dtype)
    y_ref, mean, invstd = fastbn.batch_norm_forward(x, None, None, w, b, training=True)
    ye_ref = fastbn.batch_norm(x, rm, rv, w, b)
    dx_ref, gw_ref, gb_ref = fastbn.batch_norm_backward(dy, x, w, mean, invstd)
    checked = 0
    for (name, xv), (_, dyv) in zip(_layouts(x), _layouts(dy)):
        assert not xv.flags.c_contiguous, name
        np.testing.assert_array_equal(xv, x)
        y, m2, i2 = fastbn.batch_norm_forward(xv, None, None, w, b, training=True)
        assert y.shape == x.shape
        assert_close(y, y_ref, tol=TOL[np.dtype(dtype)] / 10)
        assert_close(fastbn.batch_norm(xv, rm, rv, w, b), ye_ref, tol=TOL[np.dtype(dtype)] / 10)
        dx, gw, gb = fastbn.batch_norm_backward(dyv, xv, w, m2, i2)
        assert_close(dx, dx_ref, tol=1e-5 if dtype == np.float32 else 1e-12)
        assert_close(gw, gw_ref, tol=1e-5 if dtype == np.float32 else 1e-12)
        assert_close(gb, gb_ref, tol=1e-5 if dtype == np.float32 else 1e-12)
        checked += 1
    assert checked == 5


def test_non_contiguous_parameters_and_statistics(rng):
    """Strided weight, bias, running buffers and saved statistics are read correctly."""
    x = random_input(rng, (5, 3, 4), np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    w, b, rm, rv = random_params(rng, 3, np.float32)

    def strided(a):
        s = np.zeros(2 * a.size, a.dtype)
        s[::2] = a
        return s[::2]

    rm_s, rv_s = strided(rm), strided(rv)
    y, mean, invstd = fastbn.batch_norm_forward(x, rm_s, rv_s, strided(w), strided(b), training=True)
    rm_c, rv_c = rm.copy(), rv.copy()
    y_c, mean_c, invstd_c = fastbn.batch_norm_forward(x, rm_c, rv_c, w, b, training=True)
    np.testing.assert_array_equal(y, y_c)
    np.testing.assert_array_equal(rm_s, rm_c)  # updated in place through the view
    np.testing.assert_array_equal(rv_s, rv_c)
    ye = fastbn.batch_norm(x, rm_s, rv_s, strided(w), strided(b))
    np.testing.assert_array_equal(ye, fastbn.batch_norm(x, rm_c, rv_c, w, b))
    got = fastbn.batch_norm_backward(dy, x, strided(w), strided(mean), strided(invstd))
    want = fastbn.batch_norm_backward(dy, x, w, mean_c, invstd_c)
    for g, e in zip(got, want):
        np.testing.assert_array_equal(g, e)


def test_non_native_byte_order_input(rng):
    x = random_input(rng, (4, 3, 5), np.float32)
    swapped = x.astype(x.dtype.newbyteorder(">" if x.dtype.byteorder != ">" else "<"))
    assert swapped.dtype.isnative is False
    y = fastbn.batch_norm(swapped, None, None, training=True)
    np.testing.assert_array_equal(y, fastbn.batch_norm(x, None, None, training=True))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_read_only_inputs(rng, kernel_path, training):
    x = random_input(rng, (4, 3, 5), np.float32)
    w, b, rm, rv = random_params(rng, 3, np.float32)
    expected = fastbn.batch_norm(x, rm.copy(), rv.copy(), w, b, training=training)
    for a in (x, w, b):
        a.flags.writeable = False
    if not training:
        rm.flags.writeable = rv.flags.writeable = False
    y, mean, invstd = fastbn.batch_norm_forward(x, rm, rv, w, b, training=training)
    np.testing.assert_array_equal(y, expected)
    mean.flags.writeable = invstd.flags.writeable = False
    dy = np.ones_like(x)
    dy.flags.writeable = False
    dx = fastbn.batch_norm_backward(dy, x, w, mean, invstd, training=training)[0]
    assert dx.shape == x.shape and np.all(np.isfinite(dx))


# ---------------------------------------------------------------------------------- caller's arrays
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_inputs_are_never_modified(rng, kernel_path, training):
    x = random_input(rng, (5, 3, 7), np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    w, b, rm, rv = random_params(rng, 3, np.float32)
    copies = [a.copy() for a in (x, dy, w, b)]
    y, mean, invstd = fastbn.batch_norm_forward(x, rm, rv, w, b, training=training)
    mean_c, invstd_c = mean.copy(), invstd.copy()
    fastbn.batch_norm_backward(dy, x, w, mean, invstd, training=training)
    for a, c in zip((x, dy, w, b), copies):
        np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(mean, mean_c)
    np.testing.assert_array_equal(invstd, invstd_c)
    assert not np.shares_memory(y, x)


# ---------------------------------------------------------------------------------- empty batches
@pytest.mark.parametrize("shape", [(0, 3, 5), (0, 3), (4, 3, 0), (0, 2, 2, 2)], ids=str)
def test_empty_batch(rng, shape):
    C = shape[1]
    x = np.zeros(shape, np.float32)
    w, b, rm, rv = random_params(rng, C, np.float32)
    rm0, rv0 = rm.copy(), rv.copy()
    y = fastbn.batch_norm(x, rm, rv, w, b, training=True)
    assert y.shape == shape and y.dtype == np.float32
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)
    y = fastbn.batch_norm(x, rm, rv, w, b, training=False)
    assert y.shape == shape
    _, mean, invstd = fastbn.batch_norm_forward(x, rm, rv, w, b, training=False)
    dx, gw, gb = fastbn.batch_norm_backward(x, x, w, mean, invstd, training=False)
    assert dx.shape == shape
    np.testing.assert_array_equal(gw, 0)
    np.testing.assert_array_equal(gb, 0)


@pytest.mark.parametrize("shape", [(3, 0), (3, 0, 5), (0, 0), (2, 0, 4, 4)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_no_channels(shape, dtype):
    """C = 0, as PyTorch's functional batch_norm allows: empty results, in every mode (this used to
    divide by zero in the kernels' planning: a crash, not an exception)."""
    x = np.ones(shape, dtype)
    rm, rv = np.zeros(0, dtype), np.ones(0, dtype)
    for training in (True, False):
        y, mean, invstd = fastbn.batch_norm_forward(x, rm, rv, training=training)
        assert y.shape == shape and mean.shape == (0,) and invstd.shape == (0,)
        dx, gw, gb = fastbn.batch_norm_backward(x, x, None, mean, invstd, training=training)
        assert dx.shape == shape and gw.shape == (0,) and gb.shape == (0,)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fastbn.batch_norm(np.ones((1, 0), dtype), None, None, training=True)


def test_eval_backward_does_not_read_the_input_or_the_mean(kernel_path):
    """With fixed statistics dx = dy * weight * invstd: a NaN or inf in x, or a NaN running mean,
    must not reach dx (it would through x * 0), as in PyTorch; grad_weight does see them."""
    x = np.tile(np.array([[1.0, 2.0, 3.0]], np.float32), (40, 1))
    x[1, 0], x[2, 0] = np.inf, np.nan
    dy = np.ones_like(x)
    w = np.array([2.0, 3.0, 4.0], np.float32)
    rm = np.array([0.0, np.nan, 0.0], np.float32)
    rv = np.array([4.0, 1.0, 0.25], np.float32)
    _, mean, invstd = fastbn.batch_norm_forward(x, rm, rv, w, training=False, eps=1e-300)
    dx, gw, gb = fastbn.batch_norm_backward(dy, x, w, mean, invstd, training=False)
    np.testing.assert_array_equal(dx, np.broadcast_to(np.float32([1.0, 3.0, 8.0]), x.shape))
    assert np.isnan(gw[:2]).all() and np.isfinite(gw[2])
    np.testing.assert_array_equal(gb, 40.0)
