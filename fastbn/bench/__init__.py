"""fastbn's benchmark harness: ``fastbn bench`` and the pytest-benchmark suite in ``bench/``.

Tooling beside the library: nothing in fastbn imports this package except the command line
(fastbn/__main__.py: ``fastbn bench`` and ``fastbn info``'s self-check, which uses the reference).

    cases.py      what is measured: the operations, shapes, targets, and Problem (the inputs)
    reference.py  batch norm in plain NumPy, written once: the float64 reference (fastbn info's
                  self-check, the bench's result check) and, in the input's dtype, "naive NumPy"
    native.py     the compiled entry points the bench calls directly (the floor kernel, the bare
                  eval kernel): their one import site
    onnxrt.py     onnxruntime's BatchNormalization with io_binding (optional, imported lazily)
    impls.py      make_bench(op, impl, problem): fastbn, fastbn_out, numpy, torch, onnxruntime,
                  copy, floor; thread_count; the result check
    timing.py     interleaved rounds of samples; single-call latencies; contention on the machine
    report.py     the table's rows: measure, targets, print, plot
    latency.py    ``fastbn bench --latency``: per-call eval forward against onnxruntime
    pipeline.py   ``fastbn bench --pipeline``: a training step in a loop next to other work
    cli.py        the options of ``fastbn bench`` and which report they run

    __main__ ─> cli ─┬─> report ───┐
                     ├─> latency ──┼─> impls ─> native, onnxrt, reference, cases
                     └─> pipeline ─┘      └───> timing
"""
