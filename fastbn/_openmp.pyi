# Type stubs for the compiled module fastbn._openmp (see _openmp.pyx).

OPENMP: bool
"""Whether this build has OpenMP (False: a serial build)."""
BUILD_FLAGS: str
"""What this module was built with: OpenMP and why not, the compiler, the compile and link flags."""
MAX_THREADS: int

def get_num_threads() -> int: ...
def set_num_threads(n: int) -> None: ...
