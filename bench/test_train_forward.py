"""Training-mode forward, ``layer.train(); layer(x)``: batch statistics, normalize + affine and
the running-buffer update, output allocated by the call.  torch: ``bn.train(); bn(t)`` without
autograd; numpy: the textbook formula; copy: ``x.copy()``."""


def test_train_forward(run_bench):
    run_bench("train")
