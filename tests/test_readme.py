"""The Python snippets of the docs run as written.

README.md: each snippet on its own, in a fresh namespace, because a reader copies one at a time.
docs/*.md: each file's snippets in order, in one namespace per file (a page may build on its own
earlier snippets, never on another page's).

A snippet that imports an optional package which is missing (torch, cupy without a GPU, mpi4py,
scikit-learn) is skipped with the reason; a docs page with such a snippet is skipped whole, since
its later snippets may use the names it defines.  Where README.md or docs/ is not beside the tests
(an installed package, the sdist), those tests skip too."""
import glob
import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def python_blocks(path):
    with open(path, encoding="utf-8") as f:
        return re.findall(r"^```python\n(.*?)^```", f.read(), re.S | re.M)


def _gpu_available():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def missing_requirement(block):
    """The optional package this snippet imports and this environment lacks, or None."""
    for name in sorted(set(re.findall(r"^\s*(?:import|from)\s+(\w+)", block, re.M))):
        if name == "cupy":
            if not _gpu_available():
                return "cupy with a CUDA GPU"
        elif importlib.util.find_spec(name) is None:
            return name
    return None


def run_blocks(blocks, label, namespace=None):
    for i, block in enumerate(blocks):
        exec(compile(block, f"{label} python block {i + 1}", "exec"), {} if namespace is None else namespace)


README_BLOCKS = python_blocks(README) if os.path.exists(README) else []


@pytest.mark.skipif(not os.path.exists(README), reason="README.md is not beside tests/")
def test_the_readme_has_its_quickstart():
    assert len(README_BLOCKS) >= 3  # layer and training step, functional, norms and no_grad


@pytest.mark.parametrize("index", range(len(README_BLOCKS)), ids=lambda i: f"block{i + 1}")
def test_each_readme_snippet_runs_on_its_own(index, tmp_path, monkeypatch):
    block = README_BLOCKS[index]
    missing = missing_requirement(block)
    if missing:
        pytest.skip(f"README.md python block {index + 1} needs {missing}")
    monkeypatch.chdir(tmp_path)
    run_blocks([block], f"README.md block {index + 1}:")


@pytest.mark.skipif(not DOCS, reason="docs/ is not beside tests/ (an installed package or the sdist)")
@pytest.mark.parametrize("path", DOCS, ids=os.path.basename)
def test_each_docs_page_runs_in_order(path, tmp_path, monkeypatch):
    blocks = python_blocks(path)
    name = os.path.relpath(path, ROOT)
    for i, block in enumerate(blocks):
        missing = missing_requirement(block)
        if missing:
            pytest.skip(f"{name} python block {i + 1} needs {missing}")
    monkeypatch.chdir(tmp_path)
    run_blocks(blocks, name, namespace={"__name__": "__docs__"})
