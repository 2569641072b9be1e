"""SyncBatchNorm and fastbn.sync's engine-neutral pieces, with a fake in-process communicator
(ranks as threads): exactness against a single-process BatchNorm*d on the concatenated batch,
bit-identical statistics on every rank, bad input and faults, conversion.  The runs under
mpiexec are in tests/test_sync_mpi.py."""
import numpy as np
import pytest

import fastbn
from fastbn import sync
from fastbn.sync import SyncBatchNorm

from _fake_comm import NoComm, run_ranks

SPLITS = [(6,), (3, 3), (5, 1), (0, 6), (2, 0, 4), (1, 2, 3), (4, 0, 1, 1), (1, 1, 1, 3)]
SHAPES = [(3,), (4, 5), (3, 4, 5), (2, 3, 2, 3), (40, 7)]  # per-sample shapes: (C, *spatial)
TOL = {np.float32: dict(rtol=2e-5, scale=2e-5), np.float64: dict(rtol=1e-12, scale=1e-12)}


def _layer_for(ndim):
    return {2: fastbn.BatchNorm1d, 3: fastbn.BatchNorm1d, 4: fastbn.BatchNorm2d, 5: fastbn.BatchNorm3d}[ndim]


def _close(a, b, dtype, what):
    t = TOL[dtype]
    scale = float(np.max(np.abs(b))) if np.size(b) else 0.0
    np.testing.assert_allclose(a, b, rtol=t["rtol"], atol=t["scale"] * max(scale, 1.0), err_msg=what)


def _pieces(a, split):
    edges = np.cumsum((0,) + tuple(split))
    return [a[edges[r]:edges[r + 1]] for r in range(len(split))]


def _train_reference(xs, dys, C, dtype, momentum, affine, rng_params):
    ref = _layer_for(xs[0].ndim)(C, momentum=momentum, affine=affine, dtype=dtype)
    if affine:
        ref.weight[...], ref.bias[...] = rng_params
    outs = []
    for x, dy in zip(xs, dys):
        y = ref(x)
        dx = ref.backward(dy)
        outs.append((y, dx, ref.grad_weight, ref.grad_bias, ref.running_mean.copy(), ref.running_var.copy()))
    return outs


