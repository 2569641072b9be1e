"""Batch normalization on NumPy (or CuPy) arrays, with ``torch.nn.functional.batch_norm``'s semantics.

The public functions check their arguments (fastbn._checks), once, before any state changes, then
call the internal entry points ``forward``/``backward`` below, which the layers call directly
after their own checks.  The arithmetic lives in the backends (fastbn._backends).
"""
from . import _checks as ck
from ._fastpath import eval_forward as _plain_eval

__all__ = ["batch_norm", "batch_norm_forward", "batch_norm_backward"]


def batch_norm_forward(input, running_mean, running_var, weight=None, bias=None, training=False,
                       momentum=0.1, eps=1e-5, *, out=None, unbiased=True, activation=None):
    """Like :func:`batch_norm`, and also return what :func:`batch_norm_backward` needs.

    Returns ``(output, save_mean, save_invstd)``: the per-channel mean and ``1/sqrt(var + eps)``
    that normalized the input (the batch's in training, the running buffers' otherwise), as
    float64 arrays of shape ``(C,)``.
    """
    if training is False and unbiased is True and momentum is not None:  # the plain evaluation call, checked in C
        done = _plain_eval(input, running_mean, running_var, weight, bias, eps, out, ck.activation(activation))
        if done is not None:
            return done
    with ck.device_of(input):  # arrays made from here on land on the input's device
        return _checked_forward(input, running_mean, running_var, weight, bias, training, momentum, eps, out, unbiased,
                                activation)


def _checked_forward(input, running_mean, running_var, weight, bias, training, momentum, eps, out, unbiased,
                     activation):
    be, x3 = ck.as_ncs(input, native_half=True)
    C = x3.shape[1]
    training = ck.flag(training, "training")
    unbiased = ck.flag(unbiased, "unbiased")
    relu = ck.activation(activation)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be arrays or both be None")
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var must be given in evaluation mode (training=False)")
    eps = ck.scalar(eps, "eps")
    if momentum is None:  # PyTorch's functional batch_norm refuses None in either mode
        raise TypeError("momentum must be a float; for a cumulative average pass 1/num_batches "
                        "(the layers do this when momentum=None)")
    if training and running_mean is not None:
        momentum = ck.scalar(momentum, "momentum", 0.0, 1.0)
    if running_mean is not None:
        ck.vector(running_mean, "running_mean", be, (C,), None, writable=training)
        ck.vector(running_var, "running_var", be, (C,), None, writable=training)
    pdt = ck.compute_dtype(x3.dtype)
    w = ck.param(weight, "weight", be, (C,), pdt, 1.0)
    b = ck.param(bias, "bias", be, (C,), pdt, 0.0)
    return forward(be, input, x3, running_mean, running_var, w, b, training, momentum, eps, out, unbiased, relu)


def forward(be, x, x3, running_mean, running_var, w, b, training, momentum, eps, out, unbiased=True, relu=False):
    """batch_norm_forward after the checks: ``x3`` is the contiguous (N, C, S) view of the input
    ``x``, ``w``/``b`` contiguous vectors of its dtype, the running buffers checked (or None);
    ``relu``: the fused activation."""
    N, C, S = x3.shape
    if training and not eps > 0:  # as PyTorch: a constant channel would divide by zero
        raise ValueError(f"eps must be positive in training, got {eps!r}")
    if training and N * S == 1:
        raise ValueError(f"expected more than 1 value per channel when training, got input of shape {tuple(x.shape)}")
    if running_mean is not None:  # updated after the kernel has written out: check before it runs
        be.check_device(x3, (("running_mean", running_mean), ("running_var", running_var)))
    y, y3, target = ck.prepare_out(be, out, x, x3)
    if training:
        ck.out_apart_from(be, out, (("running_mean", running_mean), ("running_var", running_var)))
        if x3.size == 0:  # PyTorch: empty output, running buffers untouched (also with C = 0)
            mean, invstd = be.xp.zeros(C), be.xp.zeros(C)
        else:
            mean, var, invstd = be.forward_train(x3, y3, *ck.apart(be, out, w, b), eps, relu)
            if running_mean is not None:
                be.update_running(running_mean, running_var, mean, var, momentum, N * S, unbiased)
    elif y3.size:
        mean, invstd = be.forward_eval_running(x3, y3, *ck.apart(be, out, w, b, running_mean, running_var), eps, relu)
    else:
        mean, invstd = be.eval_stats(running_mean, running_var, eps)
    return ck.finish(y, target), mean, invstd


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, out=None, unbiased=True, activation=None):
    """Batch normalization over the channel axis 1 of ``input`` (N, C, *spatial).

    Same semantics as ``torch.nn.functional.batch_norm``: in training, normalize with the batch
    mean and biased variance and, when running buffers are given, update them in place
    (``running = (1 - momentum) * running + momentum * batch``, the unbiased batch variance for
    ``running_var``, or the biased one with ``unbiased=False``, as ONNX and Keras do); otherwise
    normalize with the running buffers.  ``out=`` receives the result (it may be ``input`` itself
    for an in-place call).  ``activation="relu"`` applies ReLU in the same pass:
    ``relu(batch_norm(...))``, with NaN and -0.0 kept as ``torch.relu`` keeps them.
    """
    if training is False and unbiased is True and momentum is not None:
        done = _plain_eval(input, running_mean, running_var, weight, bias, eps, out, ck.activation(activation))
        if done is not None:
            return done[0]
    return batch_norm_forward(input, running_mean, running_var, weight, bias, training, momentum, eps, out=out,
                              unbiased=unbiased, activation=activation)[0]


