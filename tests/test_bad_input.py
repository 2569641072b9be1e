"""Bad input: a ValueError/TypeError naming the value and the rule, and no state changed."""
import re

import numpy as np
import pytest

import fastbn
from fastbn import _kernels
from _helpers import assert_close, random_input, random_params, ref_backward

SHAPE = (4, 3, 5)


def _valid(rng):
    x = random_input(rng, SHAPE, np.float32)
    w, b, rm, rv = random_params(rng, 3, np.float32)
    return dict(input=x, running_mean=rm, running_var=rv, weight=w, bias=b, training=True,
                momentum=0.1, eps=1e-5, out=np.full(SHAPE, 7.0, np.float32))


def _read_only(a):
    a = a.copy()
    a.flags.writeable = False
    return a


# (id, change to the valid arguments, exception, regex the message must match)
FORWARD_CASES = [
    ("int-input", dict(input=np.ones(SHAPE, np.int64)), TypeError, r"input must be float16, bfloat16, float32 or float64, got dtype int64"),
    ("int32-input", dict(input=np.ones(SHAPE, np.int32)), TypeError, r"float32 or float64.*int32"),
    ("bool-input", dict(input=np.ones(SHAPE, bool)), TypeError, r"float32 or float64.*bool"),
    ("complex-input", dict(input=np.ones(SHAPE, np.complex128)), TypeError, r"float32 or float64.*complex128"),
    ("object-input", dict(input=np.ones(SHAPE, object)), TypeError, r"float32 or float64.*object"),
    ("float128-input", dict(input=np.ones(SHAPE, np.longdouble)), TypeError, r"float32 or float64, got dtype float128; cast it with .astype"),
    ("list-input", dict(input=[[1.0, 2.0, 3.0]] * 4), TypeError, r"numpy\.ndarray.*list"),
    ("1d-input", dict(input=np.ones(5, np.float32)), ValueError, r"at least 2 dimensions.*\(5,\)"),
    ("0d-input", dict(input=np.ones((), np.float32)), ValueError, r"at least 2 dimensions.*\(\)"),
    ("weight-length", dict(weight=np.ones(4, np.float32)), ValueError, r"weight must have shape \(3,\).*3 channels.*\(4,\)"),
    ("weight-2d", dict(weight=np.ones((3, 1), np.float32)), ValueError, r"weight must have shape \(3,\).*\(3, 1\)"),
    ("weight-int", dict(weight=np.ones(3, np.int64)), TypeError, r"weight must be float16, bfloat16, float32 or float64, got dtype int64"),
    ("weight-float128", dict(weight=np.ones(3, np.longdouble)), TypeError, r"weight must be float16, bfloat16, float32 or float64.*float128"),
    ("weight-list", dict(weight=[1.0, 1.0, 1.0]), TypeError, r"weight must be a numpy array.*list"),
    ("bias-length", dict(bias=np.zeros(2, np.float32)), ValueError, r"bias must have shape \(3,\).*\(2,\)"),
    ("bias-complex", dict(bias=np.zeros(3, np.complex64)), TypeError, r"bias must be float16, bfloat16, float32 or float64.*complex64"),
    ("running-mean-length", dict(running_mean=np.zeros(5, np.float32)), ValueError, r"running_mean must have shape \(3,\).*\(5,\)"),
    ("running-var-length", dict(running_var=np.ones(1, np.float32)), ValueError, r"running_var must have shape \(3,\).*\(1,\)"),
    ("running-mean-int", dict(running_mean=np.zeros(3, np.int32)), TypeError, r"running_mean must be float16, bfloat16, float32 or float64.*int32"),
    ("running-var-int", dict(running_var=np.ones(3, np.int32)), TypeError, r"running_var must be float16, bfloat16, float32 or float64.*int32"),
    ("running-var-read-only", dict(running_var=_read_only(np.ones(3, np.float32))), ValueError, r"running_var is read-only"),
    ("only-running-mean", dict(running_var=None), ValueError, r"running_mean and running_var must both be"),
    ("eval-without-buffers", dict(running_mean=None, running_var=None, training=False), ValueError,
     r"running_mean and running_var must be given in evaluation mode"),
    ("out-shape", dict(out=np.zeros((4, 3, 6), np.float32)), ValueError, r"out must have the input's shape \(4, 3, 5\).*\(4, 3, 6\)"),
    ("out-dtype", dict(out=np.zeros(SHAPE, np.float64)), ValueError, r"out must have .*dtype float32.*float64"),
    ("out-read-only", dict(out=_read_only(np.zeros(SHAPE, np.float32))), ValueError, r"out is read-only"),
    ("out-list", dict(out=[0.0]), TypeError, r"out must be a numpy array, got list"),
    ("one-value-per-channel", dict(input=np.ones((1, 3), np.float32), out=None), ValueError,
     r"more than 1 value per channel.*\(1, 3\)"),
    ("one-value-per-channel-3d", dict(input=np.ones((1, 3, 1), np.float32), out=None), ValueError,
     r"more than 1 value per channel.*\(1, 3, 1\)"),
    ("momentum-high", dict(momentum=1.5), ValueError, r"momentum must be a real number in \[0.0, 1.0\], got 1.5"),
    ("momentum-negative", dict(momentum=-0.1), ValueError, r"momentum must be .*got -0.1"),
    ("momentum-none", dict(momentum=None), TypeError, r"momentum must be a float"),
    ("momentum-none-eval", dict(momentum=None, training=False), TypeError, r"momentum must be a float"),
    ("momentum-str", dict(momentum="0.1"), TypeError, r"momentum must be a real number.*'0.1'"),
    ("eps-negative", dict(eps=-1e-5), ValueError, r"eps must be a real number >= 0.0, got -1e-05"),
    ("eps-nan", dict(eps=float("nan")), ValueError, r"eps must be .*nan"),
    ("eps-bool", dict(eps=True), TypeError, r"eps must be .*True"),
]


