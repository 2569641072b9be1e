"""Training-loop ergonomics on every layer (issue 13): the monitoring-pass trap, layers shared by
threads, params_and_grads, fastbn.no_grad, update_running_stats=False and a finite-difference
check of the whole layer protocol."""
import copy
import pickle
import threading

import numpy as np
import pytest

import fastbn

torch = pytest.importorskip("torch")

LAYERS = {
    "BatchNorm2d": (lambda dt: fastbn.BatchNorm2d(3, dtype=dt), lambda: torch.nn.BatchNorm2d(3), (4, 3, 5, 5)),
    "BatchNorm1d": (lambda dt: fastbn.BatchNorm1d(3, momentum=None, dtype=dt),
                    lambda: torch.nn.BatchNorm1d(3, momentum=None), (6, 3)),
    "GroupNorm": (lambda dt: fastbn.GroupNorm(2, 4, dtype=dt), lambda: torch.nn.GroupNorm(2, 4), (3, 4, 6)),
    "LayerNorm": (lambda dt: fastbn.LayerNorm((4, 5), dtype=dt), lambda: torch.nn.LayerNorm((4, 5)), (3, 4, 5)),
    "InstanceNorm2d": (lambda dt: fastbn.InstanceNorm2d(3, affine=True, track_running_stats=True, dtype=dt),
                       lambda: torch.nn.InstanceNorm2d(3, affine=True, track_running_stats=True), (2, 3, 4, 4)),
    "InstanceNorm1d": (lambda dt: fastbn.InstanceNorm1d(3, affine=True, dtype=dt),
                       lambda: torch.nn.InstanceNorm1d(3, affine=True), (2, 3, 7)),
}


def _randomized(name, rng, dt=np.float64):
    make, make_torch, shape = LAYERS[name]
    layer = make(dt)
    for p in layer.parameters():
        p[...] = rng.standard_normal(p.shape)
    return layer, shape


def _reference_grad(layer, x, g):
    """dx and parameter grads of a fresh copy of the layer (same mode), for one forward/backward."""
    twin = copy.deepcopy(layer)
    twin(x)
    return twin.backward(g), twin.grad_weight, twin.grad_bias


@pytest.mark.parametrize("name", list(LAYERS))
def test_monitoring_pass_raises_instead_of_a_wrong_gradient(name, rng):
    layer, shape = _randomized(name, rng)
    xa, xb, g = (rng.standard_normal(shape) for _ in range(3))
    ref_dx, _, _ = _reference_grad(layer, xa, g)
    layer(xa)
    layer.eval()
    layer(xb)  # the monitoring pass, without no_grad
    layer.train()
    with pytest.raises(RuntimeError, match=r"training mode, but this thread's last forward ran in eval mode.*no_grad"):
        layer.backward(g)
    # the same pass inside no_grad: the right gradient
    layer(xa)
    layer.eval()
    with fastbn.no_grad():
        layer(xb)
    layer.train()
    np.testing.assert_allclose(layer.backward(g), ref_dx, rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match="needs a forward"):
        layer.backward(g)  # one forward, one backward


@pytest.mark.parametrize("name", list(LAYERS))
def test_an_eval_forward_over_a_pending_training_one_raises(name, rng):
    """A training forward, then an evaluation forward outside no_grad, then a backward still in
    evaluation mode: which forward is meant is not clear, so the backward raises rather than
    return the evaluation call's gradient; further evaluation forwards keep it so, and a training
    forward ends it.  A validation pass between training steps (each forward with its backward)
    raises nothing, nor does an evaluation forward with its backward."""
    layer, shape = _randomized(name, rng)
    xa, xb, g = (rng.standard_normal(shape) for _ in range(3))
    layer(xa)
    layer.eval()
    layer(xb)
    with pytest.raises(RuntimeError, match=r"eval-mode forward that replaced .* pending training-mode forward.*no_grad"):
        layer.backward(g)
    layer(xb)  # another evaluation forward: still after the pending training one
    with pytest.raises(RuntimeError, match="replaced"):
        layer.backward(g)
    layer.train()
    layer(xa)  # a training forward replaces the evaluation ones: the one meant
    ref_dx, _, _ = _reference_grad(layer, xa, g)
    layer(xa)
    np.testing.assert_allclose(layer.backward(g), ref_dx, rtol=1e-10, atol=1e-12)
    # a validation pass between training steps, each forward followed by its backward
    layer.eval()
    layer(xb)
    eval_dx = layer.backward(g)  # an evaluation forward and its own backward
    layer(xb)                    # validation, without no_grad: pending, never differentiated
    layer.train()
    layer(xa)
    np.testing.assert_allclose(layer.backward(g), ref_dx, rtol=1e-10, atol=1e-12)
    assert eval_dx.shape == xb.shape


