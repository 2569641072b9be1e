"""Thread control (set/get_num_threads, OMP_NUM_THREADS, threadpoolctl) and thread safety."""
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from threadpoolctl import ThreadpoolController, threadpool_info, threadpool_limits

import fastbn
from fastbn import _kernels, _openmp
from fastbn._backends import cpu as _cpu
from _helpers import assert_close, random_input, random_params, ref_backward, ref_forward

# These test the OpenMP thread count; a serial build (no OpenMP in the compiler) has one thread.
needs_openmp = pytest.mark.skipif(not _openmp.OPENMP, reason="fastbn was built without OpenMP: serial kernels")

# The kernels cut a call into one task per 16384 elements (at most PLAN_WIDTH), so these shapes
# (>= 32768 elements) are several tasks, which the `threads` fixture lets run on every thread.
BIG = [
    ("ranges", 0, (8, 4, 1024)),     # two ranges
    ("auto", 0, (16, 1, 4096)),      # C=1: ranges split inside the channel
    ("ranges", 97, (5, 3, 2203)),    # forced small ranges, odd sizes
    ("auto", 0, (6, 5, 13331)),      # every task's range is several pieces of the backwards
                                     # second pass (512 KiB), cut inside rows
    ("auto", 0, (4096, 64)),         # spatial size 1: columns, 16 row blocks, one per task
    ("columns", 700, (3000, 33)),    # columns, five row blocks, a task each, a short last block
                                     # and a SIMD tail
    ("auto", 0, (8, 4100)),          # 512 times as wide as tall: slices of 2064 and 2036 columns,
                                     # in chunks of 1024, 1024, 16 and 1024, 1012
    ("slices", 5, (12, 1100, 3)),    # slices of 550 channels of 3 columns, each in two chunks of at
                                     # most 341 channels, 5-row blocks (5, 5, 2)
    ("auto", 0, (8, 66000)),         # wider than MAX_COLUMNS: 16 slices of 4125 columns, 5 chunks each
    ("auto", 0, (200, 700, 10)),     # 16 slices of 43 or 44 channels of 10 columns, a block each
    ("auto", 0, (32, 34, 31)),       # S = 31: 17 channels a task, chunks of 33 channels
    ("slices", 0, (4, 9, 1024)),     # S = SLICE_CHUNK: chunks of one channel, 1024 columns
    ("slices", 0, (4096, 8)),        # 8 channels: one slice (at least 16 channels a slice)
]
STREAM = {"ranges": 1, "columns": 1, "slices": 1}  # also force streaming stores on these
BIG_IDS = [f"{p}-{'x'.join(map(str, s))}" for p, _, s in BIG]


def _run_all(x, dy, w, b, rm, rv):
    rm, rv = rm.copy(), rv.copy()
    y, mean, invstd = fastbn.batch_norm_forward(x, rm, rv, w, b, training=True)
    ye = fastbn.batch_norm(x, rm, rv, w, b, training=False)
    dx, gw, gb = fastbn.batch_norm_backward(dy, x, w, mean, invstd)
    dxe = fastbn.batch_norm_backward(dy, x, w, rm.astype(np.float64), 1 / np.sqrt(rv.astype(np.float64) + 1e-5),
                                     training=False)[0]
    return dict(y=y, mean=mean, invstd=invstd, rm=rm, rv=rv, ye=ye, dx=dx, gw=gw, gb=gb, dxe=dxe)


@needs_openmp
def test_set_and_get_num_threads(threads):
    threads(1)
    assert fastbn.get_num_threads() == 1
    threads(2)
    assert fastbn.get_num_threads() == 2
    for bad in (0, -3, 1025, 2**40):
        with pytest.raises(ValueError, match=rf"set_num_threads\({bad}\) is invalid: expected a number of threads from 1 to 1024"):
            fastbn.set_num_threads(bad)
        assert fastbn.get_num_threads() == 2
    for bad in ("4", 2.9, 0.5, True, None):  # a float is not silently truncated
        with pytest.raises(TypeError, match="set_num_threads expects an integer number of threads"):
            fastbn.set_num_threads(bad)
        assert fastbn.get_num_threads() == 2
    fastbn.set_num_threads(np.int64(1))
    assert fastbn.get_num_threads() == 1


