"""The hint to rebuild a source tree whose Cython or C sources changed after its build."""
import os

import fastbn


def _touch(path, mtime):
    path.write_text("")
    os.utime(path, (mtime, mtime))


def test_an_edited_source_after_the_build_gets_a_rebuild_hint(tmp_path):
    for name in ("_kernels.pyx", "_openmp.pyx", "_openmp.pxd", "_simd.h"):
        _touch(tmp_path / name, 1000)
    modules = {"_openmp": str(tmp_path / "_openmp.so"), "_kernels": str(tmp_path / "_kernels.so")}
    for built in modules.values():
        _touch(tmp_path / os.path.basename(built), 2000)
    assert fastbn._stale_build(str(tmp_path), modules) is None
    _touch(tmp_path / "_kernels.pyx", 3000)
    assert fastbn._stale_build(str(tmp_path), modules) == "_kernels.pyx"
    _touch(tmp_path / "_kernels.so", 4000)  # rebuilt: _openmp.so is older, but not built from it
    assert fastbn._stale_build(str(tmp_path), modules) is None
    _touch(tmp_path / "_simd.h", 5000)  # a header goes into every module
    assert fastbn._stale_build(str(tmp_path), modules) == "_simd.h"


def test_an_installed_package_or_an_unbuilt_module_gets_no_hint(tmp_path):
    _touch(tmp_path / "_simd.h", 3000)  # installed packages hold headers, never the .pyx
    _touch(tmp_path / "_kernels.so", 2000)
    assert fastbn._stale_build(str(tmp_path), {"_kernels": str(tmp_path / "_kernels.so")}) is None
    _touch(tmp_path / "_kernels.pyx", 3000)
    assert fastbn._stale_build(str(tmp_path), {"_kernels": None, "_openmp": None}) is None
