"""fastbn [info|bench]: what this build is, a self-check, and the benchmark report."""
import argparse
import os
import re
import sys

import numpy as np

import fastbn

from . import _alloc, _kernels, _machine, _openmp
from ._backends import cpu as _cpu
from .bench import cli as bench_cli
from .bench import reference


def self_check(out=None):
    """Run every kernel on every work-splitting path against the float64 reference; True if all pass."""
    out = out or sys.stdout
    rng = np.random.default_rng(0)
    # (shape, work-splitting path, streaming stores, unit); unit=97: 97-element ranges, 97-row
    # column blocks; unit=0, the kernels' own split: ranges long enough for the second pass to walk
    # back over several 512 KiB pieces, and slices of a wide batch in several 1024-column chunks
    cases = [((6, 4, 5, 7), "auto", 0, 97), ((6, 4, 5, 7), "ranges", 1, 97), ((6, 3, 33, 17), "ranges", 1, 97),
             ((257, 19), "columns", 1, 97), ((300, 5), "columns", 0, 97), ((3, 1, 1000), "ranges", 0, 97),
             ((300, 2, 3), "columns", 1, 97), ((4, 5, 13331), "ranges", 0, 0), ((5, 3000), "auto", 0, 0),
             ((9, 700, 3), "slices", 1, 4)]
    ok = True
    for shape, path, stream, unit in cases:
        for dtype, tol in ((np.float32, 1e-5), (np.float64, 1e-12)):
            x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
            C = shape[1]
            w, b = rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)
            dy = rng.standard_normal(shape).astype(dtype)
            rm, rv = rng.standard_normal(C).astype(dtype), rng.uniform(0.5, 2, C).astype(dtype)
            saved = dict(_cpu.tuning)
            _cpu.tuning.update(path=path, unit=unit, stream=stream)
            try:
                rm1, rv1 = rm.copy(), rv.copy()
                y, mean, invstd = fastbn.batch_norm_forward(x, rm1, rv1, w, b, training=True, momentum=0.25)
                ye = fastbn.batch_norm(x, rm, rv, w, b, training=False)
                dx, gw, gb = fastbn.batch_norm_backward(dy, x, w, mean, invstd, training=True)
                yr = fastbn.batch_norm(x, None, None, w, b, training=True, activation="relu")
                dxr = fastbn.batch_norm_backward(dy, x, w, mean, invstd, training=True, activation="relu", bias=b)[0]
                halves = _half_results(x, dy, w, b, rm, rv) if dtype == np.float32 else {}
            finally:
                _cpu.tuning.update(saved)
            ref_rm, ref_rv = rm.astype(np.float64), rv.astype(np.float64)  # the reference updates them
            ref_ye = reference.forward_eval(x, w, b, ref_rm, ref_rv, 1e-5)
            ref_y = reference.forward_train(x, w, b, ref_rm, ref_rv, 0.25, 1e-5)[0]
            stats = reference.saved_stats(x, 1e-5)
            ref_dx, ref_gw, ref_gb = reference.backward(dy, x, w, *stats)
            passes = (yr > 0) | np.isnan(yr)  # ReLU's gradient mask, from fastbn's own forward
            checks = {
                "train forward": np.abs(y - ref_y).max(),
                "running stats": max(np.abs(rm1 - ref_rm).max(), np.abs(rv1 - ref_rv).max()),
                "eval forward": np.abs(ye - ref_ye).max(),
                "backward dx": np.abs(dx - ref_dx).max(),
                "backward dw": np.abs(gw - ref_gw).max() / max(1.0, np.abs(ref_gw).max()),
                "backward db": np.abs(gb - ref_gb).max() / max(1.0, np.abs(ref_gb).max()),
                "relu forward": np.abs(yr - np.maximum(ref_y, 0)).max(),
                "relu backward": np.abs(dxr - reference.backward(dy * passes, x, w, *stats)[0]).max(),
            }
            for name, (got, want, ulp) in halves.items():  # within ~1 ulp of the half type, plus rounding
                checks[name] = np.abs(got - want).max() / max(1.0, np.abs(want).max()) * tol / ulp
            ok &= _report(out, checks, tol, f"{str(shape):<15} {np.dtype(dtype).name:<8} path={path:<9} nt={stream} "
                          f"forwards, running stats, backward, ReLU{', half types' if halves else ''}")
    for shape in ((4, 6, 5, 7), (2, 4, 3000)):  # group, layer and instance norm: short rows, and rows of pieces
        for dtype, tol in ((np.float32, 1e-5), (np.float64, 1e-12)):
            ok &= _report(out, _norm_checks(rng, shape, dtype), tol,
                          f"{str(shape):<15} {np.dtype(dtype).name:<8} group, layer and instance norm, forward and backward")
    return ok


