"""Transformers.js under Node, as the tests drive it: ``tests/js/generate.mjs`` on an output folder."""

from __future__ import annotations

import json
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest

from surgery.verify import random_images

REPO = Path(__file__).resolve().parents[1]


def require_transformers_js() -> None:
    """Skip loudly without Node; fail without the npm package (scripts/test installs it)."""
    if shutil.which("node") is None:
        message = "node is not installed: the Transformers.js client test is SKIPPED"
        warnings.warn(message, stacklevel=2)
        pytest.skip(message)
    assert (REPO / "node_modules" / "@huggingface" / "transformers").is_dir(), (
        "Transformers.js is not installed; run `npm ci --ignore-scripts` (scripts/test does)"
    )


def image_at_processor_size(folder: Path, tmp_path: Path) -> Path:
    """A random image already at the folder's processor size (no client-side resize)."""
    size = json.loads((folder / "preprocessor_config.json").read_text())["size"]["height"]
    image = tmp_path / "image.png"
    random_images(size, 1)[0].save(image)
    return image


def node_generate(
    folder: Path, image: Path, prompt: str, steps: int, dtype: str
) -> dict[str, list[list[int]]]:
    """Greedy generation by Transformers.js from ``folder`` with ``dtype``: its input ids and
    sequences."""
    result = subprocess.run(
        ["node", str(REPO / "tests" / "js" / "generate.mjs"), str(folder), str(image), prompt,
         str(steps), dtype],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
