"""quantize's ``gather`` option is on by default only if Transformers.js's runtimes all run it.

The option writes ``com.microsoft.GatherBlockQuantized``. Transformers.js 4.3.1 (``package.json``)
runs models with onnxruntime-node under Node and, in browsers, with the ``onnxruntime-web/webgpu``
build embedded in its web bundle (for device ``wasm`` too). ``tests/js/run_model.mjs`` tries each
package on a quantized embedding. Measured: onnxruntime-node 1.30 and onnxruntime-web's plain wasm
build run it; the webgpu build's wasm has no CPU kernel for it. The default follows what is
measured here, so an upgrade that adds the kernel fails this test until the default is flipped.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from passes.quantize import Quantize, QuantizeOptions
from surgery import writer
from surgery.io import load_model

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ["onnxruntime-node", "onnxruntime-web", "onnxruntime-web/webgpu"]


def _quantized_embedding(tmp_path: Path, scales: str) -> Path:
    table = np.random.default_rng(0).standard_normal((64, 32), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["embedded"], axis=0, name="embed")],
        "embedding",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("embedded", TensorProto.FLOAT, ["batch", "sequence", 32])],
        [numpy_helper.from_array(table, "table")],
    )
    source = tmp_path / "embedding.onnx"
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), source
    )
    model = load_model(source)
    assert Quantize(mode="q4", gather=True)(model).modified
    if scales == "float16":  # as q4f16 leaves them
        from passes.fp16 import Fp16

        assert Fp16()(model).modified
    out = tmp_path / scales / "embedding_q4.onnx"
    writer.save_model(model, out)
    return out


@pytest.mark.parametrize("scales", ["float32", "float16"])
def test_gather_default_is_on_only_if_every_runtime_runs_gather_block_quantized(
    tmp_path: Path, scales: str
) -> None:
    if shutil.which("node") is None:
        message = "node is not installed: the runtime check of GatherBlockQuantized is SKIPPED"
        warnings.warn(message, stacklevel=1)
        pytest.skip(message)
    assert (REPO / "node_modules" / "onnxruntime-web").is_dir(), (
        "Transformers.js is not installed; run `npm ci --ignore-scripts` (scripts/test does)"
    )
    model = _quantized_embedding(tmp_path, scales)
    runs = {}
    for package in PACKAGES:
        result = subprocess.run(
            # Liftoff only: V8's optimising tier-up of the 27 MB wasm would hold the exit ~2 min.
            [
                "node",
                "--liftoff-only",
                str(REPO / "tests" / "js" / "run_model.mjs"),
                str(model),
                package,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
        assert result.returncode == 0, result.stderr[-4000:]
        runs[package] = json.loads(result.stdout.strip().splitlines()[-1])["result"]
    assert runs["onnxruntime-node"] == "ok", runs
    assert runs["onnxruntime-web"] == "ok", runs
    assert "GatherBlockQuantized" in runs["onnxruntime-web/webgpu"], runs
    everywhere = all(r == "ok" for r in runs.values())
    assert QuantizeOptions.model_fields["gather"].default is everywhere, runs
