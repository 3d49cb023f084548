"""The real client in a real browser: Transformers.js's web build in headless Chromium.

``surgery apply`` with the flagship recipe (plus a ``_q4`` variant with ``gather: true``, see
:func:`folder`) writes the tiny PaliGemma 2's output folder; a local HTTP server on 127.0.0.1
serves it beside the web build of the npm package Transformers.js (``dist/transformers.min.js``,
what its CDN serves) and onnxruntime-web's wasm files (which the library would otherwise fetch
from a CDN). Chromium opens ``tests/js/browser.html``, which loads the model, runs the prompt once
(the logits at its last position) and generates greedily, and POSTs the results back; they must
equal our ONNX Runtime driver's on the same files. Chromium resolves no host but 127.0.0.1, so
nothing leaves the machine.

* Device ``wasm``: the library's defaults (dtype ``q8``: the ``_quantized`` files), then dtype
  ``q4f16`` (``MatMulNBits``, float16) on the same device.
* Device ``webgpu``: the same build's WebGPU execution provider, on the adapter Chromium offers.
  Headless Chromium on a machine without a GPU offers its software adapter, SwiftShader (vendor
  ``google``, architecture ``swiftshader``, a fallback adapter) without the ``shader-f16``
  feature: there fp32 (the library's default on webgpu) and ``q4`` run; ``q4f16`` and ``fp16``
  cannot (ONNX Runtime refuses to build the f16 shaders; Transformers.js refuses fp16 itself),
  and those cases are skipped with a warning that names the adapter and the error, never passed.
  The page is also teacher-forced along our driver's tokens, and logs where ONNX Runtime placed
  each node.

Without Chromium (``scripts/test`` installs Debian's ``chromium``) the tests are skipped with a
warning, never passed; so is the WebGPU test when Chromium offers no adapter at all.
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
import yaml

from surgery.cli import main
from surgery.verify import (
    NEAR_TIE,
    GreedyResult,
    PartsRunner,
    near_ties,
    processor_inputs,
    random_images,
)

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
#: The same with WebGPU: the GPU process kept, and WebGPU on for Linux (off there by default).
WEBGPU_FLAGS = [*(f for f in CHROMIUM_FLAGS if f != "--disable-gpu"), "--enable-unsafe-webgpu"]
PARTS = ("vision_encoder", "embed_tokens", "decoder_model_merged")


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
    """``surgery apply`` of the flagship recipe on the tiny PaliGemma 2, with one more dtype,
    ``_q4`` with ``gather: true`` (``MatMulNBits`` and ``GatherBlockQuantized``, float32 scales:
    what a WebGPU adapter without ``shader-f16`` can run), added as the recipe's own comment
    says; and an image at the processor's size (Transformers.js resizes with its own bicubic: no
    resize keeps the pixels exact)."""
    base = tmp_path_factory.mktemp("browser")
    recipe = yaml.safe_load((REPO / "recipes" / "paligemma2.yaml").read_text())
    at = recipe["passes"].index("fold-transposes")
    recipe["passes"][at:at] = [
        {"pass": "copy-parts", "parts": list(PARTS), "options": {"suffix": "_q4"}},
        {
            "pass": "quantize",
            "parts": [f"{part}_q4" for part in PARTS],
            "options": {"mode": "q4", "gather": True},
        },
    ]
    (base / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = base / "out"
    assert (
        main(["apply", str(base / "recipe.yaml"), str(paligemma2_onnx), "-o", str(out), "-q"]) == 0
    )
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


PROMPT, STEPS = "caption en", 10


def _open_page(
    server: _Server, folder: Path, tmp_path: Path, flags: list[str], **params: str
) -> dict[str, Any]:
    """Serve the folder and the library, open ``browser.html`` with ``params`` and return what
    the page POSTs."""
    server.roots.update(
        {
            "/transformers/": REPO / "node_modules" / "@huggingface" / "transformers" / "dist",
            "/ort/": REPO / "node_modules" / "onnxruntime-web" / "dist",
            "/models/paligemma2/": folder,
        }
    )
    query = urlencode(
        {"image": "/models/paligemma2/image.png", "prompt": PROMPT, "steps": STEPS, **params}
    )
    browser = subprocess.Popen(
        [
            CHROMIUM,
            *flags,
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
    assert server.result is not None
    return server.result


def _check_files_and_inputs(
    server: _Server, got: dict[str, Any], inputs: dict[str, np.ndarray], suffix: str
) -> None:
    """The page loaded the files of the dtype asked for, and no other dtype's, and fed the
    processor's inputs."""
    models = {p for p in server.requested if p.endswith(".onnx")}
    assert models == {f"/models/paligemma2/onnx/{part}{suffix}.onnx" for part in PARTS}
    np.testing.assert_array_equal(np.asarray(got["input_ids"]), inputs["input_ids"])
    pixels = np.asarray(got["pixel_values"], np.float32).reshape(inputs["pixel_values"].shape)
    np.testing.assert_allclose(pixels, inputs["pixel_values"], rtol=0, atol=1e-6)


