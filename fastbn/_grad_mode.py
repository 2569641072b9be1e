"""``fastbn.no_grad()``: a thread-local switch that makes the layers' forwards save nothing for backward."""
import contextlib
import threading

__all__ = ["no_grad", "is_grad_enabled"]

class _State(threading.local):
    # class-level default: a thread that never entered no_grad() reads it without the
    # AttributeError that getattr(local, name, default) raises and catches (0.4 us a call)
    enabled = True


_state = _State()


def is_grad_enabled():
    """False inside ``fastbn.no_grad()`` on this thread."""
    return _state.enabled


class no_grad(contextlib.ContextDecorator):
    """Context manager (and decorator) in which the layers' forwards save nothing for
    ``backward()``, as ``torch.no_grad()``: use it for evaluation and monitoring passes.

    It is thread-local (other threads are unaffected) and nests.  A forward inside it leaves the
    thread's pending saved forward untouched, so a ``backward()`` after the block still gets the
    gradient of the forward before it.  Running statistics are updated as without it (PyTorch's
    ``no_grad`` does not stop a training-mode forward from updating them): switch the layer to
    ``eval()``, or pass ``update_running_stats=False`` to the forward, to leave them alone.
    """

    def __enter__(self):
        # the previous state on a per-thread stack: one no_grad() object may be entered by several
        # threads at once (a decorated function)
        stack = _state.__dict__.setdefault("stack", [])
        stack.append(is_grad_enabled())
        _state.enabled = False
        return self

    def __exit__(self, *exc):
        _state.enabled = _state.stack.pop()
        return False