def _report(out, checks, tol, what):
    """Print one self-check line; True if every error is within tol."""
    failed = [name for name, err in checks.items() if not err <= tol]
    print(f"  {'FAIL' if failed else 'pass'}  {what}: worst error {max(checks.values()):.1e} (tolerance {tol:.0e})"
          + (f"  failed: {', '.join(failed)}" if failed else ""), file=out)
    return not failed


def _norm_checks(rng, shape, dtype):
    """{check: error} of group (2 groups), layer (over the last axis) and instance norm against
    batch norm's float64 reference on the (1, rows, row length) view that each normalizes, with
    the affine applied elementwise after."""
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    C, L = shape[1], shape[-1]
    wc, bc = rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)
    wl, bl = rng.standard_normal(L).astype(dtype), rng.standard_normal(L).astype(dtype)
    per_channel = (1, C) + (1,) * (len(shape) - 2)
    runs = {
        "group": (lambda: fastbn.group_norm_forward(x, 2, wc, bc),
                  lambda m, s: fastbn.group_norm_backward(dy, x, 2, wc, m, s), shape[0] * 2, wc, bc, per_channel),
        "layer": (lambda: fastbn.layer_norm_forward(x, L, wl, bl),
                  lambda m, s: fastbn.layer_norm_backward(dy, x, L, wl, m, s), x.size // L, wl, bl, (L,)),
        "instance": (lambda: fastbn.instance_norm_forward(x, weight=wc, bias=bc),
                     lambda m, s: fastbn.instance_norm_backward(dy, x, wc, m, s), shape[0] * C, wc, bc, per_channel),
    }
    checks = {}
    for kind, (forward, backward, rows, w, b, wshape) in runs.items():
        y, m, s = forward()
        dx, gw, gb = backward(m, s)
        xr = x.astype(np.float64).reshape(1, rows, -1)
        mean, var = reference.batch_stats(xr)
        one, zero = np.ones(rows), np.zeros(rows)
        xhat = reference.normalize(xr, one, zero, mean, var, 1e-5).reshape(shape)
        W, B = w.astype(np.float64).reshape(wshape), b.astype(np.float64).reshape(wshape)
        g = (dy * W).reshape(1, rows, -1)
        ref_dx = reference.backward(g, xr, one, mean, 1 / np.sqrt(var + 1e-5))[0].reshape(shape)
        over = tuple(range(len(shape) - 1)) if kind == "layer" else reference.axes(x)  # the weight's sums
        ref_gw, ref_gb = (dy * xhat).sum(axis=over), dy.astype(np.float64).sum(axis=over)
        checks[f"{kind} forward"] = np.abs(y - (xhat * W + B)).max()
        checks[f"{kind} backward dx"] = np.abs(dx - ref_dx).max()
        checks[f"{kind} backward dw"] = np.abs(gw - ref_gw).max() / max(1.0, np.abs(ref_gw).max())
        checks[f"{kind} backward db"] = np.abs(gb - ref_gb).max() / max(1.0, np.abs(ref_gb).max())
    return checks


def _half_results(x, dy, w, b, rm, rv):
    """{check: (fastbn's result on the half types, the float64 reference of the upcast input, the
    type's unit in the last place at 1)} for a float32 case: train and eval forward, backward."""
    halves = {"float16": (np.float16, 2.0 ** -10)}
    try:
        import ml_dtypes

        halves["bfloat16"] = (ml_dtypes.bfloat16, 2.0 ** -7)
    except ImportError:
        pass
    out = {}
    for name, (dt, ulp) in halves.items():
        xh, dyh = x.astype(dt), dy.astype(dt)
        x64, dy64 = xh.astype(np.float64), dyh.astype(np.float64)
        yh, mean, invstd = fastbn.batch_norm_forward(xh, None, None, w, b, training=True)
        ye = fastbn.batch_norm(xh, rm, rv, w, b, training=False)
        dxh = fastbn.batch_norm_backward(dyh, xh, w, mean, invstd, training=True)[0]
        stats = reference.saved_stats(x64, 1e-5)
        ref_y = reference.forward_train(x64, w, b, None, None, 0.1, 1e-5)[0]
        out[f"{name} train forward"] = (yh.astype(np.float64), ref_y, 2 * ulp)
        out[f"{name} eval forward"] = (ye.astype(np.float64), reference.forward_eval(x64, w, b, rm, rv, 1e-5), 2 * ulp)
        out[f"{name} backward dx"] = (dxh.astype(np.float64), reference.backward(dy64, x64, w, *stats)[0], 2 * ulp)
    return out


def build_flags():
    """{module name: what it was built with} for each compiled module (setup.py's BUILD_FLAGS)."""
    return {name: getattr(module, "BUILD_FLAGS", "unknown (the module does not say: built before fastbn reported it)")
            for name, module in (("fastbn._openmp", _openmp), ("fastbn._kernels", _kernels))}


def _loud(out, *lines):
    bar = "!" * 78
    print("\n".join([bar, *lines, bar]), file=out)


def _serial_reason(flags):
    m = re.search(r"openmp: OFF \((.*?)\); compiler:", flags)
    return m.group(1) if m else "not recorded by this build"


def info(out=None):
    out = out or sys.stdout
    print(f"fastbn {fastbn.__version__}", file=out)
    print(f"  numpy {np.__version__}, python {sys.version.split()[0]}", file=out)
    print(f"  OpenMP: {'on' if _openmp.OPENMP else 'OFF (serial build)'}; threads in effect: {fastbn.get_num_threads()}", file=out)
    flags = build_flags()
    mixed = len(set(flags.values())) > 1
    if not mixed:
        print(f"  build of {' and '.join(flags)}: {flags['fastbn._openmp']}", file=out)
    else:
        for name, text in flags.items():
            print(f"  build of {name}: {text}", file=out)
    print(f"  backends: cpu (NumPy) available; cuda (CuPy) {_cuda_status()}", file=out)
    for line in machine_lines():
        print(f"  {line}", file=out)
    if mixed:
        _loud(out, "fastbn: its compiled modules come from DIFFERENT builds (see 'build of' above): rebuild them all,",
              "  pip install --force-reinstall --no-deps .  (or in a source tree: python setup.py build_ext --inplace --force)")
    if not _openmp.OPENMP:
        _loud(out, "fastbn was built WITHOUT OpenMP (a serial build): its kernels run on one thread.",
              f"  why: {_serial_reason(flags['fastbn._openmp'])}.",
              "  For threads: a compiler with OpenMP (on macOS `brew install libomp`), then reinstall",
              "  without FASTBN_DISABLE_OPENMP (FASTBN_REQUIRE_OPENMP=1 makes a failed probe an error).")
    print("self-check against a float64 NumPy reference:", file=out)
    ok = self_check(out)
    print(f"self-check: {'PASSED' if ok else 'FAILED'}", file=out)
    return 0 if ok and not mixed else 1


def _size(n):
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            value = n / (1 << shift)
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} B"