def _train_sync(xs, dys, split, C, dtype, momentum, affine, rng_params):
    def rank_fn(comm, r):
        layer = SyncBatchNorm(C, momentum=momentum, affine=affine, comm=comm, dtype=dtype)
        if affine:
            layer.weight[...], layer.bias[...] = rng_params
        outs = []
        for x, dy in zip(xs, dys):
            y = layer(_pieces(x, split)[r])
            dx = layer.backward(_pieces(dy, split)[r])
            outs.append((y, dx, layer.grad_weight, layer.grad_bias, layer.running_mean.copy(),
                         layer.running_var.copy()))
        return outs, layer.num_batches_tracked

    group, results = run_ranks(len(split), rank_fn)
    for res in results:
        if isinstance(res, BaseException):
            raise res
    assert group.calls == 2 * len(xs), "one collective per forward and one per backward"
    return results


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("split", SPLITS, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("sample", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_equals_one_process_on_the_global_batch(sample, split, dtype):
    rng = np.random.default_rng(sum(split) * 31 + len(sample))
    C, N = sample[0], sum(split)
    xs = [(rng.standard_normal((N,) + sample) * 3 + 2).astype(dtype) for _ in range(2)]
    dys = [rng.standard_normal((N,) + sample).astype(dtype) for _ in range(2)]
    params = (rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype))
    ref = _train_reference(xs, dys, C, dtype, 0.3, True, params)
    results = _train_sync(xs, dys, split, C, dtype, 0.3, True, params)
    for step in range(2):
        y_ref, dx_ref, gw_ref, gb_ref, rm_ref, rv_ref = ref[step]
        ys = [res[0][step][0] for res in results]
        dxs = [res[0][step][1] for res in results]
        _close(np.concatenate(ys), y_ref, dtype, "output")
        _close(np.concatenate(dxs), dx_ref, dtype, "grad_input")
        for r, (outs, nbt) in enumerate(results):
            y, dx, gw, gb, rm, rv = outs[step]
            assert y.shape == (split[r],) + sample and y.dtype == dtype and dx.dtype == dtype
            _close(gw, gw_ref, dtype, "grad_weight")
            _close(gb, gb_ref, dtype, "grad_bias")
            _close(rm, rm_ref, dtype, "running_mean")
            _close(rv, rv_ref, dtype, "running_var")
            assert nbt == 2
            # every rank: the same bits
            first = results[0][0][step]
            for a, b in zip((gw, gb, rm, rv), first[2:]):
                assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("path", ["ranges", "columns", "slices"])
def test_every_kernel_path(path, force_path):
    force_path(path, 3 if path != "columns" else 0)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((9, 70)) * 2 + 1
    dy = rng.standard_normal((9, 70))
    params = (rng.standard_normal(70), rng.standard_normal(70))
    ref = _train_reference([x], [dy], 70, np.float64, 0.1, True, params)
    results = _train_sync([x], [dy], (4, 0, 5), 70, np.float64, 0.1, True, params)
    _close(np.concatenate([r[0][0][0] for r in results]), ref[0][0], np.float64, "output")
    _close(np.concatenate([r[0][0][1] for r in results]), ref[0][1], np.float64, "grad_input")


def test_wide_small_batch_that_the_plan_puts_on_slices():
    # (8, 5000): SLICES for a local batch norm; the split kernels run COLUMNS instead
    rng = np.random.default_rng(6)
    x = rng.standard_normal((8, 5000)).astype(np.float32)
    dy = rng.standard_normal((8, 5000)).astype(np.float32)
    params = (np.ones(5000, np.float32), np.zeros(5000, np.float32))
    ref = _train_reference([x], [dy], 5000, np.float32, 0.1, True, params)
    results = _train_sync([x], [dy], (3, 5), 5000, np.float32, 0.1, True, params)
    _close(np.concatenate([r[0][0][0] for r in results]), ref[0][0], np.float32, "output")
    _close(np.concatenate([r[0][0][1] for r in results]), ref[0][1], np.float32, "grad_input")


@pytest.mark.parametrize("momentum", [None, 0.0, 1.0])
@pytest.mark.parametrize("affine", [True, False])
def test_momentum_and_affine_options(momentum, affine):
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal((7, 3, 4)) for _ in range(3)]
    dys = [rng.standard_normal((7, 3, 4)) for _ in range(3)]
    params = (rng.standard_normal(3), rng.standard_normal(3))
    ref = _train_reference(xs, dys, 3, np.float64, momentum, affine, params)
    results = _train_sync(xs, dys, (2, 5), 3, np.float64, momentum, affine, params)
    for step in range(3):
        for outs, _ in results:
            _close(outs[step][4], ref[step][4], np.float64, "running_mean")
            _close(outs[step][5], ref[step][5], np.float64, "running_var")
            if not affine:
                assert outs[step][2] is None and outs[step][3] is None


def test_no_running_stats_and_eval_need_no_collective():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((5, 4, 3))
    layer = SyncBatchNorm(4, comm=NoComm(), dtype=np.float64)
    ref = fastbn.BatchNorm1d(4, dtype=np.float64)
    layer.running_mean[...] = ref.running_mean[...] = rng.standard_normal(4)
    layer.eval(), ref.eval()
    np.testing.assert_array_equal(layer(x), ref(x))
    np.testing.assert_array_equal(layer.backward(x), ref.backward(x))
    # without running statistics, evaluation normalizes with the local batch (as PyTorch)
    layer = SyncBatchNorm(4, track_running_stats=False, comm=NoComm(), dtype=np.float64).eval()
    ref = fastbn.BatchNorm1d(4, track_running_stats=False, dtype=np.float64).eval()
    np.testing.assert_array_equal(layer(x), ref(x))
    np.testing.assert_array_equal(layer.backward(x), ref.backward(x))


def test_track_running_stats_false_in_training_is_synchronized():
    rng = np.random.default_rng(9)
    x, dy = rng.standard_normal((6, 2)), rng.standard_normal((6, 2))
    ref = fastbn.BatchNorm1d(2, track_running_stats=False, dtype=np.float64)
    y_ref, dx_ref = ref(x), ref.backward(dy)

    def fn(comm, r):
        layer = SyncBatchNorm(2, track_running_stats=False, comm=comm, dtype=np.float64)
        return layer(x[3 * r:3 * r + 3]), layer.backward(dy[3 * r:3 * r + 3]), layer.running_mean

    _, res = run_ranks(2, fn)
    _close(np.concatenate([r[0] for r in res]), y_ref, np.float64, "output")
    _close(np.concatenate([r[1] for r in res]), dx_ref, np.float64, "grad_input")
    assert res[0][2] is None


