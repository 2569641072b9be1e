"""fastbn against PyTorch: functional, layers (all ranks, train/eval, running stats), backward,
state_dict both ways, repr."""
import numpy as np
import pytest

import fastbn
from _helpers import random_input, random_params

torch = pytest.importorskip("torch")

TORCH_DTYPE = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}
# outputs are O(1); torch's float32 arithmetic differs from fastbn's in rounding only
TOL = {np.dtype(np.float32): dict(rtol=1e-5, atol=2e-5), np.dtype(np.float64): dict(rtol=1e-10, atol=1e-11)}

LAYERS = [
    (fastbn.BatchNorm1d, torch.nn.BatchNorm1d, (6, 3)),
    (fastbn.BatchNorm1d, torch.nn.BatchNorm1d, (4, 3, 5)),
    (fastbn.BatchNorm2d, torch.nn.BatchNorm2d, (3, 3, 4, 2)),
    (fastbn.BatchNorm3d, torch.nn.BatchNorm3d, (2, 3, 2, 3, 2)),
]
LAYER_IDS = ["1d-NC", "1d-NCL", "2d", "3d"]
CONFIGS = [
    dict(),
    dict(momentum=None),
    dict(momentum=0.5, eps=1e-3),
    dict(track_running_stats=False),
    dict(affine=False),
    dict(bias=False),
    dict(affine=False, track_running_stats=False, momentum=None),
]
CONFIG_IDS = ["default", "momentum-None", "momentum-eps", "no-running", "no-affine", "no-bias", "bare"]


def T(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def N(t):
    return t.detach().numpy()


def close(actual, expected, dtype):
    np.testing.assert_allclose(actual, expected, **TOL[np.dtype(dtype)])


def _pair(fcls, tcls, C, dtype, rng, **kw):
    """A torch layer with random parameters and a fastbn layer loaded from its state_dict."""
    tbn = tcls(C, dtype=TORCH_DTYPE[np.dtype(dtype)], **kw)
    with torch.no_grad():
        if tbn.weight is not None:
            tbn.weight.copy_(T(rng.uniform(0.5, 2, C) * rng.choice([-1, 1], C)))
        if tbn.bias is not None:
            tbn.bias.copy_(T(rng.standard_normal(C)))
    fbn = fcls(C, dtype=dtype, **kw)
    fbn.load_state_dict({k: v.numpy() for k, v in tbn.state_dict().items()})
    return fbn, tbn


def _compare_state(fbn, tbn, dtype):
    tstate = tbn.state_dict()
    fstate = fbn.state_dict()
    assert list(fstate) == list(tstate)
    for k, v in tstate.items():
        if k == "num_batches_tracked":
            assert int(fstate[k]) == int(v)
        else:
            close(fstate[k], v.numpy(), dtype)


# ---------------------------------------------------------------------------------- layers
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("fcls,tcls,shape", LAYERS, ids=LAYER_IDS)
def test_layer_training_steps_eval_and_backward(rng, fcls, tcls, shape, config, dtype):
    C = shape[1]
    fbn, tbn = _pair(fcls, tcls, C, dtype, rng, **config)
    assert repr(fbn) == repr(tbn)
    for step in range(3):
        for mode in ("train", "eval") if step < 2 else ("eval", "train"):
            fbn.train(mode == "train")
            tbn.train(mode == "train")
            x = random_input(rng, shape, dtype, offset=step)
            dy = rng.standard_normal(shape).astype(dtype)
            xt = T(x).requires_grad_(True)
            yt = tbn(xt)
            yt.backward(T(dy))
            y = fbn(x)
            close(y, N(yt), dtype)
            dx = fbn.backward(dy)
            close(dx, N(xt.grad), dtype)
            if tbn.weight is not None:
                close(fbn.grad_weight, N(tbn.weight.grad), dtype)
                tbn.weight.grad = None
            else:
                assert fbn.grad_weight is None
            if tbn.bias is not None:
                close(fbn.grad_bias, N(tbn.bias.grad), dtype)
                tbn.bias.grad = None
            else:
                assert fbn.grad_bias is None
            _compare_state(fbn, tbn, dtype)


@pytest.mark.parametrize("fcls,tcls,shape", LAYERS, ids=LAYER_IDS)
def test_state_dict_from_torch_reproduces_torch(rng, fcls, tcls, shape):
    C = shape[1]
    tbn = tcls(C, momentum=0.4)
    with torch.no_grad():
        tbn.weight.copy_(T(rng.uniform(0.5, 2, C).astype(np.float32)))
        tbn.bias.copy_(T(rng.standard_normal(C).astype(np.float32)))
    for _ in range(3):
        tbn(T(random_input(rng, shape, np.float32)))
    fbn = fcls(C, momentum=0.4)
    fbn.load_state_dict({k: v.numpy() for k, v in tbn.state_dict().items()})
    assert fbn.num_batches_tracked == 3
    x = random_input(rng, shape, np.float32)
    with torch.no_grad():
        close(fbn.eval()(x), N(tbn.eval()(T(x))), np.float32)
        close(fbn.train()(x), N(tbn.train()(T(x))), np.float32)
    _compare_state(fbn, tbn, np.float32)


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("fcls,tcls,shape", LAYERS, ids=LAYER_IDS)
def test_state_dict_to_torch_reproduces_fastbn(rng, fcls, tcls, shape, config):
    C = shape[1]
    fbn = fcls(C, dtype=np.float64, **config)
    if fbn.weight is not None:
        fbn.weight[...] = rng.uniform(0.5, 2, C)
    if fbn.bias is not None:
        fbn.bias[...] = rng.standard_normal(C)
    for _ in range(2):
        fbn(random_input(rng, shape, np.float64))
    tbn = tcls(C, dtype=torch.float64, **config)
    tbn.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in fbn.state_dict().items()})  # strict
    x = random_input(rng, shape, np.float64)
    with torch.no_grad():
        close(N(tbn.eval()(T(x))), fbn.eval()(x), np.float64)
        close(N(tbn.train()(T(x))), fbn.train()(x), np.float64)
    _compare_state(fbn, tbn, np.float64)


