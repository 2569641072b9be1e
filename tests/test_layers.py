"""BatchNorm1d/2d/3d: attributes, modes, running statistics, backward, state_dict, repr."""
import numpy as np
import pytest

import fastbn
from _helpers import assert_close, random_input, random_params, ref_backward, ref_forward, ref_running_update

LAYERS = [
    (fastbn.BatchNorm1d, (6, 3)),
    (fastbn.BatchNorm1d, (4, 3, 5)),
    (fastbn.BatchNorm2d, (3, 3, 4, 2)),
    (fastbn.BatchNorm3d, (2, 3, 2, 3, 2)),
]
LAYER_IDS = ["1d-NC", "1d-NCL", "2d", "3d"]


def _randomize(layer, rng):
    """Random affine parameters, so tests can see them being used."""
    w, b, _, _ = random_params(rng, layer.num_features, layer.dtype)
    if layer.weight is not None:
        layer.weight[...] = w
    if layer.bias is not None:
        layer.bias[...] = b
    return layer


@pytest.mark.parametrize("cls", [fastbn.BatchNorm1d, fastbn.BatchNorm2d, fastbn.BatchNorm3d])
def test_defaults(cls):
    bn = cls(5)
    assert bn.num_features == 5 and bn.eps == 1e-5 and bn.momentum == 0.1
    assert bn.affine is True and bn.track_running_stats is True and bn.training is True
    assert bn.dtype == np.float32
    for name, value in (("weight", 1), ("bias", 0), ("running_mean", 0), ("running_var", 1)):
        arr = getattr(bn, name)
        assert isinstance(arr, np.ndarray) and arr.shape == (5,) and arr.dtype == np.float32, name
        np.testing.assert_array_equal(arr, value)
    assert bn.num_batches_tracked == 0
    assert bn.grad_weight is None and bn.grad_bias is None
    assert [p is q for p, q in zip(bn.parameters(), (bn.weight, bn.bias))] == [True, True]


def test_repr():
    assert repr(fastbn.BatchNorm2d(3)) == (
        "BatchNorm2d(3, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True)")
    assert repr(fastbn.BatchNorm1d(7, eps=1e-3, momentum=None, affine=False, track_running_stats=False)) == (
        "BatchNorm1d(7, eps=0.001, momentum=None, affine=False, bias=False, track_running_stats=False)")
    assert repr(fastbn.BatchNorm3d(2, bias=False)) == (
        "BatchNorm3d(2, eps=1e-05, momentum=0.1, affine=True, bias=False, track_running_stats=True)")


def test_train_eval_return_the_layer():
    bn = fastbn.BatchNorm1d(3)
    assert bn.eval() is bn and bn.training is False
    assert bn.train() is bn and bn.training is True
    assert bn.train(False) is bn and bn.training is False
    with pytest.raises(ValueError, match="bool"):  # PyTorch's exception type
        bn.train("yes")
    assert bn.training is False


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls,shape", LAYERS, ids=LAYER_IDS)
def test_training_steps_then_eval(rng, cls, shape, dtype):
    C = shape[1]
    bn = _randomize(cls(C, momentum=0.2, dtype=dtype), rng)
    exp_rm, exp_rv = np.zeros(C), np.ones(C)
    for step in range(3):
        x = random_input(rng, shape, dtype, offset=step)
        y = bn(x)
        assert y.shape == shape and y.dtype == dtype
        assert_close(y, ref_forward(x, bn.weight, bn.bias)[0], dtype)
        exp_rm, exp_rv = ref_running_update(exp_rm, exp_rv, x, 0.2)
        assert_close(bn.running_mean, exp_rm, dtype)
        assert_close(bn.running_var, exp_rv, dtype)
        assert bn.running_mean.dtype == dtype
        assert bn.num_batches_tracked == step + 1
    bn.eval()
    rm, rv = bn.running_mean.copy(), bn.running_var.copy()
    x = random_input(rng, shape, dtype)
    y = bn(x)
    assert_close(y, ref_forward(x, bn.weight, bn.bias, rm, rv)[0], dtype)
    np.testing.assert_array_equal(bn.running_mean, rm)
    np.testing.assert_array_equal(bn.running_var, rv)
    assert bn.num_batches_tracked == 3


