# Type stubs for the compiled module fastbn._kernels (see _kernels.pyx): its entry points are
# private (fastbn.functional calls them), so only the build facts are typed.
from typing import Any

BUILD_FLAGS: str
"""What this module was built with (as fastbn._openmp.BUILD_FLAGS: `fastbn info` compares them)."""
PATHS: dict[str, int]

def __getattr__(name: str) -> Any: ...
