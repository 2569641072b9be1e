"""fastbn's caching allocator of large outputs (fastbn/_alloc.pyx, fastbn/_alloc.h).

What must hold: outputs from the pool are correct, ordinary NumPy arrays (views, pickling,
resizing, zeroed memory where NumPy asks for it), independent of each other and of every live
array, freed and reused from any thread; the cache stays bounded and empty_cache() gives it back;
FASTBN_ALLOCATOR switches it.  The tests that need a fresh process (the environment switch, use
after free, the whole file under PYTHONMALLOC=debug) run one.
"""
import gc
import os
import pickle
import queue
import subprocess
import sys
import threading

import numpy as np
import pytest

import fastbn
from fastbn import _alloc
from fastbn import functional as F

from _helpers import assert_close, random_input, random_params, ref_backward, ref_forward

OURS = _alloc.HANDLER_NAME
MIB = 1 << 20
PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(fastbn.__file__)))
POOL = _alloc.MODE != "system"
needs_pool = pytest.mark.skipif(not POOL, reason=f"the caching allocator is off (FASTBN_ALLOCATOR={_alloc.MODE})")
linux = pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc/self/statm")


def handler_name(a):
    try:
        from numpy._core.multiarray import get_handler_name
    except ImportError:  # NumPy 1.x
        from numpy.core.multiarray import get_handler_name
    return get_handler_name(a)


def span(a):
    """[first, last) byte addresses of an array's memory (C-contiguous arrays)."""
    start = a.__array_interface__["data"][0]
    return start, start + a.nbytes


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_python(code, **env):
    """Run ``code`` in a fresh interpreter that imports this fastbn; returns the CompletedProcess."""
    environ = dict(os.environ, PYTHONPATH=os.pathsep.join([PKG_PARENT, os.environ.get("PYTHONPATH", "")]))
    environ.update(env)
    # from a folder where `python -c` (which puts the working directory first on sys.path) cannot
    # pick up an unbuilt source tree instead of this fastbn (CI runs in a clone)
    return subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(PKG_PARENT))


@pytest.fixture
def pool():
    """The allocator with an empty cache and no recent requests; settings restored afterwards."""
    gc.collect()
    fastbn.empty_cache()
    before = _alloc.configure(forget=True)
    yield _alloc
    _alloc.configure(**before, forget=True)
    fastbn.empty_cache()


def layer(C, rng, training=True):
    bn = fastbn.BatchNorm2d(C)
    bn.weight[...], bn.bias[...], bn.running_mean[...], bn.running_var[...] = random_params(rng, C)
    return bn.train(training)


# ---------------------------------------------------------------- which allocator, and the results
@needs_pool
def test_large_outputs_come_from_the_pool_small_ones_from_numpy(rng, pool):
    big = random_input(rng, (4, 16, 64, 64))  # 1 MiB exactly: the pool's minimum
    small = random_input(rng, (4, 16, 64, 63))
    assert big.nbytes == _alloc.MIN_BYTES
    bn = layer(16, rng)
    y = bn(big)
    dx = bn.backward(y)
    assert handler_name(y) == handler_name(dx) == OURS
    assert y.flags.owndata and y.base is None and y.shape == big.shape  # the array itself, not a view
    assert y.ctypes.data % 64 == 0 and dx.ctypes.data % 64 == 0
    ys = bn(small)
    assert handler_name(ys) == handler_name(bn.backward(ys)) == "default_allocator"
    out = np.empty_like(big)  # out= is the caller's memory
    assert bn(big, out=out) is out and handler_name(out) == "default_allocator"
    y_eval, _, _ = F.batch_norm_forward(big, bn.running_mean, bn.running_var, training=False)
    assert handler_name(y_eval) == OURS


@needs_pool
@pytest.mark.skipif(sys.platform != "linux", reason="counts page faults with getrusage (Linux)")
@pytest.mark.skipif(_alloc.MODE == "debug", reason="the debug allocator unmaps every dropped block, on purpose")
@pytest.mark.skipif("fsanitize=address" in fastbn._kernels.BUILD_FLAGS,
                    reason="AddressSanitizer's allocator hands out fresh memory for every malloc (its quarantine)")