@pytest.mark.parametrize("kwargs", [dict(), dict(eps=1e-3, momentum=None), dict(affine=False),
                                    dict(bias=False), dict(track_running_stats=False, momentum=0.25)])
@pytest.mark.parametrize("fcls,tcls", [(fastbn.BatchNorm1d, torch.nn.BatchNorm1d),
                                       (fastbn.BatchNorm2d, torch.nn.BatchNorm2d),
                                       (fastbn.BatchNorm3d, torch.nn.BatchNorm3d)])
def test_repr_equals_torch(fcls, tcls, kwargs):
    assert repr(fcls(4, **kwargs)) == repr(tcls(4, **kwargs))


def test_reset_parameters_like_torch(rng):
    fbn, tbn = _pair(fastbn.BatchNorm1d, torch.nn.BatchNorm1d, 3, np.float32, rng)
    x = random_input(rng, (5, 3), np.float32)
    fbn(x)
    with torch.no_grad():
        tbn(T(x))
    fbn.reset_parameters()
    tbn.reset_parameters()
    _compare_state(fbn, tbn, np.float32)


def test_empty_batch_like_torch(rng):
    fbn, tbn = _pair(fastbn.BatchNorm2d, torch.nn.BatchNorm2d, 3, np.float32, rng)
    with torch.no_grad():
        tbn(T(random_input(rng, (2, 3, 2, 2), np.float32)))
    fbn(random_input(rng, (2, 3, 2, 2), np.float32))
    fbn.load_state_dict({k: v.numpy() for k, v in tbn.state_dict().items()})
    x = np.zeros((0, 3, 2, 2), np.float32)
    with torch.no_grad():
        yt = tbn(T(x))
    y = fbn(x)
    assert y.shape == tuple(yt.shape)
    _compare_state(fbn, tbn, np.float32)


