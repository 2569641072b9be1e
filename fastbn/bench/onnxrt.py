"""onnxruntime's ``BatchNormalization`` as an implementation to time fastbn's eval forward against.

One ONNX node (opset 15, inference mode: ``training_mode=0``) whose scale, bias, mean and
variance are initializers (constants of the graph, as in an exported model), run by an
``InferenceSession`` on the CPU execution provider with ``intra_op_num_threads`` = the threads
given (fastbn's count) and ``inter_op_num_threads=1``, default session options otherwise (so
onnxruntime's graph optimizations and its thread spinning are on, as a user gets them).  The
call is ``run_with_iobinding`` on a binding made once, whose input and output are the caller's
NumPy arrays, bound by their data pointers: no copy in or out, the same contract as fastbn's
``out=``.

onnx (to build the model) and onnxruntime are optional (``pip install 'fastbn[bench]'``) and
imported on first use; :func:`unavailable` says why they cannot be used.
"""
import functools

import numpy as np

OPSET = 15
IR_VERSION = 8  # the IR version of opset 15: any onnxruntime that runs opset 15 loads it
INSTALL = "pip install 'fastbn[bench]'"


@functools.lru_cache(maxsize=None)
def _modules():
    """(onnx, onnxruntime, None), or (None, None, why not)."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:  # either one missing, or a broken install of it
        return None, None, f"onnxruntime or onnx is not installed ({INSTALL}): {exc}"
    return onnx, onnxruntime, None


def unavailable():
    """None when onnx and onnxruntime import, else the reason (what to install, the original error)."""
    return _modules()[2]


def version():
    """onnxruntime's version, or None."""
    ort = _modules()[1]
    return ort.__version__ if ort is not None else None


def _model(shape, weight, bias, mean, var, eps):
    onnx = _modules()[0]
    from onnx import helper, numpy_helper

    elem = helper.np_dtype_to_tensor_dtype(np.dtype(weight.dtype))
    inits = [numpy_helper.from_array(np.ascontiguousarray(a), name)
             for a, name in zip((weight, bias, mean, var), ("scale", "B", "input_mean", "input_var"))]
    node = helper.make_node("BatchNormalization", ["X", "scale", "B", "input_mean", "input_var"], ["Y"],
                            epsilon=float(eps), training_mode=0)
    graph = helper.make_graph([node], "fastbn_bench_batch_norm",
                              [helper.make_tensor_value_info("X", elem, list(shape))],
                              [helper.make_tensor_value_info("Y", elem, list(shape))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model.SerializeToString()


def session(shape, weight, bias, mean, var, eps, threads):
    """An InferenceSession of one BatchNormalization node for inputs of ``shape`` and the
    parameters' dtype, on ``threads`` intra-op threads."""
    _, ort, why = _modules()
    if why:
        raise ImportError(why)
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(_model(shape, weight, bias, mean, var, eps), options,
                                providers=["CPUExecutionProvider"])


def bound_eval(x, out, weight, bias, running_mean, running_var, eps, threads):
    """A call that runs onnxruntime's eval batch norm of ``x`` into ``out`` (both C-contiguous,
    same shape and dtype, kept alive by the call), bound once by their data pointers; it returns
    ``out``."""
    if not (x.flags.c_contiguous and out.flags.c_contiguous and x.shape == out.shape and x.dtype == out.dtype):
        raise ValueError(f"x and out must be C-contiguous arrays of one shape and dtype, got {x.shape} {x.dtype} "
                         f"and {out.shape} {out.dtype}")
    sess = session(x.shape, weight.astype(x.dtype), bias.astype(x.dtype), running_mean.astype(x.dtype),
                   running_var.astype(x.dtype), eps, threads)
    binding = sess.io_binding()
    binding.bind_input("X", "cpu", 0, x.dtype, list(x.shape), x.ctypes.data)
    binding.bind_output("Y", "cpu", 0, out.dtype, list(out.shape), out.ctypes.data)
    run_with_iobinding = sess.run_with_iobinding

    def run():
        run_with_iobinding(binding)
        return out
    run.keep = (x, out, sess, binding)  # the bound memory and the session live as long as the call
    return run
