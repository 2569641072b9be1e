"""``fastbn bench --half``: half-precision inputs against float32, in bytes moved per second.

The same (64, 64, 56, 56) values as float32, float16 and (where ml_dtypes imports) bfloat16, with
float32 parameters, through fastbn's training forward, eval forward and backward, timed in
interleaved rounds (fastbn.bench.timing).  GB/s counts the bytes the operation must move at the
input's own width (forward: read x, write y; backward: read dy and x, write dx): the kernels read
and write half elements in place (fastbn/_simd.h), so half the bytes of float32; issue 14's target
is "comparable" speed in bytes moved.
"""
import numpy as np

import fastbn

from . import impls
from .impls import Bench
from .timing import Contention, print_footer, time_calls

SHAPE = (64, 64, 56, 56)
THREADS = 2
DEFAULT_REPEAT = 11
OPS = {"train forward": 2, "eval forward": 2, "backward": 3}  # arrays of the input's size moved


def dtypes():
    """{name: dtype} of the widths to compare: float32, float16, and bfloat16 where ml_dtypes imports."""
    out = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}
    try:
        import ml_dtypes

        out["bfloat16"] = np.dtype(ml_dtypes.bfloat16)
    except ImportError:
        pass
    return out


def make_benches(rng):
    C = SHAPE[1]
    x32 = rng.standard_normal(SHAPE, dtype=np.float32)
    g32 = rng.standard_normal(SHAPE, dtype=np.float32)
    w, b = np.ones(C, np.float32), np.zeros(C, np.float32)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    benches = {}
    for name, dt in dtypes().items():
        x, g = x32.astype(dt), g32.astype(dt)
        _, mean, invstd = fastbn.batch_norm_forward(x, None, None, w, b, training=True)
        benches[name, "train forward"] = Bench(lambda x=x: fastbn.batch_norm(x, rm, rv, w, b, training=True))
        benches[name, "eval forward"] = Bench(lambda x=x: fastbn.batch_norm(x, rm, rv, w, b))
        benches[name, "backward"] = Bench(lambda x=x, g=g, m=mean, s=invstd: fastbn.batch_norm_backward(g, x, w, m, s))
    return benches


def run(threads, repeat, machine_info):
    """(rows, info): per (dtype, op), the median seconds and GB/s."""
    with impls.thread_count(threads), Contention() as contention:
        benches = make_benches(np.random.default_rng(0))
        timings = time_calls(benches, {k: repeat for k in benches})
        info = machine_info(None, fastbn.get_num_threads())
    info["contention_cores"] = contention.cores
    rows = []
    for (name, op), t in timings.items():
        nbytes = OPS[op] * int(np.prod(SHAPE)) * np.dtype(dtypes()[name]).itemsize
        rows.append({"dtype": name, "op": op, "median_s": t.median, "gbps": nbytes / t.median / 1e9})
    return rows, info


def print_report(rows, info, out):
    print(f"fastbn bench --half: {SHAPE}, float32 parameters | {info.get('cpu', '?')} | "
          f"{info.get('threads', '?')} threads", file=out)
    names = list(dict.fromkeys(r["dtype"] for r in rows))
    print(f"{'op':15s}" + "".join(f"{n + ' ms':>14s}{'GB/s':>7s}" for n in names), file=out)
    by = {(r["dtype"], r["op"]): r for r in rows}
    for op in OPS:
        print(f"{op:15s}" + "".join(f"{by[n, op]['median_s'] * 1e3:>14.2f}{by[n, op]['gbps']:>7.1f}" for n in names),
              file=out)
    for n in names[1:]:
        share = ", ".join(f"{op} {by[n, op]['gbps'] / by[names[0], op]['gbps']:.2f}" for op in OPS)
        print(f"{n} GB/s over float32's: {share}", file=out)
    print("GB/s: the bytes the operation must move at the input's width over the median time.  Half elements\n"
          "are read and written in place and computed in float32 (converted inside the vector loops with\n"
          "AVX-512F, else staged through float buffers); a ratio below 1 is time spent on per-element work\n"
          "(conversions, float64 statistics) rather than on memory.", file=out)
    print_footer(info, [], "", out)
