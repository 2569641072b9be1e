"""`fastbn` (or `python -m fastbn`): the build facts and the self-check (the README's main job),
the name the command goes by, and `fastbn bench`'s options."""
import json
import os
import subprocess
import sys

import pytest

from fastbn import __main__ as cli
from fastbn import _kernels, _openmp


def test_info_prints_build_facts_and_passes_its_self_check(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "OpenMP:" in out and "threads in effect:" in out and "compile flags:" in out
    assert "backends: cpu (NumPy) available; cuda (CuPy)" in out
    assert "self-check: PASSED" in out and "FAIL" not in out


def test_compiled_modules_report_one_build():
    """Each compiled module says what it was built with (setup.py's FASTBN_BUILD_FLAGS), and both
    say the same: a rebuild with other switches rebuilds every extension."""
    flags = cli.build_flags()
    assert flags == {"fastbn._openmp": _openmp.BUILD_FLAGS, "fastbn._kernels": _kernels.BUILD_FLAGS}
    assert _openmp.BUILD_FLAGS == _kernels.BUILD_FLAGS
    assert _openmp.BUILD_FLAGS.startswith("openmp: on (" if _openmp.OPENMP else "openmp: OFF (")
    assert "; compiler: " in _openmp.BUILD_FLAGS and "; compile flags: " in _openmp.BUILD_FLAGS


def test_info_warns_loudly_about_modules_from_different_builds(monkeypatch, capsys):
    monkeypatch.setattr(_kernels, "BUILD_FLAGS", "openmp: OFF (switched off on purpose: FASTBN_DISABLE_OPENMP=1); "
                                                 "compiler: cc; compile flags: -O3; link flags: -")
    assert cli.main(["info"]) == 1
    out = capsys.readouterr().out
    assert "its compiled modules come from DIFFERENT builds" in out
    assert f"build of fastbn._openmp: {_openmp.BUILD_FLAGS}" in out
    assert "build of fastbn._kernels: openmp: OFF (switched off on purpose" in out


@pytest.mark.parametrize("why", ["switched off on purpose: FASTBN_DISABLE_OPENMP=1",
                                 "the OpenMP probe failed: linking the probe failed (gcc, exit 1): "
                                 "/usr/bin/ld: cannot find -lgomp"])
def test_info_says_loudly_why_a_build_is_serial(monkeypatch, capsys, why):
    flags = f"openmp: OFF ({why}); compiler: cc; compile flags: -O3; link flags: -"
    monkeypatch.setattr(_openmp, "OPENMP", False)
    monkeypatch.setattr(_openmp, "BUILD_FLAGS", flags)
    monkeypatch.setattr(_kernels, "BUILD_FLAGS", flags)
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "OpenMP: OFF (serial build)" in out
    assert "fastbn was built WITHOUT OpenMP (a serial build)" in out and f"why: {why}." in out


def test_self_check_fails_on_a_broken_kernel(monkeypatch):
    """The self-check compares with its own float64 reference, so a wrong kernel fails it."""
    real = cli.fastbn.batch_norm_forward

    def off_by_a_little(*args, **kwargs):
        y, mean, invstd = real(*args, **kwargs)
        return y + 1e-3, mean, invstd

    monkeypatch.setattr(cli.fastbn, "batch_norm_forward", off_by_a_little)
    lines = []

    class Sink:
        def write(self, text):
            lines.append(text)

    assert cli.self_check(out=Sink()) is False
    assert any("FAIL" in line for line in lines)


@pytest.mark.parametrize("name", ["group_norm_backward", "layer_norm_forward", "instance_norm_backward"])
def test_self_check_covers_the_other_norms(monkeypatch, name):
    """Group, layer and instance norm are in the self-check too: a wrong one fails it."""
    real = getattr(cli.fastbn, name)

    def off_by_a_little(*args, **kwargs):
        first, *rest = real(*args, **kwargs)
        return (first + 1e-3, *rest)

    monkeypatch.setattr(cli.fastbn, name, off_by_a_little)
    lines = []

    class Sink:
        def write(self, text):
            lines.append(text)

    assert cli.self_check(out=Sink()) is False
    assert any("FAIL" in line and name.split("_")[0] in line for line in lines)


def test_bench_subcommand_is_wired():
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0


@pytest.mark.parametrize("argv,message", [
    (["--json", "/nonexistent-folder/x.json"], "--json /nonexistent-folder/x.json: the folder /nonexistent-folder does not exist"),
    (["--json", "."], "is a folder, expected a file name"),
])
def test_bench_refuses_an_unwritable_output_before_running(capsys, argv, message):
    """A typo in --json / --plot is reported at once, not after the whole benchmark."""
    assert cli.main(["bench", *argv]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "[1/" not in captured.err


def test_bench_refuses_an_output_file_that_cannot_be_written(capsys, tmp_path):
    """The folder's permissions pass, the file itself does not (/proc refuses new files even to
    root; a read-only file refuses its owner unless root); nothing is left behind on success."""
    assert cli.main(["bench", "--json", "/proc/fastbn-x.json"]) == 2
    assert "--json /proc/fastbn-x.json: cannot be written" in capsys.readouterr().err
    from fastbn.bench.cli import output_problem
    assert output_problem(str(tmp_path / "new.json"), "json") is None
    assert not (tmp_path / "new.json").exists()


def test_bench_refuses_an_unknown_plot_format(capsys, tmp_path):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (fastbn[plot])")
    assert cli.main(["bench", "--plot", str(tmp_path / "chart.txt")]) == 2
    assert "unknown image format 'txt', expected one of" in capsys.readouterr().err


@pytest.mark.parametrize("threads", ["0", "1025", "x"])
def test_bench_threads_must_be_a_thread_count(capsys, threads):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--threads", threads])
    assert exc.value.code == 2
    assert "argument --threads: expected" in capsys.readouterr().err


# ---------------------------------------------------------------- the name it goes by
@pytest.mark.parametrize("argv0,name", [
    ("/venv/bin/fastbn", "fastbn"),              # the console script
    ("fastbn.exe", "fastbn"),                    # the console script on Windows
    ("/opt/tools/fastbn-dev", "fastbn-dev"),     # a script installed under another name: as invoked
    ("/src/fastbn/__main__.py", "fastbn"),       # python -m fastbn
    ("-c", "fastbn"), ("", "fastbn"), (None, "fastbn"),  # python -c "...main()", main(argv) from Python code
])
def test_the_command_line_names_itself_as_invoked(argv0, name):
    assert cli.prog_name(argv0) == name


def test_usage_and_errors_say_fastbn_when_called_from_python(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--threads", "0"])
    err = capsys.readouterr().err
    assert err.startswith("usage: fastbn bench ") and "python -m" not in err and "pytest" not in err


def test_python_m_fastbn_calls_itself_fastbn(tmp_path):
    """Run as a module, argv[0] is fastbn/__main__.py: the usage says ``fastbn``, as the README's
    commands do, and no help text says ``python -m fastbn``.  The child imports the fastbn this
    process imported (built), from a folder where no source tree can shadow it."""
    import fastbn

    root = os.path.dirname(os.path.dirname(os.path.abspath(fastbn.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    for argv in (["--help"], ["bench", "--help"]):
        done = subprocess.run([sys.executable, "-m", "fastbn", *argv], capture_output=True, text=True, env=env,
                              timeout=120, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("usage: fastbn" + (" bench" if argv[0] == "bench" else "")), done.stdout
        assert "python -m" not in done.stdout and "__main__" not in done.stdout


# ---------------------------------------------------------------- fastbn bench --latency
def test_bench_latency_prints_the_table_and_writes_json(monkeypatch, tmp_path, capsys):
    from fastbn.bench import latency

    monkeypatch.setattr(latency, "CASES", [(2, 16, 4, 4)])
    monkeypatch.setattr(latency, "PER_ROUND", 2)
    path = tmp_path / "latency.json"
    assert cli.main(["bench", "--latency", "--repeat", "1", "--json", str(path)]) == 0
    captured = capsys.readouterr()
    assert "[latency 1/1] (2, 16, 4, 4) float32" in captured.err
    out = captured.out
    assert "implementation" in out and "x onnxrt" in out and f"wrote {path}" in out
    data = json.loads(path.read_text())
    assert data["repeat"] == 1 and data["per_round"] == 2
    assert {r["impl"] for r in data["rows"]} >= {"kernel", "batch_norm_out", "batch_norm", "layer", "layer_out"}
    assert all(r["calls"] == 2 and r["error"] is None for r in data["rows"])
    if _openmp.OPENMP:
        assert data["machine"]["threads"] == 2 and data["targets_checked"] == len(data["targets"]) == 3
        assert "targets met: " in out


@pytest.mark.parametrize("argv,message", [
    (["--latency", "--pipeline"], "--pipeline and --latency are different reports: pick one"),
    (["--latency", "--full"], "--full applies to the usual table, not to --latency"),
    (["--latency", "--plot", "x.png"], "--plot applies to the usual table, not to --latency"),
    (["--latency", "--shape", "4x3"], "--shape applies to --pipeline only"),
    (["--latency", "--json", "/nonexistent-folder/x.json"], "the folder /nonexistent-folder does not exist"),
])
def test_bench_latency_refuses_options_of_the_other_reports(capsys, argv, message):
    assert cli.main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "[latency" not in err