@pytest.mark.parametrize("func", [fastbn.batch_norm, fastbn.batch_norm_forward])
@pytest.mark.parametrize("change,exc,message", [c[1:] for c in FORWARD_CASES], ids=[c[0] for c in FORWARD_CASES])
def test_functional_forward_rejects(rng, func, change, exc, message):
    args = _valid(rng)
    args.update(change)
    snapshot = {k: (np.array(v, copy=True) if isinstance(v, np.ndarray) else v) for k, v in args.items()}
    kwargs = dict(args)
    x = kwargs.pop("input")
    out = kwargs.pop("out")
    with pytest.raises(exc, match=message):
        func(x, kwargs.pop("running_mean"), kwargs.pop("running_var"), out=out, **kwargs)
    for k, v in args.items():
        if isinstance(v, np.ndarray):
            np.testing.assert_array_equal(v, snapshot[k], err_msg=f"{k} was changed")
            assert v.dtype == snapshot[k].dtype


def test_functional_error_happens_before_any_running_update(rng):
    """A bad out= (checked last) must not leave half-updated running buffers behind."""
    args = _valid(rng)
    rm, rv = args["running_mean"], args["running_var"]
    rm0, rv0 = rm.copy(), rv.copy()
    with pytest.raises(ValueError):
        fastbn.batch_norm(args["input"], rm, rv, args["weight"], args["bias"], training=True,
                          out=np.zeros((1, 1, 1), np.float32))
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)


BACKWARD_CASES = [
    ("grad-shape", dict(grad_output=np.ones((4, 3, 6), np.float32)), ValueError,
     r"grad_output must have the input's shape \(4, 3, 5\), got \(4, 3, 6\)"),
    ("grad-dtype", dict(grad_output=np.ones(SHAPE, np.float64)), TypeError, r"grad_output must have the input's dtype float32, got float64"),
    ("grad-int", dict(grad_output=np.ones(SHAPE, np.int64)), TypeError, r"grad_output must be float16, bfloat16, float32 or float64, got dtype int64"),
    ("grad-list", dict(grad_output=[1.0]), TypeError, r"numpy"),
    ("input-int", dict(input=np.ones(SHAPE, np.int64)), TypeError, r"input must be float16, bfloat16, float32 or float64, got dtype int64"),
    ("input-1d", dict(input=np.ones(5, np.float32), grad_output=np.ones(5, np.float32)), ValueError, r"at least 2 dimensions"),
    ("weight-length", dict(weight=np.ones(2, np.float32)), ValueError, r"weight must have shape \(3,\).*\(2,\)"),
    ("save-mean-length", dict(save_mean=np.zeros(4)), ValueError, r"save_mean must have shape \(3,\).*\(4,\)"),
    ("save-invstd-int", dict(save_invstd=np.ones(3, np.int64)), TypeError, r"save_invstd must be float16, bfloat16, float32 or float64.*int64"),
    ("save-invstd-none", dict(save_invstd=None), TypeError, r"save_invstd must be a numpy array.*NoneType"),
    ("out-shape", dict(out=np.zeros((4, 3, 6), np.float32)), ValueError, r"out must have the input's shape \(4, 3, 5\).*\(4, 3, 6\)"),
    ("out-dtype", dict(out=np.zeros(SHAPE, np.float64)), ValueError, r"out must have .*dtype float32.*float64"),
    ("out-read-only", dict(out=_read_only(np.zeros(SHAPE, np.float32))), ValueError, r"out is read-only"),
    ("out-list", dict(out=[0.0]), TypeError, r"out must be a numpy array, got list"),
]


