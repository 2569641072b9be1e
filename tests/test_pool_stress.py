"""fastbn/_pool.h alone, under stress: tests/pool_stress.c built with the system C compiler (and
ThreadSanitizer where it has it) and run.  Skipped, with the reason, where there is no C compiler
or no source tree (an installed fastbn without its headers)."""
import os
import shutil
import subprocess

import pytest

import fastbn

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER_DIR = os.path.dirname(os.path.abspath(fastbn.__file__))


def _build(tmp_path, flags):
    exe = tmp_path / ("pool_stress" + "".join(f.replace("=", "_") for f in flags))
    cmd = [shutil.which("cc") or "cc", "-O1", "-g", "-pthread", *flags, "-I", HEADER_DIR,
           os.path.join(HERE, "pool_stress.c"), "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    return exe if res.returncode == 0 else None


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) to build tests/pool_stress.c")
@pytest.mark.skipif(not os.path.exists(os.path.join(HEADER_DIR, "_pool.h")), reason="fastbn/_pool.h is not installed")
@pytest.mark.parametrize("sanitizer", [None, "thread"])
def test_every_task_runs_exactly_once(tmp_path, sanitizer):
    flags = [] if sanitizer is None else [f"-fsanitize={sanitizer}"]
    exe = _build(tmp_path, flags)
    if exe is None:
        if sanitizer is None:
            pytest.fail("tests/pool_stress.c did not compile")
        pytest.skip(f"the C compiler cannot build with -fsanitize={sanitizer}")
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1 exitcode=66 die_after_fork=0")
    env.pop("LD_PRELOAD", None)
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=240, env=env)
    if sanitizer and res.returncode != 0 and "FATAL: ThreadSanitizer" in res.stderr:
        pytest.skip(f"ThreadSanitizer cannot run here: {res.stderr.strip().splitlines()[0]}")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "tasks run other than once: 0; forked child: exit 0" in res.stdout
