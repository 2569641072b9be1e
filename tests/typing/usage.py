"""A typed use of fastbn's public API, checked by `mypy --strict` in CI (.ci/run), not run by pytest.

The `type: ignore[...]` lines are mistakes the stubs must catch: mypy's warn_unused_ignores (part of
--strict) fails the check if one of them stops being an error.
"""
from typing import Any

import numpy as np
import numpy.typing as npt

import fastbn
from fastbn.layers import IncompatibleKeys, Layer

F32 = npt.NDArray[np.float32]


def train_step(bn: fastbn.BatchNorm2d, x: F32, target: F32, lr: float = 0.1) -> float:
    y: F32 = bn(x)
    loss = 0.5 * float(np.mean((y - target) ** 2))
    grad_x = bn.backward((y - target) / y.size)
    assert grad_x.shape == x.shape
    for p, g in zip(bn.parameters(), (bn.grad_weight, bn.grad_bias)):
        if g is not None:  # None for a parameter the layer does not have
            p -= lr * g
    return loss


def functional(x: F32, rm: F32, rv: F32, w: F32, b: F32) -> tuple[F32, F32]:
    y: F32 = fastbn.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5)
    out = np.empty_like(x)
    same: F32 = fastbn.batch_norm(x, rm, rv, w, b, training=False, out=out)
    y2, save_mean, save_invstd = fastbn.batch_norm_forward(x, None, None, w, b, training=True)
    mean64: npt.NDArray[np.float64] = save_mean
    dx, gw, gb = fastbn.batch_norm_backward(np.ones_like(x), x, w, mean64, save_invstd)
    grads: tuple[F32, F32, F32] = (dx, gw, gb)
    assert y2.dtype == same.dtype == grads[0].dtype
    return y, dx


def layers_and_threads() -> None:
    bn = fastbn.BatchNorm1d(16, eps=1e-3, momentum=None, affine=False, dtype=np.float64).eval()
    state: dict[str, Any] = bn.state_dict()
    keys: IncompatibleKeys = bn.load_state_dict(state, strict=False)
    assert not keys.missing_keys
    n: int = fastbn.get_num_threads()
    fastbn.set_num_threads(n)
    version: str = fastbn.__version__
    print(version, bn.num_features, bn.training)


def sgd_step(layer: Layer, x: F32, target: F32, lr: float = 0.1) -> float:
    """Any layer, through the protocol: forward, backward, then params_and_grads()."""
    y: F32 = layer(x)
    loss = 0.5 * float(np.mean((y - target) ** 2))
    grad_x = layer.backward((y - target) / y.size)
    assert grad_x.shape == x.shape
    for p, g in layer.params_and_grads():
        p -= lr * g
    names: list[str] = [name for name, _ in layer.named_parameters()]
    assert len(names) == len(layer.parameters())
    return loss


def norm_layers(x: F32) -> F32:
    C: int = x.shape[1]
    gn = fastbn.GroupNorm(C, C, eps=1e-5)
    ln = fastbn.LayerNorm(x.shape[2:], elementwise_affine=True, bias=False, dtype=np.float32)
    inorm = fastbn.InstanceNorm2d(C, affine=True, track_running_stats=True)
    layers: list[Layer] = [gn, ln, inorm, fastbn.BatchNorm2d(C).train()]
    for layer in layers:
        sgd_step(layer, x, np.zeros_like(x))
    shape: tuple[int, ...] = ln.normalized_shape
    assert gn.num_groups == C and shape == x.shape[2:] and ln.bias is None
    with fastbn.no_grad():
        assert not fastbn.is_grad_enabled()
        y: F32 = inorm(x, update_running_stats=False)

    @fastbn.no_grad()
    def evaluate(x: F32) -> F32:
        return ln(inorm.eval()(x))

    return evaluate(y)


def norms(x: F32) -> F32:
    w = np.ones(x.shape[1], np.float32)
    y: F32 = fastbn.group_norm(x, 1, w, np.zeros_like(w), eps=1e-5)
    y2, save_mean, save_invstd = fastbn.group_norm_forward(x, 1, w)
    mean64: npt.NDArray[np.float64] = save_mean
    dx, gw, gb = fastbn.group_norm_backward(np.ones_like(x), x, 1, w, mean64, save_invstd)
    grads: tuple[F32, F32, F32] = (dx, gw, gb)
    z: F32 = fastbn.layer_norm(x, x.shape[-1], out=np.empty_like(x))
    i: F32 = fastbn.instance_norm(x, None, None, w, None, use_input_stats=True)
    assert y2.dtype == grads[0].dtype == z.dtype == i.dtype
    return y


def mistakes(bn: fastbn.BatchNorm2d) -> None:
    """Never called: each line must be a type error."""
    fastbn.set_num_threads("4")  # type: ignore[arg-type]
    fastbn.BatchNorm3d("8")  # type: ignore[arg-type]
    fastbn.batch_norm([1.0, 2.0], None, None)  # type: ignore[type-var]
    bn.no_such_method()  # type: ignore[attr-defined]
    bn(np.ones(3), update_running_stats="no")  # type: ignore[arg-type]
    fastbn.GroupNorm(2, 4).running_mean  # type: ignore[attr-defined]
    fastbn.LayerNorm("8")  # type: ignore[arg-type]
    fastbn.group_norm([[1.0, 2.0]], 1)  # type: ignore[arg-type]
    fastbn.layer_norm(np.ones(3, np.int64), 3)  # type: ignore[type-var]
    fastbn.no_grad(False)  # type: ignore[call-arg]


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 5, 5)).astype(np.float32)
    C = np.ones(3, np.float32)
    print(train_step(fastbn.BatchNorm2d(3), x, np.zeros_like(x)))
    functional(x, C * 0, C.copy(), C.copy(), C * 0)
    layers_and_threads()
    norm_layers(x)
    norms(x)
