"""ONNX's own conformance cases for its normalization operators, run through fastbn: the node
tests that the onnx package generates (onnx/backend/test/case/node: BatchNormalization,
GroupNormalization, InstanceNormalization, LayerNormalization), each with its inputs and the
outputs of ONNX's NumPy reference.  Data that no one here wrote."""
import importlib

import numpy as np
import pytest

import fastbn

onnx = pytest.importorskip("onnx", reason="onnx is an optional test dependency (pip install onnx)")
from onnx.backend.test.case.base import Base  # noqa: E402

MODULES = ["batch_normalization", "groupnormalization", "instance_normalization", "layernormalization"]


def _cases():
    """(name, node, inputs, outputs) of every case the modules' export functions produce."""
    found = []

    def expect(node, inputs, outputs, name, **_):
        found.append((name, node, inputs, outputs))

    for modname in MODULES:
        mod = importlib.import_module("onnx.backend.test.case.node." + modname)
        mod.expect = expect  # the cases call the module's expect(); collect instead of writing files
        for cls in vars(mod).values():
            if isinstance(cls, type) and issubclass(cls, Base) and cls is not Base:
                for fn in sorted(n for n in vars(cls) if n.startswith("export")):
                    np.random.seed(0)
                    getattr(cls, fn)()
    return found


CASES = _cases()


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _run(node, inputs):
    """fastbn's outputs for an ONNX node, in the node's output order."""
    eps = _attr(node, "epsilon", 1e-5)
    op = node.op_type
    if op == "BatchNormalization":
        x, scale, bias, mean, var = inputs
        if _attr(node, "training_mode", 0):
            # ONNX's momentum m weighs the running statistics, and its running variance is biased
            rm, rv = mean.copy(), var.copy()
            y = fastbn.batch_norm(x, rm, rv, scale, bias, training=True, momentum=1 - _attr(node, "momentum", 0.9),
                                  eps=eps, unbiased=False)
            return [y, rm, rv]
        return [fastbn.batch_norm(x, mean.copy(), var.copy(), scale, bias, training=False, eps=eps)]
    if op == "GroupNormalization":
        x, scale, bias = inputs
        return [fastbn.group_norm(x, _attr(node, "num_groups", None), scale, bias, eps)]
    if op == "InstanceNormalization":
        x, scale, bias = inputs
        return [fastbn.instance_norm(x, weight=scale, bias=bias, eps=eps)]
    if op == "LayerNormalization":  # normalizes dims [axis, rank); scale and bias broadcast to them
        x, scale = inputs[:2]
        axis = _attr(node, "axis", -1) % x.ndim
        shape = x.shape[axis:]
        bias = np.broadcast_to(inputs[2], shape) if len(inputs) > 2 else None
        y, mean, invstd = fastbn.layer_norm_forward(x, shape, np.broadcast_to(scale, shape), bias, eps)
        kept = x.shape[:axis] + (1,) * (x.ndim - axis)  # ONNX keeps the reduced dims as ones
        return [y, mean.reshape(kept), invstd.reshape(kept)][:len(node.output)]
    raise AssertionError(f"no mapping for {op}")


def test_the_cases_are_there():
    ops = {node.op_type for _, node, _, _ in CASES}
    assert ops == {"BatchNormalization", "GroupNormalization", "InstanceNormalization", "LayerNormalization"}
    assert len(CASES) >= 20


@pytest.mark.parametrize("name,node,inputs,outputs", CASES, ids=[c[0] for c in CASES])
def test_onnx_node_case(name, node, inputs, outputs):
    if node.op_type == "GroupNormalization" and inputs[1].shape[0] != inputs[0].shape[1]:
        pytest.skip("opset 18's per-group scale and bias: fastbn's (PyTorch's) are per channel, as opset 21's")
    given = [a.copy() for a in inputs]
    got = _run(node, inputs)
    assert len(got) == len(outputs)
    for g, want in zip(got, outputs):
        assert np.shape(g) == want.shape
        # ONNX's reference computes in the input's type; fastbn accumulates in float64
        np.testing.assert_allclose(np.asarray(g, np.float64), want.astype(np.float64), rtol=1e-5, atol=1e-5)
    for a, b in zip(inputs, given):  # inputs untouched
        np.testing.assert_array_equal(a, b)