def batch_norm_backward(grad_output, input, weight, save_mean, save_invstd, training=True, *, out=None,
                        activation=None, bias=None, output=None):
    """Gradients of batch norm from the statistics :func:`batch_norm_forward` returned.

    ``training=True``: the forward normalized with batch statistics, so the gradient flows
    through the mean and variance too.  ``training=False``: the statistics were constants
    (evaluation mode), ``grad_input = grad_output * weight * save_invstd``.
    Returns ``(grad_input, grad_weight, grad_bias)``; the parameter gradients are computed even
    when ``weight`` is None (they are cheap), in the dtype of the parameters (the input's, float32
    for a half input).  ``out=`` receives grad_input
    (it may be ``grad_output`` or ``input`` itself, for an in-place call); without it a large
    grad_input comes from fastbn's caching allocator, which reuses the memory of dropped outputs
    (see fastbn._alloc), so reusing a buffer by hand no longer saves page faults.

    ``activation="relu"``: the gradient of ``relu(batch_norm(...))``, with ReLU's mask (PyTorch's:
    the gradient passes where the output is > 0 or NaN) taken in the same passes, no extra pass
    and no saved mask.  Give the forward's ``bias`` (the mask is recomputed from ``input``, the
    saved statistics, ``weight`` and ``bias``) or its ``output=``; exactly one of them, since
    either alone defines the mask.  After an in-place forward (``out=input``) the input is gone:
    pass ``output=`` then.  For a float16 or bfloat16 input, ``grad_input`` is of its type and
    the parameter gradients float32.
    """
    with ck.device_of(input):
        be, x3 = ck.as_ncs(input, native_half=True)
        C = x3.shape[1]
        g3 = ck.like_input(be, grad_output, input, x3, "grad_output")
        training = ck.flag(training, "training")
        pdt = ck.compute_dtype(x3.dtype)
        w = ck.param(weight, "weight", be, (C,), pdt, 1.0)
        mean = ck.vector(save_mean, "save_mean", be, (C,), be.xp.float64)
        invstd = ck.vector(save_invstd, "save_invstd", be, (C,), be.xp.float64)
        b = z3 = None
        if ck.activation(activation):
            if (bias is None) == (output is None):
                raise ValueError("activation='relu' needs the forward's bias= (to recompute ReLU's mask from the "
                                 "input) or its output= (to read it), exactly one; got "
                                 + ("both" if bias is not None else "neither")
                                 + " (a layer without bias: pass bias=np.zeros(C) or output=)")
            if bias is not None:
                b = ck.param(bias, "bias", be, (C,), pdt, 0.0)
            else:
                z3 = ck.like_input(be, output, input, x3, "output")
        elif bias is not None or output is not None:
            raise ValueError("bias= and output= define the fused ReLU's mask; they need activation='relu' "
                             f"(got activation={activation!r})")
        return backward(be, input, x3, g3, w, mean, invstd, training, out, b, z3)


def backward(be, x, x3, g3, w, mean, invstd, training, out, bias=None, z3=None):
    """batch_norm_backward after the checks (arguments as :func:`forward`'s; ``g3`` the contiguous
    (N, C, S) grad_output).  Through the fused ReLU when ``bias`` (the forward's, to recompute its
    output) or ``z3`` (the forward's output, as g3) is given."""
    C = x3.shape[1]
    reads = (g3,) if z3 is None else (g3, z3)
    dx, dx3, target = ck.prepare_out(be, out, x, x3, *reads)
    if x3.size:
        w, mean, invstd, b = ck.apart(be, out, w, mean, invstd, bias)
        gw, gb = be.backward(g3, x3, dx3, w, mean, invstd, training, bias=b, output=z3)
    else:
        gw, gb = be.xp.zeros(C), be.xp.zeros(C)
    pdt = ck.compute_dtype(x3.dtype)  # float32 for half x, as PyTorch's float32 parameters
    return ck.finish(dx, target), gw.astype(pdt), gb.astype(pdt)
