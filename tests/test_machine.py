"""fastbn._machine (cache sizes and cores read at import) and the kernel thresholds derived from them."""
import os

import numpy as np
import pytest

import fastbn
from fastbn import __main__ as cli
from fastbn import _kernels, _machine, _plan
from fastbn._backends import cpu as _cpu


def write_cache(root, cpu, index, level, kind, size, shared):
    d = root / f"cpu{cpu}" / "cache" / f"index{index}"
    d.mkdir(parents=True)
    for name, value in (("level", level), ("type", kind), ("size", size), ("shared_cpu_list", shared)):
        (d / name).write_text(f"{value}\n")


def fake_sysfs(root, cpus, l3_groups):
    """A sysfs cache tree: 48K L1d, 32K L1i, 2M L2 per CPU, a 96M L3 per group of CPUs."""
    for group in l3_groups:
        shared = f"{min(group)}-{max(group)}"
        for cpu in group:
            write_cache(root, cpu, 0, 1, "Data", "48K", str(cpu))
            write_cache(root, cpu, 1, 1, "Instruction", "32K", str(cpu))
            write_cache(root, cpu, 2, 2, "Unified", "2048K", str(cpu))
            write_cache(root, cpu, 3, 3, "Unified", "98304K", shared)


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """Point _machine at a fake sysfs tree and a fake affinity mask."""
    def setup(cpus, l3_groups, sysconf=None):
        fake_sysfs(tmp_path, cpus, l3_groups)
        monkeypatch.setattr(_machine, "_SYSFS", str(tmp_path))
        monkeypatch.setattr(_machine, "_cpus", lambda: list(cpus))
        monkeypatch.setattr(_machine, "usable_cores", lambda: len(cpus))
        monkeypatch.setattr(_machine, "_sysconf", lambda name: (sysconf or {}).get(name))
        return _machine.detect()
    return setup


def test_sizes_parse():
    assert _machine._parse_size("32K") == 32768 and _machine._parse_size("2M") == 2 << 20
    assert _machine._parse_size("98304K\n") == 96 << 20 and _machine._parse_size("512") == 512
    assert _machine._parse_size("?") is None
    assert _machine._parse_cpu_list("0-3,8,10-11") == {0, 1, 2, 3, 8, 10, 11}


def test_sysfs_sizes_and_the_l3_instances_the_cpus_span(machine):
    info = machine(range(16), [range(0, 8), range(8, 16)], sysconf={"SC_LEVEL3_CACHE_SIZE": 1 << 33})
    assert (info["l1d"], info["l2"], info["l3"]) == (48 << 10, 2 << 20, 96 << 20)
    assert info["source"] == {"l1d": "sysfs", "l2": "sysfs", "l3": "sysfs"}  # sysfs wins over sysconf
    assert (info["cores"], info["l3_instances"], info["l3_shared_by"]) == (16, 2, 8)
    assert info["l3_effective"] == 192 << 20


def test_a_few_vcpus_count_on_at_most_16_mib_of_l3_each(machine):
    info = machine([0, 1], [[0, 1]])  # a 2-vCPU guest that sees its host's 96 MiB L3
    assert info["l3"] == 96 << 20 and info["l3_effective"] == 32 << 20


def test_without_sysfs_sysconf_then_the_defaults(machine, monkeypatch, tmp_path):
    monkeypatch.setattr(_machine, "_SYSFS", str(tmp_path / "absent"))
    monkeypatch.setattr(_machine, "_cpus", lambda: [0])
    monkeypatch.setattr(_machine, "usable_cores", lambda: 4)
    monkeypatch.setattr(_machine, "_sysconf", lambda name: {"SC_LEVEL2_CACHE_SIZE": 1 << 21}.get(name))
    info = _machine.detect()
    assert info["l2"] == 2 << 20 and info["source"]["l2"] == "sysconf"
    assert info["l1d"] == _machine.DEFAULTS["l1d"] and info["l3"] == _machine.DEFAULTS["l3"]
    assert info["source"]["l3"] == "default" and info["l3_effective"] == 32 << 20


def test_this_machine_reads_something_sane():
    m = _machine.CACHES
    assert m["cores"] >= 1
    assert 4 << 10 <= m["l1d"] <= m["l2"] and 64 << 10 <= m["l2"]
    assert 1 << 20 <= m["l3_effective"] <= _machine.L3_PER_CORE_MAX * m["cores"]


def test_the_stream_threshold_follows_the_l3_and_restores():
    before = _kernels.thresholds()
    try:
        assert _kernels.tune_for(1 << 20, 100 << 20)["stream_bytes"] == int(_kernels.STREAM_L3_RATIO * (100 << 20))
        # the norm kernels' threshold follows the same L3, at their own share of it
        assert _kernels.norm_stream_threshold() == int(_plan.NORM_STREAM_RATIO * (100 << 20))
        assert _kernels.thresholds(piece_bytes=1 << 20)["piece_bytes"] == 1 << 20
        with pytest.raises(ValueError, match="expected 4096"):
            _kernels.thresholds(stream_bytes=0)
    finally:
        _kernels.thresholds(**before)
    assert _kernels.thresholds() == before
    assert before["stream_bytes"] == int(_kernels.STREAM_L3_RATIO * _machine.CACHES["l3_effective"])


@pytest.mark.parametrize("shape", [(4, 3, 40, 40), (300, 20), (8, 3000)])
def test_thresholds_change_speed_not_results(rng, shape):
    """Streaming stores by size (any threshold) and any piece size give the same bits."""
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    C = shape[1]
    before = _kernels.thresholds()

    def run():
        y, mean, invstd = fastbn.batch_norm_forward(x, None, None, training=True)
        ye = fastbn.batch_norm(x, np.zeros(C, np.float32), np.ones(C, np.float32))
        return y, ye, fastbn.batch_norm_backward(dy, x, None, mean, invstd)[0]

    try:
        expected = run()
        for stream_bytes, piece in ((4096, 4096), (1 << 40, 1 << 20)):
            _kernels.thresholds(stream_bytes=stream_bytes, piece_bytes=piece)
            for got, want in zip(run(), expected):
                np.testing.assert_array_equal(got, want)
    finally:
        _kernels.thresholds(**before)


def test_info_prints_the_machine_and_the_thresholds(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    m = _machine.CACHES
    assert f"machine: {m['cores']} usable cores; L1d " in out and "L3 the kernels count on:" in out
    assert "kernel thresholds: streaming stores above " in out and "second passes in pieces of 512 KiB" in out
    assert "allocator: " in out