def _special_tokens(checkpoint: Path) -> tuple[set[int], int]:
    from transformers import GenerationConfig

    generation = GenerationConfig.from_pretrained(checkpoint)
    eos = generation.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]), generation.pad_token_id or 0


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
    got = _open_page(
        server, folder, tmp_path, CHROMIUM_FLAGS, **({} if dtype is None else {"dtype": dtype})
    )
    assert "error" not in got, got
    inputs = processor_inputs(paligemma2_checkpoint, [PROMPT], [folder / "image.png"])
    _check_files_and_inputs(server, got, inputs, suffix)
    eos_ids, pad = _special_tokens(paligemma2_checkpoint)
    ours = PartsRunner(folder, suffix).greedy(inputs, STEPS, eos_ids, pad)
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


#: What ONNX Runtime's WebGPU execution provider must run itself, never hand to its CPU provider:
#: the quantized ops, and the float compute the decoder and the (fused) vision encoder are made of.
ON_WEBGPU = {
    "MatMulNBits", "GatherBlockQuantized", "MatMul", "Softmax", "Gelu", "Tanh", "Conv",
    "MultiHeadAttention",
}  # fmt: skip


def _cpu_placed(lines: list[str]) -> tuple[int, list[str]]:
    """From ONNX Runtime's verbose node-placement log: how many sessions it reported, and the op
    types of the nodes it placed on its CPU provider."""
    sessions, cpu, provider = 0, [], None
    for line in lines:
        text = line.split("VerifyEachNodeIsAssignedToAnEp]", 1)[1].rstrip()
        if text.strip() == "Node placements":
            sessions += 1
        elif "placed on [" in text:
            provider = text.split("placed on [", 1)[1].split("]", 1)[0]
        elif text.startswith("   ") and provider == "CPUExecutionProvider":
            cpu.append(text.split()[0])
    return sessions, cpu