@pytest.mark.parametrize("change,exc,message", [c[1:] for c in BACKWARD_CASES], ids=[c[0] for c in BACKWARD_CASES])
def test_functional_backward_rejects(rng, change, exc, message):
    x = random_input(rng, SHAPE, np.float32)
    w = random_params(rng, 3, np.float32)[0]
    _, mean, invstd = fastbn.batch_norm_forward(x, None, None, w, training=True)
    args = dict(grad_output=np.ones(SHAPE, np.float32), input=x, weight=w, save_mean=mean, save_invstd=invstd)
    args.update(change)
    copies = {k: v.copy() for k, v in args.items() if isinstance(v, np.ndarray)}
    with pytest.raises(exc, match=message):
        fastbn.batch_norm_backward(args["grad_output"], args["input"], args["weight"], args["save_mean"],
                                   args["save_invstd"], out=args.get("out"))
    for k, v in copies.items():
        np.testing.assert_array_equal(args[k], v)


# ---------------------------------------------------------------------------------- layers
def _layer_snapshot(bn):
    return {k: np.array(v, copy=True) for k, v in bn.state_dict().items()}


def _assert_layer_unchanged(bn, snapshot):
    now = bn.state_dict()
    assert list(now) == list(snapshot)
    for k, v in snapshot.items():
        np.testing.assert_array_equal(now[k], v, err_msg=f"{k} changed")


