"""The README's Python examples run as written, so the docs cannot drift from the code."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from _util import run_onnx

from surgery.synthetic import write_synthetic_model

README = Path(__file__).parents[2] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)


def test_readme_has_python_examples() -> None:
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index: int, tmp_path: Path) -> None:
    model = write_synthetic_model(tmp_path / "model.onnx")
    script = tmp_path / "example.py"
    script.write_text(BLOCKS[index], encoding="utf-8")
    # A fresh interpreter per example: examples register passes, which must not leak into
    # other tests' registry.
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    if (tmp_path / "out" / "model.onnx").exists():
        assert (run_onnx(tmp_path / "out" / "model.onnx") == run_onnx(model)).all()
