# Type stubs for fastbn.layers (the layer protocol, Layer, is in _layer_base.pyi).
from typing import Literal

import numpy.typing as npt

from ._layer_base import IncompatibleKeys as IncompatibleKeys
from ._layer_base import Layer as Layer
from ._layer_base import _Buffer

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "Layer"]

class _BatchNorm(Layer):
    num_features: int
    momentum: float | None
    affine: bool
    track_running_stats: bool
    unbiased: bool
    activation: Literal["relu"] | None
    running_mean: _Buffer | None
    running_var: _Buffer | None
    num_batches_tracked: int | None
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
        unbiased: bool = True,
        activation: Literal["relu"] | None = None,
    ) -> None: ...
    def reset_running_stats(self) -> None: ...
    def reset_parameters(self) -> None: ...
    def extra_repr(self) -> str: ...

class BatchNorm1d(_BatchNorm): ...
class BatchNorm2d(_BatchNorm): ...
class BatchNorm3d(_BatchNorm): ...