@needs_openmp
def test_a_thread_count_read_back_can_be_set_again():
    """With OMP_NUM_THREADS above the 1024 cap, get_num_threads() still round-trips (the benchmark
    restores the count it found)."""
    code = "import fastbn; n = fastbn.get_num_threads(); fastbn.set_num_threads(n); print(n)"
    assert _fastbn_subprocess(code, OMP_NUM_THREADS="2000") == "2000"


@needs_openmp
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("path,unit,shape", BIG, ids=BIG_IDS)
def test_results_are_the_same_bits_on_any_thread_count(rng, threads, force_path, path, unit, shape, dtype):
    """A call's tasks, and where partial sums are cut and merged, depend on the shape alone: 1, 2,
    3 or 4 threads (whichever thread runs which task) give the same bits."""
    force_path(path, unit, STREAM.get(path))
    x = random_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w, b, rm, rv = random_params(rng, shape[1], dtype)
    threads(1)
    one = _run_all(x, dy, w, b, rm, rv)
    for n in (2, 3, 4):
        threads(n)
        for _ in range(2):
            two = _run_all(x, dy, w, b, rm, rv)
            for key in one:
                np.testing.assert_array_equal(two[key].view(np.uint8), one[key].view(np.uint8), err_msg=f"{key}, {n} threads")
    # and they are right
    assert_close(two["y"], ref_forward(x, w, b)[0], dtype)
    ref_dx = ref_backward(dy, x, w)[0]
    assert_close(two["dx"], ref_dx, tol=1e-4 if dtype == np.float32 else 1e-10)


def test_helpers_run_in_the_callers_floating_point_mode(threads, force_path):
    """torch.set_flush_denormal(True) sets denormals-are-zero on the calling thread only; the
    pool's helpers adopt the caller's mode for each task, so the result does not depend on which
    thread read which subnormal input (before, helpers read them as they are: 20480 of the 262144
    outputs below were not 0)."""
    torch = pytest.importorskip("torch", reason="sets the calling thread's FP mode (pip install torch)")
    threads(2)
    force_path("ranges", 4096)
    x = np.full((64, 1, 4096), 1e-40, np.float32)  # subnormal inputs
    w, b = np.ones(1, np.float32), np.zeros(1, np.float32)
    fastbn.batch_norm(x, None, None, w, b, training=True)  # starts the helpers
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        two = [fastbn.batch_norm(x, None, None, w, b, training=True) for _ in range(5)]
        fastbn.set_num_threads(1)
        one = fastbn.batch_norm(x, None, None, w, b, training=True)
    finally:
        torch.set_flush_denormal(False)
    for y in two:
        np.testing.assert_array_equal(y, one)


