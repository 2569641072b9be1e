# Type stubs for fastbn.norm_layers.  The layers hold NumPy arrays (CuPy arrays on device="cuda"); the
# protocol they follow (forward, backward, params_and_grads, ...) is Layer's, in _layer_base.pyi.
from collections.abc import Sequence

import numpy.typing as npt

from ._layer_base import Layer, _Buffer

__all__ = ["GroupNorm", "LayerNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]

class _Norm(Layer): ...

class GroupNorm(_Norm):
    num_groups: int
    num_channels: int
    affine: bool
    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: str | None = "cpu",
        dtype: npt.DTypeLike | None = ...,
        *,
        bias: bool = True,
    ) -> None: ...
    def reset_parameters(self) -> None: ...
    def extra_repr(self) -> str: ...

class LayerNorm(_Norm):
    normalized_shape: tuple[int, ...]
    elementwise_affine: bool
    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: str | None = "cpu",
        dtype: npt.DTypeLike | None = ...,
    ) -> None: ...
    def reset_parameters(self) -> None: ...
    def extra_repr(self) -> str: ...

class _InstanceNorm(_Norm):
    num_features: int
    momentum: float | None
    affine: bool
    track_running_stats: bool
    running_mean: _Buffer | None
    running_var: _Buffer | None
    num_batches_tracked: int | None
    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        device: str | None = "cpu",
        dtype: npt.DTypeLike | None = ...,
        *,
        bias: bool = True,
    ) -> None: ...
    def reset_running_stats(self) -> None: ...
    def reset_parameters(self) -> None: ...
    def extra_repr(self) -> str: ...

class InstanceNorm1d(_InstanceNorm): ...
class InstanceNorm2d(_InstanceNorm): ...
class InstanceNorm3d(_InstanceNorm): ...
