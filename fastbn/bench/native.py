"""The compiled entry points the bench calls past fastbn's public API, imported here and only here.

``traffic``: the floor kernel (the least memory traffic of one pass of batch norm, no arithmetic),
    behind every "floor" row of ``fastbn bench`` and ``fastbn bench --pipeline``.
``eval_kernel``: the evaluation forward kernel with the running statistics, on fastbn's threads,
    without the functional layer's checks: the "kernel" row of ``fastbn bench --latency``.

When either moves, this file is the one to change (issue 12 moved the floor kernel out of the
production kernels, to fastbn._floor).
"""
from .._backends.cpu import forward_eval_running as eval_kernel  # noqa: F401  (x3, y3, w, b, rm, rv, eps)
from .._floor import traffic  # noqa: F401  (a, b=None, y=None, n_threads=1, stream=-1, backwards=False)