@needs_openmp
@pytest.mark.parametrize("training", [True, False])
def test_slices_in_place_on_two_threads(rng, threads, training):
    """A wide batch (SLICES on two threads) written over its own input, forward and backward."""
    threads(2)
    x = random_input(rng, (8, 4100), np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    w, b, rm, rv = random_params(rng, x.shape[1], np.float32)
    want = fastbn.batch_norm(x, rm.copy(), rv.copy(), w, b, training=training)
    xi = x.copy()
    got = fastbn.batch_norm(xi, rm.copy(), rv.copy(), w, b, training=training, out=xi)
    assert got is xi
    np.testing.assert_array_equal(got, want)
    _, mean, invstd = fastbn.batch_norm_forward(x, None, None, w, b, training=True)
    want_dx = fastbn.batch_norm_backward(dy, x, w, mean, invstd, training=training)[0]
    dyi = dy.copy()
    got_dx = fastbn.batch_norm_backward(dyi, x, w, mean, invstd, training=training, out=dyi)[0]
    assert got_dx is dyi
    np.testing.assert_array_equal(got_dx, want_dx)


@needs_openmp
@pytest.mark.parametrize("vector,training", [("running_mean", False), ("running_var", False), ("weight", False),
                                             ("bias", False), ("weight", True), ("bias", True)])
def test_out_overlapping_a_channel_vector_on_two_threads(rng, threads, vector, training):
    """An out= that holds a per-channel vector, shifted by half the channels, on a wide batch
    (SLICES: each thread reads its channels' vectors while the other writes its outputs): the
    vector is read as it was before the call, every time.  (Found by a review: 2-10% of such calls
    were wrong.)  Training refuses an out over a running buffer, so those cases are eval only."""
    threads(2)
    N, C = 4, 16384
    x = random_input(rng, (N, C), np.float32)
    w, b, rm, rv = random_params(rng, C, np.float32)
    vectors = dict(running_mean=rm, running_var=rv, weight=w, bias=b)
    want = fastbn.batch_norm(x, rm.copy(), rv.copy(), w, b, training=training)
    for _ in range(20):
        buf = np.empty(N * C + C // 2, np.float32)
        out, inside = buf[:N * C].reshape(N, C), buf[C // 2:C // 2 + C]
        inside[...] = vectors[vector]
        args = dict(vectors, **{vector: inside})
        got = fastbn.batch_norm(x, args["running_mean"].copy() if training else args["running_mean"],
                                args["running_var"].copy() if training else args["running_var"],
                                args["weight"], args["bias"], training=training, out=out)
        np.testing.assert_array_equal(got, want)


@needs_openmp
@pytest.mark.parametrize("vector", ["weight", "save_mean", "save_invstd"])
def test_backward_out_overlapping_a_channel_vector_on_two_threads(rng, threads, vector):
    """The backward's out= over one of the vectors it reads, on a wide batch (SLICES), as above."""
    threads(2)
    N, C = 4, 16384
    x = random_input(rng, (N, C), np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    w = random_params(rng, C, np.float32)[0]
    _, mean, invstd = fastbn.batch_norm_forward(x, None, None, w, None, training=True)
    want = fastbn.batch_norm_backward(dy, x, w, mean, invstd)[0]
    vectors = dict(weight=w, save_mean=mean, save_invstd=invstd)
    for _ in range(20):
        dtype = np.float64 if vector.startswith("save") else np.float32
        buf = np.empty(2 * N * C + C, dtype)  # room for out (float32) and a shifted vector in one buffer
        out = buf.view(np.uint8)[:N * C * 4].view(np.float32).reshape(N, C)
        inside = buf[C // 4:C // 4 + C]
        inside[...] = vectors[vector]
        args = dict(vectors, **{vector: inside})
        got = fastbn.batch_norm_backward(dy, x, args["weight"], args["save_mean"], args["save_invstd"], out=out)[0]
        np.testing.assert_array_equal(got, want)


@needs_openmp
@pytest.mark.parametrize("path,shape", [("auto", (1, 16384)), ("auto", (3, 9000)), ("ranges", (2, 9000, 2)),
                                        ("columns", (2, 9000, 2))])
def test_eval_statistics_of_many_channels_on_two_threads(rng, threads, force_path, path, shape):
    """From 8192 channels on, an evaluation forward shares the statistics' square roots between the
    threads (SLICES: each thread its own channels, even where x alone would take one thread): the
    same statistics and output, to the bit, as one thread and as eval_stats."""
    force_path(path)
    x = random_input(rng, shape, np.float32)
    w, b, rm, rv = random_params(rng, shape[1], np.float32)
    threads(1)
    one = fastbn.batch_norm_forward(x, rm, rv, w, b)
    threads(2)
    two = fastbn.batch_norm_forward(x, rm, rv, w, b)
    for got, want in zip(two, one):
        np.testing.assert_array_equal(got, want)
    want_mean, want_invstd = _cpu.eval_stats(rm, rv, 1e-5)
    np.testing.assert_array_equal(two[1], want_mean)
    np.testing.assert_array_equal(two[2], want_invstd)


def test_small_thread_stacks_are_enough():
    """The kernels keep no large scratch on the stack: a wide batch (SLICES) in a Python thread of
    48 KiB stack, with OpenMP workers of 48 KiB, as with the default sizes.  (SLICES kept 49 KiB
    of moments on the stack at first, and crashed here.)  In a subprocess: a crash is a failure,
    not the end of the test run."""
    code = ("import threading, numpy as np, fastbn\n"
            "x = np.random.default_rng(0).standard_normal((8, 8192)).astype(np.float32)\n"
            "def work():\n"
            "    y, m, i = fastbn.batch_norm_forward(x, None, None, training=True)\n"
            "    dx = fastbn.batch_norm_backward(x, x, None, m, i)[0]\n"
            "    print(float(abs(y.mean(axis=0)).max()) < 1e-5, dx.shape)\n"
            "threading.stack_size(48 * 1024)\n"
            "t = threading.Thread(target=work)\n"
            "t.start()\n"
            "t.join()\n")
    assert _fastbn_subprocess(code, OMP_STACKSIZE="48K") == "True (8, 8192)"


def _fastbn_subprocess(code, **env):
    # Import the same fastbn as this process (installed or built in place), from a working
    # directory where `python -c` cannot pick up an unbuilt source tree instead.
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastbn.__file__)))
    environ = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    res = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(root))
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


@needs_openmp
@pytest.mark.parametrize("n", [1, 3])
def test_omp_num_threads_is_honoured(n):
    code = ("import numpy as np, fastbn; print(fastbn.get_num_threads());"
            "x = np.random.default_rng(0).standard_normal((8, 4, 2048)).astype(np.float32);"
            "y = fastbn.batch_norm(x, None, None, training=True); print(float(abs(y.mean(axis=(0, 2))).max()))")
    out = _fastbn_subprocess(code, OMP_NUM_THREADS=str(n)).split()
    assert int(out[0]) == n
    assert float(out[1]) < 1e-6


@needs_openmp
def test_threadpool_limits(rng, threads):
    threads(2)
    x = random_input(rng, (8, 4, 1024), np.float32)
    outside = fastbn.batch_norm(x, None, None, training=True)
    with threadpool_limits(limits=1):
        assert fastbn.get_num_threads() == 1
        inside = fastbn.batch_norm(x, None, None, training=True)
    assert fastbn.get_num_threads() == 2
    np.testing.assert_array_equal(inside, outside)
    with threadpool_limits(limits=1, user_api="openmp"):
        assert fastbn.get_num_threads() == 1
    with threadpool_limits(limits=1, user_api="blas"):  # BLAS limits do not steer fastbn
        assert fastbn.get_num_threads() == 2
    assert fastbn.get_num_threads() == 2


@needs_openmp
def test_fastbn_openmp_runtime_is_listed_by_threadpoolctl(threads):
    threads(2)
    info = threadpool_info()
    listed = {os.path.realpath(d["filepath"]) for d in info if d["user_api"] == "openmp"}
    assert listed, f"no OpenMP library in threadpool_info(): {info}"
    steering = []
    for lib in ThreadpoolController().lib_controllers:
        if lib.user_api != "openmp":
            continue
        before = lib.num_threads
        lib.set_num_threads(1)
        try:
            if fastbn.get_num_threads() == 1:
                steering.append(os.path.realpath(lib.filepath))
        finally:
            lib.set_num_threads(before)
    assert fastbn.get_num_threads() == 2
    # the OpenMP runtime whose limit steers fastbn is one threadpool_info() reports
    assert steering and set(steering) <= listed


def test_concurrent_calls_match_serial_calls(rng):
    cases = []
    for i, shape in enumerate([(8, 4, 1024), (16, 1, 4096), (4096, 16), (6, 3, 17), (33, 5), (2, 2, 3, 4, 5)] * 2):
        dtype = np.float32 if i % 2 == 0 else np.float64
        x = random_input(rng, shape, dtype, offset=i)
        dy = rng.standard_normal(shape).astype(dtype)
        cases.append((x, dy) + random_params(rng, shape[1], dtype))
    copies = [[a.copy() for a in case] for case in cases]
    serial = [_run_all(*case) for case in cases]
    for _ in range(3):
        with ThreadPoolExecutor(max_workers=4) as pool:
            parallel = list(pool.map(lambda case: _run_all(*case), cases))
        for case, s, p in zip(cases, serial, parallel):
            tol = 64 * np.finfo(case[0].dtype).eps
            for key in s:
                assert_close(p[key], s[key], tol=tol)
    for case, saved in zip(cases, copies):
        for a, c in zip(case, saved):
            np.testing.assert_array_equal(a, c)


def test_concurrent_layers(rng):
    """Several layers trained at once from several Python threads, each like a serial run."""
    shapes = [(4, 3, 8), (6, 3), (2, 3, 4, 4), (3, 3, 5)]
    data = [[random_input(rng, s, np.float64, offset=k) for k in range(4)] for s in shapes]

    def train(inputs):
        bn = fastbn.BatchNorm1d(3, dtype=np.float64) if inputs[0].ndim < 4 else fastbn.BatchNorm2d(3, dtype=np.float64)
        outs = []
        for x in inputs:
            outs.append(bn(x))
            outs.append(bn.backward(np.ones_like(x) + x))
        return outs, bn.state_dict()

    serial = [train(d) for d in data]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(train, data))
    for (so, ss), (co, cs) in zip(serial, concurrent):
        for a, b in zip(so, co):
            assert_close(b, a, tol=1e-13)
        for k in ss:
            np.testing.assert_allclose(cs[k], ss[k], rtol=1e-13)


