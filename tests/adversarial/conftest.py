"""The adversarial corpus's harness: hostile inputs are built by code, run through the CLI.

Every case checks the three promises of a refusal: exit code 1 with one line on stderr, inputs
byte-identical afterwards, and nothing left beside the destination.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from surgery.synthetic import write_synthetic_model


@dataclasses.dataclass
class Outcome:
    """What one CLI run returned."""

    code: int
    stdout: str
    stderr: str


def run_cli(
    *args: str | os.PathLike[str], cwd: Path | None = None, timeout: float = 120
) -> Outcome:
    """Run ``surgery ARGS`` in a child process (so signals, imports and exits are real)."""
    proc = subprocess.run(
        [sys.executable, "-m", "surgery.cli", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return Outcome(proc.returncode, proc.stdout, proc.stderr)


def digests(*paths: Path) -> dict[str, str]:
    """SHA-256 of every file at or under ``paths`` (links are followed), by path."""
    out: dict[str, str] = {}
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            out[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest()
    return out


def assert_refused(outcome: Outcome, *fragments: str) -> str:
    """Exit 1, one line on stderr that starts ``surgery: error:`` and holds each fragment."""
    lines = outcome.stderr.strip().splitlines()
    assert outcome.code == 1, (outcome.code, outcome.stderr[-2000:])
    assert len(lines) == 1, outcome.stderr[-2000:]
    assert lines[0].startswith("surgery: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def leftovers(dest: Path) -> list[str]:
    """Temporary or backup entries the tool left beside ``dest``."""
    return sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}."))


def refused_at_load(model: Path, tmp_path: Path, message: str) -> None:
    """``inspect`` and ``apply cleanup`` both refuse ``model`` with ``message``; nothing changes."""
    before = digests(model.parent)
    assert assert_refused(run_cli("inspect", model)) == f"surgery: error: {model}: {message}"
    dest = tmp_path / "out"
    line = assert_refused(run_cli("apply", "cleanup", model, "-o", dest))
    assert line == f"surgery: error: {model}: {message}"
    assert not dest.exists()
    assert leftovers(dest) == []
    assert digests(model.parent) == before


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    """A small valid model ``model/m.onnx`` + ``m.onnx.data`` (3 layers of 32×32 fp32)."""
    folder = tmp_path / "model"
    folder.mkdir()
    return write_synthetic_model(folder / "m.onnx")
