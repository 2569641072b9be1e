"""The per-channel formulas both backends use where no kernel applies, written once for any
array module ``xp`` (NumPy or CuPy), in float64."""


def update_running(xp, running_mean, running_var, mean, var, momentum, n, unbiased=True):
    """running = (1 - momentum) * running + momentum * batch, in place; the batch variance made
    unbiased (n / (n - 1)) unless ``unbiased=False`` (ONNX's and Keras's convention)."""
    correction = n / (n - 1) if unbiased else 1.0
    running_mean[...] = (1.0 - momentum) * running_mean.astype(xp.float64) + momentum * mean
    running_var[...] = (1.0 - momentum) * running_var.astype(xp.float64) + (momentum * correction) * var


def eval_stats(xp, running_mean, running_var, eps):
    """(running_mean, 1 / sqrt(running_var + eps)) as float64 vectors."""
    return running_mean.astype(xp.float64), 1.0 / xp.sqrt(running_var.astype(xp.float64) + eps)
