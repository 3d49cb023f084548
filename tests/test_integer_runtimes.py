"""quantize's 8-bit modes rewrite Conv and Gather only where Transformers.js's runtimes run them.

Beside ``MatMulInteger``, ONNX Runtime's IntegerOps quantizer (the route of Transformers.js's
``scripts/quantize.py``) writes ``ConvInteger`` (weights int8 or uint8, by mode) and, for a
``Gather`` of a constant table, the table in uint8 and a ``DequantizeLinear`` after. Transformers.js
4.3.1 (``package.json``) runs models with onnxruntime-node under Node and, in browsers, with the
``onnxruntime-web/webgpu`` build embedded in its web bundle (for device wasm too); that script's
QUINT8 rule says onnxruntime-web 1.20 had no int8 ``ConvInteger``. Here ONNX Runtime's quantizer
writes each candidate and ``tests/js/run_model.mjs`` runs it in each package on fixed inputs: the
weight types that load and compute what ONNX Runtime in Python computes in all of them must be
:data:`passes.quantize.RUNTIME_WEIGHT_TYPES`, which decides what the pass rewrites (measured:
all three, onnxruntime-node 1.30 and onnxruntime-web 1.31, plain and webgpu). An upgrade that
adds or drops a kernel fails this test until the table follows.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from _onnx_quantizer import transformersjs_q8
from onnx import TensorProto, helper, numpy_helper

from passes.quantize import RUNTIME_WEIGHT_TYPES, Quantize
from surgery.io import load_model

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ["onnxruntime-node", "onnxruntime-web", "onnxruntime-web/webgpu"]
#: (op, weight type) -> the quantizer's weight type that writes it (Gather's table is uint8 always).
CANDIDATES = {
    ("Conv", TensorProto.INT8): TensorProto.INT8,
    ("Conv", TensorProto.UINT8): TensorProto.UINT8,
    ("Gather", TensorProto.UINT8): TensorProto.INT8,
}


def _float_model(path: Path) -> Path:
    """A patch-embedding Conv (with bias) and an embedding Gather, as in PaliGemma's parts."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["pixels", "kernel", "bias"], ["patches"], strides=[4, 4],
                             kernel_shape=[4, 4], name="patch_embedding"),
            helper.make_node("Gather", ["table", "ids"], ["embedded"], axis=0, name="embed"),
            helper.make_node("Mul", ["embedded", "normalizer"], ["embeds"], name="scale"),
        ],
        "conv_gather",
        [
            helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [1, 3, 16, 16]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4]),
        ],
        [
            helper.make_tensor_value_info("patches", TensorProto.FLOAT, [1, 8, 4, 4]),
            helper.make_tensor_value_info("embeds", TensorProto.FLOAT, [1, 4, 32]),
        ],
        [
            numpy_helper.from_array(rng.standard_normal((8, 3, 4, 4), np.float32), "kernel"),
            numpy_helper.from_array(rng.standard_normal(8, np.float32), "bias"),
            numpy_helper.from_array(rng.standard_normal((64, 32), np.float32), "table"),
            numpy_helper.from_array(np.array(5.6, np.float32), "normalizer"),
        ],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.save(model, path)
    return path


def _anchor(source: Path, op: str, weight_type: int, path: Path) -> Path:
    """What Transformers.js's route writes with this weight type, restricted to ``op``."""
    quantized = transformersjs_q8(
        onnx.load(source),
        per_channel=False,
        reduce_range=False,
        unsigned=weight_type != TensorProto.INT8,
        op_types={op},
    )
    onnx.save(quantized, path)
    return path


#: The quantized weight of each op in :func:`_float_model`.
QUANTIZED = {"Conv": "kernel_quantized", "Gather": "table_quantized"}
FEEDS = {
    "pixels": np.sin(np.arange(768, dtype=np.float32)).reshape(1, 3, 16, 16),
    "ids": np.array([[1, 5, 63, 0]], np.int64),
}