@pytest.mark.parametrize("shape, call", [
    ((32, 1024, 4, 4), "fastbn.batch_norm_backward(dy, x, w, mean, invstd, True, activation='relu', bias=b)"),
    ((64, 512, 2, 2), "fastbn.group_norm_backward(dy, x, 32, w, gmean, ginvstd)"),
])
def test_large_kernel_scratch_is_not_mapped_afresh_every_call(shape, call):
    """Kernel scratch that grows with the data: the COLUMNS path's per-column coefficients and
    partials with the fused ReLU on (32, 1024, 4, 4) float32 (0.9 MiB), group norm's per-channel
    sums, coefficients and means on (64, 512, 2, 2) (1.4 MiB), outputs of 0.5 MiB.  NumPy's
    allocator (glibc) mapped them afresh on every call in a fresh process: 230 and 320 page faults
    a call, 3x the plain call's time.  They come from fastbn's pool (_alloc.scratch), so calls in a
    loop fault (almost) no pages in."""
    code = f"""
import resource, numpy as np, fastbn
rng = np.random.default_rng(0)
x = rng.standard_normal({shape}, dtype=np.float32)
dy = rng.standard_normal({shape}, dtype=np.float32)
C = {shape[1]}
w, b = rng.uniform(0.5, 2.0, C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
_, mean, invstd = fastbn.batch_norm_forward(x, None, None, w, b, True, activation="relu")
_, gmean, ginvstd = fastbn.group_norm_forward(x, 32, w, b)
for _ in range(5):
    {call}
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    {call}
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    faults = float(done.stdout.split()[-1])
    assert faults < 50, f"{faults:.0f} page faults a call"


@pytest.mark.parametrize("training", [True, False])
def test_pool_outputs_are_correct_and_independent(rng, pool, training):
    """Many calls of a few sizes (so that blocks are recycled), every output checked against the
    reference, all kept alive; then writing one changes no other."""
    shapes = [(4, 16, 64, 64), (8, 16, 64, 64), (2, 64, 64, 64)]
    outputs = []
    for i in range(12):
        x = random_input(rng, shapes[i % 3])
        dy = rng.standard_normal(x.shape).astype(np.float32)
        C = x.shape[1]
        w, b, rm, rv = random_params(rng, C)
        y, mean, invstd = F.batch_norm_forward(x, rm.copy(), rv.copy(), w, b, training=training)
        dx, gw, gb = F.batch_norm_backward(dy, x, w, mean, invstd, training=training)
        stats = (None, None) if training else (rm, rv)
        assert_close(y, ref_forward(x, w, b, *stats)[0])
        assert_close(dx, ref_backward(dy, x, w, *stats, training=training)[0])
        outputs += [y, dx]
        if i % 4 == 3:  # drop some, so that the next calls reuse their blocks
            del outputs[-4:-2]
    for k, o in enumerate(outputs):
        o[...] = k
    for k, o in enumerate(outputs):
        assert (o == k).all()


@needs_pool
def test_an_output_never_aliases_a_live_array(rng, pool):
    """Over many calls of mixed sizes, keeping a random set of outputs alive: no new output shares
    memory with a live one, and every live output keeps its values."""
    pool.configure(min_bytes=64 << 10)  # small arrays through the pool too: more calls, more reuse
    live, sums = [], []
    C = 8
    bn = layer(C, rng)
    xs = [random_input(rng, (n, C, 32, 32)) for n in (2, 3, 5, 8, 13)]  # 64 KiB .. 416 KiB
    for i in range(600):
        x = xs[rng.integers(len(xs))]
        if i % 3 == 0:
            bn(x)  # an output dropped at once; then its backward
            y = bn.backward(x)
        else:
            y = bn(x)
        lo, hi = span(y)
        assert not any(np.shares_memory(y, a) for a in xs), f"call {i}: the output overlaps an input"
        for o in live:
            olo, ohi = span(o)
            assert hi <= olo or ohi <= lo, f"call {i}: the new output overlaps a live one"
            assert not np.shares_memory(y, o)
        assert all(o.sum(dtype=np.float64) == s for o, s in zip(live, sums)), f"call {i} changed a live output"
        live.append(y)
        sums.append(y.sum(dtype=np.float64))
        while len(live) > 6 or (live and rng.random() < 0.3):
            k = rng.integers(len(live))
            del live[k], sums[k]
    assert fastbn.memory_stats()["hits"] > 100


# ---------------------------------------------------------------- ordinary NumPy arrays
@needs_pool
def test_views_outlive_the_output_they_come_from(rng, pool):
    bn = layer(16, rng)
    x = random_input(rng, (8, 16, 64, 64))
    y = bn(x)
    view = y[::2, 3]
    expected = view.copy()
    del y
    for _ in range(5):  # the view keeps the block in use: these calls must not get it
        z = bn(x)
        z[...] = -1
    np.testing.assert_array_equal(view, expected)


@needs_pool
def test_pool_arrays_pickle(rng, pool):
    bn = layer(16, rng)
    y = bn(random_input(rng, (8, 16, 64, 64)))
    assert handler_name(y) == OURS
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        np.testing.assert_array_equal(pickle.loads(pickle.dumps(y, protocol=protocol)), y)
    # protocol 5 out of band: the buffer refers to y's memory, which must stay valid without y
    buffers = []
    data = pickle.dumps(y, protocol=5, buffer_callback=buffers.append)
    expected = y.copy()
    del y
    for _ in range(3):
        bn(random_input(rng, (8, 16, 64, 64)))[...] = 0
    np.testing.assert_array_equal(pickle.loads(data, buffers=buffers), expected)


@needs_pool
@pytest.mark.parametrize("factor", [0.25, 0.75, 1.5, 3.0])
def test_pool_arrays_resize(rng, pool, factor):
    """ndarray.resize reallocates through the array's own handler (ours): the values kept, the new
    tail zeros (NumPy's rule), and the block freed to the pool later; np.resize copies."""
    bn = layer(16, rng)
    y = bn(random_input(rng, (8, 16, 64, 64)))
    expected = y.copy().reshape(-1)
    n = int(y.size * factor)
    y.resize((n,), refcheck=False)
    assert handler_name(y) == OURS and y.shape == (n,)
    m = min(n, expected.size)
    np.testing.assert_array_equal(y[:m], expected[:m])
    assert (y[m:] == 0).all()
    np.testing.assert_array_equal(np.resize(y, (3, n // 2)), np.resize(y.copy(), (3, n // 2)))
    del y
    stats = fastbn.memory_stats()
    assert stats["blocks_in_use"] == 0


@needs_pool
def test_zeroed_memory_is_zero_even_from_a_recycled_block(pool):
    with _alloc.handler():
        a = np.empty(4 * MIB, np.uint8)
        a[...] = 0xAB
        assert handler_name(a) == OURS
        del a
        hits = fastbn.memory_stats()["hits"]
        b = np.zeros(4 * MIB, np.uint8)  # calloc, served from a's dirty block
        assert fastbn.memory_stats()["hits"] == hits + 1
        assert not b.any()
        c = np.zeros(100, np.float64)  # a small one: the handler's heap blocks
        assert handler_name(c) == OURS and not c.any() and c.ctypes.data % 64 == 0
        c.resize(10 * MIB, refcheck=False)  # heap block -> pool block
        assert not c.any()
        c.resize(7, refcheck=False)  # and back
        assert not c.any()


# ---------------------------------------------------------------- threads
@needs_pool
def test_outputs_made_in_one_thread_are_freed_in_another_and_reused(rng, pool):
    bn = layer(16, rng, training=False)
    x = random_input(rng, (8, 16, 64, 64))
    expected = bn(x).copy()
    inbox = queue.Queue()
    errors = []

    def consumer():
        while True:
            item = inbox.get()
            if item is None:
                return
            if not np.array_equal(item, expected):
                errors.append("an output changed before it was dropped")
            del item  # the drop: back into the pool from this thread

    t = threading.Thread(target=consumer)
    t.start()
    for _ in range(50):
        inbox.put(bn(x))
    inbox.put(None)
    t.join()
    assert not errors
    stats = fastbn.memory_stats()
    assert stats["blocks_in_use"] == 0 and stats["hits"] >= 40


@needs_pool
def test_concurrent_calls_and_drops_from_many_threads(rng, pool):
    C = 16
    x = random_input(rng, (8, C, 64, 64))
    bn = layer(C, rng, training=False)
    expected = bn(x).copy()
    handoff = queue.Queue()
    errors = []

    def worker(k):
        local = fastbn.BatchNorm2d(C).eval()
        local.load_state_dict(bn.state_dict())
        for i in range(30):
            y = local(x)
            if not np.array_equal(y, expected):
                errors.append(f"thread {k}, call {i}: wrong output")
            handoff.put(y)  # another thread drops it
            try:
                other = handoff.get_nowait()
                if not np.array_equal(other, expected):
                    errors.append(f"thread {k}: an output changed while live")
                del other
            except queue.Empty:
                pass

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    while not handoff.empty():
        handoff.get()
    assert fastbn.memory_stats()["blocks_in_use"] == 0


# ---------------------------------------------------------------- bounds
@needs_pool
@linux
def test_rss_stays_bounded_over_10000_calls_of_mixed_sizes(rng, pool):
    pool.configure(min_bytes=64 << 10)  # 64 KiB .. 1 MiB outputs through the pool: quick calls
    C = 8
    bn = layer(C, rng)
    xs = [random_input(rng, (n, C, 32, 32)) for n in (2, 3, 4, 6, 9, 16, 24, 32)]
    keep = []

    def calls(n):
        for i in range(n):
            x = xs[rng.integers(len(xs))]
            if i % 2:
                bn(x)
                keep.append(bn.backward(x))
            else:
                keep.append(bn(x))
            if len(keep) > rng.integers(1, 5):
                keep.pop(0)

    calls(1000)
    start = rss()
    calls(9000)
    stats = fastbn.memory_stats()
    grown = rss() - start
    largest = xs[-1].nbytes
    assert stats["bytes_cached"] <= stats["cache_limit"] <= 4 * (largest + 2 * 4096)
    assert grown < 16 * MIB, f"RSS grew by {grown / MIB:.1f} MiB over 9000 calls"


@needs_pool
def test_the_cache_holds_a_small_multiple_of_the_largest_recent_output(rng, pool):
    outputs = [fastbn.batch_norm(random_input(rng, (n, 16, 64, 64)), None, None, training=True) for n in range(4, 16)]
    del outputs
    stats = fastbn.memory_stats()
    largest = 15 * 16 * 64 * 64 * 4
    assert stats["blocks_in_use"] == 0
    assert largest * 3 < stats["bytes_cached"] <= stats["cache_limit"] <= 4 * (largest + 8192)
    assert stats["releases"] > 0  # the older ones went back to the OS
    pool.configure(max_cached=8 * MIB)  # the cap wins over the multiple
    y = fastbn.batch_norm(random_input(rng, (15, 16, 64, 64)), None, None, training=True)
    del y
    assert fastbn.memory_stats()["bytes_cached"] <= 8 * MIB


@needs_pool
@linux
def test_empty_cache_gives_the_memory_back(rng, pool):
    pool.configure(multiple=16)
    x = random_input(rng, (32, 16, 64, 64))  # 8 MiB
    bn = layer(16, rng, training=False)
    outputs = [bn(x) for _ in range(10)]
    for o in outputs:
        o[...] = 1  # touch every page
    del outputs, o
    cached = fastbn.memory_stats()["bytes_cached"]
    assert cached >= 10 * x.nbytes
    before = rss()
    assert fastbn.empty_cache() == cached
    stats = fastbn.memory_stats()
    assert stats["bytes_cached"] == stats["blocks_cached"] == 0
    assert before - rss() >= 0.9 * cached


# ---------------------------------------------------------------- fresh processes
@pytest.mark.parametrize("value", ["system", "numpy"])
def test_fastbn_allocator_system_switches_the_pool_off(value):
    code = """
import numpy as np, fastbn
try:
    from numpy._core.multiarray import get_handler_name
except ImportError:
    from numpy.core.multiarray import get_handler_name
x = np.random.default_rng(0).standard_normal((8, 16, 64, 64), dtype=np.float32)
bn = fastbn.BatchNorm2d(16)
y = bn(x); dx = bn.backward(y)
assert get_handler_name(y) == get_handler_name(dx) == "default_allocator", get_handler_name(y)
s = fastbn.memory_stats()
assert s["allocator"] == "system" and s["hits"] == s["misses"] == s["bytes_cached"] == 0, s
assert fastbn.empty_cache() == 0
print(float(np.abs(y).sum()), float(np.abs(dx).sum()))
"""
    off = run_python(code, FASTBN_ALLOCATOR=value)
    assert off.returncode == 0, off.stderr
    on = run_python(code.replace('"system"', '"fastbn"').replace('"default_allocator"', f'"{OURS}"')
                    .replace('s["hits"] == s["misses"] == s["bytes_cached"] == 0', 's["misses"] >= 1'),
                    FASTBN_ALLOCATOR="fastbn")
    assert on.returncode == 0, on.stderr
    assert on.stdout == off.stdout  # the same results either way


def test_an_unknown_fastbn_allocator_warns_and_uses_the_default():
    r = run_python("import fastbn; print(fastbn.memory_stats()['allocator'])", FASTBN_ALLOCATOR="bogus")
    assert r.returncode == 0, r.stderr
    assert "FASTBN_ALLOCATOR='bogus'" in r.stderr and r.stdout.strip() == "fastbn"


def test_debug_mode_turns_a_use_after_free_into_a_crash():
    """FASTBN_ALLOCATOR=debug makes a cached block inaccessible: reading a dropped output through a
    raw pointer kills the process (SIGSEGV) instead of reading whatever the pool put there."""
    code = """
import ctypes, numpy as np, fastbn
x = np.ones((8, 16, 64, 64), np.float32)
y = fastbn.batch_norm(x, None, None, training=True)
address = y.ctypes.data
assert fastbn.memory_stats()["allocator"] == "debug"
del y
assert fastbn.memory_stats()["blocks_cached"] == 1
print("reading", flush=True)
print(ctypes.c_float.from_address(address).value)
"""
    r = run_python(code, FASTBN_ALLOCATOR="debug")
    if r.returncode == 0 and "debug" not in r.stdout and "reading" not in r.stdout:
        pytest.skip("no caching allocator on this platform")
    assert "reading" in r.stdout, r.stderr
    assert r.returncode != 0, "a read of a dropped output did not crash in debug mode"


@pytest.mark.skipif(os.environ.get("FASTBN_ALLOC_TESTS_INNER") == "1", reason="already inside the debug run")
def test_this_file_under_pythonmalloc_debug_and_the_debug_allocator():
    """The tests above again, in a process with Python's debug memory hooks (PYTHONMALLOC=debug)
    and fastbn's debug allocator, which crashes on any touch of a dropped pool block."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", __file__],
                       env=dict(os.environ, PYTHONMALLOC="debug", FASTBN_ALLOCATOR="debug",
                                FASTBN_ALLOC_TESTS_INNER="1",
                                PYTHONPATH=os.pathsep.join([PKG_PARENT, os.environ.get("PYTHONPATH", "")])),
                       cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert " passed" in r.stdout and "failed" not in r.stdout


@needs_pool
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_uses_the_pool(rng, pool):
    bn = layer(16, rng, training=False)
    x = random_input(rng, (8, 16, 64, 64))
    expected = bn(x).copy()
    pid = os.fork()
    if pid == 0:  # the child: allocate, drop, reuse, and report by the exit status
        ok = True
        try:
            for _ in range(5):
                ok &= bool(np.array_equal(bn(x), expected))
            ok &= fastbn.memory_stats()["hits"] >= 3
        except BaseException:
            ok = False
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
