# Type stubs for fastbn.functional.  Arrays are NumPy arrays, or CuPy arrays where CuPy is
# installed: a NumPy input gets NumPy results of its dtype, with float64 statistics.
from typing import Any, Literal, Protocol, TypeVar, overload

import numpy as np
import numpy.typing as npt

__all__ = ["batch_norm", "batch_norm_forward", "batch_norm_backward"]

class _Array(Protocol):
    """A NumPy or CuPy array."""

    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def dtype(self) -> np.dtype[Any]: ...

_ArrayT = TypeVar("_ArrayT", bound=_Array)
_Float = TypeVar("_Float", bound=np.floating[Any])

def batch_norm(
    input: _ArrayT,
    running_mean: _Array | None,
    running_var: _Array | None,
    weight: _Array | None = None,
    bias: _Array | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    out: _ArrayT | None = None,
    unbiased: bool = True,
    activation: Literal["relu"] | None = None,
) -> _ArrayT: ...
@overload
def batch_norm_forward(
    input: np.ndarray[Any, np.dtype[_Float]],
    running_mean: _Array | None,
    running_var: _Array | None,
    weight: _Array | None = None,
    bias: _Array | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    out: np.ndarray[Any, np.dtype[_Float]] | None = None,
    unbiased: bool = True,
    activation: Literal["relu"] | None = None,
) -> tuple[np.ndarray[Any, np.dtype[_Float]], npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
@overload
def batch_norm_forward(
    input: _ArrayT,
    running_mean: _Array | None,
    running_var: _Array | None,
    weight: _Array | None = None,
    bias: _Array | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    out: _ArrayT | None = None,
    unbiased: bool = True,
    activation: Literal["relu"] | None = None,
) -> tuple[_ArrayT, Any, Any]: ...
def batch_norm_backward(
    grad_output: _ArrayT,
    input: _ArrayT,
    weight: _Array | None,
    save_mean: _Array,
    save_invstd: _Array,
    training: bool = True,
    *,
    out: _ArrayT | None = None,
    activation: Literal["relu"] | None = None,
    bias: _Array | None = None,
    output: _Array | None = None,
) -> tuple[_ArrayT, _ArrayT, _ArrayT]: ...

# the internal entry points (the layers call them after their own checks)
def __getattr__(name: str) -> Any: ...
