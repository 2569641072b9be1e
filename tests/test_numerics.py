"""Numerical behaviour: float64 accumulation, no E[x^2]-E[x]^2, large offsets, odd sizes, NaN/Inf."""
import numpy as np
import pytest

import fastbn
from _helpers import assert_close, random_input, random_params, ref_backward, ref_forward, ref_stats

# The least eps, for exact comparisons: eps = 0 is refused in training (as PyTorch does), and
# var + 1e-300 is var for any variance these tests make.
EPS0 = 1e-300


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(6, 3, 5), (40, 3), (2, 3, 3000)], ids=str)
def test_constant_channel_of_1e7_normalizes_to_zero(kernel_path, rng, shape, dtype):
    x = random_input(rng, shape, dtype)
    x[:, 1] = 1e7
    rm, rv = np.zeros(3, dtype), np.ones(3, dtype)
    y, mean, invstd = fastbn.batch_norm_forward(x, rm, rv, training=True, momentum=1.0)
    assert np.all(np.isfinite(y))
    assert np.abs(y[:, 1]).max() <= 1e-6
    assert mean[1] == 1e7
    assert rv[1] == 0.0  # the variance of a constant is exactly 0, not rounding noise
    ref = ref_forward(x)[0]
    assert_close(np.delete(y, 1, axis=1), np.delete(ref, 1, axis=1), dtype)
    dx, _, _ = fastbn.batch_norm_backward(np.ones_like(x), x, None, mean, invstd)
    assert np.all(np.isfinite(dx))


@pytest.mark.parametrize("shape", [(64, 3), (8, 3, 64), (4, 1, 1000)], ids=str)
def test_float32_mean_1e4_std_1_keeps_precision(kernel_path, rng, shape):
    x = (rng.standard_normal(shape) + 1e4).astype(np.float32)
    w, b, _, _ = random_params(rng, shape[1], np.float32)
    y, mean, invstd = fastbn.batch_norm_forward(x, None, None, w, b, training=True)
    ref, ref_mean, ref_var, ref_invstd = ref_forward(x, w, b)
    # float32 rounding of the O(1) output only (a fused x*a + (b - m*a) would lose ~1e-3 here)
    assert_close(y, ref, tol=2e-6)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-13)
    np.testing.assert_allclose(invstd, ref_invstd, rtol=1e-9)


def test_float32_mean_1e4_more_accurate_than_torch(rng):
    torch = pytest.importorskip("torch")
    x = (rng.standard_normal((16, 4, 32)) + 1e4).astype(np.float32)
    ref = ref_forward(x)[0]
    y = fastbn.batch_norm(x, None, None, training=True)
    yt = torch.nn.functional.batch_norm(torch.from_numpy(x), None, None, training=True).numpy()
    err, err_torch = np.abs(y - ref).max(), np.abs(yt - ref).max()
    assert err <= 2e-6
    assert err_torch <= 5e-3  # torch agrees loosely
    assert err <= err_torch
    np.testing.assert_allclose(y, yt, atol=5e-3)


@pytest.mark.parametrize("offset", [1e8, -3e9])
def test_float64_large_offset_variance_is_exact(kernel_path, rng, offset):
    """E[x^2] - E[x]^2 would lose every digit here; a two-pass/Welford variance keeps them."""
    x = rng.standard_normal((50, 2, 7)) + offset
    rm, rv = np.zeros(2), np.zeros(2)
    y = fastbn.batch_norm(x, rm, rv, training=True, momentum=1.0, eps=EPS0)
    mean, var = ref_stats(x)
    n = x.size // 2
    np.testing.assert_allclose(rm, mean, rtol=1e-15)
    # E[x^2] - E[x]^2 would be off by ~offset^2 * 1e-16, i.e. by more than the variance itself
    np.testing.assert_allclose(rv, var * n / (n - 1), rtol=1e-6)
    # the mean itself is only known to ~1 ulp of the offset (4.8e-7 at 3e9)
    assert_close(y, ref_forward(x, eps=EPS0)[0], tol=1e-5)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 3, 7), (8, 3, 64, 64), (4, 1, 13331), (300, 64)],
                         ids=["rows-of-20", "one-row", "rows-of-4096", "one-long-row", "columns"])
