# Type stubs for the compiled module fastbn._kernels (see _kernels.pyx): its entry points are
# private (fastbn.functional calls them), so only the build facts and the pool's and planner's
# knobs (for `fastbn info`, the benchmarks and the tests; not fastbn's API) are typed.
from typing import Any, TypedDict

BUILD_FLAGS: str
"""What this module was built with (as fastbn._openmp.BUILD_FLAGS: `fastbn info` compares them)."""
PATHS: dict[str, int]

class _PoolCounters(TypedDict):
    jobs: int
    helper_tasks: int
    waits: int
    sleeps: int
    wait_s: float

def plan_width() -> int: ...
def pool_helpers() -> int: ...
def pool_counters() -> _PoolCounters: ...
def pool_spin_us(us: float | None = None) -> int: ...
def thread_threshold(n: int | None = None) -> int: ...
def __getattr__(name: str) -> Any: ...
