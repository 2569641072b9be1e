# Type stubs for fastbn.layers.
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
from typing_extensions import Self

from .functional import _ArrayT

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]

# A layer's parameters and buffers: NumPy arrays, CuPy arrays on device="cuda".
_Buffer = Any

class IncompatibleKeys(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]

class _BatchNorm:
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    has_bias: bool
    track_running_stats: bool
    dtype: np.dtype[Any]
    device: str
    training: bool
    weight: _Buffer | None
    bias: _Buffer | None
    running_mean: _Buffer | None
    running_var: _Buffer | None
    num_batches_tracked: int | None
    grad_weight: _Buffer | None
    grad_bias: _Buffer | None
    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: str | None = "cpu",
        dtype: npt.DTypeLike | None = ...,
        *,
        bias: bool = True,
    ) -> None: ...
    def train(self, mode: bool = True) -> Self: ...
    def eval(self) -> Self: ...
    def parameters(self) -> list[_Buffer]: ...
    def reset_running_stats(self) -> None: ...
    def reset_parameters(self) -> None: ...
    def forward(self, input: _ArrayT, *, out: _ArrayT | None = None) -> _ArrayT: ...
    def __call__(self, input: _ArrayT, *, out: _ArrayT | None = None) -> _ArrayT: ...
    def backward(self, grad_output: _ArrayT, *, out: _ArrayT | None = None) -> _ArrayT: ...
    def state_dict(self) -> dict[str, npt.NDArray[Any]]: ...
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> IncompatibleKeys: ...
    def to(self, device: str) -> Self: ...
    def extra_repr(self) -> str: ...

class BatchNorm1d(_BatchNorm): ...
class BatchNorm2d(_BatchNorm): ...
class BatchNorm3d(_BatchNorm): ...