def test_empty_global_batch():
    def fn(comm, r):
        layer = SyncBatchNorm(3, comm=comm, dtype=np.float64)
        y = layer(np.zeros((0, 3, 2)))
        dx = layer.backward(np.zeros((0, 3, 2)))
        return y.shape, dx.shape, layer.grad_weight, layer.running_mean, layer.running_var

    _, res = run_ranks(2, fn)
    for shape, dshape, gw, rm, rv in res:
        assert shape == dshape == (0, 3, 2)
        np.testing.assert_array_equal(gw, 0)
        np.testing.assert_array_equal(rm, 0)
        np.testing.assert_array_equal(rv, 1)


# ---------------------------------------------------------------------------------- bad input
def _all_raise(results, exc, match):
    for r, res in enumerate(results):
        assert isinstance(res, exc), f"rank {r}: {res!r}"
        assert match in str(res), f"rank {r}: {res}"


def test_disagreeing_channel_counts_raise_on_every_rank():
    def fn(comm, r):
        layer = SyncBatchNorm(4 if r != 1 else 5, comm=comm, dtype=np.float64)
        return layer(np.ones((3, 4 if r != 1 else 5)))

    group, res = run_ranks(3, fn)
    _all_raise(res, ValueError, "channels per rank [4, 5, 4]")
    assert group.calls == 1


def test_an_input_that_disagrees_with_the_layer_raises_on_every_rank():
    def fn(comm, r):
        layer = SyncBatchNorm(4, comm=comm, dtype=np.float64)
        return layer(np.ones((3, 4 if r != 0 else 3)))

    _, res = run_ranks(2, fn)
    _all_raise(res, ValueError, "channels per rank [3, 4]")


def test_disagreeing_dtypes_raise_on_every_rank():
    def fn(comm, r):
        dt = np.float32 if r == 0 else np.float64
        layer = SyncBatchNorm(4, comm=comm, dtype=dt)
        return layer(np.ones((3, 4), dt))

    _, res = run_ranks(2, fn)
    _all_raise(res, ValueError, "dtype per rank ['float32', 'float64']")


def test_one_value_per_channel_globally_raises_on_every_rank():
    def fn(comm, r):
        layer = SyncBatchNorm(4, comm=comm, dtype=np.float64)
        out = layer(np.ones((1 if r == 2 else 0, 4)))
        return out

    _, res = run_ranks(3, fn)
    _all_raise(res, ValueError, "expected more than 1 value per channel when training")


def test_a_rank_that_fails_locally_takes_part_and_the_others_raise():
    def fn(comm, r):
        layer = SyncBatchNorm(4, comm=comm, dtype=np.float64)
        x = np.ones((3, 4)) if r != 1 else "not an array"
        return layer(x)

    group, res = run_ranks(3, fn)
    assert isinstance(res[1], TypeError)
    for r in (0, 2):
        assert isinstance(res[r], RuntimeError) and "rank(s) [1] failed before the collective" in str(res[r])
    assert group.calls == 1


def test_a_bad_grad_output_in_backward_raises_everywhere_and_keeps_the_forward():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 4))
    dy = rng.standard_normal((6, 4))

    def fn(comm, r):
        layer = SyncBatchNorm(4, comm=comm, dtype=np.float64)
        layer(x[3 * r:3 * r + 3])
        try:
            layer.backward(dy[3 * r:3 * r + (3 if r == 0 else 2)])
        except (ValueError, RuntimeError) as e:
            err = e
        # the forward's state is kept: a second, good backward works on every rank
        return err, layer.backward(dy[3 * r:3 * r + 3])

    _, res = run_ranks(2, fn)
    assert isinstance(res[1][0], ValueError) and isinstance(res[0][0], RuntimeError)
    ref = fastbn.BatchNorm1d(4, dtype=np.float64)
    ref(x)
    _close(np.concatenate([r[1] for r in res]), ref.backward(dy), np.float64, "grad_input")


