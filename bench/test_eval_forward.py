"""Evaluation-mode forward with the running statistics.

``test_eval_forward``: ``layer.eval(); layer(x)``, output allocated by the call (copy: ``x.copy()``).
``test_eval_forward_out``: ``fastbn.batch_norm(x, rm, rv, w, b, training=False, out=out)`` into a
preallocated array (copy: ``np.copyto(out, x)``; torch has no out= batch norm and is skipped;
onnxruntime: its BatchNormalization with io_binding on the same input and output arrays, where
onnx and onnxruntime are installed: ``pip install 'fastbn[bench]'``).
"""


def test_eval_forward(run_bench):
    run_bench("eval")


def test_eval_forward_out(run_bench):
    run_bench("eval_out")