def test_float64_variance_keeps_full_precision_far_from_zero(kernel_path, rng, shape):
    """mean / std = 1e8: the partial moments merge relative to a shift near the data, so the
    variance keeps double precision (merging absolute means lost 9 digits here: 2e-9 relative
    on (2, 3, 4, 5), where PyTorch's two-pass variance gets 6e-16)."""
    x = rng.standard_normal(shape) + 1e8
    rm, rv = np.zeros(shape[1]), np.zeros(shape[1])
    fastbn.batch_norm(x, rm, rv, training=True, momentum=1.0)
    axes = (0,) + tuple(range(2, x.ndim))
    xl = x.astype(np.longdouble)
    var = ((xl - xl.mean(axis=axes, keepdims=True)) ** 2).mean(axis=axes)
    n = x.size // shape[1]
    np.testing.assert_allclose(rv, (var * n / (n - 1)).astype(np.float64), rtol=1e-13)


def test_statistics_accumulate_in_float64_for_float32(kernel_path, rng):
    # mean 1 and std 1e-3 over 5000 values: a float32 sum would be off by ~1e-7 relative,
    # i.e. ~1e-4 in the normalized output
    x = (1 + 1e-3 * rng.standard_normal((2, 2, 2500))).astype(np.float32)
    y, mean, invstd = fastbn.batch_norm_forward(x, None, None, training=True, eps=EPS0)
    _, ref_mean, _, ref_invstd = ref_forward(x, eps=EPS0)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-14)
    np.testing.assert_allclose(invstd, ref_invstd, rtol=1e-10)
    assert_close(y, ref_forward(x, eps=EPS0)[0], tol=2e-6)


def _ramp(rng):
    return (np.linspace(0, 1e5, 9000).reshape(3000, 1, 3) + rng.standard_normal((3000, 1, 3))).astype(np.float32)


def _constant_then_noise(rng):
    head = np.full((700, 1, 3), 1e4)
    return np.concatenate([head, 1e4 + 1e-2 * rng.standard_normal((2300, 1, 3))]).astype(np.float32)


def _outlier_first(rng):
    x = (1e6 + 0.1 * rng.standard_normal((3000, 2, 3))).astype(np.float32)
    x[0] = 0
    return x


@pytest.mark.parametrize("make", [_ramp, _constant_then_noise, _outlier_first])
@pytest.mark.parametrize("unit", [0, 7, 2049])
def test_float32_statistics_when_blocks_differ(force_path, rng, make, unit):
    """Statistics over many blocks whose means differ from the first block's (a drifting mean, a
    constant head, an outlier first row) stay accurate to double rounding."""
    x = make(rng)
    _, ref_mean, ref_var, _ = ref_forward(x, eps=EPS0)
    for path in ("ranges", "columns"):
        force_path(path, unit)
        y, mean, invstd = fastbn.batch_norm_forward(x, None, None, training=True, eps=EPS0)
        np.testing.assert_allclose(mean, ref_mean, rtol=1e-13)
        np.testing.assert_allclose(1.0 / invstd**2, ref_var, rtol=1e-9)
        assert_close(y, ref_forward(x, eps=EPS0)[0], tol=5e-6)