def test_backward_needs_a_forward():
    layer = SyncBatchNorm(2, comm=NoComm(), dtype=np.float64).eval()  # eval: no collective to join
    with pytest.raises(RuntimeError, match="needs a forward"):
        layer.backward(np.ones((2, 2)))


@pytest.mark.parametrize("how", ["no_grad forward", "eval before backward"])
def test_a_backward_without_its_forward_on_one_rank_raises_on_every_rank(how):
    """The rank without a forward to differentiate joins the backward's collective flagged as
    failed: every rank raises, none is left waiting."""
    x = np.random.default_rng(4).standard_normal((6, 4))

    def fn(comm, r):
        layer = SyncBatchNorm(4, comm=comm, dtype=np.float64)
        if r == 1 and how == "no_grad forward":
            with fastbn.no_grad():
                layer(x[3:])
        else:
            layer(x[3 * r:3 * r + 3])
        if r == 1 and how == "eval before backward":
            layer.eval()
        return layer.backward(np.ones((3, 4)))

    group, res = run_ranks(2, fn, timeout=20)
    assert isinstance(res[1], RuntimeError) and "backward()" in str(res[1])
    assert isinstance(res[0], RuntimeError) and "rank(s) [1] failed before the collective" in str(res[0])
    assert group.calls == 2


def test_a_bad_update_running_stats_on_one_rank_raises_on_every_rank():
    def fn(comm, r):
        layer = SyncBatchNorm(4, comm=comm, dtype=np.float64)
        return layer(np.ones((3, 4)), update_running_stats=True if r == 0 else "yes")

    group, res = run_ranks(2, fn, timeout=20)
    assert isinstance(res[1], TypeError) and "update_running_stats" in str(res[1])
    assert isinstance(res[0], RuntimeError) and "rank(s) [1] failed before the collective" in str(res[0])
    assert group.calls == 1


def test_comm_defaults_to_mpi_world_lazily():
    layer = SyncBatchNorm(2)  # no mpi4py import yet
    assert layer._comm is None
    mpi4py = pytest.importorskip("mpi4py.MPI", reason="mpi4py is not installed")
    assert layer.comm is mpi4py.COMM_WORLD


# ---------------------------------------------------------------------------------- conversion
def test_convert_sync_batchnorm_keeps_state():
    rng = np.random.default_rng(11)
    bn2 = fastbn.BatchNorm2d(3, momentum=0.2, eps=1e-3, dtype=np.float64)
    bn1 = fastbn.BatchNorm1d(5, affine=False)
    bn2.weight[...] = rng.standard_normal(3)
    bn2(rng.standard_normal((4, 3, 2, 2)))
    bn1.eval()
    other = object()
    conv = SyncBatchNorm.convert_sync_batchnorm({"a": bn2, "b": bn1, "c": other})
    assert list(conv) == ["a", "b", "c"] and conv["c"] is other
    a, b = conv["a"], conv["b"]
    assert isinstance(a, SyncBatchNorm) and isinstance(b, SyncBatchNorm)
    assert a.weight is bn2.weight and a.running_mean is bn2.running_mean and a.num_batches_tracked == 1
    assert a.eps == 1e-3 and a.momentum == 0.2 and a.dtype == np.float64 and a.training
    assert b.weight is None and not b.training and b.dtype == np.float32
    for k, v in bn2.state_dict().items():
        np.testing.assert_array_equal(a.state_dict()[k], v)
    as_list = SyncBatchNorm.convert_sync_batchnorm([bn2, bn1], comm=NoComm())
    assert isinstance(as_list, list) and all(isinstance(m, SyncBatchNorm) for m in as_list)
    assert isinstance(as_list[0].comm, NoComm)
    with pytest.raises(TypeError):
        SyncBatchNorm.convert_sync_batchnorm(3)


