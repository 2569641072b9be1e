"""Folding an evaluation-mode batch norm into the conv or linear layer before it (fastbn.fusion):
PyTorch's torch.nn.utils.fusion to float rounding, and the folded layer equals conv/linear + bn."""
import numpy as np
import pytest

import fastbn

torch = pytest.importorskip("torch")
from torch.nn.utils import fusion as tfusion  # noqa: E402


def _bn(rng, C, dtype, none_affine=False):
    rm = rng.standard_normal(C).astype(dtype)
    rv = rng.uniform(0.1, 3.0, C).astype(dtype)
    w = None if none_affine else rng.standard_normal(C).astype(dtype)
    b = None if none_affine else rng.standard_normal(C).astype(dtype)
    return rm, rv, w, b


def _t(a):
    return None if a is None else torch.from_numpy(a)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("kernel", [(3,), (3, 3), (1, 2, 3)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_conv_matches_pytorch(rng, dtype, transpose, kernel, with_bias):
    C_in, C_out = 5, 7
    shape = (C_in, C_out) + kernel if transpose else (C_out, C_in) + kernel
    w = rng.standard_normal(shape).astype(dtype)
    b = rng.standard_normal(C_out).astype(dtype) if with_bias else None
    rm, rv, bw, bb = _bn(rng, C_out, dtype)
    w0 = w.copy()
    fw, fb = fastbn.fuse_conv_bn_weights(w, b, rm, rv, 1e-5, bw, bb, transpose=transpose)
    tw, tb = tfusion.fuse_conv_bn_weights(_t(w), _t(b), _t(rm), _t(rv), 1e-5, _t(bw), _t(bb), transpose=transpose)
    assert fw.dtype == w.dtype and fb.dtype == dtype and fw.shape == w.shape and fb.shape == (C_out,)
    tol = 2e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(fw, tw.detach().numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(fb, tb.detach().numpy(), rtol=tol, atol=tol)
    np.testing.assert_array_equal(w, w0)  # nothing is written


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_linear_matches_pytorch_and_the_folded_layer_equals_linear_then_bn(rng, dtype):
    w = rng.standard_normal((6, 4)).astype(dtype)
    b = rng.standard_normal(6).astype(dtype)
    rm, rv, bw, bb = _bn(rng, 6, dtype)
    fw, fb = fastbn.fuse_linear_bn_weights(w, b, rm, rv, 1e-5, bw, bb)
    tw, tb = tfusion.fuse_linear_bn_weights(_t(w), _t(b), _t(rm), _t(rv), 1e-5, _t(bw), _t(bb))
    tol = 2e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(fw, tw.detach().numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(fb, tb.detach().numpy(), rtol=tol, atol=tol)
    # through the eval layer: x @ w.T + b, then BatchNorm1d, equals x @ fw.T + fb
    bn = fastbn.BatchNorm1d(6, dtype=dtype).eval()
    bn.running_mean[...], bn.running_var[...], bn.weight[...], bn.bias[...] = rm, rv, bw, bb
    x = rng.standard_normal((9, 4)).astype(dtype)
    want = fastbn.batch_norm(x @ w.T + b, rm, rv, bw, bb, training=False)
    gw, gb = fastbn.fuse_linear_bn_eval(w, b, bn)
    np.testing.assert_allclose(x @ gw.T + gb, want, rtol=1e-4 if dtype == np.float32 else 1e-12, atol=1e-5)


def test_missing_biases_and_affine_follow_pytorch(rng):
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    rm, rv, _, _ = _bn(rng, 3, np.float32, none_affine=True)
    fw, fb = fastbn.fuse_conv_bn_weights(w, None, rm, rv, 1e-3, None, None)
    tw, tb = tfusion.fuse_conv_bn_weights(_t(w), None, _t(rm), _t(rv), 1e-3, torch.ones(3), torch.zeros(3))
    np.testing.assert_allclose(fw, tw.detach().numpy(), rtol=2e-6)
    np.testing.assert_allclose(fb, tb.detach().numpy(), rtol=2e-6, atol=1e-7)
    assert fb.dtype == np.float32


def test_bad_input_is_refused_with_the_rule(rng):
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    rm, rv, bw, bb = _bn(rng, 3, np.float32)
    with pytest.raises(ValueError, match=r"bn_rm must have shape \(3,\)"):
        fastbn.fuse_conv_bn_weights(w, None, rm[:2], rv, 1e-5, bw, bb)
    with pytest.raises(ValueError, match="bn_eps must be a non-negative number"):
        fastbn.fuse_conv_bn_weights(w, None, rm, rv, -1.0, bw, bb)
    with pytest.raises(TypeError, match="conv_w must be a floating-point numpy array"):
        fastbn.fuse_conv_bn_weights(w.astype(np.int32), None, rm, rv, 1e-5, bw, bb)
    with pytest.raises(ValueError, match="conv_w must have 2 or 3 or 4 or 5 dimensions"):
        fastbn.fuse_conv_bn_weights(w[0, 0, 0], None, rm, rv, 1e-5, bw, bb)
    with pytest.raises(ValueError, match="training mode"):
        fastbn.fuse_conv_bn_eval(w, None, fastbn.BatchNorm2d(3))
    with pytest.raises(TypeError, match="fastbn BatchNorm"):
        fastbn.fuse_linear_bn_eval(w[:, :, 0, 0], None, object())


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("conv", [False, True])
def test_a_one_feature_norm_broadcasts_as_in_pytorch(rng, with_bias, conv):
    """PyTorch's fuse_linear_bn_eval allows bn.num_features == 1, and its arithmetic broadcasts the
    one value over every output (the fused bias keeps the running mean's shape without a bias)."""
    w = rng.standard_normal((5, 7) + ((3,) if conv else ())).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32) if with_bias else None
    rm, rv, bw, bb = _bn(rng, 1, np.float32)
    fuse, tfuse = ((fastbn.fuse_conv_bn_weights, tfusion.fuse_conv_bn_weights) if conv else
                   (fastbn.fuse_linear_bn_weights, tfusion.fuse_linear_bn_weights))
    fw, fb = fuse(w, b, rm, rv, 1e-5, bw, bb)
    tw, tb = tfuse(_t(w), _t(b), _t(rm), _t(rv), 1e-5, _t(bw), _t(bb))
    assert fw.shape == tuple(tw.shape) and fb.shape == tuple(tb.shape)
    np.testing.assert_allclose(fw, tw.detach().numpy(), rtol=2e-6)
    np.testing.assert_allclose(fb, tb.detach().numpy(), rtol=2e-6, atol=1e-6)


def test_a_2d_conv_weight_folds_as_in_pytorch(rng):
    w = rng.standard_normal((4, 6)).astype(np.float32)
    rm, rv, bw, bb = _bn(rng, 4, np.float32)
    fw, fb = fastbn.fuse_conv_bn_weights(w, None, rm, rv, 1e-5, bw, bb)
    tw, tb = tfusion.fuse_conv_bn_weights(_t(w), None, _t(rm), _t(rv), 1e-5, _t(bw), _t(bb))
    np.testing.assert_allclose(fw, tw.detach().numpy(), rtol=2e-6)
    np.testing.assert_allclose(fb, tb.detach().numpy(), rtol=2e-6, atol=1e-6)
