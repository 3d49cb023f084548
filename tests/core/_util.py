"""Helpers shared by the core tests."""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort


def file_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder``, by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def run_onnx(path: Path, batch: int = 3, width: int = 32) -> np.ndarray:
    """Run a synthetic model in ONNX Runtime on a fixed input."""
    x = np.random.default_rng(7).standard_normal((batch, width), dtype=np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


ROOT = Path(__file__).parents[2]


def absolute_imports() -> Iterator[tuple[Path, str]]:
    """``(file, module)`` for every absolute import in ``surgery/`` and ``passes/`` (ast, not run)."""
    for path in sorted([*ROOT.glob("surgery/**/*.py"), *ROOT.glob("passes/**/*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield path, alias.name
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                yield path, node.module
