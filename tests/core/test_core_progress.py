"""Progress output: bars and spinners only on a terminal, one stage line in a redirected log."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from _util import ROOT, absolute_imports

from surgery import load, save
from surgery.progress import bar, spinner
from surgery.synthetic import write_synthetic_model


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal, and keeps what was written."""

    def isatty(self) -> bool:
        return True


def test_bar_is_off_when_stderr_is_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    with bar(total=10, desc="writing weights") as progress:
        assert progress.disable
        progress.update(10)
    assert capsys.readouterr().err == ""


def test_bar_draws_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    with bar(total=10, desc="writing weights") as progress:
        assert not progress.disable
        progress.update(10)
    assert "writing weights: 100%" in terminal.getvalue()


def test_bar_is_off_when_progress_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    with bar(total=10, desc="writing weights", enabled=False) as progress:
        progress.update(10)
    assert terminal.getvalue() == ""


def test_save_writes_no_carriage_returns_into_a_redirected_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = load(write_synthetic_model(tmp_path / "m.onnx", progress=True))
    save(bundle, tmp_path / "out", progress=True)
    assert "\r" not in capsys.readouterr().err


def test_spinner_prints_one_stage_line_when_not_a_terminal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with spinner("tracing"):
        time.sleep(0.3)
    assert capsys.readouterr().err == "tracing\n"


def test_spinner_redraws_in_place_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    with spinner("tracing"):
        time.sleep(0.5)
    text = terminal.getvalue()
    frames = text.split("\r")[1:]
    assert len(frames) >= 3, text  # a redraw about every 0.2 s, and the closing line
    assert frames[0] == "tracing | 0s"
    assert frames[-1].startswith("tracing (0.") and frames[-1].endswith("s)\x1b[K\n")


def test_spinner_is_silent_when_progress_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    with spinner("tracing", enabled=False):
        pass
    assert terminal.getvalue() == ""


def test_every_progress_bar_goes_through_surgery_progress() -> None:
    """tqdm is imported in one module only, so the terminal rule cannot be forgotten elsewhere."""
    importers = [
        str(path.relative_to(ROOT))
        for path, name in absolute_imports()
        if name.split(".")[0] == "tqdm"
    ]
    assert importers == ["surgery/progress.py"]
