"""Session fixtures: tiny random PaliGemma checkpoints and their exported ONNX graphs.

Each checkpoint is generated once per session with :func:`surgery.checkpoint.make_random_checkpoint`
and each graph exported once with :func:`surgery.export.export_checkpoint`, into
``tmp_path_factory`` folders. Later test modules use them by fixture name:

* ``paligemma_checkpoint`` / ``paligemma_onnx``: PaliGemma 1 (Gemma), 16 image tokens;
* ``paligemma2_checkpoint`` / ``paligemma2_onnx``: PaliGemma 2 (Gemma 2), 16 image tokens;
* ``paligemma2_64px_checkpoint`` / ``paligemma2_64px_onnx``: PaliGemma 2, 64 image tokens;
* ``paligemma2_window_checkpoint`` / ``paligemma2_window_onnx``: PaliGemma 2 whose sliding window
  (6) is shorter than any prompt.

Fixtures skip (not fail) when torch or transformers is missing: the export extra is optional.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import surgery.builtins  # noqa: F401  (tests name built-in passes and layouts, as the CLI does)

#: Fixture prefix -> preset of :data:`surgery.checkpoint.PRESETS`.
TINY_MODELS = {
    "paligemma": "tiny-paligemma",
    "paligemma2": "tiny-paligemma2",
    "paligemma2_64px": "tiny-paligemma2-64px",
    "paligemma2_window": "tiny-paligemma2-window",
}


def _require_export_extra() -> None:
    pytest.importorskip("torch", reason="the export extra (torch) is not installed")
    pytest.importorskip("transformers", reason="the export extra (transformers) is not installed")


def _checkpoint_fixture(prefix: str, preset: str) -> Callable[..., Path]:
    @pytest.fixture(scope="session", name=f"{prefix}_checkpoint")
    def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
        _require_export_extra()
        from surgery.checkpoint import make_random_checkpoint

        return make_random_checkpoint(
            preset, tmp_path_factory.mktemp(preset) / "checkpoint", progress=False
        )

    return checkpoint


def _onnx_fixture(prefix: str) -> Callable[..., Path]:
    @pytest.fixture(scope="session", name=f"{prefix}_onnx")
    def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
        _require_export_extra()
        from surgery.export import export_checkpoint

        checkpoint = request.getfixturevalue(f"{prefix}_checkpoint")
        out = tmp_path_factory.mktemp(f"{prefix}-onnx") / "model.onnx"
        return export_checkpoint(checkpoint, out, progress=False)

    return exported


_fixtures: dict[str, Any] = {}
for _prefix, _preset in TINY_MODELS.items():
    _fixtures[f"{_prefix}_checkpoint"] = _checkpoint_fixture(_prefix, _preset)
    _fixtures[f"{_prefix}_onnx"] = _onnx_fixture(_prefix)
globals().update(_fixtures)
