"""Channels-last inputs (issue 14 item 3): an (N, C, *spatial) array whose memory is a C-contiguous
(N, *spatial, C) array, as ``x.transpose(0, 3, 1, 2)``, runs without a copy, and its output and
grad_input keep that layout, as PyTorch's preserve_format does."""
import numpy as np
import pytest

import fastbn

torch = pytest.importorskip("torch", reason="the parity checks need torch (pip install torch)")


def _channels_last(rng, shape, dtype):
    """A channels-last (N, C, *spatial) view of fresh data, and its values as a contiguous copy."""
    perm_to = (0, *range(2, len(shape)), 1)
    mem = rng.standard_normal(tuple(shape[i] for i in perm_to)).astype(dtype) * 2 + 0.5
    back = (0, len(shape) - 1, *range(1, len(shape) - 1))
    return mem.transpose(back), mem


def _is_channels_last(a):
    return a.transpose(0, *range(2, a.ndim), 1).flags.c_contiguous


SHAPES = [(4, 3, 5, 6), (2, 8, 3, 3, 2), (5, 7, 9), (1, 16, 4, 4), (3, 2, 1, 5)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
def test_matches_torch_and_keeps_the_layout(shape, dtype, training):
    rng = np.random.default_rng(len(shape) * 10 + shape[1])
    x, mem = _channels_last(rng, shape, dtype)
    C = shape[1]
    w, b = rng.uniform(0.5, 1.5, C).astype(dtype), rng.standard_normal(C).astype(dtype)
    rm, rv = rng.standard_normal(C).astype(dtype), rng.uniform(0.5, 2, C).astype(dtype)
    dy, _ = _channels_last(rng, shape, dtype)
    trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    xt = torch.from_numpy(np.ascontiguousarray(x)).requires_grad_()
    wt, bt = torch.from_numpy(w).requires_grad_(), torch.from_numpy(b).requires_grad_()
    yt = torch.nn.functional.batch_norm(xt, trm, trv, wt, bt, training, 0.1, 1e-5)
    yt.backward(torch.from_numpy(np.ascontiguousarray(dy)))

    y, mean, invstd = fastbn.batch_norm_forward(x, rm, rv, w, b, training=training)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(y, yt.detach().numpy(), **tol)
    np.testing.assert_allclose(rm, trm.numpy(), **tol)
    np.testing.assert_allclose(rv, trv.numpy(), **tol)
    S = int(np.prod(shape[2:]))
    assert _is_channels_last(y) or S == 1, "the output keeps the input's channels-last layout"
    dx, gw, gb = fastbn.batch_norm_backward(dy, x, w, mean, invstd, training=training)
    np.testing.assert_allclose(dx, xt.grad.numpy(), **tol)
    np.testing.assert_allclose(gw, wt.grad.numpy(), **tol)
    np.testing.assert_allclose(gb, bt.grad.numpy(), **tol)
    assert _is_channels_last(dx) or S == 1
    # a grad_output in the other layout gives the same gradient (it is copied into x's)
    dx2, gw2, gb2 = fastbn.batch_norm_backward(np.ascontiguousarray(dy), x, w, mean, invstd, training=training)
    np.testing.assert_array_equal(dx2, dx)
    np.testing.assert_array_equal(gw2, gw)


def test_batchnorm1d_on_nlc_memory():
    """BatchNorm1d over (N, L, C) data through transpose(0, 2, 1), the layout of a sequence model."""
    rng = np.random.default_rng(3)
    nlc = rng.standard_normal((6, 11, 4)).astype(np.float32)
    x = nlc.transpose(0, 2, 1)
    bn, tbn = fastbn.BatchNorm1d(4), torch.nn.BatchNorm1d(4)
    y = bn(x)
    np.testing.assert_allclose(y, tbn(torch.from_numpy(np.ascontiguousarray(x))).detach().numpy(), rtol=1e-5, atol=1e-5)
    assert y.transpose(0, 2, 1).flags.c_contiguous
    np.testing.assert_allclose(bn.running_var, tbn.running_var.numpy(), rtol=1e-5)
    dx = bn.backward(np.ones_like(x))
    assert dx.transpose(0, 2, 1).flags.c_contiguous


def test_in_place_and_out_in_either_layout():
    rng = np.random.default_rng(4)
    x, mem = _channels_last(rng, (3, 4, 5, 5), np.float64)
    want = fastbn.batch_norm(np.ascontiguousarray(x), None, None, training=True)
    out_nchw = np.empty(x.shape)
    y = fastbn.batch_norm(x, None, None, training=True, out=out_nchw)  # copied into a C-contiguous out
    assert y is out_nchw
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    y = fastbn.batch_norm(x, None, None, training=True, out=x)  # in place, in the input's own memory
    assert y is x
    np.testing.assert_allclose(mem.transpose(0, 3, 1, 2), want, rtol=1e-12, atol=1e-12)


def test_layer_in_place_channels_last_backward():
    """An in-place training forward saves a copy of the input in its own layout for backward."""
    rng = np.random.default_rng(5)
    x, _ = _channels_last(rng, (4, 3, 4, 4), np.float64)
    ref = x.copy(order="C")
    bn, bn_ref = fastbn.BatchNorm2d(3, dtype=np.float64), fastbn.BatchNorm2d(3, dtype=np.float64)
    bn(x, out=x)
    bn_ref(ref)
    g = rng.standard_normal(x.shape)
    np.testing.assert_allclose(bn.backward(g), bn_ref.backward(g), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("C", [8, 12, 24, 61, 64, 65])
@pytest.mark.parametrize("path", ["columns", "slices"])
def test_narrow_rows_statistics_keep_double_precision(C, path, force_path, threads):
    """Rows of up to 64 float32 columns take their column moments a row at a time with the sums in
    double registers (8 columns a vector; the rest, and wider rows, the vector-across-rows loops):
    the statistics agree with float64 ones to double rounding, on every split of the work."""
    force_path(path, unit=16)
    threads(2)
    rng = np.random.default_rng(C)
    x = (rng.standard_normal((3, 7, 11, C)) * 3 + 1e3).astype(np.float32)  # an offset: shifts matter
    x_cl = x.transpose(0, 3, 1, 2)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    y, mean, invstd = fastbn.batch_norm_forward(x_cl, rm, rv, None, None, True)
    flat = x.reshape(-1, C).astype(np.float64)
    np.testing.assert_allclose(mean, flat.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(invstd, 1 / np.sqrt(flat.var(axis=0) + 1e-5), rtol=1e-11)
    y_nchw = fastbn.batch_norm(np.ascontiguousarray(x_cl), rm.copy(), rv.copy(), None, None, True)
    np.testing.assert_allclose(y, y_nchw, rtol=0, atol=2e-6)
