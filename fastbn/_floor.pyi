# Type stubs for the compiled module fastbn._floor (see _floor.pyx): the benchmark's floor, not
# fastbn's API.
import numpy as np
import numpy.typing as npt

def traffic(a: npt.NDArray[np.floating], b: npt.NDArray[np.floating] | None = None,
            y: npt.NDArray[np.floating] | None = None, n_threads: int = 1, stream: int = -1,
            backwards: bool = False) -> float: ...
