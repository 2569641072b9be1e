"""Group, layer and instance norm (issue 13): PyTorch parity of the functional API on shapes and
options drawn at random (not only the benchmark's), numerics, determinism and bad input."""
import math

import numpy as np
import pytest

import fastbn
from _helpers import switched_on
from fastbn import _norm_kernels as K

torch = pytest.importorskip("torch")
TF = torch.nn.functional

TOL = {np.float32: dict(rtol=1e-4, atol=3e-5), np.float64: dict(rtol=1e-9, atol=1e-10)}


def _t(a, grad=False):
    return None if a is None else torch.tensor(a, requires_grad=grad)


def _close(a, t, dt, scale=1.0):
    tol = TOL[dt]
    np.testing.assert_allclose(a, t.detach().numpy(), rtol=tol["rtol"], atol=tol["atol"] * scale)


def _random_group_case(rng):
    ndim = int(rng.integers(2, 6))
    N = int(rng.integers(1, 5))
    G = int(rng.integers(1, 5))
    C = G * int(rng.integers(1, 4))
    spatial = tuple(int(rng.integers(1, 7)) for _ in range(ndim - 2))
    return (N, C) + spatial, G


@pytest.mark.parametrize("dt", [np.float32, np.float64])
@pytest.mark.parametrize("seed", range(12))
def test_group_norm_parity_random(seed, dt):
    rng = np.random.default_rng(1000 + seed)
    shape, G = _random_group_case(rng)
    if np.prod(shape) // (shape[0] * G) < 2:
        shape = shape + (3,)
    C = shape[1]
    x = (rng.standard_normal(shape) * rng.uniform(0.1, 5) + rng.uniform(-3, 3)).astype(dt)
    g = rng.standard_normal(shape).astype(dt)
    affine = bool(rng.integers(2))
    w = rng.standard_normal(C).astype(dt) if affine else None
    b = rng.standard_normal(C).astype(dt) if affine else None
    eps = float(rng.choice([1e-5, 1e-3, 0.1]))
    y, m, s = fastbn.group_norm_forward(x, G, w, b, eps)
    xt, wt, bt = _t(x, True), _t(w, affine), _t(b, affine)
    yt = TF.group_norm(xt, G, wt, bt, eps)
    _close(y, yt, dt)
    assert m.shape == s.shape == (shape[0], G) and m.dtype == np.float64
    np.testing.assert_allclose(y, fastbn.group_norm(x, G, w, b, eps))
    yt.backward(torch.tensor(g))
    dx, gw, gb = fastbn.group_norm_backward(g, x, G, w, m, s)
    _close(dx, xt.grad, dt, 10)
    assert gw.dtype == dt and gw.shape == (C,)
    if affine:
        _close(gw, wt.grad, dt, 10 * np.sqrt(x.size))
        _close(gb, bt.grad, dt, 10 * np.sqrt(x.size))


@pytest.mark.parametrize("dt", [np.float32, np.float64])
@pytest.mark.parametrize("seed", range(12))
def test_layer_norm_parity_random(seed, dt):
    rng = np.random.default_rng(2000 + seed)
    ndim = int(rng.integers(1, 5))
    shape = tuple(int(rng.integers(1, 9)) for _ in range(ndim))
    k = int(rng.integers(1, ndim + 1))
    ns = shape[ndim - k:]
    if np.prod(ns) < 2:
        shape, ns = shape[:-1] + (5,), ns[:-1] + (5,)
    x = (rng.standard_normal(shape) * 2 + 1).astype(dt)
    g = rng.standard_normal(shape).astype(dt)
    mode = int(rng.integers(3))  # 0: no affine, 1: weight only (bias=False), 2: weight and bias
    w = rng.standard_normal(ns).astype(dt) if mode else None
    b = rng.standard_normal(ns).astype(dt) if mode == 2 else None
    arg = ns[0] if len(ns) == 1 and seed % 2 else ns
    y, m, s = fastbn.layer_norm_forward(x, arg, w, b)
    assert m.shape == shape[:ndim - k]
    xt, wt, bt = _t(x, True), _t(w, mode > 0), _t(b, mode == 2)
    yt = TF.layer_norm(xt, ns, wt, bt)
    _close(y, yt, dt)
    yt.backward(torch.tensor(g))
    dx, gw, gb = fastbn.layer_norm_backward(g, x, arg, w, m, s)
    _close(dx, xt.grad, dt, 10)
    assert gw.shape == gb.shape == ns
    if mode:
        _close(gw, wt.grad, dt, 10 * np.sqrt(x.size))
    if mode == 2:
        _close(gb, bt.grad, dt, 10 * np.sqrt(x.size))


@pytest.mark.parametrize("dt", [np.float32, np.float64])
@pytest.mark.parametrize("seed", range(10))
def test_instance_norm_parity_random(seed, dt):
    rng = np.random.default_rng(3000 + seed)
    ndim = int(rng.integers(3, 6))
    shape = (int(rng.integers(1, 5)), int(rng.integers(1, 6))) + tuple(int(rng.integers(2, 6)) for _ in range(ndim - 2))
    C = shape[1]
    x = (rng.standard_normal(shape) + 2).astype(dt)
    g = rng.standard_normal(shape).astype(dt)
    affine, track, use = (bool(v) for v in rng.integers(2, size=3))
    if not track:
        use = True
    w = rng.standard_normal(C).astype(dt) if affine else None
    b = rng.standard_normal(C).astype(dt) if affine else None
    rm = rng.standard_normal(C).astype(dt) if track else None
    rv = (rng.random(C) + 0.5).astype(dt) if track else None
    rmt, rvt = _t(rm), _t(rv)
    mom = float(rng.choice([0.1, 0.5, 1.0, 0.0]))
    y, m, s = fastbn.instance_norm_forward(x, rm, rv, w, b, use, mom, 1e-5)
    xt, wt, bt = _t(x, True), _t(w, affine), _t(b, affine)
    yt = TF.instance_norm(xt, rmt, rvt, wt, bt, use, mom, 1e-5)
    _close(y, yt, dt)
    if track:
        _close(rm, rmt, dt)
        _close(rv, rvt, dt)
    yt.backward(torch.tensor(g))
    dx, gw, gb = fastbn.instance_norm_backward(g, x, w, m, s, use)
    _close(dx, xt.grad, dt, 10)
    if affine:
        _close(gw, wt.grad, dt, 10 * np.sqrt(x.size))
        _close(gb, bt.grad, dt, 10 * np.sqrt(x.size))


@pytest.mark.parametrize("case", [
    ("group", (1, 4, 70001), 2), ("group", (2, 3, 40000), 1), ("layer", (3, 50000), (50000,)),
    ("layer", (2, 7, 9000), (7, 9000)), ("instance", (1, 3, 90000), None)])