def machine_lines():
    """What fastbn read about this machine at import, the thresholds it derived, the allocator."""
    m = _machine.CACHES
    src = m["source"]
    sources = sorted(set(src.values()))
    shared = f", shared by {m['l3_shared_by']} CPUs" if m["l3_shared_by"] else ""
    l3 = f"L3 {_size(m['l3'])}{shared}" + (f", {m['l3_instances']} instances" if m["l3_instances"] > 1 else "")
    t = _kernels.thresholds()
    a = _alloc.memory_stats()
    alloc = ("NumPy's (FASTBN_ALLOCATOR=system)" if a["allocator"] == "system" else
             f"fastbn's caching allocator{' in debug mode' if a['allocator'] == 'debug' else ''} for outputs "
             f"from {_size(a['min_bytes'])} (cache: "
             f"up to {_alloc.MULTIPLE}x the largest recent output, at most {_size(a['max_cached'])})")
    return [
        f"machine: {m['cores']} usable cores; L1d {_size(m['l1d'])}, L2 {_size(m['l2'])} per core, {l3} "
        f"(from {', '.join(sources)}); L3 the kernels count on: {_size(m['l3_effective'])}",
        f"kernel thresholds: streaming stores above {_size(t['stream_bytes'])} touched by a call "
        f"({_kernels.STREAM_L3_RATIO:g}x that L3; group, layer and instance norm above "
        f"{_size(_kernels.norm_stream_threshold())}), second passes in pieces of {_size(t['piece_bytes'])}",
        f"allocator: {alloc}",
    ]


def _cuda_status():
    try:
        from ._backends import cuda as _cupy_backend

        return _cupy_backend.status()
    except ImportError as exc:  # the backend module itself is optional
        return f"unavailable ({exc})"


def prog_name(argv0):
    """The name the command line goes by in its usage and messages, from ``argv0`` (sys.argv[0]
    when run from a shell, None when main() is called with its own argv): the console script's
    basename as invoked (normally ``fastbn``); ``fastbn`` for ``python -m fastbn`` (argv[0] is
    then this file's path, no command a user could type) and for a call from Python code (whose
    argv[0] names the calling program, pytest's for instance, not this one)."""
    name = os.path.basename(argv0 or "")
    if name.lower().endswith(".exe"):
        name = name[:-4]
    return "fastbn" if not name or name.endswith(".py") or name == "-c" else name


def main(argv=None):
    parser = argparse.ArgumentParser(prog=prog_name(sys.argv[0] if argv is None else None), description=__doc__)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("info", help="build facts and a self-check of every kernel (the default)")
    bench = sub.add_parser("bench", help="time fastbn against a memory copy, NumPy, PyTorch and onnxruntime")
    bench_cli.add_arguments(bench)
    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench_cli.run(args)
    return info()


if __name__ == "__main__":
    sys.exit(main())
