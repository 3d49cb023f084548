"""The real client in a real browser: Transformers.js's web build in headless Chromium.

``surgery apply paligemma2`` writes the tiny PaliGemma 2's output folder; a local HTTP server on
127.0.0.1 serves it beside the web build of the npm package Transformers.js
(``dist/transformers.min.js``, what its CDN serves) and onnxruntime-web's wasm files (which the
library would otherwise fetch from a CDN). Chromium opens ``tests/js/browser.html``, which loads
the model with the library's defaults (device ``wasm``, so dtype ``q8``: the ``_quantized``
files), runs the prompt once (the logits at its last position) and generates greedily, and POSTs
the results back; they must equal our ONNX Runtime driver's on the same files. A second run asks
for dtype ``q4f16`` (``MatMulNBits``, float16) on the same device. Chromium resolves no host but
127.0.0.1, so nothing leaves the machine.
Without Chromium (``scripts/test`` installs Debian's ``chromium``) the test is skipped with a
warning, never passed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import warnings
from collections.abc import Iterator
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import numpy as np
import pytest

from surgery.cli import main
from surgery.verify import PartsRunner, processor_inputs, random_images

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
TIMEOUT_S = 120
#: Flags of a quiet, throw-away headless browser that reaches nothing but 127.0.0.1.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]


class _Server(ThreadingHTTPServer):
    """Serves URL prefixes from folders, logs every path asked for and keeps the page's result."""

    def __init__(self, roots: dict[str, Path]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.roots = roots
        self.requested: list[str] = []
        self.result: dict[str, Any] | None = None
        self.done = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(SimpleHTTPRequestHandler):
    server: _Server

    def translate_path(self, path: str) -> str:
        path = urlsplit(path).path
        self.server.requested.append(path)
        for prefix, root in self.server.roots.items():
            if path.startswith(prefix):
                self.directory = str(root)  # the base class resolves the rest safely under it
                return super().translate_path("/" + path.removeprefix(prefix))
        return "/nonexistent"

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.result = json.loads(body)
        self.send_response(HTTPStatus.NO_CONTENT)
        self.end_headers()
        self.server.done.set()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def folder(paligemma2_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``surgery apply paligemma2`` on the tiny PaliGemma 2, and an image at its processor's size
    (Transformers.js resizes with its own bicubic: no resize keeps the pixels exact)."""
    out = tmp_path_factory.mktemp("browser") / "out"
    assert main(["apply", "paligemma2", str(paligemma2_onnx), "-o", str(out), "-q"]) == 0
    size = json.loads((out / "preprocessor_config.json").read_text())["size"]["height"]
    random_images(size, 1)[0].save(out / "image.png")
    return out


@pytest.fixture
def server(tmp_path: Path) -> Iterator[_Server]:
    roots = {"/page/": REPO / "tests" / "js"}
    httpd = _Server(roots)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


def _require_chromium_and_transformersjs() -> None:
    if not Path(CHROMIUM).exists():
        message = (
            f"{CHROMIUM} is missing (apt-get install chromium; scripts/test does): "
            "the browser test is SKIPPED"
        )
        warnings.warn(message, stacklevel=2)
        pytest.skip(message)
    if not (REPO / "node_modules" / "@huggingface" / "transformers").is_dir():
        message = "Transformers.js is not installed (npm ci --ignore-scripts): the browser test is SKIPPED"
        if shutil.which("npm") is not None:
            pytest.fail(message.replace("SKIPPED", "cannot run; scripts/test installs it"))
        warnings.warn(message, stacklevel=2)
        pytest.skip(message)


@pytest.mark.parametrize(
    ("dtype", "suffix", "tolerance"),
    [
        # The library's defaults: wasm, so q8. Browser and ONNX Runtime logits: 0.0 apart
        # (ORT 1.32 vs onnxruntime-web 1.31), while q8 and fp32 are about 0.13 apart.
        (None, "_quantized", 1e-4),
        # MatMulNBits with float16 in the browser: 0.002 apart (fp16 rounding in other
        # kernels), while q4f16 and fp32 are about 1.1 apart.
        ("q4f16", "_q4f16", 1e-2),
    ],
)
def test_transformersjs_in_chromium_generates_our_tokens(
    folder: Path,
    paligemma2_checkpoint: Path,
    server: _Server,
    tmp_path: Path,
    dtype: str | None,
    suffix: str,
    tolerance: float,
) -> None:
    _require_chromium_and_transformersjs()
    server.roots.update(
        {
            "/transformers/": REPO / "node_modules" / "@huggingface" / "transformers" / "dist",
            "/ort/": REPO / "node_modules" / "onnxruntime-web" / "dist",
            "/models/paligemma2/": folder,
        }
    )
    prompt, steps = "caption en", 10
    params = {"image": "/models/paligemma2/image.png", "prompt": prompt, "steps": steps}
    query = urlencode(params if dtype is None else {**params, "dtype": dtype})
    browser = subprocess.Popen(
        [
            CHROMIUM,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            f"{server.url}/page/browser.html?{query}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        finished = server.done.wait(TIMEOUT_S)
    finally:
        browser.kill()
        _, stderr = browser.communicate()
    assert finished, f"no result from the page in {TIMEOUT_S} s; chromium said:\n{stderr[-4000:]}"
    got = server.result
    assert got is not None and "error" not in got, got
    # The files of the dtype asked for (by default q8: _quantized), and no other dtype's.
    models = {p for p in server.requested if p.endswith(".onnx")}
    assert models == {
        f"/models/paligemma2/onnx/{part}{suffix}.onnx"
        for part in ("vision_encoder", "embed_tokens", "decoder_model_merged")
    }

    inputs = processor_inputs(paligemma2_checkpoint, [prompt], [folder / "image.png"])
    np.testing.assert_array_equal(np.asarray(got["input_ids"]), inputs["input_ids"])
    pixels = np.asarray(got["pixel_values"], np.float32).reshape(inputs["pixel_values"].shape)
    np.testing.assert_allclose(pixels, inputs["pixel_values"], rtol=0, atol=1e-6)
    from transformers import GenerationConfig

    generation = GenerationConfig.from_pretrained(paligemma2_checkpoint)
    eos = generation.eos_token_id
    eos_ids, pad = set(eos if isinstance(eos, list) else [eos]), generation.pad_token_id or 0
    ours = PartsRunner(folder, suffix).greedy(inputs, steps, eos_ids, pad)
    # The page's logits come from a plain forward, where Transformers.js feeds
    # num_logits_to_keep 0 (every position): compute ours the same way.
    forward = PartsRunner(folder, suffix)
    forward.logits_kept = 0
    prefill = forward.greedy(inputs, 1, eos_ids, pad)
    new_tokens = np.asarray(got["sequences"])[:, inputs["input_ids"].shape[1] :]
    # Random weights give few distinct tokens (fp32 picks the same ones here); the logits are the
    # sharp check: browser and ONNX Runtime agree far closer than the dtype and fp32 do.
    np.testing.assert_allclose(
        np.asarray(got["logits"], np.float32)[None], prefill.logits[0], rtol=0, atol=tolerance
    )
    np.testing.assert_array_equal(new_tokens, ours.tokens)
