# Type stubs for fastbn._layer_base: the protocol every fastbn layer follows (fastbn.layers.Layer).
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
from typing_extensions import Self

from .functional import _ArrayT

# A layer's parameters, buffers and gradients: NumPy arrays, CuPy arrays on device="cuda".
_Buffer = Any

PROTOCOL_DOC: str

class IncompatibleKeys(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]

class Layer:
    # set by every layer's constructor
    training: bool
    eps: float
    has_bias: bool
    dtype: np.dtype[Any]
    device: str
    weight: _Buffer | None
    bias: _Buffer | None
    @property
    def grad_weight(self) -> _Buffer | None:
        """grad of weight from this thread's last backward (else the last of any thread), or None"""
    @grad_weight.setter
    def grad_weight(self, value: _Buffer | None) -> None: ...
    @property
    def grad_bias(self) -> _Buffer | None:
        """grad of bias from this thread's last backward (else the last of any thread), or None"""
    @grad_bias.setter
    def grad_bias(self, value: _Buffer | None) -> None: ...
    def __getstate__(self) -> dict[str, Any]: ...
    def __setstate__(self, state: dict[str, Any]) -> None: ...
    def train(self, mode: bool = True) -> Self: ...
    def eval(self) -> Self: ...
    def reset_parameters(self) -> None: ...
    def named_parameters(self) -> list[tuple[str, _Buffer]]: ...
    def parameters(self) -> list[_Buffer]: ...
    def params_and_grads(self) -> list[tuple[_Buffer, _Buffer]]: ...
    def forward(self, input: _ArrayT, *, out: _ArrayT | None = None, update_running_stats: bool = True) -> _ArrayT: ...
    def __call__(self, input: _ArrayT, *, out: _ArrayT | None = None, update_running_stats: bool = True) -> _ArrayT: ...
    def backward(self, grad_output: _ArrayT, *, out: _ArrayT | None = None) -> _ArrayT: ...
    def state_dict(self) -> dict[str, npt.NDArray[Any]]: ...
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> IncompatibleKeys: ...