def test_momentum_none_is_a_cumulative_average(rng):
    C = 3
    bn = fastbn.BatchNorm1d(C, momentum=None, dtype=np.float64)
    means, unbiased = [], []
    for step in range(5):
        x = random_input(rng, (7, C, 4), np.float64, offset=3 * step)
        bn(x)
        means.append(x.mean(axis=(0, 2)))
        unbiased.append(x.var(axis=(0, 2), ddof=1))
        # the first batch replaces the initial buffers entirely
        assert_close(bn.running_mean, np.mean(means, axis=0), tol=1e-12)
        assert_close(bn.running_var, np.mean(unbiased, axis=0), tol=1e-12)
    assert bn.num_batches_tracked == 5


def test_momentum_none_continues_from_loaded_num_batches_tracked(rng):
    bn = fastbn.BatchNorm1d(2, momentum=None, dtype=np.float64)
    state = bn.state_dict()
    state["running_mean"] = np.array([10.0, 20.0])
    state["num_batches_tracked"] = np.array(3, dtype=np.int64)
    bn.load_state_dict(state)
    x = random_input(rng, (6, 2), np.float64)
    bn(x)
    assert bn.num_batches_tracked == 4
    assert_close(bn.running_mean, 0.75 * np.array([10.0, 20.0]) + 0.25 * x.mean(axis=0), tol=1e-12)


def test_no_running_stats_uses_batch_statistics_in_eval(rng):
    bn = _randomize(fastbn.BatchNorm2d(3, track_running_stats=False), rng)
    assert bn.running_mean is None and bn.running_var is None and bn.num_batches_tracked is None
    x = random_input(rng, (2, 3, 3, 3), np.float32)
    with fastbn.no_grad():  # (not differentiated: a pending training forward would make the eval backward raise)
        y_train = bn(x)
    bn.eval()
    y_eval = bn(x)
    np.testing.assert_array_equal(y_train, y_eval)
    assert_close(y_eval, ref_forward(x, bn.weight, bn.bias)[0])
    assert bn.running_mean is None and bn.num_batches_tracked is None
    assert set(bn.state_dict()) == {"weight", "bias"}
    # eval-mode backward goes through the batch statistics too
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dx = bn.backward(dy)
    assert_close(dx, ref_backward(dy, x, bn.weight)[0], tol=1e-4)


def test_eval_before_any_training_uses_initial_buffers(rng):
    bn = fastbn.BatchNorm1d(3).eval()
    x = random_input(rng, (4, 3), np.float32)
    assert_close(bn(x), x / np.sqrt(1 + 1e-5))


def test_affine_false(rng):
    bn = fastbn.BatchNorm1d(4, affine=False)
    assert bn.weight is None and bn.bias is None and bn.parameters() == []
    x = random_input(rng, (5, 4, 3), np.float32)
    y = bn(x)
    assert_close(y, ref_forward(x)[0])
    dx = bn.backward(np.ones_like(x))
    assert dx.shape == x.shape
    assert bn.grad_weight is None and bn.grad_bias is None
    assert set(bn.state_dict()) == {"running_mean", "running_var", "num_batches_tracked"}


