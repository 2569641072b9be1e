"""Every Python snippet in README.md runs as written, in order (the later ones use the names the
quickstart defines).  Skipped, with the reason, where README.md is not beside the tests (an
installed package) or PyTorch (which the checkpoint snippet loads from) is missing."""
import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


@pytest.mark.skipif(not os.path.exists(README), reason="README.md is not beside tests/")
def test_readme_python_snippets_run_as_written(tmp_path, monkeypatch):
    pytest.importorskip("torch", reason="the checkpoint snippet loads a torch.nn.BatchNorm2d")
    with open(README, encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert len(blocks) >= 5
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
