"""What ``fastbn bench`` measures: the operations, the shapes, the targets and the inputs.

Batch norm is memory-bound, so each operation carries the bytes it must move at the least
(``Op.bytes_moved``, in multiples of the input) and the copy it is quoted against (``Op.copy``).
Tiny shapes measure per-call overhead instead, and have their own targets.
"""
import math
from collections import namedtuple

import numpy as np

Op = namedtuple("Op", "title bytes_moved copy")
OPS = {
    # bytes_moved: multiples of x.nbytes that must cross the memory bus at the very least
    # copy: the yardstick, "copy" = x.copy() (allocate + copy), "copyto" = np.copyto(out, x)
    "train": Op("train forward", 2, "copy"),        # read x, write y
    "eval": Op("eval forward", 2, "copy"),          # read x, write y
    "eval_out": Op("eval forward out=", 2, "copyto"),  # read x, write into out
    "backward": Op("backward", 3, "copy"),          # read dy and x, write dx
}

TINY = (2, 16, 4, 4)
QUICK_CASES = [((64, 64, 56, 56), "float32"), ((4096, 1024), "float32"), (TINY, "float32")]
FULL_CASES = [((64, 64, 56, 56), "float32"), ((256, 256, 14, 14), "float32"), ((32, 3, 224, 224), "float32"),
              ((4096, 1024), "float32"), ((64, 64, 56, 56), "float64"), (TINY, "float32")]

# Targets the project holds itself to.  Memory-bound shapes: fastbn time / copy time at most
# `copy`, at least `torch`x / `numpy`x faster.  Tiny shapes measure per-call overhead instead:
# fastbn's layer must be no slower than torch.nn.BatchNorm*d.
# `out`: the allocating call at most this many times the same call with out= (fastbn_out).
TARGETS = {
    "train": {"copy": 1.6, "torch": 3.0, "numpy": 5.0, "out": 1.1},
    "eval": {"copy": 1.15, "torch": 2.0, "out": 1.1},
    "eval_out": {"copy": 1.1},
    "backward": {"copy": 2.4, "torch": 1.7, "out": 1.1},
}
TINY_TARGETS = {"train": {"torch": 1.0}, "eval": {"torch": 1.0}}
# Thread scaling: the training forward of SCALING_CASE through the layer, 2 threads at least this
# many times faster than 1 (measured with --full).
SCALING_CASE = ((64, 64, 56, 56), "float32")
SCALING_TARGET = 1.5


def is_tiny(shape):
    """Shapes so small that the call overhead, not memory traffic, is what gets measured."""
    return math.prod(shape) <= 4096


class Problem:
    """One benchmark input: x, dy and random per-channel parameters and running buffers."""

    momentum = 0.1
    eps = 1e-5

    def __init__(self, shape, dtype, rng):
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self._rng = rng
        C = self.shape[1]
        self.x = rng.standard_normal(self.shape, dtype=self.dtype)
        self.x *= 2
        self.x += 0.5
        self.weight = rng.uniform(0.5, 1.5, C).astype(self.dtype)
        self.bias = rng.standard_normal(C).astype(self.dtype)
        self.running_mean = (rng.standard_normal(C) * 0.5).astype(self.dtype)
        self.running_var = rng.uniform(0.5, 2.0, C).astype(self.dtype)
        self._dy = None

    @property
    def dy(self):
        """The incoming gradient (made on first use: only backward needs it)."""
        if self._dy is None:
            self._dy = self._rng.standard_normal(self.shape, dtype=self.dtype)
        return self._dy

    @property
    def nbytes(self):
        return self.x.nbytes

    def label(self):
        return f"{self.shape} {self.dtype.name}"

    def copies(self):
        """Fresh copies of (weight, bias, running_mean, running_var): each implementation its own."""
        return self.weight.copy(), self.bias.copy(), self.running_mean.copy(), self.running_var.copy()
