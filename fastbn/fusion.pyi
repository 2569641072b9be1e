# Type stubs for fastbn.fusion (folding an evaluation-mode batch norm into a conv or linear layer).
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from .layers import _BatchNorm

__all__ = ["fuse_conv_bn_weights", "fuse_linear_bn_weights", "fuse_conv_bn_eval", "fuse_linear_bn_eval"]

_W = TypeVar("_W", bound=np.floating[Any])
_Vec = npt.NDArray[np.floating[Any]]

def fuse_conv_bn_weights(
    conv_w: npt.NDArray[_W],
    conv_b: _Vec | None,
    bn_rm: _Vec,
    bn_rv: _Vec,
    bn_eps: float,
    bn_w: _Vec | None,
    bn_b: _Vec | None,
    transpose: bool = False,
) -> tuple[npt.NDArray[_W], _Vec]: ...
def fuse_linear_bn_weights(
    linear_w: npt.NDArray[_W],
    linear_b: _Vec | None,
    bn_rm: _Vec,
    bn_rv: _Vec,
    bn_eps: float,
    bn_w: _Vec | None,
    bn_b: _Vec | None,
) -> tuple[npt.NDArray[_W], _Vec]: ...
def fuse_conv_bn_eval(conv_w: npt.NDArray[_W], conv_b: _Vec | None, bn: _BatchNorm,
                      transpose: bool = False) -> tuple[npt.NDArray[_W], _Vec]: ...
def fuse_linear_bn_eval(linear_w: npt.NDArray[_W], linear_b: _Vec | None,
                        bn: _BatchNorm) -> tuple[npt.NDArray[_W], _Vec]: ...
