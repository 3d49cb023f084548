"""The quick start as a new user meets it: what the demo keeps, and what export and verify print."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any, NoReturn

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import surgery.export
from surgery.cli import main
from surgery.export import export_checkpoint
from surgery.verify import _torch_model, processor_inputs, torch_greedy

TRACING = "tracing with torch.onnx.export(dynamo=True), weights on the meta device"


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal, and keeps what was written."""

    def isatty(self) -> bool:
        return True


class _Stop(Exception):
    """Raised by the stand-in trace once it has seen what was printed before tracing."""


def _stop_at_trace(monkeypatch: pytest.MonkeyPatch, seconds: float = 0.0) -> list[str]:
    """Replace the trace by a wait; return the list that gets stderr as it was while tracing."""
    import time

    seen: list[str] = []

    def trace(model: Any) -> NoReturn:
        time.sleep(seconds)
        stream = surgery.export.sys.stderr
        seen.append(stream.getvalue() if isinstance(stream, io.StringIO) else "")
        raise _Stop

    monkeypatch.setattr(surgery.export, "_trace", trace)
    return seen


def test_export_prints_one_stage_line_for_the_trace_in_a_log(
    paligemma2_checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _stop_at_trace(monkeypatch)
    with pytest.raises(_Stop):
        export_checkpoint(paligemma2_checkpoint, tmp_path / "model.onnx")
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if TRACING in line]
    assert len(lines) == 1, err
    assert re.fullmatch(rf"\[ *\d+\.\ds\] {re.escape(TRACING)}", lines[0]), lines


def test_export_spins_while_tracing_on_a_terminal(
    paligemma2_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    seen = _stop_at_trace(monkeypatch, seconds=0.5)
    with pytest.raises(_Stop):
        export_checkpoint(paligemma2_checkpoint, tmp_path / "model.onnx")
    frames = [f for f in seen[0].split("\r") if TRACING in f]
    assert len(frames) >= 2, seen[0]  # redrawn while the trace ran
    assert all(re.fullmatch(rf".*{re.escape(TRACING)} [|/\\-] \d+s", f) for f in frames), frames
    assert terminal.getvalue().endswith("\x1b[K\n")  # the spinner line is finished


def test_export_is_silent_without_progress(
    paligemma2_checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    _stop_at_trace(monkeypatch, seconds=0.3)
    with pytest.raises(_Stop):
        export_checkpoint(paligemma2_checkpoint, tmp_path / "model.onnx", progress=False)
    assert terminal.getvalue() == ""


def test_verify_does_not_print_transformers_loading_bars(
    paligemma2_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # as in a fresh process
    _torch_model.cache_clear()  # load for real, not from another test's cache
    inputs = processor_inputs(paligemma2_checkpoint, ["caption en"])
    torch_greedy(paligemma2_checkpoint, inputs, steps=1)
    err = capsys.readouterr().err
    assert "Loading weights" not in err
    assert "\r" not in err


def test_demo_refuses_an_existing_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "demo").mkdir()
    assert main(["demo", "-o", str(tmp_path / "demo")]) == 1
    assert capsys.readouterr().err == (
        f"surgery: error: {tmp_path / 'demo'}: output already exists; pass --force to replace it\n"
    )


def test_demo_keeps_what_it_finished_when_verification_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The failure a new user met: verify could not import Pillow, after a minute of export."""

    def verify(*args: Any, **kwargs: Any) -> NoReturn:
        raise ModuleNotFoundError("No module named 'PIL'")

    monkeypatch.setattr("surgery.demo.verify", verify)
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "stale.txt").write_text("from an earlier demo")
    assert main(["demo", "-o", str(demo), "--force"]) == 3
    err = capsys.readouterr().err
    assert (
        f"demo: stopped in step 5/5 verify; what the earlier steps made is kept in {demo}/: "
        "checkpoint/, model.onnx, out/\n"
        "surgery: internal error: ModuleNotFoundError: No module named 'PIL'\n"
    ) in err
    assert sorted(p.name for p in demo.iterdir()) == [
        "checkpoint",
        "model.onnx",
        "model.onnx.data",
        "out",
    ]  # --force replaced the old folder; no temporary folders left
    assert (demo / "checkpoint" / "config.json").is_file()
    for name in ("vision_encoder", "embed_tokens", "decoder_model_merged"):
        assert (demo / "out" / "onnx" / f"{name}.onnx").is_file()
        assert (demo / "out" / "onnx" / f"{name}_fp16.onnx").is_file()