LAYER_CASES = [
    ("1d-gets-4d", fastbn.BatchNorm1d, np.ones((2, 3, 4, 4), np.float32), ValueError,
     r"BatchNorm1d expected 2-D or 3-D .*got shape \(2, 3, 4, 4\)"),
    ("1d-gets-1d", fastbn.BatchNorm1d, np.ones(3, np.float32), ValueError, r"BatchNorm1d expected 2-D or 3-D.*\(3,\)"),
    ("2d-gets-3d", fastbn.BatchNorm2d, np.ones((2, 3, 4), np.float32), ValueError, r"BatchNorm2d expected 4-D .*\(2, 3, 4\)"),
    ("2d-gets-5d", fastbn.BatchNorm2d, np.ones((2, 3, 2, 2, 2), np.float32), ValueError, r"BatchNorm2d expected 4-D"),
    ("3d-gets-4d", fastbn.BatchNorm3d, np.ones((2, 3, 4, 4), np.float32), ValueError, r"BatchNorm3d expected 5-D .*\(2, 3, 4, 4\)"),
    ("channels-1d", fastbn.BatchNorm1d, np.ones((2, 4), np.float32), ValueError,
     r"BatchNorm1d\(3\) expected 3 channels \(axis 1\), got shape \(2, 4\)"),
    ("channels-2d", fastbn.BatchNorm2d, np.ones((2, 2, 3, 3), np.float32), ValueError, r"expected 3 channels.*\(2, 2, 3, 3\)"),
    ("int", fastbn.BatchNorm1d, np.ones((2, 3), np.int64), TypeError, r"float32 parameters, got input of dtype int64"),
    ("bool", fastbn.BatchNorm2d, np.ones((2, 3, 2, 2), bool), TypeError, r"got input of dtype bool"),
    ("complex", fastbn.BatchNorm1d, np.ones((2, 3, 2), np.complex64), TypeError, r"got input of dtype complex64"),
    ("object", fastbn.BatchNorm1d, np.ones((2, 3), object), TypeError, r"got input of dtype object"),
    ("float128", fastbn.BatchNorm3d, np.ones((2, 3, 1, 2, 2), np.longdouble), TypeError, r"got input of dtype float128"),
    ("float64-into-float32", fastbn.BatchNorm1d, np.ones((2, 3), np.float64), TypeError,
     r"holds float32 parameters, got input of dtype float64"),
    ("list", fastbn.BatchNorm1d, [[1.0, 2.0, 3.0]] * 2, (TypeError, ValueError), r"expected a numpy.ndarray \(or cupy.ndarray\), got builtins.list"),
    ("one-value-1d", fastbn.BatchNorm1d, np.ones((1, 3), np.float32), ValueError, r"more than 1 value per channel.*\(1, 3\)"),
    ("one-value-2d", fastbn.BatchNorm2d, np.ones((1, 3, 1, 1), np.float32), ValueError, r"more than 1 value per channel"),
    ("one-value-3d", fastbn.BatchNorm3d, np.ones((1, 3, 1, 1, 1), np.float32), ValueError, r"more than 1 value per channel"),
]


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("cls,bad,exc,message", [c[1:] for c in LAYER_CASES], ids=[c[0] for c in LAYER_CASES])
def test_layer_forward_rejects(rng, cls, bad, exc, message, momentum):
    bn = cls(3, momentum=momentum)
    shape = {fastbn.BatchNorm1d: (4, 3), fastbn.BatchNorm2d: (2, 3, 2, 2), fastbn.BatchNorm3d: (2, 3, 1, 2, 2)}[cls]
    good = random_input(rng, shape, np.float32)
    bn(good)  # one good step, then a failing one
    snapshot = _layer_snapshot(bn)
    bad_copy = np.array(bad, copy=True)
    with pytest.raises(exc, match=message):
        bn(bad)
    _assert_layer_unchanged(bn, snapshot)
    if isinstance(bad, np.ndarray):
        np.testing.assert_array_equal(bad, bad_copy)
    # the failed call did not replace what backward() works on
    dy = rng.standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(bn.backward(dy), ref_backward(dy, good, bn.weight)[0], atol=1e-4)


def test_layer_bad_out_changes_nothing(rng):
    bn = fastbn.BatchNorm1d(3)
    x = random_input(rng, (4, 3, 5), np.float32)
    snapshot = _layer_snapshot(bn)
    for out, exc in ((np.zeros((4, 3, 4), np.float32), ValueError), (np.zeros((4, 3, 5), np.float64), ValueError),
                     ([0.0], TypeError)):
        with pytest.raises(exc, match="out"):
            bn(x, out=out)
        _assert_layer_unchanged(bn, snapshot)
    assert bn.num_batches_tracked == 0


def test_layer_backward_misuse(rng):
    bn = fastbn.BatchNorm2d(3)
    dy = np.ones((2, 3, 2, 2), np.float32)
    with pytest.raises(RuntimeError, match=r"backward\(\) needs a forward\(\)"):
        bn.backward(dy)
    x = random_input(rng, (2, 3, 2, 2), np.float32)
    bn(x)
    with pytest.raises(ValueError, match=r"grad_output must match .*\(2, 3, 2, 2\).*\(2, 3, 2, 3\)"):
        bn.backward(np.ones((2, 3, 2, 3), np.float32))
    with pytest.raises((TypeError, ValueError), match=r"ndarray.*list"):
        bn.backward([1.0])
    with pytest.raises(TypeError, match=r"grad_output must have the input's dtype float32, got float64"):
        bn.backward(np.ones((2, 3, 2, 2), np.float64))
    with pytest.raises(ValueError, match=r"out must have the input's shape"):
        bn.backward(dy, out=np.empty((2, 3, 2, 3), np.float32))
    assert bn.grad_weight is None and bn.grad_bias is None
    # the rejected calls did not consume the saved forward
    out = np.empty_like(dy)
    dx = bn.backward(dy, out=out)
    assert dx is out
    np.testing.assert_allclose(dx, ref_backward(dy, x, bn.weight)[0], atol=1e-4)


