"""fastbn: fast, PyTorch-compatible batch normalization for NumPy arrays.

Functional API (named after ``torch.nn.functional``): :func:`batch_norm`,
:func:`batch_norm_forward`, :func:`batch_norm_backward`.  Layers: :class:`BatchNorm1d`,
:class:`BatchNorm2d`, :class:`BatchNorm3d`.  Threads: :func:`set_num_threads`,
:func:`get_num_threads`.  CuPy arrays run on fastbn's own CUDA kernels when CuPy is installed.
"""
from ._openmp import get_num_threads, set_num_threads
from ._version import __version__
from .functional import batch_norm, batch_norm_backward, batch_norm_forward
from .layers import BatchNorm1d, BatchNorm2d, BatchNorm3d
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
    "get_num_threads",
    "set_num_threads",
]
