"""What ships with fastbn besides the kernels: type information, and the hint to rebuild a source
tree whose Cython or C sources changed after its build."""
import os

import pytest

import fastbn

PKG = os.path.dirname(os.path.abspath(fastbn.__file__))


def test_the_package_is_typed():
    """py.typed and the stubs of the public API and of the compiled modules ship with the package
    (in the sdist and the wheel: CI checks a typed usage file against them with mypy)."""
    for name in ("py.typed", "_openmp.pyi", "_kernels.pyi", "functional.pyi", "layers.pyi", "_layer_base.pyi",
                 "norms.pyi", "norm_layers.pyi", "_grad_mode.pyi", "_alloc.pyi", "_fastpath.pyi", "_floor.pyi", "_plan.pyi", "_pool.pyi",
                 "sync.pyi", "fusion.pyi"):
        assert os.path.isfile(os.path.join(PKG, name)), name


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


def test_every_subpackage_is_named_in_pyproject():
    """setuptools installs only the packages pyproject.toml names: a new folder of modules (the
    benchmark harness, fastbn/bench/) that is not listed works in a source tree and is missing
    from every wheel."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib: Python 3.11 or newer")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pyproject = os.path.join(root, "pyproject.toml")
    if not os.path.isfile(pyproject):
        pytest.skip(f"no pyproject.toml beside the tests ({root})")
    with open(pyproject, "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    found = {os.path.relpath(folder, root).replace(os.sep, ".")
             for folder, _, files in os.walk(os.path.join(root, "fastbn")) if "__init__.py" in files}
    assert "fastbn.bench" in found
    assert found <= listed, f"not in pyproject.toml's [tool.setuptools] packages: {sorted(found - listed)}"