def test_converted_layer_trains_like_the_original_on_one_rank():
    rng = np.random.default_rng(12)
    x, dy = rng.standard_normal((5, 3, 4)), rng.standard_normal((5, 3, 4))
    bn = fastbn.BatchNorm1d(3, dtype=np.float64)
    ref = fastbn.BatchNorm1d(3, dtype=np.float64)
    _, (res,) = run_ranks(1, lambda comm, r: (lambda s: (s(x), s.backward(dy), s.state_dict()))(
        SyncBatchNorm.convert_sync_batchnorm(bn, comm=comm)))
    _close(res[0], ref(x), np.float64, "output")
    _close(res[1], ref.backward(dy), np.float64, "grad_input")
    for k, v in ref.state_dict().items():
        _close(res[2][k], v, np.float64, k)


# ---------------------------------------------------------------------------------- the protocol
class ListAllgather:
    """The simplest fake engine: every rank's object already in hand, 'gathered' in rank order."""

    def __init__(self):
        self.calls = 0

    def allgather(self, objs):
        self.calls += 1
        return list(objs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_protocol_step_by_step(dtype):
    rng = np.random.default_rng(13)
    split = (3, 0, 5, 2)
    x = (rng.standard_normal((10, 6, 3)) * 4 - 1).astype(dtype)
    dy = rng.standard_normal((10, 6, 3)).astype(dtype)
    w, b = rng.standard_normal(6).astype(dtype), rng.standard_normal(6).astype(dtype)
    rm, rv = np.zeros(6, dtype), np.ones(6, dtype)
    engine = ListAllgather()
    xs, dys = _pieces(x, split), _pieces(dy, split)
    merged = sync.merge_stats(engine.allgather([sync.local_stats(xr) for xr in xs]))
    assert merged.shape == (6, 3) and (merged[:, 0] == 30).all()
    outs = [sync.normalize(xr, merged, w, b, 1e-5) for xr in xs]
    sync.update_running(rm, rv, merged, 0.1)
    mean, invstd = outs[0][1], outs[0][2]
    total = sync.merge_grad_sums(engine.allgather([sync.local_grad_sums(g, xr, mean) for g, xr in zip(dys, xs)]))
    grads = [sync.finish_backward(g, xr, w, mean, invstd, total, merged[0, 0]) for g, xr in zip(dys, xs)]
    assert engine.calls == 2
    ref = fastbn.BatchNorm1d(6, dtype=dtype)
    ref.weight[...], ref.bias[...] = w, b
    _close(np.concatenate([o[0] for o in outs]), ref(x), dtype, "output")
    _close(np.concatenate([g[0] for g in grads]), ref.backward(dy), dtype, "grad_input")
    _close(grads[1][1], ref.grad_weight, dtype, "grad_weight")  # the empty rank has the global ones too
    _close(grads[1][2], ref.grad_bias, dtype, "grad_bias")
    _close(rm, ref.running_mean, dtype, "running_mean")
    _close(rv, ref.running_var, dtype, "running_var")


def test_merge_stats_is_chan_not_sums_of_squares():
    # a large offset: sums of squares would lose every digit of the variance in float64
    rng = np.random.default_rng(14)
    x = 1e9 + rng.standard_normal((1000, 1))
    stats = [sync.local_stats(p) for p in np.array_split(x, 7)]
    merged = sync.merge_stats(stats)
    ref_var = np.var(x - 1e9, axis=0)
    np.testing.assert_allclose(merged[:, 2] / merged[:, 0], ref_var, rtol=1e-6)
    np.testing.assert_allclose(merged[:, 1], x.mean(axis=0), rtol=1e-15)


def test_merge_stats_skips_empty_ranks_exactly():
    rng = np.random.default_rng(15)
    s = sync.local_stats(rng.standard_normal((5, 3)))
    empty = sync.local_stats(np.zeros((0, 3)))
    np.testing.assert_array_equal(empty, 0)
    for stack in ([s], [empty, s], [s, empty], [empty, s, empty]):
        assert sync.merge_stats(stack).tobytes() == s.tobytes()


def test_protocol_argument_checks():
    with pytest.raises(ValueError, match="stack"):
        sync.merge_stats(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="stack"):
        sync.merge_grad_sums(np.zeros((1, 2, 3)))
    x = np.ones((2, 3))
    with pytest.raises(ValueError, match=r"shape \(3, 3\)"):
        sync.normalize(x, np.zeros((4, 3)))
    with pytest.raises(ValueError, match="more than 1 value"):
        sync.normalize(x[:1], sync.local_stats(x[:1]))
    with pytest.raises(ValueError, match="grad_output"):
        sync.local_grad_sums(np.ones((3, 3)), x, np.zeros(3))
    with pytest.raises(ValueError, match="count"):
        sync.finish_backward(x, x, None, np.zeros(3), np.ones(3), np.zeros((3, 2)), -1)


def test_a_failed_forward_changes_no_state_on_any_rank():
    """The ranks fail together (one rank's bad input), and, as BatchNorm*d's, a failed forward
    changes nothing: the running statistics and the pending forward stay, so the backward then
    differentiates the last good forward on every rank."""
    x = np.random.default_rng(1).standard_normal((8, 2))
    dy = np.random.default_rng(2).standard_normal((8, 2))

    def fn(comm, r):
        layer = SyncBatchNorm(2, comm=comm, dtype=np.float64)
        layer(x[4 * r:4 * r + 4])
        state = {k: v.copy() for k, v in layer.state_dict().items()}
        with pytest.raises((ValueError, RuntimeError)):
            layer(np.ones((4, 2)) if r == 0 else np.ones((4, 3)))
        assert all(np.array_equal(v, layer.state_dict()[k]) for k, v in state.items())
        return layer.backward(dy[4 * r:4 * r + 4]), layer.grad_weight

    _, res = run_ranks(2, fn)
    ref = fastbn.BatchNorm1d(2, dtype=np.float64)
    ref(x)
    _close(np.concatenate([r[0] for r in res]), ref.backward(dy), np.float64, "grad_input")
    for r in res:
        _close(r[1], ref.grad_weight, np.float64, "grad_weight")


# ---------------------------------------------------------------------------------- any split
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sample=st.integers(1, 4).flatmap(lambda d: st.tuples(*[st.integers(1, 6)] * d)),
       split=st.lists(st.integers(0, 5), min_size=1, max_size=4).filter(lambda s: sum(s) >= 2),
       dtype=st.sampled_from([np.float32, np.float64]),
       path=st.sampled_from([("auto", 0), ("ranges", 3), ("columns", 0), ("columns", 2), ("slices", 0), ("slices", 2)]),
       seed=st.integers(0, 2**16))
