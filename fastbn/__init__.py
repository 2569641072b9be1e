"""fastbn: fast, PyTorch-compatible batch normalization for NumPy arrays.

Functional API (named after ``torch.nn.functional``): :func:`batch_norm`,
:func:`batch_norm_forward`, :func:`batch_norm_backward`; :func:`group_norm`, :func:`layer_norm`,
:func:`instance_norm` and their ``*_forward``/``*_backward`` variants.  Layers: :class:`BatchNorm1d`,
:class:`BatchNorm2d`, :class:`BatchNorm3d`, :class:`GroupNorm`, :class:`LayerNorm`,
:class:`InstanceNorm1d`/``2d``/``3d``, all on one protocol (:class:`fastbn.layers.Layer`: one
forward, one backward, per thread; :func:`no_grad`; ``params_and_grads()``).  Threads: :func:`set_num_threads`,
:func:`get_num_threads`.  CuPy arrays run on fastbn's own CUDA kernels when CuPy is installed.
"""
from ._openmp import get_num_threads, set_num_threads
from ._version import __version__
from .functional import batch_norm, batch_norm_backward, batch_norm_forward
from ._grad_mode import is_grad_enabled, no_grad
from .layers import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .norm_layers import GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, LayerNorm
from .norms import (
    group_norm,
    group_norm_backward,
    group_norm_forward,
    instance_norm,
    instance_norm_backward,
    instance_norm_forward,
    layer_norm,
    layer_norm_backward,
    layer_norm_forward,
)

__all__ = [
    "__version__",
    "batch_norm",
    "batch_norm_forward",
    "batch_norm_backward",
    "group_norm",
    "group_norm_forward",
    "group_norm_backward",
    "layer_norm",
    "layer_norm_forward",
    "layer_norm_backward",
    "instance_norm",
    "instance_norm_forward",
    "instance_norm_backward",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "GroupNorm",
    "LayerNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "no_grad",
    "is_grad_enabled",
    "get_num_threads",
    "set_num_threads",
]