def _runs_everywhere(model: Path, tmp_path: Path) -> dict[str, str]:
    """Each package's verdict on ``model``: "ok" when it loads and computes ONNX Runtime's
    outputs (to 1e-5), else its error or the largest difference."""
    want = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, FEEDS)
    names = [o.name for o in onnx.load(model).graph.output]
    feeds = tmp_path / "feeds.json"
    feeds.write_text(
        json.dumps(
            {
                k: {"type": "int64" if v.dtype == np.int64 else "float32", "dims": list(v.shape),
                    "data": v.ravel().tolist()}
                for k, v in FEEDS.items()
            }
        )
    )  # fmt: skip
    verdicts = {}
    for package in PACKAGES:
        result = subprocess.run(
            # Liftoff only: V8's optimising tier-up of the 27 MB wasm would hold the exit ~2 min.
            ["node", "--liftoff-only", str(REPO / "tests" / "js" / "run_model.mjs"), str(model),
             package, str(feeds)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-4000:]
        run = json.loads(result.stdout.strip().splitlines()[-1])
        verdict = run["result"]
        if verdict == "ok":
            got = [np.asarray(run["outputs"][n]["data"], np.float32) for n in names]
            worst = max(float(np.abs(g - w.ravel()).max()) for g, w in zip(got, want, strict=True))
            verdict = "ok" if worst <= 1e-5 else f"differs by {worst}"
        verdicts[package] = verdict
    return verdicts


def test_eight_bit_ops_are_rewritten_only_where_every_runtime_runs_them(tmp_path: Path) -> None:
    if shutil.which("node") is None:
        message = "node is not installed: the runtime check of ConvInteger / Gather is SKIPPED"
        warnings.warn(message, stacklevel=1)
        pytest.skip(message)
    assert (REPO / "node_modules" / "onnxruntime-web").is_dir(), (
        "Transformers.js is not installed; run `npm ci --ignore-scripts` (scripts/test does)"
    )
    source = _float_model(tmp_path / "float.onnx")
    measured: dict[str, set[int]] = {op: set() for op in RUNTIME_WEIGHT_TYPES}
    verdicts = {}
    for (op, weight_type), quantizer_type in CANDIDATES.items():
        name = f"{op}_{TensorProto.DataType.Name(weight_type).lower()}"
        model = _anchor(source, op, quantizer_type, tmp_path / f"{name}.onnx")
        initializers = {t.name: t.data_type for t in onnx.load(model).graph.initializer}
        assert initializers[QUANTIZED[op]] == weight_type, "the candidate is what it claims"
        verdicts[name] = _runs_everywhere(model, tmp_path)
        if all(v == "ok" for v in verdicts[name].values()):
            measured[op].add(weight_type)
    assert measured == {op: set(types) for op, types in RUNTIME_WEIGHT_TYPES.items()}, verdicts


def test_an_op_without_a_kernel_for_its_weight_type_stays_float(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Were a runtime to lack int8 ConvInteger (as onnxruntime-web 1.20 did), mode int8 would
    leave the Conv float and say so; uint8 and the Gather are still rewritten."""
    monkeypatch.setitem(RUNTIME_WEIGHT_TYPES, "Conv", frozenset({TensorProto.UINT8}))
    source = _float_model(tmp_path / "float.onnx")
    for mode, conv in (("int8", "Conv"), ("uint8", "ConvInteger")):
        model = load_model(source)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="passes.quantize"):
            pass_ = Quantize(mode=mode)
            assert pass_(model).modified
        ops = [n.op_type for n in model.graph]
        assert conv in ops and "DequantizeLinear" in ops, (mode, ops)
        assert pass_.statistics["conv"] == (conv == "ConvInteger")
        assert caplog.messages == (
            [
                "quantize (int8): Conv left float in part 'conv_gather': not every runtime of "
                "Transformers.js runs it with int8 weights (RUNTIME_WEIGHT_TYPES)"
            ]
            if mode == "int8"
            else []
        )
