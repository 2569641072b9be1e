"""Training-mode backward, ``layer.backward(dy)`` -> grad_input, grad_weight, grad_bias.

The forward is not timed: fastbn's layer forgets its saved state after each backward, so every
round gets a fresh (untimed) forward from pedantic's setup.  torch:
``torch.autograd.grad(y, [t, weight, bias], dy, retain_graph=True)`` on a graph built once;
numpy: the textbook formulas from the saved mean and invstd; copy: ``x.copy()``.
"""


def test_backward(run_bench):
    run_bench("backward")
