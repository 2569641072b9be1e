# Type stubs for fastbn._grad_mode (fastbn.no_grad, fastbn.is_grad_enabled).
import contextlib
from typing import Literal

from typing_extensions import Self

__all__ = ["no_grad", "is_grad_enabled"]

def is_grad_enabled() -> bool: ...

class no_grad(contextlib.ContextDecorator):
    """A context manager, and a decorator (``@fastbn.no_grad()``), in which the layers' forwards save
    nothing for ``backward()``; thread-local, nests."""

    def __enter__(self) -> Self: ...
    def __exit__(self, *exc: object) -> Literal[False]: ...
