"""The quantize pass against its anchor: ONNX Runtime's own quantizers on the same fp32 parts.

The tiny PaliGemma 2 goes through the flagship recipe with one extra variant per mode (a
``copy-parts`` + ``quantize`` pair, before ``fold-transposes`` as in the recipe). The anchor is
run here, on the fp32 files of the same output (where ``fold-transposes`` has already made the
tied lm_head a plain initializer): ``MatMulNBitsQuantizer`` (block 32, symmetric),
``MatMulBnb4Quantizer`` (NF4, block 64) and ``ONNXQuantizer`` in IntegerOps mode as Transformers.js's
``scripts/quantize.py`` calls it: every op type of ``IntegerOpsRegistry`` but those of its
``op_block_list`` (and any op a runtime lacks for that weight type, as the pass: none today), so
the vision encoder's patch ``Conv`` and the embedding's ``Gather`` too. Every
quantized initializer must be byte-identical and feed the same kind of node, and the outputs of
both models in ONNX Runtime must agree within 1e-5. Then the real client: Transformers.js under
Node loads each dtype from the same folder and generates the tokens our ONNX Runtime driver does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from _js_client import image_at_processor_size, node_generate, require_transformers_js
from _onnx_quantizer import transformersjs_q8
from onnx import numpy_helper

from passes.quantize import RUNTIME_WEIGHT_TYPES
from surgery.cli import main
from surgery.recipe import find_recipe
from surgery.verify import PartsRunner, processor_inputs, teacher_forced

PARTS = ["vision_encoder", "decoder_model_merged"]  # embed_tokens has no MatMul
ALL_PARTS = ["vision_encoder", "embed_tokens", "decoder_model_merged"]
EIGHT_BIT = ("q8", "int8", "uint8")
#: suffix -> (quantize options, anchor settings)
VARIANTS: dict[str, dict[str, Any]] = {
    "_q4": {"mode": "q4", "gather": True},  # as _q4f16: the same parts quantized
    "_q4b16": {
        "mode": "q4",
        "block_size": 16,
        "symmetric": False,
        "accuracy_level": 4,
        "gather": True,  # embed_tokens too: GatherBlockQuantized
    },
    "_q4f16": {"mode": "q4f16", "gather": True},
    "_bnb4": {"mode": "bnb4"},
    "_fp4": {"mode": "bnb4", "quant_type": "fp4"},
    "_quantized": {"mode": "q8"},
    "_int8": {"mode": "int8"},
    "_uint8": {"mode": "uint8"},
    "_pc": {"mode": "q8", "per_channel": True, "reduce_range": True},
    "_mm": {"mode": "q8", "op_block_list": ["Conv", "Gather"]},  # MatMul only
}


def _parts(options: dict[str, Any]) -> list[str]:
    """The parts a variant quantizes: those with a MatMul, and embed_tokens where its Gather is."""
    gather = options.get("gather") or options["mode"] in EIGHT_BIT
    return ALL_PARTS if gather and "Gather" not in options.get("op_block_list", []) else PARTS


@pytest.fixture(scope="module")
def folder(paligemma2_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The recipe's output with every variant of :data:`VARIANTS` beside fp32."""
    recipe = yaml.safe_load(find_recipe("paligemma2").read_text())
    passes = [
        p
        for p in recipe["passes"]
        if not (isinstance(p, dict) and p.get("pass") in ("copy-parts", "fp16", "quantize"))
    ]
    fold = passes.index("fold-transposes")
    extra: list[Any] = []
    for suffix, options in VARIANTS.items():
        extra.append({"pass": "copy-parts", "parts": ALL_PARTS, "options": {"suffix": suffix}})
        parts = _parts(options)
        extra.append({"pass": "quantize", "parts": [p + suffix for p in parts], "options": options})
        if options["mode"] == "q4f16":
            extra.append({"pass": "fp16", "parts": [p + suffix for p in ALL_PARTS]})
    recipe["passes"] = passes[:fold] + extra + passes[fold:]
    tmp = tmp_path_factory.mktemp("quantize-anchor")
    path = tmp / "variants.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = tmp / "out"
    assert main(["apply", str(path), str(paligemma2_onnx), "-o", str(out), "-q"]) == 0
    return out


