"""Half-precision inputs (issue 14 item 4): float16, and bfloat16 through the ml_dtypes package,
with float32 weight, bias and running buffers, as PyTorch's mixed batch norm takes them.  The
kernels compute in float32 with float64 statistics; the result is rounded once to the input's
type, so it is within one unit in the last place of the float64 reference of the upcast input."""
import sys

import numpy as np
import pytest

import fastbn
from fastbn import _kernels

ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 needs ml_dtypes (pip install 'fastbn[bfloat16]')")
HALVES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def _ulps(got, want, dtype):
    """|got - want| in units of the last place of ``dtype`` at ``want``'s magnitude."""
    info = ml_dtypes.finfo(dtype)
    want = np.asarray(want, np.float64)
    exp = np.floor(np.log2(np.maximum(np.abs(want), float(info.smallest_normal))))
    return np.abs(np.asarray(got, np.float64) - want) / 2.0 ** (exp - info.nmant)


def _reference(x, w, b, mean=None, var=None, eps=1e-5):
    axes = (0, *range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    if mean is None:
        mean, var = x.mean(axis=axes), x.var(axis=axes)
    return (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps) * w.reshape(shape) + b.reshape(shape)


@pytest.mark.parametrize("half", list(HALVES))
@pytest.mark.parametrize("shape", [(8, 3, 5, 7), (64, 5), (3, 4, 100), (2, 6, 3, 3, 3)])
def test_forward_within_one_ulp_of_float64(half, shape):
    dt = HALVES[half]
    rng = np.random.default_rng(len(shape))
    x = (rng.standard_normal(shape) * 3 + 1).astype(dt)
    C = shape[1]
    w, b = rng.uniform(0.5, 2, C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    x64 = x.astype(np.float64)
    y, mean, invstd = fastbn.batch_norm_forward(x, rm, rv, w, b, training=True)
    assert y.dtype == dt and y.shape == x.shape
    assert _ulps(y, _reference(x64, w.astype(np.float64), b.astype(np.float64)), dt).max() <= 1.0
    n = x.size // C
    np.testing.assert_allclose(rm, 0.1 * x64.mean(axis=(0, *range(2, x.ndim))), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(rv, 0.9 + 0.1 * x64.var(axis=(0, *range(2, x.ndim))) * n / (n - 1), rtol=1e-6)
    y_eval = fastbn.batch_norm(x, rm, rv, w, b)
    ref = _reference(x64, w.astype(np.float64), b.astype(np.float64), rm.astype(np.float64), rv.astype(np.float64))
    assert y_eval.dtype == dt and _ulps(y_eval, ref, dt).max() <= 1.0


@pytest.mark.parametrize("half", list(HALVES))
def test_backward_and_layer_match_torch(half):
    torch = pytest.importorskip("torch", reason="the parity check needs torch")
    dt = HALVES[half]
    tdt = {"float16": torch.float16, "bfloat16": torch.bfloat16}[half]
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((6, 4, 5, 5)) * 2).astype(dt)
    g = rng.standard_normal(x.shape).astype(dt)
    bn, tbn = fastbn.BatchNorm2d(4), torch.nn.BatchNorm2d(4)
    xt = torch.from_numpy(x.astype(np.float32)).to(tdt).requires_grad_()
    y, yt = bn(x), tbn(xt)
    assert y.dtype == dt and yt.dtype == tdt
    ulp = float(ml_dtypes.finfo(dt).eps)
    np.testing.assert_allclose(y.astype(np.float32), yt.detach().float().numpy(), rtol=2 * ulp, atol=2 * ulp)
    np.testing.assert_allclose(bn.running_var, tbn.running_var.numpy(), rtol=1e-5)
    dx = bn.backward(g)
    yt.backward(torch.from_numpy(g.astype(np.float32)).to(tdt))
    assert dx.dtype == dt and bn.grad_weight.dtype == np.float32
    np.testing.assert_allclose(dx.astype(np.float32), xt.grad.float().numpy(), rtol=4 * ulp, atol=4 * ulp)
    np.testing.assert_allclose(bn.grad_weight, tbn.weight.grad.numpy(), rtol=1e-2, atol=1e-2)


def test_out_must_be_of_the_half_type_and_in_place_works():
    x = np.random.default_rng(1).standard_normal((5, 3, 4)).astype(np.float16)
    want = fastbn.batch_norm(x, None, None, training=True)
    with pytest.raises(ValueError, match="dtype float16"):
        fastbn.batch_norm(x, None, None, training=True, out=np.empty(x.shape, np.float32))
    y = fastbn.batch_norm(x, None, None, training=True, out=x)
    assert y is x
    np.testing.assert_array_equal(x, want)


@pytest.mark.parametrize("half", list(HALVES))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_running_buffers_of_the_half_type_work_in_any_layout(half, training, unbiased, strided):
    """Running buffers of the input's half type (PyTorch takes float16 buffers too) are accepted
    whatever their layout and flags, and act as float32 buffers rounded to their type.  A
    contiguous pair once reached the kernels, which refused it after the forward had written out
    (a failed call that changed out), where a strided pair or unbiased=False was accepted."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((4, 3, 5)) * 2 + 1).astype(half)
    start = np.array([0.1, -0.2, 0.3]), np.array([1.0, 2.0, 0.5])

    def buffers(dtype):
        pair = [np.zeros(6 if strided else 3, dtype)[::2 if strided else 1] for _ in range(2)]
        for buf, v in zip(pair, start):
            buf[:] = v.astype(dtype)
        return pair

    rm, rv = buffers(half)
    rm32, rv32 = buffers(np.float32)
    rm32[:], rv32[:] = rm, rv  # the same starting values
    out = np.zeros_like(x)
    y = fastbn.batch_norm(x, rm, rv, training=training, unbiased=unbiased, out=out)
    want = fastbn.batch_norm(x, rm32, rv32, training=training, unbiased=unbiased)
    assert y is out and y.dtype == half
    assert _ulps(y, want.astype(np.float64), half).max() <= 1
    for got, ref in ((rm, rm32), (rv, rv32)):
        assert got.dtype == half
        assert _ulps(got, ref.astype(np.float64), half).max() <= 1
    if training:
        assert not np.array_equal(rm.astype(np.float64), start[0].astype(half).astype(np.float64))


def test_a_float64_layer_refuses_half_input():
    with pytest.raises(TypeError, match="holds float64 parameters, got input of dtype float16"):
        fastbn.BatchNorm1d(3, dtype=np.float64)(np.ones((4, 3), np.float16))


def test_bfloat16_without_ml_dtypes_is_a_typeerror_naming_it(monkeypatch):
    x = np.ones((4, 3), ml_dtypes.bfloat16)
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # import ml_dtypes now raises ImportError
    with pytest.raises(TypeError, match="ml_dtypes"):
        fastbn.batch_norm(x, None, None, training=True)


# ---- the kernels read and write half elements in place (fastbn/_simd.h): conversions and rounding
@pytest.fixture(params=["inline", "staged"])
def half_loops(request):
    """Both ways of reading half elements: converted inside the vector loops (AVX-512F) or staged
    through float buffers (every other machine, and the cases the inline loops leave out)."""
    before = _kernels.half_inline()
    if request.param == "inline" and not _kernels.half_inline(True):
        _kernels.half_inline(before)
        pytest.skip("the inline half loops need AVX-512F, which this CPU lacks")
    _kernels.half_inline(request.param == "inline")
    yield request.param
    _kernels.half_inline(before)


def _identity(C):
    """Evaluation-mode parameters whose output is the input itself, -0.0 included:
    (x - 0) / sqrt(1 + 0) * 1 + (-0.0)."""
    return np.ones(C, np.float32), np.full(C, -0.0, np.float32), np.zeros(C, np.float32), np.ones(C, np.float32)


@pytest.mark.parametrize("half", list(HALVES))
def test_every_half_value_converts_exactly(half, kernel_path, half_loops):
    """All 65536 bit patterns in and out unchanged (NaN stays NaN), on every kernel path: the ranges
    loops' conversions (inline or staged) and the per-element ones of the column loops."""
    dt = HALVES[half]
    bits = np.arange(1 << 16, dtype=np.uint16)
    x = bits.view(dt).reshape(512, 8, 16)
    w, b, rm, rv = _identity(8)
    y = fastbn.batch_norm(x, rm, rv, w, b, eps=0.0)
    nan = np.isnan(x.astype(np.float32))
    np.testing.assert_array_equal(np.isnan(y.astype(np.float32)), nan)
    np.testing.assert_array_equal(y.view(np.uint16)[~nan], x.view(np.uint16)[~nan])


@pytest.mark.parametrize("half", list(HALVES))
@pytest.mark.parametrize("scale", [1.5, 2.0 ** -10, 1.999, 3.0 ** 0.5], ids=["ties", "subnormal", "overflow", "any"])
def test_results_round_to_nearest_even(half, scale, kernel_path, half_loops):
    """The half result is the float32 computation rounded once, as NumPy rounds (to nearest, ties
    to even, overflow to infinity): x * 1.5 of every finite half value is exact in float32 and half
    of them are ties; 2^-10 lands in the subnormals; 1.999 overflows past 65504."""
    dt = HALVES[half]
    bits = np.arange(1 << 16, dtype=np.uint16)
    x = bits.view(dt)
    x = x[np.isfinite(x.astype(np.float32))]
    x = x[: x.size // 64 * 64].reshape(-1, 4, 16)
    w, b, rm, rv = _identity(4)
    w[:] = scale
    y = fastbn.batch_norm(x, rm, rv, w, b, eps=0.0)
    y32 = fastbn.batch_norm(x.astype(np.float32), rm, rv, w, b, eps=0.0)
    with np.errstate(over="ignore"):  # NumPy's cast warns where it overflows to infinity, as meant here
        want = y32.astype(dt)
    np.testing.assert_array_equal(y.view(np.uint16), want.view(np.uint16))




@pytest.mark.parametrize("half", list(HALVES))
@pytest.mark.parametrize("shape", [(8, 3, 5, 7), (64, 5), (2, 5, 3000), (16, 2048), (2, 3, 17, 17), (3, 2, 784),
                                   (33, 19), (5, 2, 3, 3)])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_every_op_is_the_float32_one_rounded(half, shape, training, kernel_path, half_loops):
    """Forward (also with ReLU) and backward on half elements give the float32 computation of the
    upcast input rounded once: within one unit in the last place of it (the statistics are summed in
    other pieces, so their last bits may differ), and the parameter gradients float32."""
    dt = HALVES[half]
    rng = np.random.default_rng(7)
    C = shape[1]
    x = (rng.standard_normal(shape) * 3 + 1).astype(dt)
    dy = rng.standard_normal(shape).astype(dt)
    w, b = rng.uniform(0.5, 2, C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    rm, rv = rng.standard_normal(C).astype(np.float32), rng.uniform(0.5, 2, C).astype(np.float32)
    for act, kw in ((None, {}), ("relu", {"activation": "relu", "bias": b})):
        y, m, s = fastbn.batch_norm_forward(x, rm.copy(), rv.copy(), w, b, training, activation=act)
        y32, m32, s32 = fastbn.batch_norm_forward(x.astype(np.float32), rm.copy(), rv.copy(), w, b, training,
                                                  activation=act)
        assert y.dtype == dt
        assert _ulps(y, y32.astype(dt), dt).max() <= 1
        dx, gw, gb = fastbn.batch_norm_backward(dy, x, w, m, s, training, **kw)
        dx32, gw32, gb32 = fastbn.batch_norm_backward(dy.astype(np.float32), x.astype(np.float32), w, m32, s32,
                                                      training, **kw)
        assert dx.dtype == dt and gw.dtype == np.float32 and gb.dtype == np.float32
        assert _ulps(dx, dx32.astype(dt), dt).max() <= 1
        np.testing.assert_allclose(gw, gw32, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(gb, gb32, rtol=1e-4, atol=1e-3)


def test_half_is_read_in_place():
    """No float32 copy: the CPU backend takes both half types, and an in-place call writes the
    caller's half array itself."""
    from fastbn._backends import cpu

    assert cpu.native_halves == {"float16", "bfloat16"}
    x = np.linspace(-3, 3, 4 * 6 * 10).astype(np.float16).reshape(4, 6, 10)
    w, b, rm, rv = _identity(6)
    rm[:] = 1.0
    before = x.copy()
    out = fastbn.batch_norm(x, rm, rv, w, b, out=x, eps=0.0)
    assert out is x
    np.testing.assert_array_equal(x, (before.astype(np.float32) - 1.0).astype(np.float16))


@pytest.mark.parametrize("half", list(HALVES))
def test_relu_mask_of_outputs_the_half_type_stores_as_zero(half, kernel_path):
    """A tiny positive output that the half type stores as +0 stops the gradient, as reading that
    output does (and as PyTorch's threshold_backward on the half output): the recomputed mask (bias=)
    and the read one (output=) agree to the bit, also where the output is a tie to +0."""
    dt = HALVES[half]
    smallest = float(ml_dtypes.finfo(dt).smallest_subnormal)
    C = 4
    bias = np.array([smallest / 4, smallest / 2, smallest, -smallest], np.float32)  # +0, tie (+0), kept, <0
    x = np.zeros((6, C, 5), dt)
    w, _, rm, rv = _identity(C)
    y, m, s = fastbn.batch_norm_forward(x, rm, rv, w, bias, eps=0.0, activation="relu")
    assert (y.astype(np.float32)[:, :2] == 0).all() and (y.astype(np.float32)[:, 2] == smallest).all()
    dy = np.ones_like(x)
    by_bias = fastbn.batch_norm_backward(dy, x, w, m, s, False, activation="relu", bias=bias)[0]
    by_output = fastbn.batch_norm_backward(dy, x, w, m, s, False, activation="relu", output=y)[0]
    np.testing.assert_array_equal(by_bias.view(np.uint16), by_output.view(np.uint16))
    np.testing.assert_array_equal(by_bias.astype(np.float32)[0, :, 0], [0, 0, 1, 0])


def test_grad_output_of_a_half_input_has_its_type():
    """The kernels read a half input in place, so grad_output must be of that type too (either byte
    order), as PyTorch's backward requires; a float32 one is a TypeError naming both."""
    x = np.linspace(-2, 2, 2 * 3 * 4).astype(np.float16).reshape(2, 3, 4)
    w = np.ones(3, np.float32)
    _, m, s = fastbn.batch_norm_forward(x, None, None, w, None, training=True)
    with pytest.raises(TypeError, match="grad_output must have the input's dtype float16, got float32"):
        fastbn.batch_norm_backward(np.ones(x.shape, np.float32), x, w, m, s)
    swapped = np.ones(x.shape, np.dtype(">f2"))
    dx = fastbn.batch_norm_backward(swapped, x, w, m, s)[0]
    np.testing.assert_array_equal(dx, fastbn.batch_norm_backward(np.ones_like(x), x, w, m, s)[0])


@pytest.mark.parametrize("half", list(HALVES))
@pytest.mark.parametrize("scale", [1e4, 1e25, 3e37, 1e-21, 1e-25, 1e-30],
                         ids=["f16-range", "large", "near-max", "tiny", "tinier", "subnormal-squares"])
def test_large_values_keep_their_statistics(half, scale, half_loops):
    """The inline loops sum shifted squares in float lanes: bfloat16 reaches float's range, where a
    lane can overflow, and values so small that their squares fall to float's subnormals or zero;
    those blocks are summed again in double, so the statistics stay those of the float32
    computation (float16 values stay far from both).  eps=1e-300: the variance itself counts."""
    dt = HALVES[half]
    if dt == np.float16 and not 1e-4 < scale < 6e4:
        pytest.skip("beyond float16's range")
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((4, 3, 700)) * scale + scale * (rng.standard_normal(3)[:, None])).astype(dt)
    x32 = x.astype(np.float32)
    y, m, s = fastbn.batch_norm_forward(x, None, None, training=True, eps=1e-300)
    y32, m32, s32 = fastbn.batch_norm_forward(x32, None, None, training=True, eps=1e-300)
    assert np.isfinite(m).all() and np.isfinite(s).all() and (s > 0).all()
    np.testing.assert_allclose(m, m32, rtol=1e-6)
    np.testing.assert_allclose(s, s32, rtol=1e-6)
    assert _ulps(y, y32.astype(dt), dt).max() <= 1


@pytest.mark.parametrize("half", list(HALVES))
def test_streaming_stores_give_the_same_half_bits(half, kernel_path, half_loops):
    """Streaming stores (taken by size; forced here with a tiny threshold) write the same bits as
    normal ones, on every path, inline or staged, channels-last included."""
    dt = HALVES[half]
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((6, 40, 9, 9)) * 2 + 1).astype(dt)
    dy = rng.standard_normal(x.shape).astype(dt)
    w, b = rng.uniform(0.5, 2, 40).astype(np.float32), rng.standard_normal(40).astype(np.float32)
    before = _kernels.thresholds()

    def run(a, g):
        y, m, s = fastbn.batch_norm_forward(a, None, None, w, b, True)
        ye = fastbn.batch_norm(a, np.zeros(40, np.float32), np.ones(40, np.float32), w, b)
        return y, ye, fastbn.batch_norm_backward(g, a, w, m, s, True)[0]

    try:
        for a, g in ((x, dy), (np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2),
                               np.ascontiguousarray(dy.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2))):
            want = run(a, g)
            _kernels.thresholds(stream_bytes=4096)
            for got, w_ in zip(run(a, g), want):
                np.testing.assert_array_equal(got.view(np.uint16), w_.view(np.uint16))
            _kernels.thresholds(**before)
    finally:
        _kernels.thresholds(**before)


@pytest.mark.parametrize("norm", ["batch", "group", "layer", "instance"])
def test_grad_output_has_the_input_dtype_in_every_norm(norm):
    """One rule for every backward, whatever type the kernels read the input in (batch norm reads
    a half input in place, the other norms through float32): grad_output has the input's dtype, in
    either byte order.  The other norms once took a float32 grad_output for a float16 input, and
    every norm a float16 one for a float32 input."""
    def backward(x, dy):
        if norm == "batch":
            _, m, s = fastbn.batch_norm_forward(x, None, None, training=True)
            return fastbn.batch_norm_backward(dy, x, None, m, s)[0]
        if norm == "group":
            _, m, s = fastbn.group_norm_forward(x, 2)
            return fastbn.group_norm_backward(dy, x, 2, None, m, s)[0]
        if norm == "layer":
            _, m, s = fastbn.layer_norm_forward(x, 6)
            return fastbn.layer_norm_backward(dy, x, 6, None, m, s)[0]
        _, m, s = fastbn.instance_norm_forward(x)
        return fastbn.instance_norm_backward(dy, x, None, m, s)[0]

    rng = np.random.default_rng(0)
    x32, dy32 = rng.standard_normal((2, 4, 6)).astype(np.float32), rng.standard_normal((2, 4, 6)).astype(np.float32)
    for xd, gd in ((np.float16, np.float32), (np.float32, np.float16), (np.float32, np.float64), (">f2", np.float32)):
        want = np.dtype(xd).newbyteorder("=")
        with pytest.raises(TypeError, match=f"grad_output must have the input's dtype {want}, got {np.dtype(gd)}"):
            backward(x32.astype(xd), dy32.astype(gd))
    x16 = x32.astype(np.float16)
    np.testing.assert_array_equal(backward(x16, dy32.astype(">f2")), backward(x16, dy32.astype(np.float16)))


@pytest.mark.parametrize("name", sorted(HALVES))
def test_relu_keeps_outputs_that_round_to_negative_zero(name):
    """torch.relu sees the output rounded to the half type: a tiny negative value is -0.0 there,
    which it keeps.  fastbn computes in float32 and rounds after its ReLU, so it keeps the values
    that round to -0.0 as well (and its backward passes no gradient there: z <= 0)."""
    torch = pytest.importorskip("torch", reason="the parity check needs torch")
    dt = HALVES[name]
    x = np.array([[-1.0, -1.0, 1.0], [1.0, 1.0, -1.0], [0.0, 0.0, 0.0]], dtype=dt)
    rm, rv, b = np.zeros(3, np.float32), np.ones(3, np.float32), np.zeros(3, np.float32)
    # products that round to -0: below half the smallest subnormal (float16 2**-25, bfloat16 2**-134)
    w = np.array([1e-9 if name == "float16" else 1e-41, 1e-30 if name == "float16" else 2e-42, 2.0], np.float32)
    y = fastbn.batch_norm(x, rm, rv, w, b, eps=0.0, activation="relu")
    tx = torch.from_numpy(x.astype(np.float32)).to(getattr(torch, name))
    ty = torch.relu(torch.nn.functional.batch_norm(tx, *(torch.from_numpy(a) for a in (rm, rv, w, b)), False, 0.1, 0.0))
    y32, ty32 = y.astype(np.float32), ty.float().numpy()
    np.testing.assert_array_equal(np.signbit(y32), np.signbit(ty32))
    np.testing.assert_array_equal(y32, ty32)
    assert np.signbit(y32[0, 0]) and np.signbit(y32[0, 1])  # the cases themselves
    _, mean, invstd = fastbn.batch_norm_forward(x, rm, rv, w, b, eps=0.0, activation="relu")
    dx, _, _ = fastbn.batch_norm_backward(np.ones_like(x), x, w, mean, invstd, False, activation="relu", bias=b)
    assert not np.any(dx.astype(np.float32)[:2, :2])  # every z here rounds to a zero