def test_the_protocol_on_any_split(sample, split, dtype, path, seed, force_path):
    force_path(*path)
    rng = np.random.default_rng(seed)
    C, N = sample[0], sum(split)
    x = (rng.standard_normal((N,) + sample) * 2 + 3).astype(dtype)
    dy = rng.standard_normal((N,) + sample).astype(dtype)
    w, b = rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)
    if N * int(np.prod(sample[1:])) < 2:
        return
    xs, dys = _pieces(x, split), _pieces(dy, split)
    merged = sync.merge_stats([sync.local_stats(p) for p in xs])
    outs = [sync.normalize(p, merged, w, b) for p in xs]
    mean, invstd = outs[0][1], outs[0][2]
    total = sync.merge_grad_sums([sync.local_grad_sums(g, p, mean) for g, p in zip(dys, xs)])
    grads = [sync.finish_backward(g, p, w, mean, invstd, total, merged[0, 0]) for g, p in zip(dys, xs)]
    ref = _layer_for(x.ndim)(C, dtype=dtype)
    ref.weight[...], ref.bias[...] = w, b
    _close(np.concatenate([o[0] for o in outs]), ref(x), dtype, "output")
    _close(np.concatenate([g[0] for g in grads]), ref.backward(dy), dtype, "grad_input")
    for g in grads:
        _close(g[1], ref.grad_weight, dtype, "grad_weight")
        _close(g[2], ref.grad_bias, dtype, "grad_bias")


def test_matches_torch_batch_norm_on_the_global_batch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(21)
    x = rng.standard_normal((7, 3, 5))
    dy = rng.standard_normal((7, 3, 5))
    tbn = torch.nn.BatchNorm1d(3, momentum=0.2, dtype=torch.float64)
    tx = torch.tensor(x, requires_grad=True)
    ty = tbn(tx)
    ty.backward(torch.tensor(dy))

    def fn(comm, r):
        layer = SyncBatchNorm(3, momentum=0.2, comm=comm, dtype=np.float64)
        sl = slice(0, 2) if r == 0 else slice(2, 7)
        return layer(x[sl]), layer.backward(dy[sl]), layer.grad_weight, layer.running_var

    _, res = run_ranks(2, fn)
    _close(np.concatenate([r[0] for r in res]), ty.detach().numpy(), np.float64, "output")
    _close(np.concatenate([r[1] for r in res]), tx.grad.numpy(), np.float64, "grad_input")
    _close(res[1][2], tbn.weight.grad.numpy(), np.float64, "grad_weight")
    _close(res[0][3], tbn.running_var.numpy(), np.float64, "running_var")