def _anchor(fp32: Path, options: dict[str, Any]) -> onnx.ModelProto:
    """ONNX Runtime's quantizer on the fp32 file, with the settings the options stand for."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.matmul_bnb4_quantizer import MatMulBnb4Quantizer
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    model = onnx.load(fp32)
    mode = options["mode"]
    if mode == "q4f16":  # Transformers.js: q4, then its float16.py (onnxconverter-common's)
        from onnxconverter_common.float16 import convert_float_to_float16

        q4 = _anchor(fp32, {**options, "mode": "q4"})
        return convert_float_to_float16(q4, keep_io_types=True, disable_shape_infer=True)
    if mode == "q4":
        q4 = MatMulNBitsQuantizer(
            model,
            bits=4,
            block_size=options.get("block_size", 32),
            is_symmetric=options.get("symmetric", True),
            accuracy_level=options.get("accuracy_level"),
            op_types_to_quantize=("MatMul", "Gather") if options.get("gather") else None,
        )
        q4.process()
        return q4.model.model
    if mode == "bnb4":
        kind = MatMulBnb4Quantizer.FP4 if options.get("quant_type") == "fp4" else 1
        bnb4 = MatMulBnb4Quantizer(model, quant_type=kind, block_size=64)
        bnb4.process()
        return bnb4.model.model
    ops = {n.op_type for n in model.graph.node}  # Transformers.js's get_operators + QUINT8_OPS
    unsigned = mode == "uint8" or (
        mode == "q8" and bool(ops & {"Conv", "GroupQueryAttention", "MultiHeadAttention"})
    )
    weight_type = QuantType.QUInt8 if unsigned else QuantType.QInt8
    op_types = set(IntegerOpsRegistry) - set(options.get("op_block_list", []))
    types = {"Conv": weight_type.tensor_type, "Gather": QuantType.QUInt8.tensor_type}
    op_types -= {op for op, runs in RUNTIME_WEIGHT_TYPES.items() if types[op] not in runs}
    return transformersjs_q8(
        model,
        per_channel=options.get("per_channel", False),
        reduce_range=options.get("reduce_range", False),
        unsigned=unsigned,
        op_types=op_types,
    )


def _readers(model: onnx.ModelProto) -> dict[str, set[str]]:
    readers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    return readers


def _feed(session: ort.InferenceSession, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for every input of a part: batch 1, 3 new tokens after 2 past ones."""
    sizes = {"sequence_length": 3, "past_sequence_length": 2, "total_sequence_length": 5}
    rng = np.random.default_rng(seed)
    feed = {}
    for meta in session.get_inputs():
        shape = [d if isinstance(d, int) else sizes.get(str(d), 1) for d in meta.shape]
        if meta.name == "attention_mask":
            feed[meta.name] = np.ones(shape, np.int64)
        elif meta.name == "position_ids":
            feed[meta.name] = np.arange(3, 6, dtype=np.int64).reshape(shape)
        elif meta.name == "num_logits_to_keep":
            feed[meta.name] = np.array(0, np.int64)  # every position's logits
        elif meta.name == "input_ids":
            feed[meta.name] = rng.integers(0, 1000, shape, dtype=np.int64)
        else:
            feed[meta.name] = rng.standard_normal(shape).astype(np.float32)
    return feed


@pytest.mark.parametrize(
    ("part", "suffix"),
    [
        (part, suffix)
        for part in ALL_PARTS
        for suffix, options in VARIANTS.items()
        if part in _parts(options)
    ],
)
def test_quantized_initializers_and_outputs_equal_the_anchors(
    folder: Path, tmp_path: Path, part: str, suffix: str
) -> None:
    fp32 = folder / "onnx" / f"{part}.onnx"
    anchor = _anchor(fp32, VARIANTS[suffix])
    ours = onnx.load(folder / "onnx" / f"{part}{suffix}.onnx")
    original = {t.name for t in onnx.load(fp32, load_external_data=False).graph.initializer}
    ours_by_name = {t.name: t for t in ours.graph.initializer}
    anchor_readers, our_readers = _readers(anchor), _readers(ours)
    quantized = [t for t in anchor.graph.initializer if t.name not in original]
    if suffix == "_q4f16":  # fp16's graph is not onnxconverter-common's: compare the weights
        quantized = [t for t in quantized if t.name.endswith(("_Q4", "_scales"))]
    assert len(quantized) >= (2 if part == "embed_tokens" else 20), "the anchor quantized it"
    for expected in quantized:
        assert expected.name in ours_by_name, expected.name
        got = ours_by_name[expected.name]
        assert got.data_type == expected.data_type, expected.name
        assert list(got.dims) == list(expected.dims), expected.name
        assert numpy_helper.to_array(got).tobytes() == numpy_helper.to_array(expected).tobytes()
        assert our_readers[got.name] == anchor_readers[expected.name], expected.name

    if suffix == "_q4f16":  # it runs, and computes what q4 does up to fp16 rounding
        _close(folder / "onnx" / f"{part}{suffix}.onnx", folder / "onnx" / f"{part}_q4.onnx", 0.05)
        return
    ours_ops = sorted(n.op_type for n in ours.graph.node)
    anchor_ops = sorted(n.op_type for n in anchor.graph.node)
    assert ours_ops == anchor_ops
    whole_registry = {  # the 8-bit ops beside MatMulInteger, unless the variant blocks them
        "vision_encoder": ("Conv", "ConvInteger"),
        "embed_tokens": ("Gather", "DequantizeLinear"),
    }
    if VARIANTS[suffix]["mode"] in EIGHT_BIT and part in whole_registry:
        op, quantized_op = whole_registry[part]
        assert (quantized_op in ours_ops) is (op not in VARIANTS[suffix].get("op_block_list", []))

    anchor_path = tmp_path / "anchor.onnx"
    onnx.save(anchor, anchor_path, save_as_external_data=True, location="anchor.onnx.data")
    _close(folder / "onnx" / f"{part}{suffix}.onnx", anchor_path, 1e-5)


