# Type stubs for the compiled module fastbn._plan (see _plan.pyx): the work-split planner's knobs,
# which fastbn._kernels re-exports (for `fastbn info`, the benchmarks and the tests; not fastbn's API).
from typing import TypedDict

PATHS: dict[str, int]
STREAM_L3_RATIO: float
NORM_STREAM_RATIO: float

class _Thresholds(TypedDict):
    stream_bytes: int
    piece_bytes: int

def plan_width() -> int: ...
def thresholds(stream_bytes: int | None = None, piece_bytes: int | None = None) -> _Thresholds: ...
def tune_for(l2_bytes: int, l3_bytes: int) -> _Thresholds: ...
def thread_threshold(n: int | None = None) -> int: ...
def norm_stream_threshold() -> int: ...
