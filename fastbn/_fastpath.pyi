# Type stubs for the compiled module fastbn._fastpath (see _fastpath.pyx): the plain evaluation
# call, checked in C.
from typing import Any

import numpy as np

def eval_forward(x: Any, running_mean: Any, running_var: Any, weight: Any, bias: Any, eps: Any,
                 out: Any, relu: bool = ..., in_place: bool = ...
                 ) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any]] | None: ...
def group_forward(x: Any, num_groups: Any, weight: Any, bias: Any, eps: Any,
                  out: Any) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any]] | None: ...