# ---------------------------------------------------------------------------------- functional
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(7, 3), (4, 1, 9), (3, 5, 2, 3), (2, 2, 2, 1, 3), (9, 1)], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("momentum", [0.1, 0.7])
def test_functional_matches_torch(rng, kernel_path, shape, dtype, training, momentum):
    C = shape[1]
    x = random_input(rng, shape, dtype)
    w, b, rm, rv = random_params(rng, C, dtype)
    trm, trv = T(rm.copy()), T(rv.copy())
    yt = torch.nn.functional.batch_norm(T(x), trm, trv, T(w), T(b), training=training, momentum=momentum, eps=1e-4)
    y = fastbn.batch_norm(x, rm, rv, w, b, training=training, momentum=momentum, eps=1e-4)
    close(y, N(yt), dtype)
    close(rm, N(trm), dtype)
    close(rv, N(trv), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(8, 3), (3, 2, 7), (2, 3, 3, 2), (2, 1, 2, 2, 3)], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_functional_backward_matches_autograd(rng, kernel_path, shape, dtype, training):
    C = shape[1]
    x = random_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w, b, rm, rv = random_params(rng, C, dtype)
    xt, wt, bt = (T(a).requires_grad_(True) for a in (x, w, b))
    yt = torch.nn.functional.batch_norm(xt, T(rm.copy()), T(rv.copy()), wt, bt, training=training)
    yt.backward(T(dy))
    _, mean, invstd = fastbn.batch_norm_forward(x, rm, rv, w, b, training=training)
    dx, gw, gb = fastbn.batch_norm_backward(dy, x, w, mean, invstd, training=training)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dx, N(xt.grad), **tol)
    np.testing.assert_allclose(gw, N(wt.grad), **tol)
    np.testing.assert_allclose(gb, N(bt.grad), **tol)


def test_one_value_per_channel_is_an_error_like_torch(rng):
    x = random_input(rng, (1, 3), np.float32)
    with pytest.raises(ValueError):
        torch.nn.functional.batch_norm(T(x), None, None, training=True)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fastbn.batch_norm(x, None, None, training=True)
    # evaluation with one value is fine in both
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    close(fastbn.batch_norm(x, rm, rv), N(torch.nn.functional.batch_norm(T(x), T(rm), T(rv))), np.float32)


PARAMETERLESS = [
    (lambda: fastbn.BatchNorm1d(5, affine=False, track_running_stats=False),
     lambda: torch.nn.BatchNorm1d(5, affine=False, track_running_stats=False), (4, 6, 7)),
    (lambda: fastbn.BatchNorm2d(2, affine=False, track_running_stats=False, activation="relu"),
     lambda: torch.nn.Sequential(torch.nn.BatchNorm2d(2, affine=False, track_running_stats=False), torch.nn.ReLU()),
     (3, 4, 5, 5)),
    (lambda: fastbn.GroupNorm(3, 9, affine=False), lambda: torch.nn.GroupNorm(3, 9, affine=False), (2, 6, 11)),
]


@pytest.mark.parametrize("make,make_torch,shape", PARAMETERLESS, ids=["BatchNorm1d", "BatchNorm2d-relu", "GroupNorm"])
def test_layer_without_parameters_takes_any_channel_count_like_torch(rng, make, make_torch, shape):
    """A layer with nothing per channel (no affine parameters, no running statistics) normalizes an
    input of another channel count, as PyTorch's does (fastbn also warns: the count was given for
    nothing); one with parameters refuses it."""
    x = rng.standard_normal(shape).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    ours, theirs = make(), make_torch()
    tx = T(x).requires_grad_(True)
    ty = theirs(tx)
    ty.backward(T(g))
    for mode in ("train", "eval"):
        getattr(ours, mode)()
        with pytest.warns(UserWarning, match="is not used because"):
            y = ours(x)
        np.testing.assert_allclose(y, N(ty), **TOL[x.dtype])
    ours.train()
    with pytest.warns(UserWarning):
        ours(x)
    np.testing.assert_allclose(ours.backward(g), N(tx.grad), **TOL[x.dtype])
    with pytest.raises(ValueError, match="expected"):
        (fastbn.BatchNorm1d(5) if "Batch" in type(ours).__name__ else fastbn.GroupNorm(3, 9))(x)