@pytest.mark.skipif(not fastbn._openmp.OPENMP, reason="fastbn was built without OpenMP: serial kernels")
@pytest.mark.parametrize("path", ["auto", "ranges", "columns", "slices"])
@pytest.mark.parametrize("shape", [(64, 16, 300), (256, 96), (8, 6000)], ids=["ranges", "columns", "wide"])
def test_the_split_kernels_give_the_same_bits_on_any_thread_count(threads, force_path, path, shape):
    force_path(path)
    rng = np.random.default_rng(22)
    x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal(shape[1]).astype(np.float32)

    def run():
        st = sync.local_stats(x)
        y, mean, invstd = sync.normalize(x, st, w, None)
        s = sync.local_grad_sums(dy, x, mean)
        return (st, y) + sync.finish_backward(dy, x, w, mean, invstd, s, st[0, 0]) + (s,)

    threads(1)
    one = run()
    for n in (2, 3):
        threads(n)
        for a, b in zip(run(), one):
            assert a.tobytes() == b.tobytes()


def test_a_bad_out_on_one_rank_fails_before_the_collective():
    def fn(comm, r):
        layer = SyncBatchNorm(3, comm=comm, dtype=np.float64)
        x = np.arange(12.0).reshape(4, 3)
        with pytest.raises((ValueError, RuntimeError)):
            layer(x, out=np.empty((4, 3)) if r == 0 else np.empty((5, 3)))
        assert layer.num_batches_tracked == 0 and (layer.running_mean == 0).all()
        layer(x)
        with pytest.raises((ValueError, RuntimeError)):
            layer.backward(np.ones((4, 3)), out=np.empty((4, 3)) if r == 0 else np.empty((4, 2)))
        return layer.backward(np.ones((4, 3)))  # the forward's state was kept everywhere

    _, res = run_ranks(2, fn)
    assert all(isinstance(r, np.ndarray) for r in res), res


def test_in_place_forward_and_backward_with_out():
    rng = np.random.default_rng(23)
    x, dy = rng.standard_normal((6, 4, 3)), rng.standard_normal((6, 4, 3))
    ref = fastbn.BatchNorm1d(4, dtype=np.float64)
    y_ref, dx_ref = ref(x), ref.backward(dy)

    def fn(comm, r):
        layer = SyncBatchNorm(4, comm=comm, dtype=np.float64)
        xs, gs = x[3 * r:3 * r + 3].copy(), dy[3 * r:3 * r + 3].copy()
        y = layer(xs, out=xs)
        dx = layer.backward(gs, out=gs)
        assert y is xs and dx is gs
        return y, dx

    _, res = run_ranks(2, fn)
    _close(np.concatenate([r[0] for r in res]), y_ref, np.float64, "output")
    _close(np.concatenate([r[1] for r in res]), dx_ref, np.float64, "grad_input")


def test_the_layer_protocol_holds_no_grad_and_per_thread_forwards():
    """SyncBatchNorm keeps the protocol of every fastbn layer: a forward inside fastbn.no_grad()
    saves nothing and leaves the pending one; update_running_stats=False leaves the buffers; the
    backward is this thread's forward's."""
    def fn(comm, r):
        rng = np.random.default_rng(r)
        layer = SyncBatchNorm(3, comm=comm, dtype=np.float64)
        x, other = rng.standard_normal((5, 3, 4)), rng.standard_normal((5, 3, 4))
        y = layer(x)
        rm = layer.running_mean.copy()
        with fastbn.no_grad():
            layer(other, update_running_stats=False)  # a collective too, but saves nothing
        np.testing.assert_array_equal(layer.running_mean, rm)
        dx = layer.backward(np.ones_like(y) + x)  # still the gradient of x's forward
        with pytest.raises(RuntimeError, match="needs a forward"):
            layer.backward(np.ones_like(y))
        return dx

    _, got = run_ranks(2, fn)
    _, want = run_ranks(2, lambda comm, r: _plain_grad(comm, r))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def _plain_grad(comm, r):
    rng = np.random.default_rng(r)
    layer = SyncBatchNorm(3, comm=comm, dtype=np.float64)
    x = rng.standard_normal((5, 3, 4))
    y = layer(x)
    return layer.backward(np.ones_like(y) + x)


