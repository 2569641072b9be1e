"""fastbn: fast, PyTorch-compatible batch normalization for NumPy arrays.

Functional API (named after ``torch.nn.functional``): :func:`batch_norm`,
:func:`batch_norm_forward`, :func:`batch_norm_backward`.  Layers: :class:`BatchNorm1d`,
:class:`BatchNorm2d`, :class:`BatchNorm3d`.  Threads: :func:`set_num_threads`,
:func:`get_num_threads`.  Memory: :func:`memory_stats`, :func:`empty_cache` (the caching allocator
of large outputs).  CuPy arrays run on fastbn's own CUDA kernels when CuPy is installed.
"""
from ._alloc import empty_cache, memory_stats
from ._openmp import get_num_threads, set_num_threads
from ._version import __version__
from .functional import batch_norm, batch_norm_backward, batch_norm_forward
from .layers import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = [
    "__version__",
    "batch_norm",
    "batch_norm_forward",
    "batch_norm_backward",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "get_num_threads",
    "set_num_threads",
    "empty_cache",
    "memory_stats",
]
