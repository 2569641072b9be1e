"""Property tests: random shapes (ranks 2-5, dims incl. 1), dtypes and kernel paths against the
float64 reference."""
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastbn
from fastbn._backends import cpu as _cpu
from _helpers import assert_close, ref_backward, ref_forward, ref_running_update

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

shapes = st.integers(2, 5).flatmap(lambda rank: st.tuples(*[st.integers(1, 6)] * rank))
dtypes = st.sampled_from([np.float32, np.float64])
paths = st.sampled_from([("auto", 0, None), ("ranges", 0, None), ("ranges", 1, None), ("ranges", 3, None),
                         ("ranges", 7, None), ("ranges", 97, None), ("columns", 0, None), ("ranges", 0, 1),
                         ("ranges", 3, 1), ("columns", 0, 1), ("auto", 0, 0), ("slices", 0, None),
                         ("slices", 2, None), ("slices", 1, 1)])


def _data(seed, shape, dtype, offset, scale):
    rng = np.random.default_rng(seed)
    C = shape[1]
    x = (rng.standard_normal(shape) * scale + offset).astype(dtype)
    w = rng.uniform(0.5, 2, C).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    rm = (rng.standard_normal(C) * scale + offset).astype(dtype)
    rv = rng.uniform(0.5, 2, C).astype(dtype) * np.asarray(scale * scale, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    return x, w, b, rm, rv, dy


class _Path:
    """Force a kernel path, unit size and (unless None) streaming stores inside a with block."""

    def __init__(self, path, unit, stream):
        self.path, self.unit, self.stream = path, unit, stream

    def __enter__(self):
        self.saved = dict(_cpu.tuning)
        _cpu.tuning.update(path=self.path, unit=self.unit)
        if self.stream is not None:
            _cpu.tuning["stream"] = self.stream

    def __exit__(self, *exc):
        _cpu.tuning.clear()
        _cpu.tuning.update(self.saved)


def _tol(dtype, x_count):
    # float32 outputs are O(sqrt(count)) at most; rounding error grows with it
    return (5e-5 if dtype == np.float32 else 1e-11) * max(1.0, np.sqrt(x_count))


@SETTINGS
@given(shape=shapes, dtype=dtypes, path=paths, seed=st.integers(0, 2**32 - 1),
       offset=st.sampled_from([0.0, 3.0, -100.0, 1e4]), scale=st.sampled_from([1.0, 0.01, 50.0]),
       affine=st.booleans(), momentum=st.sampled_from([0.0, 0.1, 0.9, 1.0]))
def test_training_forward_and_backward(shape, dtype, path, seed, offset, scale, affine, momentum):
    N, C = shape[:2]
    count = N * int(np.prod(shape[2:]))
    x, w, b, rm, rv, dy = _data(seed, shape, dtype, offset, scale)
    if not affine:
        w = b = None
    rm0, rv0, x0 = rm.copy(), rv.copy(), x.copy()
    with _Path(*path):
        if count == 1:
            try:
                fastbn.batch_norm(x, rm, rv, w, b, training=True)
            except ValueError as e:
                assert "more than 1 value per channel" in str(e)
            else:
                raise AssertionError("one value per channel must be rejected in training")
            np.testing.assert_array_equal(rm, rm0)
            return
        y, mean, invstd = fastbn.batch_norm_forward(x, rm, rv, w, b, training=True, momentum=momentum)
        dx, gw, gb = fastbn.batch_norm_backward(dy, x, w, mean, invstd, training=True)
    np.testing.assert_array_equal(x, x0)
    ref_y, ref_mean, _, ref_invstd = ref_forward(x, w, b)
    assert y.dtype == dtype and y.shape == shape
    tol = _tol(dtype, count)
    assert_close(y, ref_y, tol=tol)
    assert_close(mean, ref_mean, tol=1e-12 * max(1.0, abs(offset)) if dtype == np.float64 else 1e-6 * max(1.0, abs(offset)))
    exp_rm, exp_rv = ref_running_update(rm0, rv0, x, momentum)
    assert_close(rm, exp_rm, tol=tol)
    np.testing.assert_allclose(rv, exp_rv, rtol=1e-4 if dtype == np.float32 else 1e-9, atol=1e-30)
    ref_dx, ref_gw, ref_gb = ref_backward(dy, x, w)
    # dx scales with weight * invstd
    assert_close(dx, ref_dx, tol=tol * 10 * max(1.0, float(np.max(ref_invstd))))
    assert_close(gw, ref_gw, tol=tol * 10)
    assert_close(gb, ref_gb, tol=tol * 10)


@SETTINGS
@given(shape=shapes, dtype=dtypes, path=paths, seed=st.integers(0, 2**32 - 1),
       offset=st.sampled_from([0.0, -7.0, 1e3]), scale=st.sampled_from([1.0, 20.0]), affine=st.booleans(),
       in_place=st.booleans())
def test_eval_forward_and_backward(shape, dtype, path, seed, offset, scale, affine, in_place):
    x, w, b, rm, rv, dy = _data(seed, shape, dtype, offset, scale)
    if not affine:
        w = b = None
    rm0, rv0 = rm.copy(), rv.copy()
    x_in = x.copy()
    with _Path(*path):
        y, mean, invstd = fastbn.batch_norm_forward(x_in, rm, rv, w, b, training=False,
                                                    out=x_in if in_place else None)
        dx, gw, gb = fastbn.batch_norm_backward(dy, x, w, mean, invstd, training=False)
    if in_place:
        assert y is x_in
    else:
        np.testing.assert_array_equal(x_in, x)
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)
    ref_y = ref_forward(x, w, b, rm, rv)[0]
    tol = 5e-6 if dtype == np.float32 else 1e-12
    assert_close(y, ref_y, tol=tol)
    ref_dx, ref_gw, ref_gb = ref_backward(dy, x, w, rm, rv, training=False)
    assert_close(dx, ref_dx, tol=tol)
    assert_close(gw, ref_gw, tol=tol * 10 * np.sqrt(x.size))
    assert_close(gb, ref_gb, tol=tol * 10 * np.sqrt(x.size))


