# Type stubs for the compiled module fastbn._alloc (see _alloc.pyx): the caching allocator of
# fastbn's large outputs.
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import numpy.typing as npt

HANDLER_NAME: str
HUGE_PAGES: bool
MAX_CACHED: int
MAX_FRACTION: int
MIN_BYTES: int
MULTIPLE: int
MODE: str
SCRATCH_POOL_BYTES: int
SCRATCH_SKEW: int

def empty_like(a: np.ndarray[Any, Any], shape: tuple[int, ...]) -> np.ndarray[Any, Any]: ...
def scratch(n: int, dtype: npt.DTypeLike) -> np.ndarray[Any, Any]: ...
def handler() -> AbstractContextManager[None]: ...
def memory_stats() -> dict[str, int | str]: ...
def empty_cache() -> int: ...
def configure(min_bytes: int | None = ..., max_cached: int | None = ..., multiple: int | None = ...,
              forget: bool = ...) -> dict[str, int]: ...
def relation(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> int: ...
def overlapping(out: np.ndarray[Any, Any], arrays: tuple[np.ndarray[Any, Any] | None, ...]) -> int: ...