def _close(path: Path, reference: Path, tolerance: float) -> None:
    """Both models give the same outputs on the same inputs, within ``tolerance`` (absolute, or
    relative to the largest reference value when over 1e-3)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sessions = [
        ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
        for p in (path, reference)
    ]
    feed = _feed(sessions[0])
    got_outputs, want_outputs = (s.run(None, feed) for s in sessions)
    for got_value, want_value in zip(got_outputs, want_outputs, strict=True):
        assert np.isfinite(got_value).all()
        scale = float(np.abs(want_value).max()) if tolerance > 1e-3 else 1.0
        np.testing.assert_allclose(got_value, want_value, rtol=0, atol=tolerance * scale)


#: Transformers.js dtype -> file suffix.
CLIENT_DTYPES = {
    "q8": "_quantized",
    "int8": "_int8",
    "uint8": "_uint8",
    "q4": "_q4",
    "q4f16": "_q4f16",
    "bnb4": "_bnb4",
}


@pytest.mark.parametrize("dtype", list(CLIENT_DTYPES))
def test_transformersjs_in_node_loads_each_dtype_and_generates_our_tokens(
    folder: Path, paligemma2_checkpoint: Path, tmp_path: Path, dtype: str
) -> None:
    """The real client loads the quantized files by dtype and generates the tokens our own
    ONNX Runtime driver generates from the same files (batch 1, no padding)."""
    require_transformers_js()
    image = image_at_processor_size(folder, tmp_path)
    prompt, steps = "caption en", 10
    got = node_generate(folder, image, prompt, steps, dtype)
    inputs = processor_inputs(paligemma2_checkpoint, [prompt], [image])
    np.testing.assert_array_equal(np.asarray(got["input_ids"]), inputs["input_ids"])
    from transformers import GenerationConfig

    generation = GenerationConfig.from_pretrained(paligemma2_checkpoint)
    eos = generation.eos_token_id
    ours = PartsRunner(folder, CLIENT_DTYPES[dtype]).greedy(
        inputs, steps, set(eos if isinstance(eos, list) else [eos]), generation.pad_token_id or 0
    )
    new_tokens = np.asarray(got["sequences"])[:, inputs["input_ids"].shape[1] :]
    np.testing.assert_array_equal(new_tokens, ours.tokens)


def test_verify_reports_teacher_forced_agreement_for_quantized_files(
    folder: Path, paligemma2_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["verify", str(folder), "--checkpoint", str(paligemma2_checkpoint)]
    assert main([*args, "--suffix", "_q4", "--max-new-tokens", "6"]) == 0
    report = capsys.readouterr().out
    assert report.count("teacher-forced along the fp32 greedy path: top-1 agreement ") == 2
    assert "greedy tokens identical" not in report
    # The measure itself: fp32 forced along its own path agrees everywhere, cosine 1.
    inputs = processor_inputs(paligemma2_checkpoint, ["caption en"], None)
    fp32 = PartsRunner(folder)
    path = fp32.greedy(inputs, 6, set(), 0)
    again = fp32.greedy(inputs, 6, set(), 0, forced=path.tokens)
    assert teacher_forced(path, again, "fp32").endswith(
        "top-1 agreement 6/6 (100.0%), logits cosine min 1.000000 mean 1.000000"
    )
