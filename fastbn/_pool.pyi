# Type stubs for the compiled module fastbn._pool (see _pool.pyx): the thread pool's knobs and
# counters, which fastbn._kernels re-exports (not fastbn's API).
from typing import TypedDict

class _PoolCounters(TypedDict):
    jobs: int
    helper_tasks: int
    waits: int
    sleeps: int
    wait_s: float
    wakes: int

def pool_helpers() -> int: ...
def pool_counters() -> _PoolCounters: ...
def pool_spin_us(us: float | None = None) -> int: ...
