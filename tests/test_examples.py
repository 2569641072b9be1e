"""examples/digits.py runs end to end with a tiny budget (issue 13)."""
import importlib.util
import os

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

HERE = os.path.dirname(os.path.abspath(__file__))


def test_digits_example_quick(tmp_path):
    path = os.path.join(HERE, "..", "examples", "digits.py")
    spec = importlib.util.spec_from_file_location("digits_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    r = mod.main(["--quick", "--out", str(tmp_path)])
    for name in ("lr_sweep", "bad_init", "saturation", "forgotten_eval", "batch_size"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    text = (tmp_path / "summary.md").read_text()
    assert "BatchNorm1d" in text and "GroupNorm(4)" in text and "LayerNorm" in text
    assert set(r["forgotten_eval"]) == {"batch 2", "batch 8", "batch 32", "one class a batch (8)"}