@pytest.mark.parametrize("case", ["missing", "unexpected", "shape", "dtype", "nbt-float", "nbt-shape", "late-bad-key"])
def test_load_state_dict_rejects_and_changes_nothing(rng, case):
    bn = fastbn.BatchNorm1d(3)
    bn.weight[...] = [1.0, 2.0, 3.0]
    bn(random_input(rng, (4, 3), np.float32))
    snapshot = _layer_snapshot(bn)
    state = {k: v * 2 + 1 if k != "num_batches_tracked" else np.array(9) for k, v in bn.state_dict().items()}
    exc, message = ValueError, None
    if case == "missing":
        del state["running_var"]
        message = r"missing keys \['running_var'\]"
    elif case == "unexpected":
        state["extra"] = np.zeros(3)
        message = r"unexpected keys \['extra'\]"
    elif case == "shape":
        state["bias"] = np.zeros(4, np.float32)
        message = r"bias must have shape \(3,\), got shape \(4,\)"
    elif case == "dtype":
        state["running_mean"] = np.zeros(3, np.complex64)
        exc, message = TypeError, r"running_mean must be an array of real numbers \(float, int or bool\), got dtype complex64"
    elif case == "nbt-float":
        state["num_batches_tracked"] = np.array(2.5)
        message = r"num_batches_tracked must be a scalar integer"
    elif case == "nbt-shape":
        state["num_batches_tracked"] = np.array([2, 3])
        message = r"num_batches_tracked must be a scalar integer"
    else:  # everything valid except the last buffer
        state["running_var"] = np.ones((3, 1), np.float32)
        message = r"running_var must have shape \(3,\)"
    with pytest.raises(exc, match=message):
        bn.load_state_dict(state)
    _assert_layer_unchanged(bn, snapshot)