def test_eps_0_in_training_raises_on_every_rank_as_batchnorm():
    """As BatchNorm*d (and PyTorch): training with eps <= 0 is refused, on every rank together (the
    check runs inside the collective), with no state changed; evaluation with eps = 0 runs."""
    x = np.random.default_rng(4).standard_normal((4, 3))

    def fn(comm, r):
        layer = SyncBatchNorm(3, eps=0.0, comm=comm, dtype=np.float64)
        with pytest.raises(ValueError, match="eps must be positive in training, got 0.0"):
            layer(x[2 * r:2 * r + 2])
        assert layer.num_batches_tracked == 0 and (layer.running_mean == 0).all()
        return layer.eval()(x[2 * r:2 * r + 2])

    _, res = run_ranks(2, fn)
    np.testing.assert_allclose(np.concatenate(res), x, rtol=1e-12)


def test_the_statistics_functions_check_their_buffers_and_counts():
    """update_running takes batch_norm's running buffers (float arrays of shape (C,), writeable),
    and every function a count that can be a global batch's: a whole number, the same in every
    row of the merged statistics, at least this rank's values per channel."""
    x = np.random.default_rng(0).standard_normal((5, 4, 3)).astype(np.float32)
    merged = sync.merge_stats([sync.local_stats(x)])
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    bad_rows = merged.copy()
    bad_rows[:, 0] = -5
    cases = [
        (lambda: sync.update_running(np.zeros(4, np.int64), rv, merged, 0.5), TypeError, "running_mean must be float16"),
        (lambda: sync.update_running([0.0] * 4, rv, merged, 0.5), TypeError, "running_mean must be a numpy array"),
        (lambda: sync.update_running(rm, np.ones(3, np.float32), merged, 0.5), ValueError,
         r"running_var must have shape \(4,\) to match the merged statistics' 4 channels"),
        (lambda: sync.update_running(rm, rv, merged[:, :2], 0.5), ValueError, r"shape \(C, 3\), got shape \(4, 2\)"),
        (lambda: sync.update_running(rm, rv, bad_rows, 0.5), ValueError, "one non-negative whole number"),
        (lambda: sync.update_running(rm, rv, np.where(np.arange(3) == 0, np.nan, merged), 0.5), ValueError,
         r"whole number .*\[nan"),
        (lambda: sync.normalize(x, np.where(np.arange(3) == 0, 3.0, merged)), ValueError,
         "at least this rank's 15 values per channel, got 3"),
        (lambda: sync.finish_backward(x, x, None, merged[:, 1], np.ones(4), np.zeros((4, 2)), float("inf")), ValueError,
         "count must be a non-negative whole number, got inf"),
        (lambda: sync.finish_backward(x, x, None, merged[:, 1], np.ones(4), np.zeros((4, 2)), 0), ValueError,
         "at least this rank's 15 values per channel, got 0"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    assert not rm.any() and (rv == 1).all()  # the refused calls changed nothing
    sync.update_running(rm, rv, merged, 0.5)
    np.testing.assert_allclose(rm, 0.5 * merged[:, 1], rtol=1e-6)


def test_a_negative_loaded_count_with_momentum_none_fails_on_every_rank():
    """momentum=None needs num_batches_tracked >= 0; a bad count on one rank is found before the
    collective, so every rank raises (none waits for the other) and nothing changes."""
    def fn(comm, r):
        layer = SyncBatchNorm(2, comm=comm, momentum=None, dtype=np.float64)
        if r == 1:
            layer.num_batches_tracked = -3
        with pytest.raises((ValueError, RuntimeError), match="num_batches_tracked|rank"):
            layer(np.arange(8.0).reshape(4, 2))
        return layer.num_batches_tracked, bool(layer.running_mean.any())

    _, res = run_ranks(2, fn)
    assert res == [(0, False), (-3, False)]