@pytest.mark.parametrize(
    ("dtype", "suffix", "atol"),
    [
        # The library's default on webgpu (fp32). Measured on SwiftShader: at most 6.0e-4 apart
        # from ONNX Runtime CPU over 10 teacher-forced steps (logits up to 3.2; SwiftShader's
        # float32 is not bit-exact with ORT's CPU kernels); the bound is 3x that, while the
        # other dtypes are 0.006 (fp16) to 1.4 (q4) apart from fp32.
        (None, "", 2e-3),
        # MatMulNBits and GatherBlockQuantized, float32 scales: measured 5.8e-4 apart.
        ("q4", "_q4", 2e-3),
        # float16 compute on the GPU, where ONNX Runtime CPU computes much of the same graph in
        # float32: judged by the project's fp16 rule only (surgery.verify.near_ties: teacher-
        # forced top-1 ours or a near-tie under 0.02, cosine >= 0.9999), no absolute bound; not
        # measured here, as they need an adapter with shader-f16.
        ("q4f16", "_q4f16", None),
        ("fp16", "_fp16", None),
    ],
)
def test_transformersjs_on_webgpu_generates_our_tokens(
    folder: Path,
    paligemma2_checkpoint: Path,
    server: _Server,
    tmp_path: Path,
    dtype: str | None,
    suffix: str,
    atol: float | None,
) -> None:
    _require_chromium_and_transformersjs()
    inputs = processor_inputs(paligemma2_checkpoint, [PROMPT], [folder / "image.png"])
    eos_ids, pad = _special_tokens(paligemma2_checkpoint)
    ours = PartsRunner(folder, suffix).greedy(inputs, STEPS, eos_ids, pad)
    got = _open_page(
        server,
        folder,
        tmp_path,
        WEBGPU_FLAGS,
        device="webgpu",
        forced=",".join(str(int(t)) for t in ours.tokens[0]),
        placements="1",
        **({} if dtype is None else {"dtype": dtype}),
    )
    adapter = got["adapter"]
    if adapter is None:
        message = "Chromium offers no WebGPU adapter here: the WebGPU browser test is SKIPPED"
        warnings.warn(message, stacklevel=1)
        pytest.skip(message)
    name = (
        f"{adapter['vendor']}/{adapter['architecture']} (fallback: {adapter['isFallbackAdapter']})"
    )
    if "error" in got and atol is None and "shader-f16" not in adapter["features"]:
        # Transformers.js refuses fp16 itself; ONNX Runtime refuses to build f16 shaders.
        assert "does not support fp16" in got["error"] or "requires f16" in got["error"], got
        message = (
            f"the WebGPU adapter {name} has no shader-f16: {dtype} cannot run on it "
            f"({got['error'].splitlines()[0]}); the {dtype} WebGPU browser test is SKIPPED"
        )
        warnings.warn(message, stacklevel=1)
        pytest.skip(message)
    assert "error" not in got, (name, got)
    _check_files_and_inputs(server, got, inputs, suffix)
    forced = GreedyResult(
        ours.tokens, [np.asarray(step, np.float32)[None] for step in got["forced_logits"]]
    )
    assert len(forced.logits) == len(ours.logits)
    # Teacher-forced along our tokens, the browser's logits at every step.
    if atol is not None:
        for step, (theirs, mine) in enumerate(zip(forced.logits, ours.logits, strict=True)):
            np.testing.assert_allclose(theirs, mine, rtol=0, atol=atol, err_msg=f"step {step}")
    close, report = near_ties(
        ours, forced, f"WebGPU {name}, {dtype or 'fp32'}", reference_name="ONNX Runtime CPU"
    )
    assert close, report
    # Free-running, its own tokens: ours, or ours up to a step where our top-1 leads the
    # browser's pick by a near-tie only (after which free-running tokens part for good).
    new_tokens = np.asarray(got["sequences"])[0, inputs["input_ids"].shape[1] :]
    common = min(len(new_tokens), ours.tokens.shape[1])
    pairs = zip(new_tokens[:common], ours.tokens[0, :common], strict=True)
    differ = [i for i, (a, b) in enumerate(pairs) if a != b]
    if differ or len(new_tokens) != ours.tokens.shape[1]:
        step = differ[0] if differ else common
        assert step < common, (new_tokens, ours.tokens)
        mine = ours.logits[step][0]
        lead = float(mine[ours.tokens[0, step]] - mine[new_tokens[step]])
        assert lead < NEAR_TIE, (step, new_tokens, ours.tokens, lead, report)
    # Every session reported its placements; the CPU provider got only shape and mask arithmetic.
    sessions, cpu = _cpu_placed(got["placements"])
    assert sessions == len(PARTS), got["placements"]
    assert not ON_WEBGPU & set(cpu), cpu