@pytest.mark.parametrize("kwargs,exc,message", [
    (dict(num_features=-2), ValueError, r"num_features must be a non-negative integer, got -2"),
    (dict(num_features=2.5), TypeError, r"num_features must be a non-negative integer, got 2.5"),
    (dict(num_features=True), TypeError, r"num_features must be a non-negative integer, got True"),
    (dict(num_features="4"), TypeError, r"num_features must be a non-negative integer, got '4'"),
    (dict(num_features=3, eps=-1.0), ValueError, r"eps must be a real number >= 0.0, got -1.0"),
    (dict(num_features=3, momentum=2.0), ValueError, r"momentum must be a real number in \[0.0, 1.0\], got 2.0"),
    (dict(num_features=3, momentum="fast"), TypeError, r"momentum must be a real number.*'fast'"),
    (dict(num_features=3, dtype=np.float16), TypeError, r"dtype must be float32 or float64, got float16"),
    (dict(num_features=3, dtype=np.int32), TypeError, r"dtype must be float32 or float64, got int32"),
    (dict(num_features=3, device="tpu"), ValueError, r"device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
])
def test_layer_constructor_rejects(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        fastbn.BatchNorm2d(**kwargs)


def test_messages_name_the_value(rng):
    """A spot check that messages carry the offending value verbatim (not just a generic text)."""
    x = random_input(rng, (2, 5), np.float32)
    with pytest.raises(ValueError) as info:
        fastbn.BatchNorm1d(3)(x)
    assert "(2, 5)" in str(info.value) and "3" in str(info.value)
    with pytest.raises(TypeError) as info:
        fastbn.batch_norm(x.astype(np.int16), None, None, training=True)
    assert re.search(r"int16", str(info.value)) and "float32" in str(info.value)


# ---------------------------------------------------------------------------------- the kernels' own checks
def _kernel_args(rng):
    x = random_input(rng, (4, 3, 5), np.float32)
    c32 = np.ones(3, np.float32)
    c64 = lambda: np.ones(3)  # noqa: E731 (fresh float64 vectors)
    return dict(
        forward_train=(x, np.empty_like(x), c32, c32, 1e-5, c64(), c64(), c64(), 1),
        forward_eval=(x, np.empty_like(x), c32, c32, c64(), c64(), 1),
        forward_eval_running=(x, np.empty_like(x), c32, c32, c32.copy(), c32.copy(), 1e-5, 1),
        backward=(x, x, np.empty_like(x), c32, c64(), c64(), True, c64(), c64(), 1),
        eval_stats=(c32, c32, 1e-5, c64(), c64()),
        update_running=(c32.copy(), c32.copy(), c64(), c64(), 0.1, 20),
    )


def _spoil(a, how):
    if how == "dtype":
        return a.astype(np.float64 if a.dtype == np.float32 else np.float32)
    if how == "length":
        return np.concatenate([a.ravel(), a.ravel()[:1]])
    if how == "strided":
        return np.repeat(a, 2, axis=-1)[..., ::2]
    if how == "byte-order":
        return a.astype(a.dtype.newbyteorder())
    if how == "read-only":
        a = a.copy()
        a.flags.writeable = False
        return a
    return a.tolist()  # "list"


@pytest.mark.parametrize("how", ["dtype", "length", "strided", "byte-order", "read-only", "list"])
@pytest.mark.parametrize("name", ["forward_train", "forward_eval", "forward_eval_running", "backward", "eval_stats",
                                  "update_running"])
def test_kernel_entry_points_refuse_bad_buffers(rng, name, how):
    """fastbn.functional validates everything, but the kernels still check, cheaply, each array they
    take a pointer to (so a wrong call from inside fastbn is an exception, never a stray write or
    read); a read-only array is only refused where the kernel writes."""
    fn = getattr(_kernels, name)
    args = _kernel_args(rng)[name]
    fn(*args)  # the good call works
    for i, a in enumerate(args):
        if not isinstance(a, np.ndarray) or (how == "read-only" and not _written(name, i)):
            continue
        bad = list(_kernel_args(rng)[name])
        bad[i] = _spoil(a, how)
        with pytest.raises((TypeError, ValueError), match=r"numpy array|float32 or float64|must be an aligned"):
            fn(*bad)


def _written(name, i):
    return i in {"forward_train": (1, 5, 6, 7), "forward_eval": (1,), "forward_eval_running": (1,), "backward": (2, 7, 8),
                 "eval_stats": (3, 4), "update_running": (0, 1)}[name]


# ---------------------------------------------------------------- found by an adversarial review
def _misaligned(a):
    """A copy of ``a`` whose data starts one byte past an element boundary (flags.aligned False)."""
    raw = np.zeros(a.nbytes + 1, np.uint8)
    m = np.ndarray(a.shape, a.dtype, buffer=raw, offset=1)
    m[...] = a
    assert not m.flags.aligned
    return m


def test_training_out_sharing_memory_with_a_running_buffer_is_refused():
    """Training writes out, then updates the running buffers: out overlapping one of them would
    give a wrong output and wrong running statistics, silently."""
    x = np.array([[1.0, 2.0], [3.0, 5.0], [0.0, 1.0]])
    buf = np.zeros(6)
    rv = np.ones(2)
    with pytest.raises(ValueError, match="out shares memory with running_mean"):
        fastbn.batch_norm(x, buf[4:6], rv, training=True, out=buf.reshape(3, 2))
    np.testing.assert_array_equal(buf, 0)
    np.testing.assert_array_equal(rv, 1)
    # in place, with a running buffer that is a view of the input
    x = np.array([1.0, 3.0, 0.0, 4.0]).reshape(2, 2, 1)
    before = x.copy()
    with pytest.raises(ValueError, match="out shares memory with running_var"):
        fastbn.batch_norm(x, np.zeros(2), x[0, :, 0], training=True, out=x)
    np.testing.assert_array_equal(x, before)


def test_instance_norm_on_running_statistics_may_write_over_them():
    """Without input statistics the running buffers are read into the call's own statistics
    before out is written, so out may overlap them (in training it may not, as above)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    buf = np.ones(24, np.float32)
    buf[:3], buf[3:6] = [0.5, -1.0, 2.0], [1.0, 4.0, 0.25]
    rm, rv = buf[:3], buf[3:6]
    want = fastbn.instance_norm(x, rm.copy(), rv.copy(), use_input_stats=False)
    out = buf.reshape(2, 3, 4)
    assert fastbn.instance_norm(x, rm, rv, use_input_stats=False, out=out) is out
    np.testing.assert_array_equal(out, want)
    with pytest.raises(ValueError, match="out shares memory with running_mean"):
        fastbn.instance_norm(x, buf[:3], buf[3:6], use_input_stats=True, out=buf.reshape(2, 3, 4))


def test_layer_in_place_forward_through_a_view_of_another_type_keeps_the_input(rng):
    """out= a plain view of a subclass input (e.g. np.asarray of a memmap) is still in place: the
    layer must save a copy of the input for backward."""
    class Sub(np.ndarray):
        pass

    x = random_input(rng, (6, 4), np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    xs = x.copy().view(Sub)
    bn = fastbn.BatchNorm1d(4)
    bn(xs, out=xs.view(np.ndarray))
    assert_close(bn.backward(dy), ref_backward(dy, x)[0], tol=1e-5)


@pytest.mark.parametrize("training", [True, False])
def test_misaligned_arrays_work_like_aligned_ones(rng, training):
    x = random_input(rng, (5, 3, 4), np.float32)
    w, b, rm, rv = random_params(rng, 3, np.float32)
    rm2, rv2 = rm.copy(), rv.copy()
    expect = fastbn.batch_norm(x, rm2, rv2, w, b, training=training)
    rm_m, rv_m = _misaligned(rm), _misaligned(rv)
    out = _misaligned(np.zeros_like(x))
    got = fastbn.batch_norm(_misaligned(x), rm_m, rv_m, _misaligned(w), _misaligned(b), training=training, out=out)
    assert got is out
    np.testing.assert_array_equal(out, expect)
    np.testing.assert_array_equal(rm_m, rm2)
    np.testing.assert_array_equal(rv_m, rv2)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    _, mean, invstd = fastbn.batch_norm_forward(x, None, None, w, training=True)
    expect = fastbn.batch_norm_backward(dy, x, w, mean, invstd)
    got = fastbn.batch_norm_backward(_misaligned(dy), _misaligned(x), _misaligned(w), _misaligned(mean),
                                     _misaligned(invstd), out=_misaligned(np.zeros_like(x)))
    for g, e in zip(got, expect):
        np.testing.assert_array_equal(g, e)
    bn = fastbn.BatchNorm1d(3).train(training)
    np.testing.assert_array_equal(bn(_misaligned(x)), fastbn.BatchNorm1d(3).train(training)(x))


def test_byte_swapped_parameters_and_buffers_work(rng):
    x = random_input(rng, (5, 3), np.float32)
    w, b, rm, rv = random_params(rng, 3, np.float32)
    swapped = [a.astype(a.dtype.newbyteorder(">")) for a in (w, b, rm, rv)]
    expect = fastbn.batch_norm(x, rm, rv, w, b, training=True)
    got = fastbn.batch_norm(x.astype(">f4"), swapped[2], swapped[3], swapped[0], swapped[1], training=True)
    np.testing.assert_array_equal(got, expect)
    np.testing.assert_array_equal(swapped[2], rm)
    np.testing.assert_array_equal(swapped[3], rv)
    np.testing.assert_array_equal(fastbn.BatchNorm1d(3)(x.astype(">f4")), fastbn.BatchNorm1d(3)(x))


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
@pytest.mark.parametrize("make,message", [
    (lambda a: np.matrix(a), r"got np.matrix"),
    (lambda a: np.ma.masked_array(a, mask=[[0, 0, 1], [0, 0, 0]]), r"got a masked array \(its mask would be ignored\)"),
], ids=["matrix", "masked"])
def test_matrix_and_masked_inputs_are_refused(make, message):
    bad = make(np.ones((2, 3)))
    with pytest.raises(TypeError, match=message):
        fastbn.batch_norm(bad, None, None, training=True)
    with pytest.raises(TypeError, match=message):
        fastbn.BatchNorm1d(3, dtype=np.float64)(bad)


@pytest.mark.parametrize("where", ["weight", "bias", "running_mean", "out"])
def test_masked_parameters_buffers_and_out_are_refused(rng, where):
    x = random_input(rng, (4, 3), np.float64)
    args = dict(running_mean=np.zeros(3), running_var=np.ones(3), weight=np.ones(3), bias=np.zeros(3), out=None)
    args[where] = np.ma.masked_array(np.zeros(x.shape if where == "out" else 3), mask=False)
    before = {k: np.array(v, copy=True) for k, v in args.items() if v is not None}
    with pytest.raises(TypeError, match=rf"{where} must be a numpy.ndarray, got a masked array"):
        fastbn.batch_norm(x, training=True, **args)
    for k, v in before.items():
        np.testing.assert_array_equal(np.asarray(args[k]), v)


def test_huge_integer_eps_is_a_value_error():
    with pytest.raises(ValueError, match=r"eps must be a real number >= 0.0"):
        fastbn.batch_norm(np.ones((2, 3)), None, None, training=True, eps=10**400)


def test_load_state_dict_refuses_a_num_batches_tracked_beyond_int64():
    bn = fastbn.BatchNorm1d(2)
    bn(np.ones((3, 2), np.float32))
    snapshot = _layer_snapshot(bn)
    state = {**bn.state_dict(), "num_batches_tracked": np.array(2**64 - 1, np.uint64)}
    with pytest.raises(ValueError, match=r"num_batches_tracked must be a scalar integer in int64's range"):
        bn.load_state_dict(state)
    _assert_layer_unchanged(bn, snapshot)


def test_num_batches_tracked_wraps_as_torch_int64():
    """PyTorch's counter is an int64 tensor: after 2**63 - 1 it wraps to -2**63, and such a
    state_dict loads; fastbn does the same instead of raising OverflowError in state_dict()."""
    torch = pytest.importorskip("torch")
    bn, tbn = fastbn.BatchNorm1d(2), torch.nn.BatchNorm1d(2)
    bn.num_batches_tracked = 2**63 - 1
    tbn.num_batches_tracked.fill_(2**63 - 1)
    x = np.ones((3, 2), np.float32)
    bn(x)
    tbn(torch.from_numpy(x))
    assert int(bn.state_dict()["num_batches_tracked"]) == int(tbn.num_batches_tracked) == -2**63
    other = fastbn.BatchNorm1d(2)
    other.load_state_dict({k: v.numpy() for k, v in tbn.state_dict().items()})
    assert other.num_batches_tracked == -2**63


def test_load_state_dict_names_a_value_that_is_not_an_array():
    bn = fastbn.BatchNorm1d(2)
    with pytest.raises(ValueError, match="running_mean is not an array"):
        bn.load_state_dict({**bn.state_dict(), "running_mean": [[1.0], [2.0, 3.0]]})
    with pytest.raises(TypeError, match="running_var must be an array of real numbers .*, got dtype object"):
        bn.load_state_dict({**bn.state_dict(), "running_var": None})


def test_load_state_dict_casts_as_pytorch():
    """PyTorch's load copies with a cast: integer and bool arrays, an integral float or a
    one-element num_batches_tracked (its old checkpoints), a Parameter that requires grad."""
    bn = fastbn.BatchNorm1d(3)
    bn.load_state_dict({"weight": np.array([1, 2, 3]), "bias": np.array([True, False, True]),
                        "running_mean": np.arange(3, dtype=np.int32), "running_var": np.ones(3, np.uint8),
                        "num_batches_tracked": np.array(5.0)})
    np.testing.assert_array_equal(bn.weight, [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(bn.bias, [1.0, 0.0, 1.0])
    assert bn.weight.dtype == bn.running_var.dtype == np.float32 and bn.num_batches_tracked == 5
    bn.load_state_dict({**bn.state_dict(), "num_batches_tracked": np.array([7])})
    assert bn.num_batches_tracked == 7
    torch = pytest.importorskip("torch")
    tbn = torch.nn.BatchNorm1d(3)
    params = {**{k: v for k, v in tbn.state_dict().items()}, **dict(tbn.named_parameters())}
    assert params["weight"].requires_grad
    bn.load_state_dict(params)
    np.testing.assert_array_equal(bn.weight, tbn.weight.detach().numpy())


def test_an_out_whose_elements_share_memory_is_refused():
    """A writeable out with a stride of 0 (as_strided) would keep only the last result written to
    each location: refused, as PyTorch refuses it, before anything is written."""
    x = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32)
    base = np.zeros(3 * 5, np.float32)
    out = np.lib.stride_tricks.as_strided(base, shape=x.shape, strides=(0, 20, 4))
    assert out.flags.writeable
    calls = [lambda: fastbn.batch_norm(x, None, None, training=True, out=out),
             lambda: fastbn.group_norm(x, 3, out=out), lambda: fastbn.layer_norm(x, 5, out=out),
             lambda: fastbn.instance_norm(x, out=out)]
    for call in calls:
        with pytest.raises(ValueError, match="share one memory location"):
            call()
    assert not base.any()
