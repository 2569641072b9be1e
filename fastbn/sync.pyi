# Type stubs for fastbn.sync (SyncBatchNorm and the engine-neutral protocol; see sync.py).
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from typing_extensions import Self

from .layers import _BatchNorm

__all__ = ["SyncBatchNorm", "local_stats", "merge_stats", "normalize", "update_running",
           "local_grad_sums", "merge_grad_sums", "finish_backward"]

_F = TypeVar("_F", bound=np.floating[Any])
_Stats = npt.NDArray[np.float64]

def local_stats(x: npt.NDArray[np.floating[Any]]) -> _Stats: ...
def merge_stats(stack: Any) -> _Stats: ...
def normalize(
    x: npt.NDArray[_F],
    merged: npt.ArrayLike,
    weight: npt.ArrayLike | None = None,
    bias: npt.ArrayLike | None = None,
    eps: float = 1e-5,
    *,
    out: npt.NDArray[_F] | None = None,
) -> tuple[npt.NDArray[_F], _Stats, _Stats]: ...
def update_running(running_mean: npt.NDArray[Any], running_var: npt.NDArray[Any], merged: npt.ArrayLike,
                   momentum: float) -> None: ...
def local_grad_sums(grad_output: npt.NDArray[_F], x: npt.NDArray[_F], mean: npt.ArrayLike) -> _Stats: ...
def merge_grad_sums(stack: Any) -> _Stats: ...
def finish_backward(
    grad_output: npt.NDArray[_F],
    x: npt.NDArray[_F],
    weight: npt.ArrayLike | None,
    mean: npt.ArrayLike,
    invstd: npt.ArrayLike,
    sums: npt.ArrayLike,
    count: float,
    *,
    out: npt.NDArray[_F] | None = None,
) -> tuple[npt.NDArray[_F], npt.NDArray[_F], npt.NDArray[_F]]: ...

class SyncBatchNorm(_BatchNorm):
    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        comm: Any = None,
        dtype: npt.DTypeLike = ...,
        *,
        bias: bool = True,
        unbiased: bool = True,
    ) -> None: ...
    @property
    def comm(self) -> Any: ...
    @comm.setter
    def comm(self, value: Any) -> None: ...
    def to(self, device: str | None) -> Self: ...
    @classmethod
    def convert_sync_batchnorm(cls, layers: Any, comm: Any = None) -> Any: ...