@pytest.mark.parametrize("name", ["BatchNorm2d", "GroupNorm", "LayerNorm", "InstanceNorm2d"])
def test_threads_sharing_a_layer_get_their_own_gradients(name):
    """8 Python threads share one layer, each forward then backward on its own input: every dx (and
    the thread's grad_weight) is that of its own forward, in 200 of 200 steps each."""
    rng = np.random.default_rng(1)
    layer, shape = _randomized(name, rng)
    layer.train()
    steps, nthreads = 200, 8
    inputs = [[rng.standard_normal(shape) for _ in range(steps)] for _ in range(nthreads)]
    grads = [[rng.standard_normal(shape) for _ in range(steps)] for _ in range(nthreads)]
    twin = copy.deepcopy(layer)
    refs = []
    for t in range(nthreads):
        row = []
        for s in range(steps):
            twin(inputs[t][s], update_running_stats=False)
            row.append((twin.backward(grads[t][s]), twin.grad_weight.copy()))
        refs.append(row)
    ok = [0] * nthreads
    errors = []
    barrier = threading.Barrier(nthreads)

    def work(t):
        try:
            barrier.wait()
            for s in range(steps):
                layer(inputs[t][s])
                dx = layer.backward(grads[t][s])
                if np.allclose(dx, refs[t][s][0], rtol=1e-9, atol=1e-12) and np.allclose(
                        layer.grad_weight, refs[t][s][1], rtol=1e-9, atol=1e-12):
                    ok[t] += 1
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(nthreads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[:3]
    assert ok == [steps] * nthreads


@pytest.mark.parametrize("name", list(LAYERS))
def test_params_and_grads_sgd_step_matches_torch(name, rng):
    make, make_torch, shape = LAYERS[name]
    ours = make(np.float64)
    theirs = make_torch().double()
    for _, p in theirs.named_parameters():
        with torch.no_grad():
            p.copy_(torch.tensor(rng.standard_normal(tuple(p.shape))))
    ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
    opt = torch.optim.SGD(theirs.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="no gradient for weight yet"):
        ours.params_and_grads()
    for _ in range(3):
        x, g = rng.standard_normal(shape), rng.standard_normal(shape)
        ours(x)
        ours.backward(g)
        for p, gr in ours.params_and_grads():
            p -= 0.1 * gr
        opt.zero_grad()
        theirs(torch.tensor(x)).backward(torch.tensor(g))
        opt.step()
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    for n, p in theirs.named_parameters():
        np.testing.assert_allclose(getattr(ours, n), p.detach().numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(LAYERS))
def test_no_grad_saves_nothing_and_keeps_the_pending_forward(name, rng):
    make, make_torch, shape = LAYERS[name]
    ours = make(np.float64)
    theirs = make_torch().double()
    x, xb, g = (rng.standard_normal(shape) for _ in range(3))
    ref_dx, ref_gw, _ = _reference_grad(ours, x, g)
    with fastbn.no_grad():
        assert not fastbn.is_grad_enabled()
        ours(xb)
    assert fastbn.is_grad_enabled()
    with pytest.raises(RuntimeError, match="needs a forward"):
        ours.backward(g)  # nothing was saved
    ours(x)
    with fastbn.no_grad():
        with fastbn.no_grad():
            ours(xb)  # a training forward under no_grad: running stats as under torch.no_grad
        ours(xb)
    with torch.no_grad():
        for a in (xb, x, xb, xb):
            theirs(torch.tensor(a))
    for k, v in theirs.state_dict().items():
        np.testing.assert_allclose(ours.state_dict()[k], v.numpy(), rtol=1e-10, atol=1e-12, err_msg=k)
    np.testing.assert_allclose(ours.backward(g), ref_dx, rtol=1e-10, atol=1e-12)  # still x's forward
    np.testing.assert_allclose(ours.grad_weight, ref_gw, rtol=1e-10, atol=1e-12)


def test_no_grad_is_thread_local_and_a_decorator():
    seen = {}
    inside, release = threading.Event(), threading.Event()

    @fastbn.no_grad()
    def holder():
        inside.set()
        release.wait(5)

    th = threading.Thread(target=holder)
    th.start()
    inside.wait(5)
    seen["main"] = fastbn.is_grad_enabled()
    release.set()
    th.join()
    assert seen["main"] is True and fastbn.is_grad_enabled()


@pytest.mark.parametrize("name", list(LAYERS))
def test_finite_differences(name, rng):
    """The gradients of loss = sum(y * r) against central differences, with probes that save
    nothing and leave the running statistics alone (no momentum=0 by hand)."""
    layer, shape = _randomized(name, rng)
    x, r = rng.standard_normal(shape), rng.standard_normal(shape)

    def loss():
        with fastbn.no_grad():
            return float(np.sum(layer(x, update_running_stats=False) * r))

    layer(x)
    dx = layer.backward(r)
    gw = layer.grad_weight
    state0 = layer.state_dict()  # after the one forward that updates the running statistics
    h = 1e-6
    for idx in [tuple(rng.integers(0, s) for s in shape) for _ in range(4)]:
        old = x[idx]
        x[idx] = old + h
        up = loss()
        x[idx] = old - h
        down = loss()
        x[idx] = old
        assert abs((up - down) / (2 * h) - dx[idx]) < 1e-6 * max(1, abs(dx[idx]))
    w = layer.weight.reshape(-1)
    for i in range(min(3, w.size)):
        old = w[i]
        w[i] = old + h
        up = loss()
        w[i] = old - h
        down = loss()
        w[i] = old
        assert abs((up - down) / (2 * h) - gw.reshape(-1)[i]) < 1e-6 * max(1, abs(gw.reshape(-1)[i]))
    for k, v in layer.state_dict().items():
        if k not in ("weight", "bias"):
            np.testing.assert_array_equal(v, state0[k], err_msg=k)


@pytest.mark.parametrize("name", list(LAYERS))
def test_updating_weights_before_backward_keeps_the_gradient(name, rng):
    layer, shape = _randomized(name, rng)
    x, g = rng.standard_normal(shape), rng.standard_normal(shape)
    ref_dx, ref_gw, _ = _reference_grad(layer, x, g)
    layer(x)
    layer.weight *= 3.0  # an optimizer step between forward and backward
    np.testing.assert_allclose(layer.backward(g), ref_dx, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(layer.grad_weight, ref_gw, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(LAYERS))
def test_layers_pickle_and_deepcopy_with_a_pending_forward(name, rng):
    layer, shape = _randomized(name, rng)
    layer(rng.standard_normal(shape))
    for clone in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        with pytest.raises(RuntimeError, match="needs a forward"):
            clone.backward(np.zeros(shape))
        for a, b in zip(clone.parameters(), layer.parameters()):
            np.testing.assert_array_equal(a, b)
    layer.backward(np.zeros(shape))


@pytest.mark.parametrize("cls", [fastbn.BatchNorm1d, fastbn.GroupNorm, fastbn.LayerNorm, fastbn.InstanceNorm2d])
def test_docstrings_state_the_one_forward_one_backward_rule(cls):
    doc = cls.__doc__
    assert "One forward, one backward" in doc and "no_grad" in doc and "per Python thread" in doc
