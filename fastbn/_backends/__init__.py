"""The backends: where an array lives and which kernels run on it.

``fastbn._checks`` validates every argument once; the functional API, the layers and SyncBatchNorm
then hand contiguous (N, C, S) arrays to the backend of the input, and nothing outside this
package asks which backend it has.  Each backend module (``cpu`` for NumPy, ``cuda`` for CuPy)
provides:

- ``name``, ``kind``, ``xp``: ``"cpu"``, ``"NumPy (CPU)"``, NumPy or ``"cuda"``, ``"CuPy (GPU)"``, CuPy
  (imported on first use);
- ``is_array(a)``; ``writeable(a)``, ``aligned(a)`` (CuPy's arrays always are both);
  ``relation(a, b)``: 0 no memory in common, 1 the same bytes (an in-place call), 2 a partial
  overlap; ``overlapping(out, arrays)``: a bit mask of the arrays that may share memory with out;
- ``contiguous(a, dtype)``: ``a`` itself when it is C-contiguous, aligned and of ``dtype``, else a
  copy that is;
- ``check_device(x, arrays)``: raise unless every ``(label, array)`` is on ``x``'s device;
  ``device(x)``: a context in which new arrays land on ``x``'s device;
- ``empty(x3, shape)``: a new C-contiguous array of ``shape`` with ``x3``'s dtype and size;
- the batch-norm kernels ``forward_train``, ``update_running``, ``eval_stats``, ``forward_eval``,
  ``forward_eval_running``, ``backward``; ``norm_kernels(what)``: the group/layer/instance norm
  kernels (NotImplementedError where a backend has none).

The NumPy/CuPy formulas both backends fall back on are written once, in ``formulas``.
"""
import numpy as np

from . import cpu


def backend_of(a):
    """The backend module of an array: ``cpu`` for NumPy, ``cuda`` for CuPy; TypeError otherwise."""
    if type(a) is np.ndarray:  # the common case, cheaply
        return cpu
    if isinstance(a, np.ndarray):
        if isinstance(a, (np.matrix, np.ma.MaskedArray)):
            what = "np.matrix" if isinstance(a, np.matrix) else "a masked array (its mask would be ignored)"
            raise TypeError(f"expected a numpy.ndarray, got {what}; pass np.asarray(...) of it")
        return cpu
    if type(a).__module__.split(".")[0] == "cupy":
        from . import cuda

        return cuda
    raise TypeError(f"expected a numpy.ndarray (or cupy.ndarray), got {type(a).__module__}.{type(a).__name__}")
