"""The fused ReLU (``activation="relu"``): forward, backward and the layers against PyTorch's
``relu(batch_norm(...))`` and its autograd, on every kernel path.

The backward's mask is recomputed from x (``bias=``) or read from the forward's output
(``output=``); the two must agree to the bit, which is the claim that the recomputation has the
forward's arithmetic.
"""
import numpy as np
import pytest
from _helpers import assert_close, random_input, random_params, switched_on

import fastbn
from fastbn import _kernels

torch = pytest.importorskip("torch", reason="the parity tests compare with PyTorch (pip install torch)")
TF = torch.nn.functional

# (N, C, *spatial): spatial sizes 1 (an (N, C) matrix: COLUMNS/SLICES), small (7x7), odd, long rows
SHAPES = [(16, 5), (3, 33), (4, 6, 7, 7), (2, 3, 50), (5, 4, 3, 2, 3), (2, 1, 300)]


def _torch_relu_bn(x, rm, rv, w, b, training, momentum=0.1, eps=1e-5, dy=None):
    """PyTorch's relu(batch_norm) and (when dy is given) its gradients, as NumPy arrays, computed
    in float64 from the (upcast) arguments: fastbn's float32 results are closer to these than
    PyTorch's float32 ones (on (3, 33) PyTorch's float32 grad_input was 9e-4 off, fastbn's 4e-6)."""
    def t(a):
        return torch.tensor(np.asarray(a, dtype=np.float64))

    tx, tw, tb = t(x).requires_grad_(), t(w).requires_grad_(), t(b).requires_grad_()
    trm = None if rm is None else t(rm)
    trv = None if rv is None else t(rv)
    y = torch.relu(TF.batch_norm(tx, trm, trv, tw, tb, training, momentum, eps))
    if dy is None:
        return y.detach().numpy(), trm, trv
    y.backward(t(dy))
    return y.detach().numpy(), tx.grad.numpy(), tw.grad.numpy(), tb.grad.numpy()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_pytorch(rng, kernel_path, shape, dtype, training):
    x = random_input(rng, shape, dtype, offset=0.3)
    C = shape[1]
    w, b, rm, rv = random_params(rng, C, dtype)
    dy = random_input(rng, shape, dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    y, mean, invstd = fastbn.batch_norm_forward(x, rm, rv, w, b, training, 0.1, 1e-5, activation="relu")
    ty, trm, trv = _torch_relu_bn(x, rm0, rv0, w, b, training)
    assert_close(y, ty, dtype)
    assert_close(rm, trm.numpy(), dtype)  # the running statistics as without the activation
    assert_close(rv, trv.numpy(), dtype)
    assert (y >= 0).all() and (y == 0).any() and (y > 0).any()
    _, tdx, tgw, tgb = _torch_relu_bn(x, rm0, rv0, w, b, training, dy=dy)
    by_bias = fastbn.batch_norm_backward(dy, x, w, mean, invstd, training, activation="relu", bias=b)
    by_output = fastbn.batch_norm_backward(dy, x, w, mean, invstd, training, activation="relu", output=y)
    for got in (by_bias, by_output):
        assert_close(got[0], tdx, dtype)
        assert_close(got[1], tgw, dtype, tol=1e-4 if dtype == np.float32 else None)
        assert_close(got[2], tgb, dtype, tol=1e-4 if dtype == np.float32 else None)
    for a, c in zip(by_bias, by_output):  # the recomputed mask is the forward's, to the bit
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_mask_matters(rng, training):
    """The activation changes the result: without it the gradient reaches every element."""
    x = random_input(rng, (8, 4, 5, 5), np.float64)
    w, b, rm, rv = random_params(rng, 4, np.float64)
    dy = np.ones_like(x)
    y, mean, invstd = fastbn.batch_norm_forward(x, rm, rv, w, b, training, activation="relu")
    plain, _, _ = fastbn.batch_norm_forward(x, rm.copy(), rv.copy(), w, b, training)
    np.testing.assert_array_equal(y, np.maximum(plain, 0))
    dx, _, gb = fastbn.batch_norm_backward(dy, x, w, mean, invstd, training, activation="relu", bias=b)
    _, _, gb_plain = fastbn.batch_norm_backward(dy, x, w, mean, invstd, training)
    np.testing.assert_array_equal(gb, (plain > 0).sum(axis=(0, 2, 3)))  # sum of the gated dy
    assert (gb < gb_plain).all()
    if not training:  # fixed statistics: no gradient where the output was clipped
        assert (dx[plain <= 0] == 0).all() and (dx[plain > 0] != 0).all()


def _around_roots(rng, shape, dtype, mean, scale, bias, ulps=30):
    """x whose every channel holds the 2 * ulps values nearest the root of its normalized output,
    mean - bias / scale (where scale is not 0), and standard-normal values in the rest."""
    x = random_input(rng, shape, dtype).reshape(shape[0], shape[1], -1)
    for c in range(shape[1]):
        if scale[c] == 0:
            continue
        root = dtype(float(mean[c]) - float(bias[c]) / float(scale[c]))
        near = [root]
        for direction in (np.inf, -np.inf):
            v = root
            for _ in range(ulps):
                v = np.nextafter(v, dtype(direction))
                near.append(v)
        flat = x[:, c].reshape(-1)
        k = min(len(near), flat.size)
        flat[:k] = near[:k]
        x[:, c] = flat.reshape(x[:, c].shape)
    return x.reshape(shape)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_mask_at_the_roots(rng, kernel_path, dtype, training):
    """Outputs within a few ulps of 0, tiny positive ones, +-0 biases, zero and negative weights, a
    float32 mean that needs its low part: the recomputed mask (bias=) is the forward's output's
    (output=) to the bit.  (A float64 mask once dropped the outputs in (0, 3e-8], float16's
    threshold; the ranges path gates on bounds on x, searched with the forward's arithmetic.)"""
    for shape, offset in (((3, 6, 7, 7), 0.0), ((40, 6), 1e4), ((2, 6, 130), -3e3)):
        C = shape[1]
        w, b, rm, rv = random_params(rng, C, dtype)
        w[0], b[0] = 0, 0.5  # z = b > 0 everywhere
        w[1], b[1] = 0, -0.0  # z = -0 everywhere
        w[2] *= 1e-3
        b[3:] = [-0.0, 0.0, 1e-3][: C - 3]
        rm += dtype(offset)
        scale = w / np.sqrt(rv.astype(np.float64) + 1e-5)
        x = _around_roots(rng, shape, dtype, rm, scale, b)
        if training:  # the batch's statistics: roots of the forward's own coefficients
            _, mean, invstd = fastbn.batch_norm_forward(x, None, None, w, b, True)
            x = _around_roots(rng, shape, dtype, mean, w * invstd, b)
        dy = random_input(rng, shape, dtype)
        y, mean, invstd = fastbn.batch_norm_forward(x, rm.copy(), rv.copy(), w, b, training, activation="relu")
        assert ((y > 0) & (y < 3e-8)).any() or dtype == np.float32 or training
        by_bias = fastbn.batch_norm_backward(dy, x, w, mean, invstd, training, activation="relu", bias=b)
        by_output = fastbn.batch_norm_backward(dy, x, w, mean, invstd, training, activation="relu", output=y)
        for a, c in zip(by_bias, by_output):
            np.testing.assert_array_equal(a, c)
        _, _, count = fastbn.batch_norm_backward(np.ones_like(x), x, w, mean, invstd, training, activation="relu", bias=b)
        np.testing.assert_array_equal(count, (y > 0).sum(axis=(0,) + tuple(range(2, len(shape)))))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_masks_agree_for_wide_means(rng, kernel_path, dtype, training):
    """Means past FBN_WIDE (2^103 for float32, 2^970 for float64), where the kernels halve before
    subtracting the mean: bias= and output= give the same gradients (their sums once ran in
    different orders there, 1-2 ulp apart).  On the column paths a float32 training grad_input
    still differs in a few elements by a few ulps (a difference of two nearly equal terms), and
    is held to 1e-5."""
    big = dtype(1e32 if dtype == np.float32 else 1e293)
    for shape in ((2, 3, 49), (9, 3), (5, 4, 7), (2, 3, 130)):
        C = shape[1]
        x = (big * (1 + 1e-3 * rng.standard_normal(shape))).astype(dtype)
        w, b, _, _ = random_params(rng, C, dtype)
        rm, rv = np.full(C, big, dtype), np.full(C, 3e38 if dtype == np.float32 else 1e300, dtype)
        dy = random_input(rng, shape, dtype)
        y, mean, invstd = fastbn.batch_norm_forward(x, rm, rv, w, b, training, activation="relu")
        # (float64 training: the batch variance overflows, so y = relu(b); eval masks are mixed)
        assert ((y > 0).any() and (y == 0).any()) or (dtype == np.float64 and training)
        by_bias = fastbn.batch_norm_backward(dy, x, w, mean, invstd, training, activation="relu", bias=b)
        by_output = fastbn.batch_norm_backward(dy, x, w, mean, invstd, training, activation="relu", output=y)
        if dtype == np.float32 and training and kernel_path[0] != "ranges":
            np.testing.assert_allclose(by_bias[0], by_output[0], rtol=1e-5, atol=0)
        else:
            np.testing.assert_array_equal(by_bias[0], by_output[0])
        np.testing.assert_array_equal(by_bias[1], by_output[1])
        np.testing.assert_array_equal(by_bias[2], by_output[2])


def test_nan_and_negative_zero_as_pytorch():
    """torch.relu keeps NaN and -0.0; its backward passes the gradient at NaN, not at -0.0."""
    x = np.array([[0.0, 1.0], [np.nan, -1.0], [-2.0, 3.0], [0.5, -0.5]], dtype=np.float32)
    rm, rv = np.zeros(2, np.float32), np.ones(2, np.float32)
    w, b = np.ones(2, np.float32), np.zeros(2, np.float32)
    y, mean, invstd = fastbn.batch_norm_forward(x, rm, rv, w, b, eps=0.0, activation="relu")
    ty, tdx, _, _ = _torch_relu_bn(x, rm, rv, w, b, False, eps=0.0, dy=np.full_like(x, 2.0))
    np.testing.assert_array_equal(np.signbit(y), np.signbit(ty))
    np.testing.assert_array_equal(y, ty)  # NaN where torch has NaN
    xz = np.array([[-0.0, 1.0], [1.0, 2.0]], dtype=np.float32)  # -0.0 * 1 + -0.0 stays -0.0
    bz = np.full(2, -0.0, np.float32)
    yz = fastbn.batch_norm(xz, rm, rv, w, bz, eps=0.0, activation="relu")
    tyz, _, _ = _torch_relu_bn(xz, rm, rv, w, bz, False, eps=0.0)
    assert np.signbit(yz[0, 0]) and yz[0, 0] == 0 and np.signbit(tyz[0, 0])
    for kw in (dict(bias=b), dict(output=y)):
        dx, _, _ = fastbn.batch_norm_backward(np.full_like(x, 2.0), x, w, mean, invstd, False, activation="relu", **kw)
        np.testing.assert_array_equal(dx, tdx)


def test_channels_last_and_in_place(rng):
    x = random_input(rng, (4, 6, 5, 3), np.float32).transpose(0, 3, 1, 2).copy()  # values
    nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    xl = nhwc.transpose(0, 3, 1, 2)  # channels-last memory
    w, b, rm, rv = random_params(rng, 3, np.float32)
    y = fastbn.batch_norm(xl, rm, rv, w, b, activation="relu")
    assert y.strides == xl.strides or y.transpose(0, 2, 3, 1).flags.c_contiguous
    ty, _, _ = _torch_relu_bn(x, rm, rv, w, b, False)
    assert_close(y, ty)
    inplace = x.copy()
    out = fastbn.batch_norm(inplace, rm, rv, w, b, out=inplace, activation="relu")
    assert out is inplace
    np.testing.assert_array_equal(inplace, fastbn.batch_norm(x, rm, rv, w, b, activation="relu"))


@pytest.mark.parametrize("cls, shape", [(fastbn.BatchNorm1d, (16, 6)), (fastbn.BatchNorm2d, (4, 6, 5, 5)),
                                        (fastbn.BatchNorm3d, (2, 6, 3, 4, 5))])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_matches_sequential(rng, cls, shape, affine):
    torch_cls = getattr(torch.nn, cls.__name__)
    layer = cls(6, affine=affine, dtype=np.float64, activation="relu")
    ref = torch.nn.Sequential(torch_cls(6, affine=affine, dtype=torch.float64), torch.nn.ReLU())
    if affine:
        w, b, _, _ = random_params(rng, 6, np.float64)
        layer.weight[...], layer.bias[...] = w, b
        with torch.no_grad():
            ref[0].weight.copy_(torch.tensor(w))
            ref[0].bias.copy_(torch.tensor(b))
    assert sorted(layer.state_dict()) == sorted(k[2:] for k in ref.state_dict())
    assert "activation='relu'" in repr(layer)
    for training in (True, False):
        layer.train(training)
        ref.train(training)
        x = random_input(rng, shape, np.float64, offset=0.2)
        dy = random_input(rng, shape, np.float64)
        tx = torch.tensor(x, requires_grad=True)
        ty = ref(tx)
        ty.backward(torch.tensor(dy))
        y = layer(x)
        assert_close(y, ty.detach().numpy())
        assert_close(layer.backward(dy), tx.grad.numpy())
        if affine:
            assert_close(layer.grad_weight, ref[0].weight.grad.numpy())
            assert_close(layer.grad_bias, ref[0].bias.grad.numpy())
            ref.zero_grad()
        assert_close(layer.running_var, ref[0].running_var.numpy())


def test_layer_mask_uses_the_forwards_bias(rng):
    """An update of the bias between forward and backward leaves the mask the forward's."""
    layer = fastbn.BatchNorm1d(4, dtype=np.float64, activation="relu")
    x, dy = random_input(rng, (32, 4), np.float64), random_input(rng, (32, 4), np.float64)
    y, mean, invstd = fastbn.batch_norm_forward(x, None, None, layer.weight, layer.bias, True, activation="relu")
    layer(x)
    layer.bias += 5.0  # an optimizer step before backward
    expected, _, _ = fastbn.batch_norm_backward(dy, x, layer.weight, mean, invstd, True, activation="relu", output=y)
    np.testing.assert_array_equal(layer.backward(dy), expected)


def test_half_input(rng):
    x = random_input(rng, (8, 4, 3, 3), np.float32)
    w, b, rm, rv = random_params(rng, 4, np.float32)
    y = fastbn.batch_norm(x.astype(np.float16), rm, rv, w, b, activation="relu")
    assert y.dtype == np.float16
    ref = np.maximum(fastbn.batch_norm(x.astype(np.float16).astype(np.float32), rm, rv, w, b), 0)
    np.testing.assert_array_equal(y, ref.astype(np.float16))


def test_bad_arguments(rng):
    x = random_input(rng, (4, 3), np.float32)
    w, b, rm, rv = random_params(rng, 3, np.float32)
    with pytest.raises(ValueError, match="activation must be None or 'relu', got 'gelu'"):
        fastbn.batch_norm(x, rm, rv, w, b, activation="gelu")
    with pytest.raises(ValueError, match="activation must be None or 'relu', got 'gelu'"):
        fastbn.batch_norm(x, rm, rv, w, b, training=True, activation="gelu")
    with pytest.raises(ValueError, match="activation must be None or 'relu'"):
        fastbn.BatchNorm1d(3, activation=True)
    before = rm.copy()
    with pytest.raises(ValueError, match="activation"):  # a failed call changes no state
        fastbn.batch_norm(x, rm, rv, w, b, training=True, activation="ReLU")
    np.testing.assert_array_equal(rm, before)
    y, mean, invstd = fastbn.batch_norm_forward(x, None, None, w, b, True, activation="relu")
    with pytest.raises(ValueError, match="exactly one; got neither"):
        fastbn.batch_norm_backward(x, x, w, mean, invstd, activation="relu")
    with pytest.raises(ValueError, match="exactly one; got both"):
        fastbn.batch_norm_backward(x, x, w, mean, invstd, activation="relu", bias=b, output=y)
    with pytest.raises(ValueError, match="need activation='relu'"):
        fastbn.batch_norm_backward(x, x, w, mean, invstd, bias=b)
    with pytest.raises(ValueError, match="output must have the input's shape"):
        fastbn.batch_norm_backward(x, x, w, mean, invstd, activation="relu", output=y[:2])
    with pytest.raises(ValueError, match="bias"):
        fastbn.batch_norm_backward(x, x, w, mean, invstd, activation="relu", bias=b[:2])


# Rows of 1 to 127 elements, 7x7 and 10x10 maps, rows split between ranges by the kernel paths' units
SHORT_SHAPES = ((3, 6, 7, 7), (2, 5, 9), (4, 3, 1, 8), (2, 4, 127), (3, 2, 1), (2, 3, 10, 10), (6, 1, 49))


@pytest.fixture
def short_inline():
    """Runs the test with _short512.h's AVX-512 loops on, then restores the switch; the tests switch
    it off and on to compare the two (fastbn._kernels.short_inline)."""
    yield from switched_on(_kernels.short_inline, "the short-row loops need AVX-512F, VL and FMA, which this CPU lacks")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_short_row_forward_is_the_generic_loop_to_the_bit(rng, kernel_path, short_inline, training):
    """float32 rows shorter than 128 elements take _short512.h's AVX-512 loops for the training
    forward's moments (8 to 127 elements) and for the forward's normalize + affine, with and without
    ReLU (its max(0, v) for GCC's compare and select), and for the evaluation backward without it
    (the same map on grad_output): the generic loops' bits (outputs, saved statistics, running
    statistics), with NaN, +-0 and +-inf outputs, a zero and an infinite weight, a large offset (a
    nonzero low part of the mean), rows of 1 to 127 elements split between ranges (the kernel
    paths' units)."""
    for shape in SHORT_SHAPES:
        C = shape[1]
        w, b, rm, rv = random_params(rng, C, np.float32)
        if C > 1:
            w[0], b[0] = 0, -0.0  # every output +-0
        if C > 2:
            w[2] = np.inf  # +-inf and NaN outputs
        x = random_input(rng, shape, np.float32)
        x[:, -1].reshape(-1)[::3] = np.nan
        x.reshape(-1)[1::7] = -0.0
        if C > 3:
            x[:, 3] += np.float32(1e4)
            rm[3] = np.float32(1e4)
        dy = random_input(rng, shape, np.float32)
        with np.errstate(all="ignore"):
            results = {}
            for inline in (True, False):
                short_inline(inline)
                results[inline] = [fastbn.batch_norm(x, rm.copy(), rv.copy(), w, b, training, activation=a)
                                   for a in (None, "relu")]
                rm2, rv2 = rm.copy(), rv.copy()
                _, mean, invstd = fastbn.batch_norm_forward(x, rm2, rv2, w, b, training)
                results[inline] += [mean, invstd, rm2, rv2]
                results[inline] += fastbn.batch_norm_backward(dy, x, w, mean, invstd, training)
        for ours, generic in zip(results[True], results[False]):
            assert ours.tobytes() == generic.tobytes(), (shape, training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_short_row_loops_are_the_generic_ones_to_the_bit(rng, kernel_path, short_inline, training):
    """float32 rows shorter than 128 elements take _short512.h's AVX-512 loops for the backward
    (fastbn._kernels.short_inline); they promise the generic loops' bits, for every activation and
    mask rule: bounds on x (positive and negative scales), the output recomputed (a zero scale, an
    infinite weight), the forward's output read, NaN x, -0 gradients, a large offset, rows split
    between ranges (the kernel paths' units), rows of 1 to 127 elements.  Each row's gradients hold
    +-2^40 among values near 1, so that the lanes' sum rounds and its order shows in the results."""
    for shape in SHORT_SHAPES:
        C = shape[1]
        w, b, rm, rv = random_params(rng, C, np.float32)
        if C > 1:
            w[0], b[0] = 0, 0.5  # z = b > 0 everywhere: every gradient kept
            w[1], b[1] = 0, -0.0  # z = -0: none kept, the output recomputed (no bounds)
        if C > 2:
            w[2] = np.inf  # a non-finite coefficient: the output recomputed
        x = random_input(rng, shape, np.float32)
        last = x[:, -1]  # NaN in one channel (they make its sum of dy * (x - mean) NaN)
        last[np.arange(last.size).reshape(last.shape) % 3 == 0] = np.nan
        if C > 3:
            x[:, 3] += np.float32(1e4)
        dy = random_input(rng, shape, np.float32)
        dy.reshape(-1)[::5] = -0.0
        rows = dy.reshape(-1, int(np.prod(shape[2:])))
        if rows.shape[1] >= 3:  # +-2^40 in lanes 0 and 2 of each row: the sums' order shows in the results
            rows[:, 0], rows[:, 2] = 2.0**40, -(2.0**40)
        with np.errstate(all="ignore"):
            y, mean, invstd = fastbn.batch_norm_forward(x, rm.copy(), rv.copy(), w, b, training, activation="relu")
            results = {}
            for inline in (True, False):
                short_inline(inline)
                results[inline] = [
                    fastbn.batch_norm_backward(dy, x, w, mean, invstd, training, **kw)
                    for kw in ({}, dict(activation="relu", bias=b), dict(activation="relu", output=y))]
        for ours, generic in zip(results[True], results[False]):
            for a, g in zip(ours, generic):
                assert a.tobytes() == g.tobytes(), (shape, training)
