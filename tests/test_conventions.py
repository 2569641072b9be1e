"""Conventions from outside PyTorch, and the argument rules of issue 12: ONNX's (and Keras's)
biased running variance checked against onnx.reference, boolean flags, in-place calls on
non-native byte order, checkpoints that cannot be written."""
import numpy as np
import pytest

import fastbn


def _onnx_batch_norm(x, scale, bias, mean, var, eps, m, training):
    onnx = pytest.importorskip("onnx", reason="onnx is an optional test dependency (pip install onnx)")
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    names = ["X", "scale", "B", "input_mean", "input_var"]
    outputs = ["Y", "running_mean", "running_var"] if training else ["Y"]
    node = helper.make_node("BatchNormalization", names, outputs, epsilon=eps, momentum=m,
                            training_mode=int(training))
    ft = TensorProto.DOUBLE if x.dtype == np.float64 else TensorProto.FLOAT
    graph = helper.make_graph(
        [node], "bn", [helper.make_tensor_value_info(n, ft, None) for n in names],
        [helper.make_tensor_value_info(n, ft, None) for n in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    return ReferenceEvaluator(model).run(None, dict(zip(names, (x, scale, bias, mean, var))))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(4, 3), (2, 5, 3, 4), (3, 2, 2, 3, 2)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_onnx_reference_with_biased_running_var(training, shape, dtype):
    rng = np.random.default_rng(sum(shape))
    C = shape[1]
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    scale, bias = rng.uniform(0.5, 1.5, C).astype(dtype), rng.standard_normal(C).astype(dtype)
    mean, var = rng.standard_normal(C).astype(dtype), rng.uniform(0.5, 2, C).astype(dtype)
    m, eps = float(np.float32(0.9)), float(np.float32(1e-5))  # ONNX's attributes are float32
    want = _onnx_batch_norm(x, scale, bias, mean.copy(), var.copy(), eps, m, training)
    rm, rv = mean.copy(), var.copy()
    # ONNX's momentum m weighs the running statistics: fastbn's (PyTorch's) momentum is 1 - m
    y = fastbn.batch_norm(x, rm, rv, scale, bias, training=training, momentum=1 - m, eps=eps, unbiased=False)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y, want[0], **tol)
    if training:
        np.testing.assert_allclose(rm, want[1], **tol)
        np.testing.assert_allclose(rv, want[2], **tol)
        # and the layer: BatchNorm*d(unbiased=False) does the same
        layer = {2: fastbn.BatchNorm1d, 4: fastbn.BatchNorm2d, 5: fastbn.BatchNorm3d}[len(shape)](
            C, eps=eps, momentum=1 - m, dtype=dtype, unbiased=False)
        layer.load_state_dict({"weight": scale, "bias": bias, "running_mean": mean, "running_var": var})
        np.testing.assert_allclose(layer(x), want[0], **tol)
        np.testing.assert_allclose(layer.running_var, want[2], **tol)


def test_unbiased_true_is_pytorchs_and_false_differs_by_n_over_n_minus_1():
    x = np.random.default_rng(0).standard_normal((5, 3, 2)).astype(np.float64)
    rv_u, rv_b = np.ones(3), np.ones(3)
    fastbn.batch_norm(x, np.zeros(3), rv_u, training=True, momentum=1.0)
    fastbn.batch_norm(x, np.zeros(3), rv_b, training=True, momentum=1.0, unbiased=False)
    var = x.transpose(1, 0, 2).reshape(3, -1).var(axis=1)
    np.testing.assert_allclose(rv_b, var, rtol=1e-13)
    np.testing.assert_allclose(rv_u, var * 10 / 9, rtol=1e-13)


@pytest.mark.parametrize("call", [
    lambda x, v: fastbn.batch_norm(x, np.zeros(3, np.float32), np.ones(3, np.float32), training=v),
    lambda x, v: fastbn.batch_norm(x, np.zeros(3, np.float32), np.ones(3, np.float32), training=True, unbiased=v),
    lambda x, v: fastbn.batch_norm_backward(x, x, None, np.zeros(3), np.ones(3), training=v),
    lambda x, v: fastbn.instance_norm(x, use_input_stats=v),
    lambda x, v: fastbn.BatchNorm1d(3, affine=v),
    lambda x, v: fastbn.BatchNorm1d(3, track_running_stats=v),
    lambda x, v: fastbn.BatchNorm1d(3, unbiased=v),
    lambda x, v: fastbn.GroupNorm(1, 3, affine=v),
    lambda x, v: fastbn.LayerNorm(2, elementwise_affine=v),
    lambda x, v: fastbn.InstanceNorm1d(3, track_running_stats=v),
    lambda x, v: fastbn.BatchNorm1d(3)(x, update_running_stats=v),
])
@pytest.mark.parametrize("value", ["False", 0, 1, None, 1.0])
def test_boolean_flags_refuse_non_bools(call, value):
    """PyTorch raises TypeError for F.batch_norm(x, ..., training="False"); a string or a number
    would otherwise silently mean True (training, updating the running statistics)."""
    x = np.random.default_rng(0).standard_normal((4, 3, 2)).astype(np.float32)
    with pytest.raises(TypeError, match=r"must be a bool \(True or False\), got"):
        call(x, value)
    call(x, np.bool_(True))  # NumPy's bool is a bool


def test_in_place_on_big_endian_input():
    x = np.random.default_rng(1).standard_normal((4, 3, 5)).astype(">f4")
    want = fastbn.batch_norm(x.astype(np.float32), None, None, training=True)
    y = fastbn.batch_norm(x, None, None, training=True, out=x)
    assert y is x and x.dtype == np.dtype(">f4")
    np.testing.assert_array_equal(x.astype(np.float32), want)


@pytest.mark.parametrize("dtype", ["f2", "f4", "f8"])
@pytest.mark.parametrize("call", [
    lambda x, **kw: fastbn.batch_norm(x, None, None, training=True, **kw),
    lambda x, **kw: fastbn.group_norm(x, 3, **kw),
    lambda x, **kw: fastbn.layer_norm(x, (4,), **kw),
], ids=["batch", "group", "layer"])
def test_either_byte_order_in_and_out(dtype, call):
    """An input of either byte order gives a native-order result, and takes out= of either byte
    order (float16 in big-endian once refused a native out=, and returned a big-endian result
    where float32 and float64 returned native ones)."""
    native = np.random.default_rng(2).standard_normal((2, 3, 4)).astype("=" + dtype)
    want = call(native)
    for order in "<>":
        x = native.astype(order + dtype)
        y = call(x)
        assert y.dtype.isnative and y.dtype == want.dtype
        np.testing.assert_array_equal(y, want)
        for out_order in "<>":
            out = np.empty(x.shape, out_order + dtype)
            assert call(x, out=out) is out
            np.testing.assert_array_equal(out.astype(want.dtype), want)


def test_load_state_dict_into_a_read_only_array_changes_nothing():
    bn = fastbn.BatchNorm1d(3)
    bn.running_var = np.ones(3, np.float32)
    bn.running_var.flags.writeable = False
    state = {"weight": np.full(3, 2, np.float32), "bias": np.full(3, 3, np.float32),
             "running_mean": np.full(3, 4, np.float32), "running_var": np.full(3, 5, np.float32)}
    with pytest.raises(ValueError, match="running_var is read-only"):
        bn.load_state_dict(state)
    assert (bn.weight == 1).all() and (bn.bias == 0).all() and (bn.running_mean == 0).all()


def test_memory_relations_match_numpys_bounds():
    """The C bounds check behind out= (fastbn._alloc.relation/overlapping) against NumPy's
    may_share_memory, on views with negative, zero and gapped strides."""
    from fastbn import _alloc

    base = np.arange(64, dtype=np.float32)
    views = [base, base[::-1], base[8:24], base[20:40], base[::2], base[1::2], base[40:], base[:0],
             np.broadcast_to(base[5:6], (4,)), base.reshape(8, 8)[:, 2], base.reshape(8, 8)[::-1, ::3],
             np.zeros(4, np.float32)]
    for a in views:
        for b in views:
            rel = _alloc.relation(a, b)
            assert (rel > 0) == np.may_share_memory(a, b), (a.strides, b.strides)
            same = a.size > 0 and a.__array_interface__["data"][0] == b.__array_interface__["data"][0] and \
                np.lib.array_utils.byte_bounds(a) == np.lib.array_utils.byte_bounds(b)
            assert (rel == 1) == same
        mask = _alloc.overlapping(a, tuple(views) + (None,))
        assert mask == sum(1 << i for i, b in enumerate(views) if np.may_share_memory(a, b))
