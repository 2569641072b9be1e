"""The compiled entry point the bench calls past fastbn's public API, imported here and only here.

``traffic``: the floor kernel (the least memory traffic of one pass of batch norm, no arithmetic),
    behind every "floor" row of ``fastbn bench`` and ``fastbn bench --pipeline``.

When it moves (issue 12: the floor kernel leaves the production kernels), this file is the one
to change.
"""
from .._kernels import traffic  # noqa: F401  (a, b=None, y=None, n_threads=1, stream=-1, backwards=False)
