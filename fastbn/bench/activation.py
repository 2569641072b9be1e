"""``fastbn bench --relu``: the fused ReLU against the same call without it.

On each shape, float32, fastbn's training forward, eval forward, training backward and eval
backward are timed with ``activation=None`` and ``activation="relu"`` in interleaved rounds
(fastbn.bench.timing); the backward through ReLU both ways: ``bias=`` (the mask recomputed from
x) and ``output=`` (read from the forward's output, one more array: shown only).  The times are
medians; the ratio ``bias=/plain`` is the median of the rounds' ratios (timing.paired_ratio).  Issue 14's
targets, at 2 threads: each forward with ReLU within 5% of the same call without it, and the
training backward with ReLU (``bias=``) at most 1.1x the backward without it.  The eval backward
without ReLU reads only grad_output; with it the mask needs x or the output too, a third array, so
it is shown but not held to 1.1x.  (32, 512, 7, 7) fits in the caches: its backward is bound by
arithmetic, to which the mask adds a multiply-add, a compare and a select per element.
"""
import numpy as np

import fastbn

from . import impls
from .impls import Bench
from .timing import Contention, paired_ratio, print_footer, time_calls

SHAPES = ((64, 64, 56, 56), (32, 512, 7, 7))
THREADS = 2
DEFAULT_REPEAT = 41  # rounds: at 15 the (32, 512, 7, 7) backward's ratio read 0.98-1.14, at 41 1.045-1.063
# op: (the target's limit on relu time / plain time, or None: shown only)
OPS = {"train forward": 1.05, "eval forward": 1.05, "train backward": 1.10, "eval backward": None}
VARIANTS = ("plain", "relu (bias=)", "relu (output=)")


def make_benches(shape, rng):
    """{(op, variant): Bench} on one shape."""
    C = shape[1]
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    w = rng.uniform(0.5, 2.0, C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    benches = {}
    for variant, act in (("plain", None), ("relu (bias=)", "relu")):
        benches["train forward", variant] = Bench(lambda a=act: fastbn.batch_norm(x, rm, rv, w, b, True, activation=a))
        benches["eval forward", variant] = Bench(lambda a=act: fastbn.batch_norm(x, rm, rv, w, b, activation=a))
    for training in (True, False):
        op = "train backward" if training else "eval backward"
        y, mean, invstd = fastbn.batch_norm_forward(x, rm.copy(), rv.copy(), w, b, training, activation="relu")
        benches[op, "plain"] = Bench(lambda t=training, m=mean, s=invstd: fastbn.batch_norm_backward(dy, x, w, m, s, t))
        benches[op, "relu (bias=)"] = Bench(lambda t=training, m=mean, s=invstd: fastbn.batch_norm_backward(
            dy, x, w, m, s, t, activation="relu", bias=b))
        benches[op, "relu (output=)"] = Bench(lambda t=training, m=mean, s=invstd, y=y: fastbn.batch_norm_backward(
            dy, x, w, m, s, t, activation="relu", output=y))
    return benches


def run(threads, repeat, machine_info, shapes=SHAPES):
    """(rows, targets, info): per shape and op, the median seconds of each variant."""
    rows, targets = [], []
    with impls.thread_count(threads), Contention() as contention:
        for shape in shapes:
            benches = make_benches(shape, np.random.default_rng(0))
            timings = time_calls(benches, {k: repeat for k in benches})
            for op, limit in OPS.items():
                row = {"shape": list(shape), "op": op}
                row.update({v: timings[op, v].median for v in VARIANTS if (op, v) in timings})
                v = "relu (bias=)"  # the mask recomputed: output= reads one more array, shown only
                row["ratio"] = ratio = paired_ratio(timings[op, "plain"], timings[op, v])
                rows.append(row)
                if limit is None or threads != THREADS:
                    continue
                targets.append({"what": f"{shape} {op}, {v} <= {limit}x plain", "value": ratio, "met": ratio <= limit})
        info = machine_info(None, fastbn.get_num_threads())
    info["contention_cores"] = contention.cores
    return rows, targets, info


def print_report(rows, targets, info, out):
    print(f"fastbn bench --relu: float32 | {info.get('cpu', '?')} | {info.get('threads', '?')} threads", file=out)
    print(f"{'shape':18s} {'op':15s}" + "".join(f"{v + ' ms':>18s}" for v in VARIANTS) + f"{'bias=/plain':>13s}",
          file=out)
    for r in rows:
        cells = "".join(f"{r[v] * 1e3:>18.3f}" if v in r else f"{'-':>18s}" for v in VARIANTS)
        print(f"{str(tuple(r['shape'])):18s} {r['op']:15s}{cells}{r['ratio']:>12.3f}x", file=out)
    print("output=: the mask read from the forward's output, one more array than bias= (recomputed from x), so\n"
          "shown but not a target.  eval backward: without ReLU it reads grad_output only; the mask needs x or the\n"
          "output too, so it cannot stay within 1.1x and is not a target.", file=out)
    print_footer(info, targets, "issue 14 item 1", out, 3)
