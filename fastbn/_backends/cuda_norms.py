"""Group, layer and instance norm on CuPy arrays: the batch-norm kernels of fastbn/_cuda/batch_norm.cu
run on views of the input, with the few per-row numbers between their passes computed by CuPy in
float64.  The same calls as the CPU's fastbn._norm_kernels (the ``threads`` argument is unused).

- Group norm (instance norm is group norm with a group a channel): the statistics of each (n, g)
  row are batch norm's channel statistics of the (1, N * G, C/G * S) view (cuda.moments); the
  normalize is batch norm's evaluation forward of the (1, N * C, S) view, each (n, c) a channel
  with its row's mean and invstd and weight[c], bias[c].  The backward sums dy and dy * (x - mean)
  over each (n, c) (cuda.channel_sums, which also give grad_weight and grad_bias over n), folds
  them with the weight into each row's grad_input coefficients, and applies those
  (cuda.grad_input): dx = w[c] * invstd * dy + (x - mean) * kx + kc, with A = sum(w * dy) and
  B = sum(w * dy * (x - mean)) over the row, kx = -invstd^3 * B / L and kc = -invstd * A / L.
- Layer norm: the statistics of each row of the (1, R, L) view; the normalize as batch norm's
  evaluation forward of that view with unit weight (x_hat, rounded to the input type as the CPU's
  loop rounds it), then the elementwise affine x_hat * weight[l] + bias[l] as that of the (R, L, 1)
  view with mean 0 and invstd 1: two passes where the CPU makes one.  The backward: grad_weight
  and grad_bias by CuPy in float64 (sums over the rows of dy * x_hat and dy), then batch norm's
  backward of the (1, R, L) view with unit weight applied to dy * weight.

Statistics and sums are the batch-norm kernels': in double, shifted, merged in a fixed order.
These paths cost more passes over memory than fused kernels would; they have not been timed on a
GPU.
"""
import numpy as np

from . import cuda


def _shape(x, C, S):
    n = x.size
    return n // (C * S), C, S


def _on_device(fn):
    """Run fn with its first argument's GPU current (the arrays CuPy makes on the way land there),
    after checking that every other array argument is on it."""
    names = fn.__code__.co_varnames[1:fn.__code__.co_argcount]

    def run(a, *args):
        cuda.check_device(a, tuple((n, v) for n, v in zip(names, args) if cuda.is_array(v)))
        with a.device:
            return fn(a, *args)
    run.__name__, run.__doc__ = fn.__name__, fn.__doc__
    return run


def _per_channel(v, Cg):
    """A per-(n, g) row value, once for each of the row's Cg channels: (N * C,)."""
    return cuda.xp.repeat(v.reshape(-1), Cg)


@_on_device
def group_forward(x, y, weight, bias, G, S, eps, mean, var, invstd, threads, stream=-1):
    """Group norm's forward: write y, and mean, var, invstd of shape (N, G) (float64)."""
    N, C, S = _shape(x, weight.shape[0], S)
    m, v, i = cuda.moments(x.reshape(1, N * G, C // G * S), eps)
    mean[...] = m.reshape(mean.shape)
    var[...] = v.reshape(var.shape)
    invstd[...] = i.reshape(invstd.shape)
    group_apply(x, y, weight, bias, G, S, mean, invstd, threads)


@_on_device
def group_apply(x, y, weight, bias, G, S, mean, invstd, threads, stream=-1):
    """y = (x - mean) * invstd * weight + bias with the given (N, G) statistics."""
    cp = cuda.xp
    N, C, S = _shape(x, weight.shape[0], S)
    Cg = C // G
    cuda.forward_eval(x.reshape(1, N * C, S), y.reshape(1, N * C, S), cp.tile(weight, N), cp.tile(bias, N),
                      _per_channel(mean, Cg), _per_channel(invstd, Cg))


@_on_device
def group_backward(dy, x, dx, weight, G, S, mean, invstd, training, threads, stream=-1):
    """Group norm's backward: write dx; return (grad_weight, grad_bias) as float64 (C,) arrays.
    ``training`` False: the statistics were constants (dx = dy * weight * invstd)."""
    cp = cuda.xp
    N, C, S = _shape(x, weight.shape[0], S)
    Cg, L = C // G, C // G * S
    x3, g3 = x.reshape(1, N * C, S), dy.reshape(1, N * C, S)
    m, istd = _per_channel(mean, Cg), _per_channel(invstd, Cg)
    gw, gb = cuda.channel_sums(g3, x3, m, istd)  # per (n, c): sum dy * (x - mean) * invstd, sum dy
    w = weight.astype(np.float64)
    kdy = cp.tile(w, N) * istd
    kx = kc = None
    if training:
        rows = invstd.reshape(-1)
        A = (gb.reshape(N, G, Cg) * w.reshape(G, Cg)).sum(axis=2).reshape(-1)  # sum w * dy
        Bi = (gw.reshape(N, G, Cg) * w.reshape(G, Cg)).sum(axis=2).reshape(-1)  # invstd * sum w * dy * (x - mean)
        kx = _per_channel(-(rows * rows) * (Bi / L), Cg)  # fbn_x_coef(invstd, invstd, B, L)
        kc = _per_channel(-rows * A / L, Cg)
    cuda.grad_input(g3, x3, dx.reshape(1, N * C, S), m, kdy, kx, kc, training)
    return gw.reshape(N, C).sum(axis=0), gb.reshape(N, C).sum(axis=0)


@_on_device
def layer_forward(x, y, weight, bias, L, eps, mean, var, invstd, threads, stream=-1):
    """Layer norm's forward over rows of L elements: write y, and mean, var, invstd (float64)."""
    cp = cuda.xp
    R = x.size // L
    x3, y3 = x.reshape(1, R, L), y.reshape(1, R, L)
    m, v, i = cuda.moments(x3, eps)
    mean[...] = m.reshape(mean.shape)
    var[...] = v.reshape(var.shape)
    invstd[...] = i.reshape(invstd.shape)
    one = cp.ones(R, weight.dtype)
    cuda.forward_eval(x3, y3, one, cp.zeros_like(one), m, i)  # x_hat
    cuda.forward_eval(y.reshape(R, L, 1), y.reshape(R, L, 1), weight, bias, cp.zeros(L), cp.ones(L))


@_on_device
def layer_backward(dy, x, dx, weight, L, mean, invstd, threads, stream=-1):
    """Layer norm's backward: write dx; return (grad_weight, grad_bias) as float64 (L,) arrays."""
    cp = cuda.xp
    R = x.size // L
    g = dy.reshape(R, L).astype(np.float64)
    m, istd = mean.reshape(R, 1), invstd.reshape(R, 1)
    xhat = 2.0 * (0.5 * x.reshape(R, L).astype(np.float64) - 0.5 * m) * istd  # halves: no overflow in x - m
    gw, gb = (g * xhat).sum(axis=0), g.sum(axis=0)  # before dx is written (it may be dy or x)
    gwy = dy.reshape(R, L) * weight.reshape(1, L)
    x3 = x.reshape(1, R, L)
    cuda.backward(gwy.reshape(1, R, L), x3, dx.reshape(1, R, L), cp.ones(R, weight.dtype), mean.reshape(-1),
                  invstd.reshape(-1), True)
    return gw, gb