def test_bias_false(rng):
    bn = fastbn.BatchNorm2d(3, bias=False)
    assert isinstance(bn.weight, np.ndarray) and bn.bias is None
    assert len(bn.parameters()) == 1
    bn.weight[...] = [1.0, 2.0, -3.0]
    x = random_input(rng, (2, 3, 2, 2), np.float32)
    y = bn(x)
    assert_close(y, ref_forward(x, bn.weight)[0])
    bn.backward(rng.standard_normal(x.shape).astype(np.float32))
    assert bn.grad_weight is not None and bn.grad_weight.shape == (3,)
    assert bn.grad_bias is None
    assert set(bn.state_dict()) == {"weight", "running_mean", "running_var", "num_batches_tracked"}
    # bias=False without affine is simply affine=False
    bn2 = fastbn.BatchNorm2d(3, affine=False, bias=False)
    assert bn2.weight is None and bn2.bias is None


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("cls,shape", LAYERS, ids=LAYER_IDS)
def test_backward_matches_reference(rng, cls, shape, mode):
    C = shape[1]
    bn = _randomize(cls(C, dtype=np.float64), rng)
    bn.running_mean[...] = rng.standard_normal(C)
    bn.running_var[...] = rng.uniform(0.5, 2, C)
    rm, rv = bn.running_mean.copy(), bn.running_var.copy()
    bn.train(mode == "train")
    x = random_input(rng, shape, np.float64)
    dy = rng.standard_normal(shape)
    bn(x)
    dx = bn.backward(dy)
    ref_dx, ref_gw, ref_gb = ref_backward(dy, x, bn.weight, rm, rv, training=mode == "train")
    assert_close(dx, ref_dx)
    assert_close(bn.grad_weight, ref_gw)
    assert_close(bn.grad_bias, ref_gb)


def test_backward_sets_gradients_instead_of_accumulating(rng):
    bn = _randomize(fastbn.BatchNorm1d(3, dtype=np.float64), rng)
    x1, x2 = random_input(rng, (5, 3), np.float64), random_input(rng, (5, 3), np.float64)
    g1, g2 = rng.standard_normal((5, 3)), rng.standard_normal((5, 3))
    bn(x1)
    bn.backward(g1)
    first_gw = bn.grad_weight.copy()
    bn(x2)
    bn.backward(g2)
    _, ref_gw, ref_gb = ref_backward(g2, x2, bn.weight)
    assert_close(bn.grad_weight, ref_gw)
    assert_close(bn.grad_bias, ref_gb)
    assert np.abs(bn.grad_weight - first_gw).max() > 1e-3


def test_backward_uses_the_input_of_the_last_forward_even_in_place(rng):
    """An in-place forward (out=input) must not corrupt the gradient of the following backward."""
    bn = _randomize(fastbn.BatchNorm1d(3, dtype=np.float64), rng)
    x = random_input(rng, (4, 3, 5), np.float64)
    dy = rng.standard_normal(x.shape)
    ref_dx, ref_gw, ref_gb = ref_backward(dy, x, bn.weight)
    buf = x.copy()
    y = bn(buf, out=buf)
    assert y is buf
    assert_close(buf, ref_forward(x, bn.weight, bn.bias)[0])
    dx = bn.backward(dy)
    assert_close(dx, ref_dx)
    assert_close(bn.grad_weight, ref_gw)
    assert_close(bn.grad_bias, ref_gb)


