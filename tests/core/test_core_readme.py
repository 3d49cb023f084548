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


TEXT = README.read_text(encoding="utf-8")
ROOT = README.parent


def _section(title: str) -> str:
    start = TEXT.index(f"\n## {title}\n")
    end = TEXT.find("\n## ", start + 1)
    return TEXT[start : end if end != -1 else len(TEXT)]


def test_readme_pass_table_lists_every_registered_pass() -> None:
    from surgery.registry import all_passes

    overview = _section("Passes").split("\n### ")[0]  # the table, not the subsections' tables
    table = re.findall(r"^\| `([a-z0-9-]+)` \|", overview, re.MULTILINE)
    assert sorted(table) == sorted(all_passes())


def test_help_names_only_registered_passes(capsys: pytest.CaptureFixture[str]) -> None:
    from surgery.cli import main
    from surgery.registry import all_passes

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    listed = re.search(r"named passes \(([^;)]*)", text)
    assert listed is not None, text
    named = [name.strip() for name in listed.group(1).split(",") if name.strip() != "..."]
    named += re.findall(r"surgery passes ([a-z0-9-]+)", text)
    assert named
    assert [name for name in named if name not in all_passes()] == []
    if not any("fuse" in name for name in all_passes()):
        assert "fusion" not in text.lower()


def test_quick_start_is_the_block_ci_runs() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from readme_command import readme_command
    finally:
        sys.path.pop(0)
    command = readme_command("Quick start")  # the first block, not the CPU-index variant
    assert command.startswith("pip install torch==") and "--index-url" not in command
    assert "pip install -e '.[export]'" in command and command.endswith("surgery demo")
    assert 'readme_command.py "Quick start"' in (ROOT / ".ci" / "run").read_text()


def test_torch_pin_is_one_version_with_a_cpu_index_command() -> None:
    quick_start = _section("Quick start")
    pins = set(re.findall(r"torch==([0-9.]+)", quick_start))
    pins |= set(re.findall(r"torch==([0-9.]+)", (ROOT / "scripts" / "test").read_text()))
    assert len(pins) == 1, pins
    cpu = f"pip install torch=={pins.pop()} --index-url https://download.pytorch.org/whl/cpu"
    assert f"```bash\n{cpu}\n" in quick_start


def test_view_is_introduced_with_its_extra() -> None:
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")
    row = next(line for line in TEXT.splitlines() if line.startswith("| `surgery view"))
    assert "`[view]` extra: `pip install -e '.[view]'`" in row
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert any(req.startswith("netron") for req in extras["view"])
