"""fastbn: fast, PyTorch-compatible batch normalization for NumPy arrays.

Functional API (named after ``torch.nn.functional``): :func:`batch_norm`,
:func:`batch_norm_forward`, :func:`batch_norm_backward`; :func:`group_norm`, :func:`layer_norm`,
:func:`instance_norm` and their ``*_forward``/``*_backward`` variants.  Layers: :class:`BatchNorm1d`,
:class:`BatchNorm2d`, :class:`BatchNorm3d`, :class:`GroupNorm`, :class:`LayerNorm`,
:class:`InstanceNorm1d`/``2d``/``3d``, all on one protocol (:class:`fastbn.layers.Layer`: one
forward, one backward, per thread; :func:`no_grad`; ``params_and_grads()``).  Threads: :func:`set_num_threads`,
:func:`get_num_threads`.  Memory: :func:`memory_stats`, :func:`empty_cache` (the caching allocator
of large outputs).  CuPy arrays run on fastbn's own CUDA kernels when CuPy is installed.
"""
import os as _os


def _stale_build(package_dir: str, modules: dict[str, str | None]) -> str | None:
    """In a source tree (an in-place or editable build): the first source newer than the compiled
    module it goes into, else None.  ``modules`` maps a module name to its compiled file; each is
    built from its .pyx and every .pxd and .h (setup.py's depends).  An installed package has no
    .pyx, and nothing is checked."""
    try:
        names = _os.listdir(package_dir)
        shared = [n for n in names if n.endswith((".pxd", ".pxi", ".h"))]
        for name, built in modules.items():
            if not built or not _os.path.exists(_os.path.join(package_dir, name + ".pyx")):
                continue
            for source in [name + ".pyx"] + shared:
                if _os.path.getmtime(_os.path.join(package_dir, source)) > _os.path.getmtime(built):
                    return source
    except OSError:
        pass
    return None


def _warn_if_stale_build() -> None:
    import importlib.util
    import warnings

    here = _os.path.dirname(_os.path.abspath(__file__))
    modules: dict[str, str | None] = {}
    for name in ("_openmp", "_pool", "_plan", "_kernels", "_floor", "_norm_kernels", "_alloc"):
        spec = importlib.util.find_spec(f"{__name__}.{name}")
        modules[name] = spec.origin if spec is not None else None
    source = _stale_build(here, modules)
    if source is not None:
        warnings.warn(f"fastbn: {source} is newer than its build; rebuild with "
                      "`python setup.py build_ext --inplace` (or `pip install -e .`), else the old "
                      "compiled modules keep loading", RuntimeWarning, stacklevel=3)


_warn_if_stale_build()

try:
    from ._openmp import get_num_threads, set_num_threads
    from ._alloc import empty_cache, memory_stats
except ImportError as exc:  # the Linux wheels use the system's OpenMP runtime (README.md, "Wheels")
    if "libgomp" not in str(exc):
        raise
    raise ImportError(f"{exc}. fastbn uses the system's OpenMP runtime, so that it shares thread settings with "
                      "PyTorch: install it (Debian/Ubuntu: apt install libgomp1; Fedora/RHEL: dnf install libgomp; "
                      "Alpine: apk add libgomp), or import torch before fastbn") from exc
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
from .sync import SyncBatchNorm
from .fusion import fuse_conv_bn_eval, fuse_conv_bn_weights, fuse_linear_bn_eval, fuse_linear_bn_weights

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
    "SyncBatchNorm",
    "fuse_conv_bn_weights",
    "fuse_linear_bn_weights",
    "fuse_conv_bn_eval",
    "fuse_linear_bn_eval",
    "get_num_threads",
    "set_num_threads",
    "empty_cache",
    "memory_stats",
]