@pytest.mark.parametrize("view", [lambda a: a, lambda a: a[...], lambda a: a.view(), lambda a: a.reshape(a.shape)])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("training", [False, True])
def test_in_place_through_any_view_of_the_input_keeps_the_gradient(rng, view, activation, training):
    """out= a *view* of the input (not the same object) overwrites the input as out=input does: the
    backward must still see the forward's input (the evaluation fast path once saved it by
    reference, and grad_weight, and with the ReLU grad_input, came out wrong)."""
    bn = _randomize(fastbn.BatchNorm2d(3, activation=activation), rng)
    bn.running_mean[:] = 0.5
    bn.train(training)
    x = random_input(rng, (4, 3, 2, 5), np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    want = bn(x.copy(), update_running_stats=False)
    want_dx, want_gw, want_gb = bn.backward(dy), bn.grad_weight.copy(), bn.grad_bias.copy()
    buf = x.copy()
    y = bn(buf, out=view(buf), update_running_stats=False)
    np.testing.assert_array_equal(y, want)
    np.testing.assert_array_equal(buf, want)  # written in place
    np.testing.assert_array_equal(bn.backward(dy), want_dx)
    np.testing.assert_array_equal(bn.grad_weight, want_gw)
    np.testing.assert_array_equal(bn.grad_bias, want_gb)


def test_backward_needs_a_forward_each_time(rng):
    bn = fastbn.BatchNorm1d(3)
    with pytest.raises(RuntimeError, match="forward"):
        bn.backward(np.ones((4, 3), np.float32))
    x = random_input(rng, (4, 3), np.float32)
    bn(x)
    bn.backward(np.ones_like(x))
    with pytest.raises(RuntimeError, match="forward"):
        bn.backward(np.ones_like(x))


def test_empty_batch_in_training_leaves_running_stats(rng):
    bn = fastbn.BatchNorm2d(3)
    bn(random_input(rng, (2, 3, 2, 2), np.float32))
    rm, rv = bn.running_mean.copy(), bn.running_var.copy()
    y = bn(np.zeros((0, 3, 2, 2), np.float32))
    assert y.shape == (0, 3, 2, 2)
    np.testing.assert_array_equal(bn.running_mean, rm)
    np.testing.assert_array_equal(bn.running_var, rv)


def test_reset_running_stats_and_parameters(rng):
    bn = fastbn.BatchNorm1d(3)
    bn(random_input(rng, (4, 3), np.float32))
    bn.weight[...] = 2
    bn.bias[...] = 3
    weight, running_mean = bn.weight, bn.running_mean
    bn.reset_running_stats()
    np.testing.assert_array_equal(bn.running_mean, 0)
    np.testing.assert_array_equal(bn.running_var, 1)
    assert bn.num_batches_tracked == 0
    np.testing.assert_array_equal(bn.weight, 2)  # parameters untouched
    bn(random_input(rng, (4, 3), np.float32))
    bn.reset_parameters()
    np.testing.assert_array_equal(bn.weight, 1)
    np.testing.assert_array_equal(bn.bias, 0)
    np.testing.assert_array_equal(bn.running_mean, 0)
    np.testing.assert_array_equal(bn.running_var, 1)
    assert bn.num_batches_tracked == 0
    assert bn.weight is weight and bn.running_mean is running_mean  # reset in place
    fastbn.BatchNorm1d(2, track_running_stats=False).reset_running_stats()  # no buffers: a no-op


def test_state_dict_keys_values_and_copies(rng):
    bn = _randomize(fastbn.BatchNorm2d(3), rng)
    bn(random_input(rng, (2, 3, 2, 2), np.float32))
    state = bn.state_dict()
    assert list(state) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    for name in ("weight", "bias", "running_mean", "running_var"):
        np.testing.assert_array_equal(state[name], getattr(bn, name))
        assert state[name].dtype == np.float32
        assert not np.shares_memory(state[name], getattr(bn, name))
    assert state["num_batches_tracked"].dtype == np.int64 and state["num_batches_tracked"].shape == ()
    assert int(state["num_batches_tracked"]) == 1
    state["weight"][...] = 42
    assert not np.any(bn.weight == 42)


@pytest.mark.parametrize("cls,shape", LAYERS, ids=LAYER_IDS)
def test_state_dict_round_trip(rng, cls, shape):
    C = shape[1]
    src = _randomize(cls(C, momentum=0.3), rng)
    for _ in range(2):
        src(random_input(rng, shape, np.float32))
    dst = cls(C, momentum=0.3)
    dst.load_state_dict(src.state_dict())
    for name in ("weight", "bias", "running_mean", "running_var"):
        np.testing.assert_array_equal(getattr(dst, name), getattr(src, name))
    assert dst.num_batches_tracked == 2
    x = random_input(rng, shape, np.float32)
    np.testing.assert_array_equal(dst.eval()(x), src.eval()(x))
    np.testing.assert_array_equal(dst.train()(x), src.train()(x))


def test_load_state_dict_casts_and_strict_false(rng):
    bn = fastbn.BatchNorm1d(3, dtype=np.float32)
    bn.load_state_dict({"weight": np.array([1.0, 2.0, 3.0]), "bias": np.zeros(3),
                        "running_mean": np.ones(3), "running_var": np.full(3, 4.0),
                        "num_batches_tracked": np.array(7)})
    assert bn.weight.dtype == np.float32 and bn.num_batches_tracked == 7
    np.testing.assert_array_equal(bn.weight, [1, 2, 3])
    bn.load_state_dict({"bias": np.full(3, 5.0)}, strict=False)
    np.testing.assert_array_equal(bn.bias, 5)
    np.testing.assert_array_equal(bn.weight, [1, 2, 3])


def test_layer_does_not_modify_input(rng):
    bn = _randomize(fastbn.BatchNorm3d(2), rng)
    x = random_input(rng, (2, 2, 2, 3, 3), np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    xc, dyc = x.copy(), dy.copy()
    bn(x)
    bn.backward(dy)
    bn.eval()(x)
    np.testing.assert_array_equal(x, xc)
    np.testing.assert_array_equal(dy, dyc)


def test_layer_non_contiguous_input(rng):
    bn = _randomize(fastbn.BatchNorm2d(3, dtype=np.float64), rng)
    x = random_input(rng, (2, 3, 4, 5), np.float64)
    xt = np.ascontiguousarray(x.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
    assert not xt.flags.c_contiguous
    dy = rng.standard_normal(x.shape)
    y = bn(xt)
    assert_close(y, ref_forward(x, bn.weight, bn.bias)[0])
    assert_close(bn.backward(np.asfortranarray(dy)), ref_backward(dy, x, bn.weight)[0])


def test_dtype_none_is_float32_as_in_pytorch():
    assert fastbn.BatchNorm2d(3, dtype=None).weight.dtype == np.float32


def test_load_state_dict_without_num_batches_tracked_keeps_the_count():
    """PyTorch loads an old checkpoint (no num_batches_tracked) and keeps the layer's own count."""
    bn = fastbn.BatchNorm1d(2)
    bn(np.ones((3, 2), np.float32))
    state = bn.state_dict()
    del state["num_batches_tracked"]
    state["running_mean"] = np.array([5.0, 6.0], np.float32)
    bn.load_state_dict(state)
    assert bn.num_batches_tracked == 1
    np.testing.assert_array_equal(bn.running_mean, [5.0, 6.0])


def test_load_state_dict_returns_the_incompatible_keys_as_pytorch():
    bn = fastbn.BatchNorm1d(2)
    result = bn.load_state_dict({"weight": np.full(2, 3.0), "extra": np.zeros(1)}, strict=False)
    assert result == (["bias", "running_mean", "running_var"], ["extra"])
    assert result.missing_keys == ["bias", "running_mean", "running_var"] and result.unexpected_keys == ["extra"]
    np.testing.assert_array_equal(bn.weight, 3.0)
    assert bn.load_state_dict(bn.state_dict()) == ([], [])


def test_train_mode_must_be_a_bool_as_in_pytorch():
    bn = fastbn.BatchNorm1d(2)
    with pytest.raises(ValueError, match=r"train\(mode\) expects a bool, got 1"):
        bn.train(1)
    assert bn.training is True


def test_a_layer_with_no_features_gives_empty_results():
    """PyTorch builds BatchNorm2d(0) (and then fails in forward); fastbn's works on empty inputs."""
    bn = fastbn.BatchNorm2d(0)
    assert bn.weight.shape == (0,) and set(bn.state_dict()) >= {"running_mean", "num_batches_tracked"}
    x = np.zeros((2, 0, 3, 3), np.float32)
    assert bn(x).shape == x.shape
    assert bn.backward(np.zeros_like(x)).shape == x.shape
    assert bn.eval()(x).shape == x.shape


@pytest.mark.parametrize("device", ["cuda:x", "cuda:", "cuda:0:1", "cuda:-1", "gpu"])
def test_device_strings_are_checked(device):
    with pytest.raises(ValueError, match=r"device must be 'cpu', 'cuda' or 'cuda:N'"):
        fastbn.BatchNorm1d(2, device=device)


@pytest.mark.parametrize("activation", [None, "relu"])
def test_a_batch_norm_without_arrays_takes_either_float_type(activation):
    """affine=False without running statistics: nothing holds a dtype, so a float32-built layer takes
    float64 input as PyTorch's does, computing in float64."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    x, g = rng.standard_normal((4, 3, 5)), rng.standard_normal((4, 3, 5))
    bn = fastbn.BatchNorm1d(3, affine=False, track_running_stats=False, activation=activation)
    y = bn(x)
    dx = bn.backward(g)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.nn.functional.batch_norm(tx, None, None, training=True)
    if activation:
        ty = torch.relu(ty)
    ty.backward(torch.tensor(g))
    assert y.dtype == dx.dtype == np.float64
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-10, atol=1e-12)
    bn.eval()
    assert bn(x).dtype == np.float64
    with pytest.raises(TypeError, match=r"BatchNorm1d holds float32 parameters, got input of dtype float64"):
        fastbn.BatchNorm1d(3, affine=False)(x)


@pytest.mark.parametrize("strict", [True, False])
def test_a_versioned_pytorch_state_dict_without_num_batches_tracked_misses_it(strict):
    """PyTorch's own state_dict() carries version 2 metadata; without num_batches_tracked it is a
    missing key there (an error with strict=True), unlike a plain dict or a version-1 one."""
    torch = pytest.importorskip("torch", reason="the PyTorch state_dict needs torch")
    sd = torch.nn.BatchNorm2d(3).state_dict()
    del sd["num_batches_tracked"]
    sd["running_mean"].fill_(4.0)
    bn = fastbn.BatchNorm2d(3)
    bn(np.ones((2, 3, 2, 2), np.float32))
    if strict:
        with pytest.raises(RuntimeError, match="num_batches_tracked"):
            torch.nn.BatchNorm2d(3).load_state_dict(sd, strict=True)
        with pytest.raises(ValueError, match=r"missing keys \['num_batches_tracked'\]"):
            bn.load_state_dict(sd, strict=True)
        np.testing.assert_array_equal(bn.running_mean, np.float32(0.1))  # a refused dict changes nothing
        return
    want = torch.nn.BatchNorm2d(3).load_state_dict(sd, strict=False)
    assert bn.load_state_dict(sd, strict=False) == (want.missing_keys, want.unexpected_keys) == (
        ["num_batches_tracked"], [])
    np.testing.assert_array_equal(bn.running_mean, 4.0)
    assert bn.num_batches_tracked == 1
    sd._metadata[""]["version"] = 1  # a checkpoint from before the count: optional, as in PyTorch
    assert bn.load_state_dict(sd, strict=True) == ([], [])


@pytest.mark.parametrize("count", [-1, -3])
def test_momentum_none_with_a_negative_loaded_count_raises_naming_it(count):
    """momentum=None averages over num_batches_tracked + 1 batches; a loaded count below 0 gives
    no average (PyTorch divides by zero at -1 and goes on with a negative factor below): a
    ValueError that names the count, and nothing changes."""
    bn = fastbn.BatchNorm1d(2, momentum=None)
    bn.load_state_dict({**bn.state_dict(), "num_batches_tracked": np.array(count)})
    with pytest.raises(ValueError, match=f"num_batches_tracked >= 0, got {count}"):
        bn(np.arange(6.0, dtype=np.float32).reshape(3, 2))
    assert bn.num_batches_tracked == count and not bn.running_mean.any()
    with pytest.raises(RuntimeError, match="needs a forward"):
        bn.backward(np.ones((3, 2), np.float32))
