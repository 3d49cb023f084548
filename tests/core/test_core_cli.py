"""The command line: listing passes, help, serving a model in Netron, usage errors."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from surgery.cli import main


def test_passes_lists_every_pass_with_its_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert re.search(
        r"^remove-unused +remove nodes, functions and opsets that no output depends on$", out, re.M
    )
    assert re.search(r"^split-large-tensors +split weights larger than a data chunk", out, re.M)
    assert main(["passes", "shape_inference"]) == 0
    assert "strict (bool, default True)" in capsys.readouterr().out


def test_unknown_pass_name_in_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["passes", "optimise"]) == 1
    assert "did you mean 'optimize'?" in capsys.readouterr().err


def test_usage_error_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["apply", "cleanup"])
    assert info.value.code == 1
    assert "the following arguments are required: model" in capsys.readouterr().err


def test_help_explains_every_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "surgery.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in (
        "apply",
        "passes",
        "validate",
        "inspect",
        "view",
        "export",
        "make-random",
        "demo",
    ):
        assert command in out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_view_serves_the_model_on_localhost(model_path: Path) -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "surgery.cli", "view", str(model_path), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith(f"serving {model_path} at http://127.0.0.1:{port}")
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                    assert response.status == 200
                    assert b"netron" in response.read().lower()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_view_refuses_a_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["view", str(tmp_path / "missing.onnx")]) == 1
    assert (
        capsys.readouterr().err.strip()
        == f"surgery: error: {tmp_path / 'missing.onnx'}: no such file"
    )