@SETTINGS
@given(shape=shapes.filter(lambda s: s[0] * int(np.prod(s[2:])) > 1), seed=st.integers(0, 2**32 - 1),
       layout=st.sampled_from(["fortran", "reversed", "strided", "transposed"]))
def test_layouts_equal_contiguous(shape, seed, layout):
    x, w, b, rm, rv, dy = _data(seed, shape, np.float64, 1.0, 2.0)
    if layout == "fortran":
        v = np.asfortranarray(x)
    elif layout == "reversed":
        v = np.flip(np.flip(x, 0).copy(), 0)
    elif layout == "strided":
        big = np.zeros(shape[:-1] + (shape[-1] * 3,))
        big[..., ::3] = x
        v = big[..., ::3]
    else:
        v = np.swapaxes(np.ascontiguousarray(np.swapaxes(x, 0, -1)), 0, -1)
    np.testing.assert_array_equal(v, x)
    # Channels-last memory (here: a Fortran-ordered (1, C, L)) is read in place, summing in
    # another order: equal to rounding.  Every other layout is copied: equal bit for bit.
    channels_last = (not v.flags.c_contiguous and np.prod(shape[2:]) > 1
                     and v.transpose(0, *range(2, v.ndim), 1).flags.c_contiguous)
    same = (lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-12)) if channels_last \
        else np.testing.assert_array_equal
    y, mean, invstd = fastbn.batch_norm_forward(v, None, None, w, b, training=True)
    y_c, mean_c, invstd_c = fastbn.batch_norm_forward(x, None, None, w, b, training=True)
    same(y, y_c)
    same(mean, mean_c)
    got = fastbn.batch_norm_backward(np.asfortranarray(dy), v, w, mean, invstd)
    want = fastbn.batch_norm_backward(dy, x, w, mean_c, invstd_c)
    for g, e in zip(got, want):
        same(g, e)
