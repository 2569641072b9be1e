# Type stubs for fastbn.norms.  NumPy arrays only (CuPy arrays raise NotImplementedError): a float32
# or float64 input gets results of its dtype, with float64 statistics.
from collections.abc import Sequence
from typing import Any, TypeAlias, TypeVar

import numpy as np
import numpy.typing as npt

__all__ = [
    "group_norm", "group_norm_forward", "group_norm_backward",
    "layer_norm", "layer_norm_forward", "layer_norm_backward",
    "instance_norm", "instance_norm_forward", "instance_norm_backward",
]

_Float = TypeVar("_Float", bound=np.floating[Any])
_FloatArray: TypeAlias = np.ndarray[Any, np.dtype[_Float]]
# weight, bias, running statistics, saved statistics: float32 or float64 arrays (converted as needed)
_Vector: TypeAlias = npt.NDArray[np.floating[Any]]
_Stats: TypeAlias = npt.NDArray[np.float64]
_ShapeLike: TypeAlias = int | Sequence[int]

def group_norm(
    input: _FloatArray[_Float],
    num_groups: int,
    weight: _Vector | None = None,
    bias: _Vector | None = None,
    eps: float = 1e-5,
    *,
    out: _FloatArray[_Float] | None = None,
) -> _FloatArray[_Float]: ...
def group_norm_forward(
    input: _FloatArray[_Float],
    num_groups: int,
    weight: _Vector | None = None,
    bias: _Vector | None = None,
    eps: float = 1e-5,
    *,
    out: _FloatArray[_Float] | None = None,
) -> tuple[_FloatArray[_Float], _Stats, _Stats]: ...
def group_norm_backward(
    grad_output: _FloatArray[_Float],
    input: _FloatArray[_Float],
    num_groups: int,
    weight: _Vector | None,
    save_mean: _Vector,
    save_invstd: _Vector,
    *,
    out: _FloatArray[_Float] | None = None,
) -> tuple[_FloatArray[_Float], _FloatArray[_Float], _FloatArray[_Float]]: ...
def layer_norm(
    input: _FloatArray[_Float],
    normalized_shape: _ShapeLike,
    weight: _Vector | None = None,
    bias: _Vector | None = None,
    eps: float = 1e-5,
    *,
    out: _FloatArray[_Float] | None = None,
) -> _FloatArray[_Float]: ...
def layer_norm_forward(
    input: _FloatArray[_Float],
    normalized_shape: _ShapeLike,
    weight: _Vector | None = None,
    bias: _Vector | None = None,
    eps: float = 1e-5,
    *,
    out: _FloatArray[_Float] | None = None,
) -> tuple[_FloatArray[_Float], _Stats, _Stats]: ...
def layer_norm_backward(
    grad_output: _FloatArray[_Float],
    input: _FloatArray[_Float],
    normalized_shape: _ShapeLike,
    weight: _Vector | None,
    save_mean: _Vector,
    save_invstd: _Vector,
    *,
    out: _FloatArray[_Float] | None = None,
) -> tuple[_FloatArray[_Float], _FloatArray[_Float], _FloatArray[_Float]]: ...
def instance_norm(
    input: _FloatArray[_Float],
    running_mean: _Vector | None = None,
    running_var: _Vector | None = None,
    weight: _Vector | None = None,
    bias: _Vector | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    out: _FloatArray[_Float] | None = None,
) -> _FloatArray[_Float]: ...
def instance_norm_forward(
    input: _FloatArray[_Float],
    running_mean: _Vector | None = None,
    running_var: _Vector | None = None,
    weight: _Vector | None = None,
    bias: _Vector | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    out: _FloatArray[_Float] | None = None,
) -> tuple[_FloatArray[_Float], _Stats, _Stats]: ...
def instance_norm_backward(
    grad_output: _FloatArray[_Float],
    input: _FloatArray[_Float],
    weight: _Vector | None,
    save_mean: _Vector,
    save_invstd: _Vector,
    use_input_stats: bool = True,
    *,
    out: _FloatArray[_Float] | None = None,
) -> tuple[_FloatArray[_Float], _FloatArray[_Float], _FloatArray[_Float]]: ...
