"""fastbn: fast, PyTorch-compatible batch normalization for NumPy arrays.

Functional API (named after ``torch.nn.functional``): :func:`batch_norm`,
:func:`batch_norm_forward`, :func:`batch_norm_backward`.  Layers: :class:`BatchNorm1d`,
:class:`BatchNorm2d`, :class:`BatchNorm3d`.  Threads: :func:`set_num_threads`,
:func:`get_num_threads`.  CuPy arrays run on fastbn's own CUDA kernels when CuPy is installed.
"""
try:
    from ._openmp import get_num_threads, set_num_threads
except ImportError as exc:  # the Linux wheels use the system's OpenMP runtime (README.md, "Wheels")
    if "libgomp" not in str(exc):
        raise
    raise ImportError(f"{exc}. fastbn uses the system's OpenMP runtime, so that it shares thread settings with "
                      "PyTorch: install it (Debian/Ubuntu: apt install libgomp1; Fedora/RHEL: dnf install libgomp; "
                      "Alpine: apk add libgomp), or import torch before fastbn") from exc
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
]