def test_long_rows_pieces_parity(case):
    """Fewer rows than tasks: rows cut into pieces merged in order (float64 against torch)."""
    kind, shape, arg = case
    rng = np.random.default_rng(7)
    x = rng.standard_normal(shape) * 3 + 5
    g = rng.standard_normal(shape)
    pshape = arg if kind == "layer" else (shape[1],)
    w, b = rng.standard_normal(pshape), rng.standard_normal(pshape)
    xt, wt, bt = _t(x, True), _t(w, True), _t(b, True)
    if kind == "group":
        y, m, s = fastbn.group_norm_forward(x, arg, w, b)
        dx, gw, gb = fastbn.group_norm_backward(g, x, arg, w, m, s)
        yt = TF.group_norm(xt, arg, wt, bt)
    elif kind == "layer":
        y, m, s = fastbn.layer_norm_forward(x, arg, w, b)
        dx, gw, gb = fastbn.layer_norm_backward(g, x, arg, w, m, s)
        yt = TF.layer_norm(xt, arg, wt, bt)
    else:
        y, m, s = fastbn.instance_norm_forward(x, None, None, w, b)
        dx, gw, gb = fastbn.instance_norm_backward(g, x, w, m, s)
        yt = TF.instance_norm(xt, None, None, wt, bt)
    yt.backward(torch.tensor(g))
    for a, t in ((y, yt), (dx, xt.grad), (gw, wt.grad), (gb, bt.grad)):
        np.testing.assert_allclose(a, t.detach().numpy(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["group", "layer", "instance"])
def test_same_result_on_1_and_2_threads(kind):
    rng = np.random.default_rng(11)
    shape = (2, 4, 300, 300) if kind != "layer" else (3, 600, 600)
    x = (rng.standard_normal(shape) + 100).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    before = fastbn.get_num_threads()
    results = []
    try:
        for t in (1, 2):
            fastbn.set_num_threads(t)
            if kind == "group":
                y, m, s = fastbn.group_norm_forward(x, 2)
                r = (y, m, s) + fastbn.group_norm_backward(g, x, 2, None, m, s)
            elif kind == "layer":
                y, m, s = fastbn.layer_norm_forward(x, (600, 600))
                r = (y, m, s) + fastbn.layer_norm_backward(g, x, (600, 600), None, m, s)
            else:
                y, m, s = fastbn.instance_norm_forward(x)
                r = (y, m, s) + fastbn.instance_norm_backward(g, x, None, m, s)
            results.append(r)
    finally:
        fastbn.set_num_threads(before)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def _err(y, ref):
    return float(np.max(np.abs(y.astype(np.float64) - ref)))


@pytest.mark.parametrize("kind", ["group", "layer", "instance"])
def test_float32_error_no_worse_than_torch(kind):
    """Offset 1e4 on every value and one constant 1e7 channel: error against a float64 reference
    no worse than PyTorch's float32 on the same input."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((4, 8, 16, 16)) + 1e4).astype(np.float32)
    x[:, 3] = 1e7
    x64 = x.astype(np.float64)
    fns = {
        "group": (lambda a, mod: mod.group_norm(a, 8) if mod is fastbn else TF.group_norm(a, 8)),
        "layer": (lambda a, mod: mod.layer_norm(a, (16, 16)) if mod is fastbn else TF.layer_norm(a, (16, 16))),
        "instance": (lambda a, mod: mod.instance_norm(a) if mod is fastbn else TF.instance_norm(a)),
    }
    fn = fns[kind]
    ref = fn(torch.tensor(x64), None).numpy()
    ours = _err(fn(x, fastbn), ref)
    theirs = _err(fn(torch.tensor(x), None).numpy(), ref)
    assert ours <= theirs * 1.01 + 1e-7, (ours, theirs)


def test_out_and_noncontiguous_inputs():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 6, 10, 8))[:, :, ::2]  # a strided view
    out = np.empty(x.shape)
    r = fastbn.group_norm(x, 3, out=out)
    assert r is out
    np.testing.assert_allclose(out, TF.group_norm(torch.tensor(np.ascontiguousarray(x)), 3).numpy(), atol=1e-12)
    xc = np.ascontiguousarray(x)
    expect = fastbn.layer_norm(xc, 8)
    fastbn.layer_norm(xc, 8, out=xc)  # in place
    np.testing.assert_array_equal(xc, expect)
    xb = x.astype(">f8")  # byte-swapped
    np.testing.assert_allclose(fastbn.instance_norm(xb), fastbn.instance_norm(np.ascontiguousarray(x)), atol=1e-12)


def test_empty_inputs():
    x = np.zeros((0, 4, 3), np.float32)
    y, m, s = fastbn.group_norm_forward(x, 2)
    assert y.shape == x.shape and m.shape == (0, 2)
    y, m, s = fastbn.layer_norm_forward(np.zeros((0, 5)), 5)
    assert y.shape == (0, 5) and m.shape == (0,)
    assert fastbn.instance_norm(np.zeros((0, 2, 4))).shape == (0, 2, 4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rows_of_one_element_give_a_zero_grad_input(dtype):
    """A row of one element (layer norm over one feature, group norm with one element a group) has
    x - mean = 0, so grad_input = invstd * (g - mean(g)) = 0 exactly, as PyTorch's layer norm
    gives; NaN where grad_output is NaN."""
    rng = np.random.default_rng(41)
    x = (rng.standard_normal((7, 6)) * 3).astype(dtype)
    g = (rng.standard_normal((7, 6)) * 100).astype(dtype)
    g[2, 3] = np.nan
    w = rng.uniform(0.5, 3, 6).astype(dtype)
    y, m, s = fastbn.layer_norm_forward(x[..., None], (1,), w[:1])
    dx = fastbn.layer_norm_backward(g[..., None], x[..., None], (1,), w[:1], m, s)[0]
    for out in (dx[..., 0], fastbn.group_norm_backward(g, x, 6, w, *fastbn.group_norm_forward(x, 6, w)[1:])[0],
                fastbn.group_norm_backward(g[..., None, None], x[..., None, None], 6, w,
                                           *fastbn.group_norm_forward(x[..., None, None], 6, w)[1:])[0][..., 0, 0]):
        assert np.isnan(out[2, 3])
        out[2, 3] = 0
        np.testing.assert_array_equal(out, 0)


@pytest.mark.parametrize("shape", [(2, 4, 0), (0, 4, 3), (0, 4)], ids=str)
def test_empty_out_arrays_are_accepted(shape):
    """NumPy 2 gives every empty array zero strides; an empty out= has no elements that could
    share a location, so it is accepted (and returned) as PyTorch accepts an empty out."""
    x = np.zeros(shape, np.float32)
    w = np.ones(4, np.float32)
    for call in (lambda o: fastbn.group_norm(x, 2, w, w, out=o), lambda o: fastbn.layer_norm(x, shape[-1:], out=o),
                 lambda o: fastbn.batch_norm(x, None, None, w, w, training=True, out=o)):
        o = np.empty_like(x)
        assert call(o) is o
    y, m, s = fastbn.group_norm_forward(x, 2, w)
    o = np.empty_like(x)
    assert fastbn.group_norm_backward(x, x, 2, w, m, s, out=o)[0] is o
    if len(shape) == 3:  # (to instance norm, a 2-d input is one unbatched instance, (C, L))
        o = np.empty_like(x)
        assert fastbn.instance_norm(x, out=o) is o


@pytest.mark.parametrize("call, exc, words", [
    (lambda x: fastbn.group_norm(x, 5), ValueError, ["num_groups", "divide", "6 channels"]),
    (lambda x: fastbn.group_norm(x, 0), ValueError, ["num_groups", ">= 1"]),
    (lambda x: fastbn.group_norm(x, 2.0), TypeError, ["num_groups", "integer"]),
    (lambda x: fastbn.group_norm(x[0, 0, 0], 1), ValueError, ["at least 2 dimensions"]),
    (lambda x: fastbn.group_norm(x, 2, np.ones(5)), ValueError, ["weight", "(6,)"]),
    (lambda x: fastbn.group_norm(x, 2, [1.0] * 6), TypeError, ["weight", "numpy array"]),
    (lambda x: fastbn.group_norm(x.astype(np.int32), 2), TypeError, ["float32 or float64"]),
    (lambda x: fastbn.group_norm(x, 2, eps=-1.0), ValueError, ["eps"]),
    (lambda x: fastbn.layer_norm(x, (4, 5)), ValueError, ["normalized_shape", "(4, 5)"]),
    (lambda x: fastbn.layer_norm(x, ()), ValueError, ["normalized_shape"]),
    (lambda x: fastbn.layer_norm(x, "a"), TypeError, ["normalized_shape"]),
    (lambda x: fastbn.layer_norm(x, 4, np.ones(3)), ValueError, ["weight", "(4,)"]),
    (lambda x: fastbn.instance_norm(x[0, 0, 0]), ValueError, ["at least 2 dimensions"]),
    (lambda x: fastbn.instance_norm(x[:, :, 0, 0]), ValueError, ["more than 1 spatial element"]),
    (lambda x: fastbn.instance_norm(x, use_input_stats=False), ValueError, ["running_mean"]),
    (lambda x: fastbn.instance_norm(x, np.zeros(6), None), ValueError, ["both"]),
    (lambda x: fastbn.instance_norm(x, np.zeros(6), np.ones(6), momentum=2.0), ValueError, ["momentum"]),
    (lambda x: fastbn.instance_norm(x[:, :, :1, :1]), ValueError, ["more than 1 spatial element"]),
    (lambda x: fastbn.instance_norm(x[:0, :, :1, :1]), ValueError, ["more than 1 spatial element"]),
    (lambda x: fastbn.group_norm(x[:1, :, :1, :1], 6), ValueError, ["more than 1 value per channel", "num_groups=6"]),
    (lambda x: fastbn.group_norm(x, 2, out=np.empty((2, 6))), ValueError, ["out", "shape"]),
    (lambda x: fastbn.group_norm_backward(x[:1], x, 2, None, np.zeros((2, 2)), np.ones((2, 2))), ValueError,
     ["grad_output", "shape"]),
    (lambda x: fastbn.group_norm_backward(x, x, 2, None, np.zeros((2, 3)), np.ones((2, 2))), ValueError,
     ["save_mean", "(2, 2)"]),
    (lambda x: fastbn.layer_norm_backward(x.astype(np.float32), x, 4, None, np.zeros((2, 6, 5)), np.ones((2, 6, 5))),
     TypeError, ["grad_output", "dtype"]),
])
def test_bad_input_messages(call, exc, words):
    x = np.random.default_rng(0).standard_normal((2, 6, 5, 4))
    with pytest.raises(exc) as e:
        call(x)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(N=st.integers(1, 3), G=st.integers(1, 3), Cg=st.integers(1, 3), S=st.integers(2, 40),
       scale=st.floats(1e-3, 1e3), offset=st.floats(-1e3, 1e3), seed=st.integers(0, 2**31))
def test_group_norm_hypothesis_float64(N, G, Cg, S, scale, offset, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, G * Cg, S)) * scale + offset
    g = rng.standard_normal(x.shape)
    w, b = rng.standard_normal(G * Cg), rng.standard_normal(G * Cg)
    y, m, s = fastbn.group_norm_forward(x, G, w, b)
    xt, wt = _t(x, True), _t(w, True)
    yt = TF.group_norm(xt, G, wt, _t(b))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-8, atol=1e-8)
    yt.backward(torch.tensor(g))
    dx, gw, _ = fastbn.group_norm_backward(g, x, G, w, m, s)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-6, atol=1e-6 / scale)
    np.testing.assert_allclose(gw, wt.grad.numpy(), rtol=1e-7, atol=1e-7)


# ---------------------------------------------------------------- layers against torch.nn
def _layer_pair(kind, rng, dt):
    tdt = torch.float32 if dt == np.float32 else torch.float64
    if kind == "group":
        G = int(rng.integers(1, 4))
        C = G * int(rng.integers(1, 4))
        affine, bias = bool(rng.integers(2)), bool(rng.integers(2))
        args = dict(eps=float(rng.choice([1e-5, 1e-3])), affine=affine, bias=bias)
        ours = fastbn.GroupNorm(G, C, dtype=dt, **args)
        theirs = torch.nn.GroupNorm(G, C, dtype=tdt, **args)
        shape = (int(rng.integers(2, 4)), C) + tuple(int(rng.integers(2, 5)) for _ in range(int(rng.integers(0, 3))))
        # (torch refuses N * prod(spatial) == 1 in group_norm, even when a group has several
        # channels; fastbn normalizes such an input: not compared here)
    elif kind == "layer":
        ns = tuple(int(rng.integers(2, 6)) for _ in range(int(rng.integers(1, 3))))
        args = dict(eps=1e-5, elementwise_affine=bool(rng.integers(2)), bias=bool(rng.integers(2)))
        arg = ns[0] if len(ns) == 1 and rng.integers(2) else ns
        ours = fastbn.LayerNorm(arg, dtype=dt, **args)
        theirs = torch.nn.LayerNorm(arg, dtype=tdt, **args)
        shape = tuple(int(rng.integers(1, 4)) for _ in range(int(rng.integers(0, 3)))) + ns
    else:
        d = int(rng.integers(1, 4))
        C = int(rng.integers(1, 5))
        args = dict(eps=1e-5, momentum=[0.1, 0.5, None][int(rng.integers(3))], affine=bool(rng.integers(2)),
                    track_running_stats=bool(rng.integers(2)), bias=bool(rng.integers(2)))
        ours = getattr(fastbn, f"InstanceNorm{d}d")(C, dtype=dt, **args)
        theirs = getattr(torch.nn, f"InstanceNorm{d}d")(C, dtype=tdt, **args)
        shape = ((int(rng.integers(1, 4)),) if rng.integers(4) else ()) + (C,) + tuple(
            int(rng.integers(2, 5)) for _ in range(d))
    return ours, theirs, shape


@pytest.mark.parametrize("dt", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["group", "layer", "instance"])
@pytest.mark.parametrize("seed", range(8))
def test_layer_parity_over_steps(kind, seed, dt):
    """Random layer options; train and eval steps interleaved; forward, backward, parameter
    gradients, running statistics, state_dict keys and values and repr against torch.nn."""
    rng = np.random.default_rng(4000 + seed)
    ours, theirs, shape = _layer_pair(kind, rng, dt)
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    # random parameters and buffers, loaded into both from torch's state_dict
    with torch.no_grad():
        for name, t in theirs.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.tensor(rng.standard_normal(tuple(t.shape))).abs() + 0.5 if "var" in name else
                        torch.tensor(rng.standard_normal(tuple(t.shape))))
    ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
    for step in range(4):
        train = step != 2
        ours.train(train)
        theirs.train(train)
        x = (rng.standard_normal(shape) * 2 + 1).astype(dt)
        g = rng.standard_normal(shape).astype(dt)
        xt = torch.tensor(x, requires_grad=True)
        yt = theirs(xt)
        y = ours(x)
        _close(y, yt, dt)
        yt.backward(torch.tensor(g))
        dx = ours.backward(g)
        _close(dx, xt.grad, dt, 10)
        for name, p in theirs.named_parameters():
            _close(getattr(ours, "grad_" + name), p.grad, dt, 10 * np.sqrt(x.size))
            p.grad = None
        for k, v in theirs.state_dict().items():
            np.testing.assert_allclose(ours.state_dict()[k], v.numpy(), rtol=1e-5, atol=1e-6)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]


def test_layer_bad_input_and_cuda():
    with pytest.raises(ValueError, match=r"num_channels \(6\) must be divisible by num_groups \(4\)"):
        fastbn.GroupNorm(4, 6)
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N'"):
        fastbn.LayerNorm(4, device="gpu")
    with pytest.raises(ValueError, match=r"expected \(N, 4, \*\)"):
        fastbn.GroupNorm(2, 4)(np.zeros((2, 3, 5), np.float32))
    with pytest.raises(TypeError, match="float32 parameters.*float64"):
        fastbn.LayerNorm(5)(np.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"3-D \(unbatched\) or 4-D"):
        fastbn.InstanceNorm2d(3)(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="expected 3 channels"):
        fastbn.InstanceNorm1d(3, affine=True)(np.zeros((2, 5, 4), np.float32))
    with pytest.warns(UserWarning, match="num_features is not used"):
        fastbn.InstanceNorm1d(3)(np.ones((2, 5, 4), np.float32))
    with pytest.raises(ValueError, match=r"weight must have shape \(3, 4\)"):
        fastbn.LayerNorm((3, 4)).load_state_dict({"weight": np.ones(12), "bias": np.zeros((3, 4))})


@pytest.mark.parametrize("kind", ["group", "layer", "instance"])
def test_float32_backward_error_no_worse_than_torch(kind):
    """The backward on the same input (offset 1e4, a constant 1e7 channel): grad_input and
    grad_weight errors against torch's float64 gradients no worse than torch's float32 ones
    (measured: ours 5e-5 / 2e-6, torch's up to 1e3 / 2e4)."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((4, 8, 16, 16)) + 1e4).astype(np.float32)
    x[:, 3] = 1e7
    g = rng.standard_normal(x.shape).astype(np.float32)
    w = rng.standard_normal(8).astype(np.float32) if kind != "layer" else np.ones((16, 16), np.float32)

    def torch_grads(xx, gg, ww):
        xt, wt = torch.tensor(xx, requires_grad=True), torch.tensor(ww, requires_grad=True)
        y = {"group": lambda: TF.group_norm(xt, 8, wt), "instance": lambda: TF.instance_norm(xt, weight=wt),
             "layer": lambda: TF.layer_norm(xt, (16, 16), wt)}[kind]()
        y.backward(torch.tensor(gg))
        return xt.grad.numpy(), wt.grad.numpy()

    ref = torch_grads(x.astype(np.float64), g.astype(np.float64), w.astype(np.float64))
    theirs = torch_grads(x, g, w)
    if kind == "group":
        _, m, s = fastbn.group_norm_forward(x, 8, w)
        ours = fastbn.group_norm_backward(g, x, 8, w, m, s)[:2]
    elif kind == "instance":
        _, m, s = fastbn.instance_norm_forward(x, weight=w)
        ours = fastbn.instance_norm_backward(g, x, w, m, s)[:2]
    else:
        _, m, s = fastbn.layer_norm_forward(x, (16, 16), w)
        ours = fastbn.layer_norm_backward(g, x, (16, 16), w, m, s)[:2]
    for a, t, r in zip(ours, theirs, ref):
        assert _err(a, r) <= _err(t, r) * 1.01 + 1e-6, (_err(a, r), _err(t, r))


# float32 rows are summed in double lanes (_norm_simd.h), and layer norm's backward folds its
# float32 column partials into double every FBN_LN_FOLD rows.  These bound the results against a
# float64 reference, on shapes that reach every part of the loops: rows shorter than a vector step,
# ragged tails, channel runs that are not a multiple of 16, long rows cut into pieces, and row
# blocks that are not a multiple of the fold.
EPS32 = float(np.finfo(np.float32).eps)


def _stats_ref(x64, rows):
    xr = x64.reshape(rows, -1)
    m = xr.mean(axis=1)
    return xr, m, 1 / np.sqrt(xr.var(axis=1) + 1e-5)


@pytest.mark.parametrize("shape,kind", [
    ((3, 4, 333, 301), "group"), ((2, 4, 1, 1_000_003), "group"), ((4, 6, 5, 3), "group"),
    ((5003, 77), "layer"), ((37, 1000), "layer"), ((9, 13), "layer"), ((2, 2, 131, 129), "instance"),
])
def test_float32_lanes_statistics_and_grad_input(shape, kind):
    """Offset 1e4, std 2: the statistics within 1e-7 of float64's (relative to the std), y and dx
    within 4 float32 ulps of their largest value."""
    rng = np.random.default_rng(21)
    x = (rng.standard_normal(shape) * 2 + 1e4).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    if kind == "group":
        y, m, s = fastbn.group_norm_forward(x, 2)
        dx = fastbn.group_norm_backward(g, x, 2, None, m, s)[0]
        rows = shape[0] * 2
    elif kind == "layer":
        y, m, s = fastbn.layer_norm_forward(x, shape[-1:])
        dx = fastbn.layer_norm_backward(g, x, shape[-1:], None, m, s)[0]
        rows = int(np.prod(shape[:-1]))
    else:
        y, m, s = fastbn.instance_norm_forward(x)
        dx = fastbn.instance_norm_backward(g, x, None, m, s)[0]
        rows = shape[0] * shape[1]
    xr, mr, sr = _stats_ref(x.astype(np.float64), rows)
    assert np.max(np.abs(m.reshape(-1) - mr) * sr) <= 1e-7
    assert np.max(np.abs(s.reshape(-1) / sr - 1)) <= 1e-7
    xh = (xr - mr[:, None]) * sr[:, None]
    gr = g.astype(np.float64).reshape(rows, -1)
    dxr = sr[:, None] * (gr - gr.mean(axis=1, keepdims=True) - xh * (gr * xh).mean(axis=1, keepdims=True))
    assert np.max(np.abs(y.reshape(rows, -1) - xh)) <= 4 * EPS32 * np.max(np.abs(xh))
    assert np.max(np.abs(dx.reshape(rows, -1) - dxr)) <= 4 * EPS32 * np.max(np.abs(dxr))


def test_float32_layer_norm_parameter_grads_over_many_rows():
    """grad_weight and grad_bias summed over 4099 rows (blocks of 256-257 rows, folded every 16,
    a ragged tail of 12 columns): within 8 float32 ulps of their largest value, and far better than
    PyTorch's float32 (measured on (12608, 768): ours 3e-5, PyTorch's 0.1 and 8e-4)."""
    rng = np.random.default_rng(22)
    shape = (4099, 300)
    x = (rng.standard_normal(shape) * 2 + 1e4).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(300)).astype(np.float32)
    _, m, s = fastbn.layer_norm_forward(x, (300,), w)
    _, gw, gb = fastbn.layer_norm_backward(g, x, (300,), w, m, s)
    xr, mr, sr = _stats_ref(x.astype(np.float64), shape[0])
    gwr = (g.astype(np.float64) * (xr - mr[:, None]) * sr[:, None]).sum(axis=0)
    gbr = g.astype(np.float64).sum(axis=0)
    for ours, ref in ((gw, gwr), (gb, gbr)):
        assert np.max(np.abs(ours - ref)) <= 8 * EPS32 * np.max(np.abs(ref)), np.max(np.abs(ours - ref))


@pytest.mark.parametrize("kind,shape", [("group", (3, 8, 37, 13)), ("group", (2, 4, 47, 45)), ("instance", (2, 3, 50, 41)),
                                        ("group", (5, 66, 1)), ("group", (3, 40, 7, 7)),
                                        ("layer", (37, 1003)), ("layer", (64, 768))])
@pytest.mark.parametrize("shift", [0, 1, 5, 15])
def test_float32_streaming_stores_same_grad_input(kind, shape, shift):
    """The backward's streaming stores (on AVX-512: straight from the registers, the partial vectors
    at either end of a run masked) give the dx of ordinary stores, at any offset of dx within a
    64-byte line: runs of 481 (buffered: shorter than FBN_NT512_RUN), 2115, 2050 and 1003 elements,
    not multiples of 16, and rows of 768."""
    rng = np.random.default_rng(23)
    x = (rng.standard_normal(shape) * 3 + 50).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    n = x.size
    outs = []
    for stream in (0, 1):
        buf = np.full(n + 32, np.nan, dtype=np.float32)
        dx = buf[shift:shift + n].reshape(shape)
        if kind == "layer":
            L = shape[-1]
            w = (1 + 0.1 * rng.standard_normal(L)).astype(np.float32) if stream == 0 else w
            _, m, s = fastbn.layer_norm_forward(x, (L,), w)
            K.layer_backward(g, x, dx, w, L, m, s, 2, stream)
        else:
            C = shape[1]
            G = 2 if kind == "group" else C
            w = (1 + 0.1 * rng.standard_normal(C)).astype(np.float32) if stream == 0 else w
            _, m, s = fastbn.group_norm_forward(x, G, w)
            K.group_backward(g, x, dx, w, G, int(np.prod(shape[2:])), m, s, True, 2, stream)
        assert np.isnan(buf[:shift]).all() and np.isnan(buf[shift + n:]).all()  # nothing outside dx
        outs.append(dx.copy())
    # the same instructions either way (bit for bit with GCC 12 on Zen 4); a compiler may contract
    # the clones' scalar tails otherwise
    np.testing.assert_allclose(outs[1], outs[0], rtol=0, atol=2 * EPS32 * np.max(np.abs(outs[0])))


@pytest.mark.parametrize("shape", [(2, 8, 28, 28), (3, 4, 17, 19), (2, 6, 256)])
def test_group_norm_output_at_any_offset_in_a_line_has_the_same_values(shape):
    """Channel runs of FBN_AL512_RUN elements or more, written with ordinary stores to an output that
    is not 64-byte aligned, take AVX-512 loops that store whole vectors at aligned addresses (the
    partial vectors at a run's ends masked): the forward's y and the backward's dx are those of an
    aligned output, at every offset of the output in a line, runs of 784, 323 (not a multiple of
    16) and 256 elements; nothing outside the output is written."""
    rng = np.random.default_rng(31)
    x = (rng.standard_normal(shape) * 3 + 20).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    C, G, S = shape[1], 2, int(np.prod(shape[2:]))
    w, b = rng.uniform(0.5, 2, C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    _, m, s = fastbn.group_norm_forward(x, G, w, b)
    ys, dxs = [], []
    for shift in range(16):
        buf = np.full(2 * x.size + 64, np.nan, dtype=np.float32)
        base = (-buf.ctypes.data % 64) // 4  # buf[base] starts a line
        y = buf[base + shift:base + shift + x.size].reshape(shape)
        dx = buf[base + shift + x.size + 16:base + shift + 2 * x.size + 16].reshape(shape)
        K.group_forward(x, y, w, b, G, S, 1e-5, np.zeros(shape[0] * G), np.zeros(shape[0] * G),
                        np.zeros(shape[0] * G), 2, 0)
        K.group_backward(g, x, dx, w, G, S, m, s, True, 2, 0)
        assert np.isnan(buf[:base + shift]).all() and np.isnan(buf[base + shift + 2 * x.size + 16:]).all()
        ys.append(y.copy())
        dxs.append(dx.copy())
    for outs in (ys, dxs):  # the same instructions either way (see the streaming test above)
        for o in outs[1:]:
            np.testing.assert_allclose(o, outs[0], rtol=0, atol=2 * EPS32 * np.max(np.abs(outs[0])))


def test_pytorchs_checks_of_tiny_inputs_and_their_limits():
    """PyTorch's group norm refuses N * C / G * spatial == 1 only (one-value groups in a batch of
    several pass, as there); its instance norm refuses one spatial element also in an empty batch,
    and lets an empty spatial size through."""
    x = np.arange(24.0).reshape(4, 6)
    for shape, G in (((4, 6), 6), ((1, 6, 1), 3)):
        a = np.arange(math.prod(shape), dtype=np.float64).reshape(shape)
        want = torch.nn.functional.group_norm(torch.from_numpy(a), G).numpy()
        np.testing.assert_allclose(fastbn.group_norm(a, G), want, atol=1e-12)
    assert fastbn.group_norm(x, 6).shape == (4, 6)
    assert fastbn.instance_norm(np.zeros((2, 3, 0))).shape == (2, 3, 0)
    assert torch.nn.functional.instance_norm(torch.zeros(2, 3, 0)).shape == (2, 3, 0)


@pytest.mark.parametrize("affine", [False, True])
def test_instance_norm_eps_0_on_a_constant_instance_is_pytorchs(affine):
    """eps = 0: PyTorch's kernel takes 1 / sqrt(var + eps) as 0 where both are 0, so a constant
    (sample, channel) gives the bias and a zero gradient instead of 0 / 0."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 4, 5)).astype(np.float32)
    x[0, 1] = 2.5
    x[2, 3] = -1.0
    g = rng.standard_normal(x.shape).astype(np.float32)
    layer = fastbn.InstanceNorm1d(4, eps=0.0, affine=affine)
    ref = torch.nn.InstanceNorm1d(4, eps=0.0, affine=affine)
    if affine:
        layer.weight[...] = rng.uniform(0.5, 2.0, 4)
        layer.bias[...] = rng.standard_normal(4)
        with torch.no_grad():
            ref.weight.copy_(torch.from_numpy(layer.weight))
            ref.bias.copy_(torch.from_numpy(layer.bias))
    tx = torch.from_numpy(x.copy()).requires_grad_()
    ty = ref(tx)
    ty.backward(torch.from_numpy(g))
    y = layer(x)
    dx = layer.backward(g)
    assert np.isfinite(y).all() and np.isfinite(dx).all()
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(y[0, 1], layer.bias[1] if affine else 0.0)
    np.testing.assert_array_equal(dx[0, 1], 0.0)
    _, _, invstd = fastbn.instance_norm_forward(x, eps=0.0)
    assert invstd[0, 1] == 0.0 and invstd[2, 3] == 0.0 and (invstd[1] > 0).all()


@pytest.mark.parametrize("make, tmake", [
    (lambda: fastbn.InstanceNorm2d(3), lambda: torch.nn.InstanceNorm2d(3)),
    (lambda: fastbn.GroupNorm(1, 3, affine=False), lambda: torch.nn.GroupNorm(1, 3, affine=False)),
    (lambda: fastbn.LayerNorm(5, elementwise_affine=False), lambda: torch.nn.LayerNorm(5, elementwise_affine=False)),
])
def test_a_layer_without_arrays_takes_either_float_type(make, tmake):
    """PyTorch's default InstanceNorm holds nothing, so it takes float64 input although it was
    built float32; so does fastbn's, computing in the input's precision."""
    rng = np.random.default_rng(3)
    x, g = rng.standard_normal((4, 3, 5, 5)), rng.standard_normal((4, 3, 5, 5))
    layer, tlayer = make(), tmake().double()
    y = layer(x)
    dx = layer.backward(g)
    tx = torch.tensor(x, requires_grad=True)
    ty = tlayer(tx)
    ty.backward(torch.tensor(g))
    assert y.dtype == dx.dtype == np.float64
    _close(y, ty, np.float64)
    _close(dx, tx.grad, np.float64)


def test_a_layer_with_arrays_still_refuses_another_float_type():
    with pytest.raises(TypeError, match=r"InstanceNorm2d holds float32 parameters, got input of dtype float64"):
        fastbn.InstanceNorm2d(3, affine=True)(np.ones((2, 3, 4, 4)))
    with pytest.raises(TypeError, match=r"holds float32 parameters, got input of dtype float64"):
        fastbn.InstanceNorm2d(3, track_running_stats=True)(np.ones((2, 3, 4, 4)))


def test_instance_norm_takes_2d_input_on_running_statistics_as_pytorch():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 5)).astype(np.float32)
    rm, rv = rng.standard_normal(5).astype(np.float32), rng.uniform(0.5, 2, 5).astype(np.float32)
    w, b = rng.uniform(0.5, 2, 5).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    y, mean, invstd = fastbn.instance_norm_forward(x, rm, rv, w, b, use_input_stats=False)
    t = TF.instance_norm(*map(_t, (x, rm, rv, w, b)), use_input_stats=False)
    _close(y, t, np.float32)
    dx = fastbn.instance_norm_backward(np.ones_like(x), x, w, mean, invstd, False)[0]
    np.testing.assert_allclose(dx, np.broadcast_to(w / np.sqrt(rv + 1e-5), x.shape), rtol=1e-6)


def test_instance_norm_refuses_running_statistics_it_does_not_track():
    layer = fastbn.InstanceNorm1d(3)
    state = {"running_mean": np.zeros(3, np.float32), "running_var": np.ones(3, np.float32)}
    for strict in (True, False):  # PyTorch raises even with strict=False
        with pytest.raises(ValueError, match=r"unexpected running stats buffer\(s\) \['running_mean', 'running_var'\]"):
            layer.load_state_dict(state, strict=strict)


def test_instance_norm_takes_a_versioned_pytorch_state_dict_as_pytorch():
    """PyTorch's own state_dict() carries version metadata; PyTorch then treats a tracking layer's
    running statistics as unexpected keys (reported with strict=False, an error with strict=True),
    not as the pre-0.4 checkpoint it refuses even with strict=False."""
    torch = pytest.importorskip("torch", reason="the PyTorch state_dict needs torch")
    sd = torch.nn.InstanceNorm2d(3, affine=True, track_running_stats=True).state_dict()
    sd["weight"].fill_(2.0)
    layer = fastbn.InstanceNorm2d(3, affine=True)
    want = torch.nn.InstanceNorm2d(3, affine=True).load_state_dict(sd, strict=False)
    got = layer.load_state_dict(sd, strict=False)
    assert sorted(got.unexpected_keys) == sorted(want.unexpected_keys) == [
        "num_batches_tracked", "running_mean", "running_var"]
    assert got.missing_keys == want.missing_keys == []
    np.testing.assert_array_equal(layer.weight, np.full(3, 2.0, np.float32))
    with pytest.raises((RuntimeError, ValueError), match="running_mean"):
        fastbn.InstanceNorm2d(3, affine=True).load_state_dict(sd, strict=True)
    with pytest.raises(ValueError, match="unexpected running stats"):  # the same dict without its metadata
        fastbn.InstanceNorm2d(3, affine=True).load_state_dict(dict(sd), strict=False)


def test_shape_errors_name_what_the_shape_comes_from():
    x = np.ones((2, 3, 5), np.float32)
    cases = [
        (lambda: fastbn.layer_norm(x, 5, weight=np.ones(6, np.float32)), r"weight .*\(5,\) to match normalized_shape"),
        (lambda: fastbn.layer_norm_backward(x, x, (5,), None, np.zeros((2, 1, 1)), np.ones((2, 3))),
         r"save_mean .*\(2, 3\) to match the input's leading dimensions"),
        (lambda: fastbn.group_norm_backward(x, x, 3, None, np.zeros((2, 2)), np.ones((2, 3))),
         r"save_mean .*\(2, 3\) to match \(N, num_groups\)"),
        (lambda: fastbn.instance_norm_backward(x, x, None, np.zeros((2, 2)), np.ones((2, 3))),
         r"save_mean .*\(2, 3\) to match \(N, C\)"),
        (lambda: fastbn.group_norm(x, 3, weight=np.ones(4, np.float32)), r"weight .*\(3,\) to match the input's 3 channels"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,G", [((4, 6, 5, 3), 3), ((2, 8), 4), ((3, 4, 7), 1), ((1, 16, 2, 2, 2), 16), ((40, 64, 9), 32)])
def test_group_norm_forward_plain_call_is_the_checked_one(dtype, shape, G):
    """group_norm_forward's C fast path (fastbn._fastpath.group_forward) gives the full path's
    results to the bit, and steps aside for anything not plain."""
    from fastbn import _fastpath
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * 3 + 2).astype(dtype)
    C = shape[1]
    w, b = rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)
    fast = _fastpath.group_forward(x, G, w, b, 1e-5, None)
    assert fast is not None
    slow = fastbn.group_norm_forward(np.asfortranarray(x), G, np.repeat(w, 2)[::2], b, 1e-5)  # checked in Python
    for f, s in zip(fast, slow):
        assert f.dtype == s.dtype and f.shape == s.shape
        np.testing.assert_array_equal(f, s)
    out = np.empty_like(x)
    y = fastbn.group_norm_forward(x, G, w, b, out=out)[0]
    assert y is out
    np.testing.assert_array_equal(out, slow[0])
    buf = x.copy()  # in place
    assert _fastpath.group_forward(buf, G, w, b, 1e-5, buf)[0] is buf
    np.testing.assert_array_equal(buf, slow[0])
    # not plain: None, and the checked path decides
    none = _fastpath.group_forward(x, G, None, None, 1e-5, None)  # no affine: the checked path's ones and zeros
    for f, s in zip(none, fastbn.group_norm_forward(np.asfortranarray(x), G, None, None, 1e-5)):
        np.testing.assert_array_equal(f, s)
    for args in [(x, True, w, b, 1e-5, None), (x, np.int64(G), w, b, 1e-5, None), (x, G, w[:-1], b, 1e-5, None),
                 (x, G, w, b, 0, None), (x, G, w, b, -1.0, None), (x, G, w.astype(np.float16), b, 1e-5, None),
                 (x[:, ::-1], G, w, b, 1e-5, None), (x.astype(np.float16), G, w, b, 1e-5, None),
                 (x, G, w, b, 1e-5, np.empty(x.shape, np.float16)), (x, C + 1, w, b, 1e-5, None),
                 (x, 0, w, b, 1e-5, None), (x, G, w, b, 1e-5, x.reshape(-1)[::-1].reshape(x.shape))]:
        assert _fastpath.group_forward(*args) is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(4, 6, 5), (7,), (3, 768), (2, 3, 4, 33), (64, 9)])
def test_layer_norm_forward_plain_call_is_the_checked_one(dtype, shape):
    """layer_norm_forward's C fast path (fastbn._fastpath.layer_forward) gives the full path's
    results to the bit, and steps aside for anything not plain."""
    from fastbn import _fastpath
    rng = np.random.default_rng(len(shape) + shape[-1])
    x = (rng.standard_normal(shape) * 3 + 2).astype(dtype)
    L = shape[-1]
    w, b = rng.standard_normal(L).astype(dtype), rng.standard_normal(L).astype(dtype)
    slow = fastbn.layer_norm_forward(np.asfortranarray(x), (L,), np.repeat(w, 2)[::2], b, 1e-5)  # checked in Python
    for ns in (L, (L,)):
        fast = _fastpath.layer_forward(x, ns, w, b, 1e-5, None)
        assert fast is not None
        for f, s in zip(fast, slow):
            assert f.dtype == s.dtype and f.shape == s.shape
            np.testing.assert_array_equal(f, s)
    out = np.empty_like(x)
    assert fastbn.layer_norm_forward(x, L, w, b, out=out)[0] is out
    np.testing.assert_array_equal(out, slow[0])
    buf = x.copy()  # in place
    assert _fastpath.layer_forward(buf, [L][0], w, b, 1e-5, buf)[0] is buf
    np.testing.assert_array_equal(buf, slow[0])
    none = _fastpath.layer_forward(x, L, None, None, 1e-5, None)  # no affine: the checked path's ones and zeros
    for f, s in zip(none, fastbn.layer_norm_forward(np.asfortranarray(x), (L,), None, None, 1e-5)):
        np.testing.assert_array_equal(f, s)
    for args in [(x, [L], w, b, 1e-5, None), (x, np.int64(L), w, b, 1e-5, None), (x, L + 1, w, b, 1e-5, None),
                 (x, (1, L), w, b, 1e-5, None), (x, L, w, b[:-1], 1e-5, None), (x, L, w, b, 0, None),
                 (x, L, w, b, -1.0, None), (x, L, w.astype(np.float16), b, 1e-5, None), (x[..., ::-1], L, w, b, 1e-5, None),
                 (x, L, w, b, 1e-5, np.empty(x.shape, np.float16)), (x, True, w, b, 1e-5, None),
                 (x, L, w, b, 1e-5, x.reshape(-1)[::-1].reshape(x.shape))]:
        assert _fastpath.layer_forward(*args) is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind,shape,arg", [("group", (4, 6, 5, 3), 3), ("group", (2, 8), 8), ("group", (40, 64, 9), 32),
                                            ("layer", (4, 6, 5), 5), ("layer", (7,), 7), ("layer", (2, 3, 4, 33), (33,))])
def test_norm_backward_plain_call_is_the_checked_one(dtype, kind, shape, arg):
    """group_norm_backward's and layer_norm_backward's C fast paths give the full paths' results to
    the bit (grad_input, grad_weight, grad_bias), and step aside for anything not plain."""
    from fastbn import _fastpath
    rng = np.random.default_rng(len(shape) + shape[-1])
    x = (rng.standard_normal(shape) * 3 + 2).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    n = shape[1] if kind == "group" else shape[-1]
    w = rng.standard_normal(n).astype(dtype)
    forward = fastbn.group_norm_forward if kind == "group" else fastbn.layer_norm_forward
    backward = fastbn.group_norm_backward if kind == "group" else fastbn.layer_norm_backward
    plain = _fastpath.group_backward if kind == "group" else _fastpath.layer_backward
    _, m, s = forward(x, arg, w, None)
    slow = backward(np.asfortranarray(g), x, arg, np.repeat(w, 2)[::2], m, s)  # checked in Python
    fast = plain(g, x, arg, w, m, s, None)
    assert fast is not None
    for f, want in zip(fast, slow):
        assert f.dtype == want.dtype and f.shape == want.shape
        np.testing.assert_array_equal(f, want)
    target = np.empty_like(x)
    assert backward(g, x, arg, w, m, s, out=target)[0] is target
    np.testing.assert_array_equal(target, slow[0])
    target = g.copy()  # in place over grad_output
    assert backward(target, x, arg, w, m, s, out=target)[0] is target
    np.testing.assert_array_equal(target, slow[0])
    none = plain(g, x, arg, None, m, s, None)  # no weight: the checked path's ones
    for f, want in zip(none, backward(np.asfortranarray(g), x, arg, None, m, s)):
        np.testing.assert_array_equal(f, want)
    bad_arg = np.int64(arg) if not isinstance(arg, tuple) else [arg[0]]
    for args in [(g, x, bad_arg, w, m, s, None), (g, x, arg, w[:-1], m, s, None), (g.astype(np.float16), x, arg, w, m, s, None),
                 (g[..., ::-1], x, arg, w, m, s, None), (g, x, arg, w, m.astype(np.float32), s, None),
                 (g, x, arg, w, m, s.reshape(1, *s.shape), None),
                 (g, x, arg, w, m, s, np.empty(x.shape, np.float16)), (g, x, arg, w, m, s, x.reshape(-1)[::-1].reshape(x.shape))]:
        assert plain(*args) is None


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(4, 6, 5), (2, 3, 4, 4), (1, 8, 3, 2, 2)])
def test_instance_norm_plain_call_is_the_checked_one(shape, affine):
    """instance_norm_forward/backward on batch statistics without running buffers take group
    norm's C fast path (a group a channel): the checked path's bits; eps = 0, running buffers and
    one spatial element keep the checked path's rules."""
    rng = np.random.default_rng(shape[1])
    x = (rng.standard_normal(shape) * 3 + 2).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    C = shape[1]
    w, b = (rng.standard_normal(C).astype(np.float32), rng.standard_normal(C).astype(np.float32)) if affine else (None, None)
    fast = fastbn.instance_norm_forward(x, None, None, w, b)
    slow = fastbn.instance_norm_forward(np.asfortranarray(x), None, None, w, b)  # checked in Python
    for f, s in zip(fast, slow):
        assert f.dtype == s.dtype and f.shape == s.shape
        np.testing.assert_array_equal(f, s)
    fast_b = fastbn.instance_norm_backward(g, x, w, fast[1], fast[2])
    slow_b = fastbn.instance_norm_backward(np.asfortranarray(g), x, w, fast[1], fast[2])
    for f, s in zip(fast_b, slow_b):
        np.testing.assert_array_equal(f, s)
    layer = fastbn.InstanceNorm2d(C, affine=affine) if len(shape) == 4 else None
    if layer is not None:
        if affine:
            layer.weight[...], layer.bias[...] = w, b
        np.testing.assert_array_equal(layer(x), fast[0])
        np.testing.assert_array_equal(layer.backward(g), fast_b[0])
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        fastbn.instance_norm(x.reshape(shape[0], C, -1)[..., :1].copy())
    # momentum weighs nothing without running buffers (any real number, as in PyTorch and batch_norm)
    np.testing.assert_array_equal(fastbn.instance_norm(x, None, None, w, b, momentum=1.5), fast[0])
    with pytest.raises(TypeError, match="momentum must be a real number"):
        fastbn.instance_norm(x, momentum=None)
    with pytest.raises(ValueError, match=r"momentum must be a real number in \[0.0, 1.0\], got 1.5"):
        fastbn.instance_norm(x, np.zeros(C, np.float32), np.ones(C, np.float32), momentum=1.5)


def test_unbatched_out_must_have_the_inputs_shape():
    layer = fastbn.InstanceNorm1d(3)
    x = np.random.default_rng(5).standard_normal((3, 6)).astype(np.float32)
    with pytest.raises(ValueError, match=r"out must have the input's shape \(3, 6\), got shape \(1, 3, 6\)"):
        layer(x, out=np.zeros((1, 3, 6), np.float32))
    out = np.zeros((3, 6), np.float32)
    assert layer(x, out=out) is out
    with pytest.raises(ValueError, match=r"out must have the input's shape \(3, 6\), got shape \(1, 3, 6\)"):
        layer.backward(x, out=np.zeros((1, 3, 6), np.float32))
    assert layer.backward(x).shape == (3, 6)  # the refused call left the saved forward


def test_zero_variance_with_eps_0_warns_nothing():
    import warnings
    xc = np.ones((2, 4, 3), np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, m, s = fastbn.group_norm_forward(xc, 2, np.ones(4, np.float32), None, eps=0.0)
        fastbn.group_norm_backward(xc, xc, 2, np.ones(4, np.float32), m, s)
        y = fastbn.instance_norm(xc, np.zeros(4, np.float32), np.zeros(4, np.float32), use_input_stats=False, eps=0.0)
    assert np.isnan(y).all()  # (1 - 0) * inf: PyTorch's NaN too


@pytest.mark.parametrize("shape", [(5, 66), (7, 64, 1, 1), (3, 40, 7, 7), (2, 6, 5)])
@pytest.mark.parametrize("shift", [0, 3])
def test_group_norm_forward_streams_short_channels_with_the_same_bits(shape, shift):
    """One element a channel (S = 1: a vector loop along the row) and short channel runs (results
    gathered across runs before they are streamed): streaming stores on and off, the same bits."""
    rng = np.random.default_rng(29)
    x = (rng.standard_normal(shape) * 2 + 7).astype(np.float32)
    C, G, S = shape[1], 2, int(np.prod(shape[2:]))
    w, b = rng.uniform(0.5, 2, C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    outs = []
    for stream in (0, 1):
        buf = np.full(x.size + 32, np.nan, dtype=np.float32)
        y = buf[shift:shift + x.size].reshape(shape)
        R = shape[0] * G
        mean, var, invstd = np.zeros(R), np.zeros(R), np.zeros(R)
        K.group_forward(x, y, w, b, G, S, 1e-5, mean, var, invstd, 2, stream)
        assert np.isnan(buf[:shift]).all() and np.isnan(buf[shift + x.size:]).all()
        outs.append(y.copy())
    np.testing.assert_array_equal(outs[1], outs[0])
    _close(outs[0], TF.group_norm(torch.tensor(x), G, torch.tensor(w), torch.tensor(b)), np.float32, scale=10)


def test_instance_norm_with_no_channels_runs_backward_as_pytorch():
    """(N, 0, L): the forward's statistics are (N, 0), and its backward takes them (it once asked
    for (N, 1), a group of no channels)."""
    x = np.zeros((2, 0, 5), np.float32)
    y, m, s = fastbn.instance_norm_forward(x)
    assert y.shape == x.shape and m.shape == s.shape == (2, 0)
    dx, gw, gb = fastbn.instance_norm_backward(np.zeros_like(x), x, None, m, s)
    assert dx.shape == x.shape and dx.dtype == np.float32 and gw.shape == gb.shape == (0,)
    layer = fastbn.InstanceNorm1d(0, affine=True)
    layer(x)
    assert layer.backward(np.zeros_like(x)).shape == x.shape
    with pytest.raises(ValueError, match=r"save_mean .*\(2, 0\)"):
        fastbn.instance_norm_backward(np.zeros_like(x), x, None, np.zeros((2, 1)), s)


@pytest.mark.parametrize("kind", ["group", "layer", "instance"])
@pytest.mark.parametrize("head", [0.0, 40.0, 1000.0])
def test_float32_statistics_are_float64s(kind, head):
    """A float32 row's statistics are accumulated in double: the saved mean and invstd are
    float64's to 1e-12, and y is within 3 ulps of the exact output everywhere, also where it is
    near zero and where the row's first 256 values sit far above the rest (once the moments'
    shift: float32 partial sums then left outputs 70,000 ulps off, PyTorch's float32 2,100)."""
    rng = np.random.default_rng(31)
    n = 40_000
    x = rng.standard_normal((2, 1, n))
    x[:, :, :256] += head
    x = x.astype(np.float32)
    if kind == "group":
        y, m, s = fastbn.group_norm_forward(x, 1)
    elif kind == "layer":
        y, m, s = fastbn.layer_norm_forward(x, n)
    else:
        y, m, s = fastbn.instance_norm_forward(x)
    r = x.astype(np.float64).reshape(2, n)
    mean = r.mean(axis=1)
    d = r - mean[:, None]
    invstd = 1 / np.sqrt((d * d).mean(axis=1) + 1e-5)
    np.testing.assert_allclose(m.reshape(-1), mean, rtol=0, atol=1e-12 * np.abs(r).max())
    np.testing.assert_allclose(s.reshape(-1), invstd, rtol=1e-12)
    exact = d * invstd[:, None]
    ulps = np.abs(y.reshape(2, n) - exact) / np.spacing(np.abs(exact).astype(np.float32))
    assert ulps.max() <= 3, ulps.max()


@pytest.fixture
def row_pairs():
    """fastbn._norm_kernels.row_pairs, restored after the test; skips where the build has one set of
    loops (no AVX-512F)."""
    yield from switched_on(K.row_pairs, "no AVX-512F here, or a build without the paired loops: one set of loops")


@pytest.fixture
def norm_short_inline():
    """fastbn._norm_kernels.short_inline, on, restored after the test (skips as row_pairs)."""
    yield from switched_on(K.short_inline, "no AVX-512F, VL and FMA here, or a build without the AVX-512 loops: "
                                           "one set of loops")


def _skewed(a, k):
    """A float32 copy of a, 4 * k bytes past a 64-byte aligned start."""
    buf = np.empty(a.size + 16 + k, np.float32)
    out = buf[(-buf.ctypes.data % 64) // 4 + k:][:a.size].reshape(a.shape)
    out[...] = a
    return out


@pytest.mark.parametrize("stream", [0, 1])
@pytest.mark.parametrize("shape, G, skew", [((6, 8, 16, 16), 1, 0), ((5, 12, 17, 31), 2, 1), ((4, 6, 2100), 3, 3),
                                            ((3, 4, 700), 1, 2), ((3, 8, 16, 16), 4, 0), ((2, 64, 130), 16, 1)])
def test_paired_rows_are_rows_one_at_a_time(row_pairs, shape, G, skew, stream):
    """Group norm's fused float32 forward tasks with AVX-512 normalize a row in one loop with the
    next row's moments (_norm_simd.h's paired rows; fastbn._norm_kernels.row_pairs switches them):
    the same bits as a row at a time, output and statistics, with streaming stores and without,
    arrays 4 * skew bytes past a 64-byte line, NaN input, a 1e4 offset, and a row with a wide mean
    among paired ones (it takes the double loop, the rest pair).  Rows shorter than 2048 (the fifth
    case) and runs shorter than 256 (the last; with streaming stores, 2048) never pair."""
    rng = np.random.default_rng(37)
    N, C = shape[0], shape[1]
    S = int(np.prod(shape[2:]))
    R = N * G

    def skewed(a):
        return _skewed(a, skew)

    x = (rng.standard_normal(shape) * 2 + 1e4 * rng.standard_normal((1, C) + (1,) * (len(shape) - 2)))
    x = skewed(x.astype(np.float32))
    rows = x.reshape(R, -1)
    rows[1, 7] = np.nan
    if R > 3:
        rows[2] = 3e38  # a wide mean: the rows' double loop
    w = skewed(rng.uniform(-2, 2, C).astype(np.float32))
    b = skewed(rng.standard_normal(C).astype(np.float32))
    results = {}
    for paired in (True, False):
        row_pairs(paired)
        for threads in (1, 2):
            y = skewed(np.zeros(shape, np.float32))
            mean, var, invstd = (np.empty(R) for _ in range(3))
            K.group_forward(x, y, w, b, G, S, 1e-5, mean, var, invstd, threads, stream)
            results[paired, threads] = (y, mean, var, invstd)
    for threads in (1, 2):
        for a, c in zip(results[True, threads], results[False, threads]):
            np.testing.assert_array_equal(a.view(np.uint8), c.view(np.uint8))
    for a, c in zip(results[True, 1], results[True, 2]):
        np.testing.assert_array_equal(a.view(np.uint8), c.view(np.uint8))


@pytest.mark.parametrize("shape, G, skew, stream", [((4, 64, 28, 28), 8, 0, 0), ((3, 4, 700), 2, 1, 0),
                                                    ((2, 6, 300), 3, 3, 0), ((4, 8, 16, 17), 4, 2, 0),
                                                    ((3, 4, 257), 4, 1, 0), ((3, 4, 700), 2, 0, 1),
                                                    ((2, 64, 130), 16, 1, 0)])
def test_paired_backward_rows_are_rows_one_at_a_time(row_pairs, shape, G, skew, stream):
    """Group norm's float32 backward tasks with AVX-512 take a row's grad_input in one loop with the
    next row's gradient sums (_norm_simd.h's fbn_pair_grad; fastbn._norm_kernels.row_pairs switches
    them): the same bits as a row at a time, grad_input and the parameter gradients, on 1 and 2
    threads, arrays 4 * skew bytes past a 64-byte line (runs whose head vector is partial, and a
    sums step left after the last whole vector), NaN input, a 1e4 offset, and a row with a wide
    mean among paired ones.  With streaming stores (the sixth case) and on runs shorter than 256
    (the last) rows never pair; instance norm on running statistics (no sums) neither."""
    rng = np.random.default_rng(41)
    N, C = shape[0], shape[1]
    S = int(np.prod(shape[2:]))
    R = N * G

    def skewed(a, k=skew):
        return _skewed(a, k)

    x = rng.standard_normal(shape) * 2 + 1e4 * rng.standard_normal((1, C) + (1,) * (len(shape) - 2))
    x = skewed(x.astype(np.float32))
    g = skewed(rng.standard_normal(shape).astype(np.float32), (skew + 2) % 4)
    rows = x.reshape(R, -1)
    rows[1, 7] = np.nan
    if R > 3:
        rows[2] = 3e38  # a wide mean: the rows' double loops
    w = skewed(rng.uniform(-2, 2, C).astype(np.float32))
    mean, var, invstd = (np.empty(R) for _ in range(3))
    K.group_forward(x, np.empty_like(x), w, w, G, S, 1e-5, mean, var, invstd, 1, 0)
    results = {}
    for paired in (True, False):
        row_pairs(paired)
        for threads in (1, 2):
            for training in (True, False):
                dx = skewed(np.zeros(shape, np.float32), (skew + 1) % 4)
                gw, gb = K.group_backward(g, x, dx, w, G, S, mean, invstd, training, threads, stream)
                results[paired, threads, training] = (dx, gw, gb)
    for key in results:
        for a, c in zip(results[key], results[(False,) + key[1:]]):
            np.testing.assert_array_equal(a.view(np.uint8), c.view(np.uint8))


@pytest.mark.parametrize("shape, G", [((3, 64, 2, 2), 4), ((2, 24, 3, 3), 3), ((3, 10, 5), 2), ((2, 64, 3, 4), 2),
                                      ((3, 20, 11), 1), ((4, 6, 2), 6), ((2, 33, 3), 1), ((4, 64, 4, 4), 2),
                                      ((2, 6, 200), 3)])
def test_short_channel_runs_loops_are_the_generic_ones(norm_short_inline, shape, G):
    """Rows of short channel runs take one vector loop a row with AVX-512 (_norm_simd.h's
    fbn_gs_affine and fbn_gs_grad_input; fastbn._norm_kernels.short_inline switches them and
    _short512.h's sums): the generic loops' values for the forward, grad_input and the parameter
    gradients, group and instance norm, with NaN input, zero, negative and infinite weights, a 1e4
    offset and +-2**40 in grad_output (so that the sums' order shows); up to the sign of a zero
    gradient where a weight is 0.  Runs of 2 to 12 elements
    take them, with 1 to 32 channels a group (one register of coefficients or two); more channels
    or longer runs (the last cases) take the generic loops both times."""
    rng = np.random.default_rng(31)
    C = shape[1]
    results = {}
    for offset in (0.0, 1e4):
        x = (rng.standard_normal(shape) + offset).astype(np.float32)
        x.flat[5] = np.nan
        dy = rng.standard_normal(shape).astype(np.float32)
        if offset:  # +-2**40 in each run's first two elements: a change in the sums' order shows
            runs = dy.reshape(shape[0], C, -1)
            runs[:, :, 0] += np.float32(2.0 ** 40)
            runs[:, :, min(1, runs.shape[2] - 1)] -= np.float32(2.0 ** 40)
        w = rng.uniform(-2, 2, C).astype(np.float32)
        w[0], w[-1] = 0.0, np.inf
        b = rng.standard_normal(C).astype(np.float32)
        for inline in (True, False):
            norm_short_inline(inline)
            y, m, s = fastbn.group_norm_forward(x, G, w, b)
            dx, gw, gb = fastbn.group_norm_backward(dy, x, G, w, m, s)
            yi, mi, si = fastbn.instance_norm_forward(x, weight=w, bias=b)
            dxi, gwi, gbi = fastbn.instance_norm_backward(dy, x, w, mi, si)
            results[offset, inline] = (y, dx, gw, gb, yi, dxi, gwi, gbi)
    for offset in (0.0, 1e4):
        for a, c in zip(results[offset, True], results[offset, False]):
            np.testing.assert_array_equal(a, c)  # (equal values: +0 == -0, NaN where NaN)
    norm_short_inline(True)
    # and PyTorch's, where the input is finite and the weights too
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.uniform(-2, 2, C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    _close(fastbn.group_norm(x, G, w, b), TF.group_norm(torch.tensor(x), G, torch.tensor(w), torch.tensor(b)),
           np.float32, scale=10)
