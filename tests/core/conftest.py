"""Fixtures for the core tests: small synthetic models with external data, built on the fly."""

from __future__ import annotations

from pathlib import Path

import pytest

from surgery.synthetic import write_synthetic_model


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    """A synthetic model ``model/m.onnx`` + ``m.onnx.data`` (3 layers of 32×32 fp32)."""
    folder = tmp_path / "model"
    folder.mkdir()
    return write_synthetic_model(folder / "m.onnx")