# ---------------------------------------------------------------- the thread pool (_pool.h)
_FORK_CHILD = """
import os, sys, numpy as np, fastbn
from fastbn import _kernels
fastbn.set_num_threads(2)
_kernels.thread_threshold(1)
x = np.random.default_rng(0).standard_normal((64, 8, 1024)).astype(np.float32)
want = fastbn.batch_norm(x, None, None, training=True)   # the parent's helpers start here
assert _kernels.pool_helpers() >= 1
pid = os.fork()
if pid == 0:
    ok = _kernels.pool_helpers() == 0                     # the child has none of the parent's
    y = fastbn.batch_norm(x, None, None, training=True)   # and starts its own
    ok = ok and _kernels.pool_helpers() >= 1 and np.array_equal(y, want)
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""


@needs_openmp
def test_a_forked_child_runs_fastbn():
    """After a multi-threaded call, a child made by os.fork() runs fastbn on threads of its own
    (libgomp's teams hung there: a child's first parallel region waited for the parent's threads)."""
    assert _fastbn_subprocess(_FORK_CHILD) == "0"


_FORK_POOL = """
import multiprocessing as mp, numpy as np, fastbn
from fastbn import _kernels

def work(seed):
    x = np.random.default_rng(seed).standard_normal((64, 8, 1024)).astype(np.float32)
    return fastbn.batch_norm(x, None, None, training=True).sum(dtype=np.float64), _kernels.pool_helpers()

if __name__ == "__main__":
    fastbn.set_num_threads(2)
    _kernels.thread_threshold(1)
    here = [work(s)[0] for s in range(4)]
    with mp.get_context("fork").Pool(2) as pool:
        there = pool.map(work, range(4))
    print(all(abs(a - b) == 0 for a, (b, _) in zip(here, there)), all(h >= 1 for _, h in there))
"""


@needs_openmp
def test_multiprocessing_fork_workers_run_fastbn(tmp_path):
    script = tmp_path / "fork_pool.py"
    script.write_text(_FORK_POOL)
    assert _fastbn_subprocess(f"exec(open({str(script)!r}).read())") == "True True"


@needs_openmp
def test_idle_helpers_sleep(rng, threads):
    """After a call, the helpers spin for a few microseconds and then sleep: they leave the cores
    to whatever runs next (another library's threads) instead of burning them."""
    threads(2)
    x = random_input(rng, (64, 8, 1024), np.float32)
    for _ in range(3):
        fastbn.batch_norm(x, None, None, training=True)
    assert _kernels.pool_helpers() >= 1
    cpu, wall = time.process_time(), time.perf_counter()
    time.sleep(0.3)
    used = time.process_time() - cpu
    assert used < 0.05 * (time.perf_counter() - wall), f"idle helpers used {used:.3f} s of CPU in 0.3 s"


@needs_openmp
def test_helpers_run_tasks_and_the_caller_never_needs_them(rng, threads):
    """Helpers take part in a call's tasks; with a helper that cannot keep up (here: a spin budget of
    zero, so each sleeps between calls and must be woken), the caller still finishes every call
    with the same bits."""
    threads(2)
    x = random_input(rng, (64, 8, 1024), np.float32)
    want = fastbn.batch_norm(x, None, None, training=True)
    before = _kernels.pool_counters()
    for _ in range(20):
        np.testing.assert_array_equal(fastbn.batch_norm(x, None, None, training=True), want)
    after = _kernels.pool_counters()
    assert after["jobs"] > before["jobs"]
    spin = _kernels.pool_spin_us()
    try:
        _kernels.pool_spin_us(0)
        for _ in range(20):
            np.testing.assert_array_equal(fastbn.batch_norm(x, None, None, training=True), want)
    finally:
        _kernels.pool_spin_us(spin)
    with pytest.raises(ValueError, match="pool_spin_us"):
        _kernels.pool_spin_us(-1)


@needs_openmp
def test_two_python_threads_at_once_get_their_own_results(rng, threads):
    """One job runs on the pool at a time; a call from a second Python thread meanwhile runs its
    tasks on its own thread, with the same tasks, so the same bits."""
    threads(2)
    inputs = [random_input(rng, (32, 8, 1024), np.float32, offset=k) for k in range(2)]
    want = [fastbn.batch_norm(x, None, None, training=True) for x in inputs]
    barrier = threading.Barrier(2)

    def loop(k):
        barrier.wait()
        return all(np.array_equal(fastbn.batch_norm(inputs[k], None, None, training=True), want[k])
                   for _ in range(50))

    with ThreadPoolExecutor(max_workers=2) as pool:
        assert list(pool.map(loop, range(2))) == [True, True]


@needs_openmp
def test_relu_backward_wakes_sleeping_helpers_first(rng, threads):
    """The ReLU backward with bias= finds its mask's bounds before its first job, and wakes the
    pool's sleeping helpers first (_pool.h's fbn_pool_wake), so that they are up when the job
    comes; the result is the same bits as on one thread."""
    threads(1)
    x, dy = random_input(rng, (16, 8, 49), np.float32), random_input(rng, (16, 8, 49), np.float32)
    w, b = np.linspace(0.5, 2.0, 8).astype(np.float32), np.linspace(-1.0, 1.0, 8).astype(np.float32)
    _, mean, invstd = fastbn.batch_norm_forward(x, None, None, w, b, True, activation="relu")
    want = fastbn.batch_norm_backward(dy, x, w, mean, invstd, True, activation="relu", bias=b)
    threads(2)
    fastbn.batch_norm(x, None, None, training=True)  # the helper exists
    assert _kernels.pool_helpers() >= 1
    time.sleep(0.05)  # ... and sleeps: it spins 20 us after a job
    before = _kernels.pool_counters()
    got = fastbn.batch_norm_backward(dy, x, w, mean, invstd, True, activation="relu", bias=b)
    assert _kernels.pool_counters()["wakes"] > before["wakes"]
    for g, e in zip(got, want):
        np.testing.assert_array_equal(g, e)
    time.sleep(0.05)
    before = _kernels.pool_counters()
    fastbn.batch_norm_backward(dy, x, w, mean, invstd, True)  # (no bounds: no wake ahead)
    assert _kernels.pool_counters()["wakes"] == before["wakes"]


def test_threads_sharing_a_training_layer_lose_no_running_statistics_update():
    """8 Python threads run training forwards on one BatchNorm1d(momentum=None) at once, thread t's
    batch of mean t + 3.5: every update counts (num_batches_tracked) and the cumulative average
    is 7.0 whatever their order.  Each update (the factor read from the count, the buffers'
    read-modify-write in the kernel, the increment) runs under the layer's lock; without it two
    threads took the same factor and the average drifted (7.118 in one run)."""
    bn = fastbn.BatchNorm1d(4, momentum=None)
    xs = [np.full((8, 4), float(t), np.float32) + np.arange(8, dtype=np.float32)[:, None] for t in range(8)]
    steps = 200

    def work(t):
        for _ in range(steps):
            bn(xs[t])

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, so that a race shows
    try:
        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(old)
    assert bn.num_batches_tracked == 8 * steps
    np.testing.assert_allclose(bn.running_mean, 7.0, atol=5e-5)