@pytest.mark.parametrize("scale", [1e20, 1e-20])
def test_float32_extreme_magnitudes(kernel_path, rng, scale):
    """Squares of 1e20 overflow float32 and squares of 1e-20 underflow it; double accumulators don't."""
    x = (rng.standard_normal((5, 2, 6)) * scale).astype(np.float32)
    y, mean, invstd = fastbn.batch_norm_forward(x, None, None, training=True, eps=EPS0)
    assert np.all(np.isfinite(y))
    assert_close(y, ref_forward(x, eps=EPS0)[0], tol=1e-5)
    np.testing.assert_allclose(invstd, ref_forward(x, eps=EPS0)[3], rtol=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_odd_sizes(kernel_path, rng, dtype):
    """Runs of 1, 3, 7, 17, 33 elements (SIMD tails), C = 1, spatial size 1, and runs that cross
    the kernels' 2048-element blocks."""
    shapes = [(n, c, s) for s in (1, 3, 7, 17, 33) for c in (1, 3, 5) for n in (1, 2, 3) if n * s > 1]
    shapes += [(1, 2, 2049), (3, 1, 1500), (2, 2, 4099), (4097, 1)]
    tol = 1e-4 if dtype == np.float32 else 1e-10
    for shape in shapes:
        C = shape[1]
        x = random_input(rng, shape, dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        w, b, rm, rv = random_params(rng, C, dtype)
        y, mean, invstd = fastbn.batch_norm_forward(x, None, None, w, b, training=True)
        assert_close(y, ref_forward(x, w, b)[0], dtype)
        assert_close(fastbn.batch_norm(x, rm, rv, w, b), ref_forward(x, w, b, rm, rv)[0], dtype)
        dx, gw, gb = fastbn.batch_norm_backward(dy, x, w, mean, invstd)
        for got, want in zip((dx, gw, gb), ref_backward(dy, x, w)):
            assert_close(got, want, tol=tol)


def test_every_path_gives_the_same_result(force_path, rng):
    for shape in [(5, 3, 17), (9, 2, 1), (3, 1, 33), (200, 7)]:
        for dtype in (np.float32, np.float64):
            x = random_input(rng, shape, dtype)
            dy = rng.standard_normal(shape).astype(dtype)
            w, b, rm, rv = random_params(rng, shape[1], dtype)
            results = {}
            for path, unit, stream in [("ranges", 0, None), ("ranges", 1, None), ("ranges", 7, None),
                                       ("ranges", 97, None), ("columns", 0, None), ("auto", 0, None),
                                       ("ranges", 0, 1), ("ranges", 7, 1), ("columns", 0, 1), ("slices", 0, None),
                                       ("slices", 3, None), ("slices", 2, 1)]:
                force_path(path, unit, stream)
                y, mean, invstd = fastbn.batch_norm_forward(x, None, None, w, b, training=True)
                ye = fastbn.batch_norm(x, rm, rv, w, b)
                results[path, unit, stream] = (y, ye, mean, invstd) + fastbn.batch_norm_backward(dy, x, w, mean, invstd)
            first = results["ranges", 0, None]
            for key, res in results.items():
                for got, want in zip(res, first):
                    # only the summation order differs
                    tol = 4 * np.finfo(got.dtype).eps
                    assert_close(got, want, tol=tol * 16)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("shape", [(6, 3, 5), (30, 3)], ids=str)
def test_nan_and_inf_stay_in_their_channel(kernel_path, rng, shape, value):
    x = random_input(rng, shape, np.float32)
    idx = (2, 1) + (3,) * (len(shape) - 2)
    x[idx] = value
    w, b, rm, rv = random_params(rng, 3, np.float32)
    rm0, rv0 = rm.copy(), rv.copy()
    y, mean, invstd = fastbn.batch_norm_forward(x, rm, rv, w, b, training=True)
    # training: the channel's statistics are poisoned, so all its outputs are NaN (as in torch)
    assert np.all(np.isnan(y[:, 1]))
    assert not np.isfinite(rm[1]) and not np.isfinite(rv[1])
    others = [0, 2]
    assert np.all(np.isfinite(y[:, others]))
    assert_close(y[:, others], ref_forward(x[:, others], w[others], b[others])[0])
    assert np.all(np.isfinite(rm[others])) and np.all(np.isfinite(rv[others]))
    dx, gw, gb = fastbn.batch_norm_backward(np.ones_like(x), x, w, mean, invstd)
    assert np.all(np.isfinite(dx[:, others])) and np.all(np.isfinite(gw[others]))
    # evaluation: only the bad element itself is non-finite
    ye = fastbn.batch_norm(x, rm0, rv0, w, b)
    bad = ~np.isfinite(ye)
    assert bad[idx] and bad.sum() == 1
    assert np.isnan(ye[idx]) == np.isnan(value)


def test_nan_and_inf_like_torch(rng):
    torch = pytest.importorskip("torch")
    for value in (np.nan, np.inf):
        x = random_input(rng, (4, 3, 5), np.float32)
        x[1, 2, 3] = value
        rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
        trm, trv = torch.zeros(3), torch.ones(3)
        y = fastbn.batch_norm(x, rm, rv, training=True)
        yt = torch.nn.functional.batch_norm(torch.from_numpy(x), trm, trv, training=True).numpy()
        np.testing.assert_array_equal(np.isnan(y), np.isnan(yt))
        np.testing.assert_allclose(y, yt, rtol=1e-5, atol=2e-5)  # NaNs compare equal here
        np.testing.assert_array_equal(np.isfinite(rm), np.isfinite(trm.numpy()))
        np.testing.assert_array_equal(np.isfinite(rv), np.isfinite(trv.numpy()))
        ye = fastbn.batch_norm(x, np.zeros(3, np.float32), np.ones(3, np.float32))
        yte = torch.nn.functional.batch_norm(torch.from_numpy(x), torch.zeros(3), torch.ones(3)).numpy()
        np.testing.assert_allclose(ye, yte, rtol=1e-6, atol=1e-6)


def test_huge_eps_and_zero_eps(rng):
    x = random_input(rng, (4, 2, 3), np.float64)
    assert_close(fastbn.batch_norm(x, None, None, training=True, eps=1e6), ref_forward(x, eps=1e6)[0])
    y = fastbn.batch_norm(x, None, None, training=True, eps=EPS0)
    np.testing.assert_allclose(y.var(axis=(0, 2)), 1.0, rtol=1e-12)
    # eps = 0 divides a constant channel by zero: refused in training, as PyTorch does
    with pytest.raises(ValueError, match=r"eps must be positive in training, got 0.0"):
        fastbn.batch_norm(x, None, None, training=True, eps=0.0)
    rm, rv = np.zeros(2), np.full(2, 4.0)
    np.testing.assert_array_equal(fastbn.batch_norm(x, rm, rv, training=False, eps=0.0), x / 2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("stream", [0, 1], ids=["normal-stores", "streaming-stores"])
@pytest.mark.parametrize("unit", [1, 3, 4, 5, 8, 9, 15, 16, 17])
@pytest.mark.parametrize("path", ["columns", "slices"])
def test_column_loops_every_row_remainder(force_path, rng, path, dtype, stream, unit):
    """The column loops take rows eight (moments) and four (normalize, backward) at a time: blocks
    of 1 to 17 rows, over 41 rows, leave every remainder, in the first block and the later ones;
    W = 3 * 5 = 15 columns also leaves a SIMD tail.  In place, too."""
    force_path(path, unit, stream)
    x = (3.0 + rng.standard_normal((41, 3, 5))).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    w, b = rng.uniform(0.5, 1.5, 3).astype(dtype), rng.standard_normal(3).astype(dtype)
    rm, rv = rng.standard_normal(3).astype(dtype), rng.uniform(0.5, 2, 3).astype(dtype)
    y, mean, invstd = fastbn.batch_norm_forward(x, None, None, w, b, training=True)
    want, want_mean, want_var, want_invstd = ref_forward(x, w, b)
    assert_close(y, want)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(invstd, want_invstd, rtol=1e-10)
    assert_close(fastbn.batch_norm(x, rm, rv, w, b), ref_forward(x, w, b, rm, rv)[0])
    xi = x.copy()
    assert_close(fastbn.batch_norm(xi, rm, rv, w, b, out=xi), ref_forward(x, w, b, rm, rv)[0])
    dx, gw, gb = fastbn.batch_norm_backward(dy, x, w, mean, invstd)
    want_dx, want_gw, want_gb = ref_backward(dy, x, w)
    assert_close(dx, want_dx)
    np.testing.assert_allclose(gw, want_gw, rtol=1e-5 if dtype == np.float32 else 1e-10, atol=1e-5)
    np.testing.assert_allclose(gb, want_gb, rtol=1e-5 if dtype == np.float32 else 1e-10, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_slices_vector_finish_gives_the_bits_of_the_per_channel_one(force_path, threads, rng, dtype):
    """With one column per channel, SLICES derives statistics, coefficients and the parameter
    gradients in one vector loop (fbn_col_finish_stats/grad), COLUMNS channel by channel.  Forced
    to one block of all the rows (unit = N), both take the same moments, and every output must be
    the same to the bit, in training and evaluation mode, with -0 and NaN."""
    threads(1)
    for shape in [(7, 300), (64, 1024), (128, 33)]:
        x = random_input(rng, shape, dtype, offset=1e3)
        x[2, 5] = np.nan
        dy = rng.standard_normal(shape).astype(dtype)
        dy[:, 7] = -0.0
        w, b, rm, rv = random_params(rng, shape[1], dtype)
        results = {}
        for path in ("columns", "slices"):
            force_path(path, shape[0])
            rm1, rv1 = rm.copy(), rv.copy()
            y, mean, invstd = fastbn.batch_norm_forward(x, rm1, rv1, w, b, training=True)
            ye = fastbn.batch_norm(x, rm, rv, w, b)
            grads = fastbn.batch_norm_backward(dy, x, w, mean, invstd)
            grads_eval = fastbn.batch_norm_backward(dy, x, w, mean, invstd, training=False)
            results[path] = (y, mean, invstd, rm1, rv1, ye) + grads + grads_eval
        for got, want in zip(results["slices"], results["columns"]):
            np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_infinite_running_mean_gives_infinite_outputs_in_eval(kernel_path, dtype):
    """x - inf is -inf, as in PyTorch; splitting an infinite mean into high and low parts gave
    inf - inf = NaN.  A float64 mean beyond float32's range, with float32 input, likewise."""
    x = np.ones((6, 4, 3), dtype)
    rm = np.array([np.inf, -np.inf, 1e39, 0.0])
    rv = np.ones(4)
    y = fastbn.batch_norm(x, rm, rv, training=False)
    with np.errstate(over="ignore"):  # -1e39 is -inf in float32
        expect = ((x.astype(np.float64) - rm.reshape(1, 4, 1)) / np.sqrt(1 + 1e-5)).astype(dtype)
    np.testing.assert_array_equal(y[:, :2], expect[:, :2])
    assert (y[:, 2] == (-np.inf if dtype == np.float32 else expect[:, 2])).all()
    assert_close(y[:, 3], expect[:, 3], dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("unit", [0, 7, 333])
def test_streamed_results_gathered_across_rows_keep_their_bits(force_path, rng, dtype, unit):
    """Streaming stores gather the results of consecutive short rows (here 49 and 5 elements) into
    one buffer and move it out a chunk at a time (fbn_out in _simd_impl.h); ranges that start and
    end inside rows (unit) included, the bits are those of ordinary stores."""
    for shape in [(6, 9, 7, 7), (40, 3, 5)]:
        x = random_input(rng, shape, dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        w, b, rm, rv = (a.astype(np.float32) if dtype == np.float16 else a for a in random_params(rng, shape[1], dtype))
        results = []
        for stream in (0, 1):
            force_path("ranges", unit, stream)
            out = []
            for act in (None, "relu"):
                y, mean, invstd = fastbn.batch_norm_forward(x, None, None, w, b, training=True, activation=act)
                out += [y, fastbn.batch_norm(x, rm, rv, w, b, activation=act)]
                out += list(fastbn.batch_norm_backward(dy, x, w, mean, invstd, activation=act,
                                                       bias=b if act else None))
            results.append(out)
        for got, want in zip(*results):
            np.testing.assert_array_equal(got, want)
