"""Tests of the ``fp16`` pass: toy Gemma-like graphs, the exported PaliGemma 2, a stress model.

Tolerances: fp16 has an 11-bit significand (relative rounding 2⁻¹¹ ≈ 4.9e-4 per value), so a
logits cosine of 0.999 leaves room for a few hundred roundings of uncorrelated error and still
fails on any systematic error (a wrong cast, a zeroed norm: cosine 0.83 on the stress model).
ONNX Runtime on CPU computes most fp16 ops in fp32 internally and skips the casts inside chains of
such ops, which hides fp16 overflow; overflow is therefore shown with onnx's ReferenceEvaluator,
which computes each fp16 op in fp16 (as a GPU does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pydantic
import pytest
from onnx import TensorProto
from onnx import helper as oh
from onnx.reference import ReferenceEvaluator

from passes import fp16 as fp16_module
from passes.fp16 import FP16_MAX, Fp16
from surgery import get_pass, load, load_model, save

F, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
WIDTH = 32


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(array.astype(np.float32), name)


def _gemma_toy(rng: np.random.Generator) -> onnx.ModelProto:
    """RMSNorm → MatMul → attention scores with softcap → Softmax → MatMul, like Gemma 2's export.

    Also: a no-op ``Cast`` to float, an int input cast to float, an initializer ``shared`` read by a
    blocked op (``Max``) and an unblocked one (``Add``), and a large weight clamped to fp16's range.
    """
    nodes = [
        oh.make_node("Pow", ["x", "two"], ["sq"], name="norm.pow"),
        oh.make_node("ReduceMean", ["sq", "axes"], ["mean"], name="norm.mean"),
        oh.make_node("Add", ["mean", "eps"], ["mean_eps"], name="norm.add"),
        oh.make_node("Sqrt", ["mean_eps"], ["std"], name="norm.sqrt"),
        oh.make_node("Reciprocal", ["std"], ["rstd"], name="norm.rsqrt"),
        oh.make_node("Mul", ["x", "rstd"], ["normed"], name="norm.mul"),
        oh.make_node("Mul", ["normed", "norm_w"], ["h"], name="norm.scale"),
        oh.make_node("Cast", ["h"], ["h32"], to=F, name="noop_cast"),
        oh.make_node("MatMul", ["h32", "wq"], ["q"], name="q_proj"),
        oh.make_node("MatMul", ["h", "wk"], ["k"], name="k_proj"),
        oh.make_node("Transpose", ["k"], ["kt"], perm=[1, 0], name="k_t"),
        oh.make_node("MatMul", ["q", "kt"], ["scores"], name="qk"),
        oh.make_node("Mul", ["scores", "scale"], ["scaled"], name="qk.scale"),
        oh.make_node("Div", ["scaled", "cap"], ["capped"], name="softcap.div"),
        oh.make_node("Tanh", ["capped"], ["tanh"], name="softcap.tanh"),
        oh.make_node("Mul", ["tanh", "cap"], ["soft"], name="softcap.mul"),
        oh.make_node("Cast", ["mask_i"], ["mask"], to=F, name="mask_cast"),
        oh.make_node("Add", ["soft", "mask"], ["masked"], name="mask_add"),
        oh.make_node("Softmax", ["masked"], ["probs"], axis=-1, name="softmax"),
        oh.make_node("MatMul", ["probs", "h"], ["attn"], name="pv"),
        oh.make_node("Add", ["attn", "shared"], ["biased"], name="bias_add"),
        oh.make_node("Max", ["biased", "shared"], ["maxed"], name="max"),
        oh.make_node("MatMul", ["maxed", "big"], ["y"], name="out_proj"),
    ]
    big = rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)
    big[0, 0], big[0, 1] = 3e4, 1e5  # fp16 holds 3e4; 1e5 is clamped to 65504 (not to 1e4)
    graph = oh.make_graph(
        nodes,
        "gemma_toy",
        [
            oh.make_tensor_value_info("x", F, ["n", WIDTH]),
            oh.make_tensor_value_info("mask_i", TensorProto.INT64, ["n", "n"]),
        ],
        [oh.make_tensor_value_info("y", F, ["n", WIDTH])],
        [
            _init("two", np.array(2.0)),
            onnx.numpy_helper.from_array(np.array([-1], np.int64), "axes"),
            _init("eps", np.array(1e-6)),
            _init("norm_w", 1 + 0.1 * rng.standard_normal(WIDTH)),
            _init("wq", rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)),
            _init("wk", rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)),
            _init("scale", np.array(WIDTH**-0.5)),
            _init("cap", np.array(50.0)),
            _init("shared", 0.1 * rng.standard_normal(WIDTH)),
            _init("big", big),
        ],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 20)], ir_version=10)


@pytest.fixture
def toy_path(tmp_path: Path) -> Path:
    """The toy saved with external data (initializers over 64 bytes in ``toy.onnx.data``)."""
    model = ir.from_proto(_gemma_toy(np.random.default_rng(0)))
    path = tmp_path / "toy" / "toy.onnx"
    path.parent.mkdir()
    ir.save(model, path, external_data="toy.onnx.data", size_threshold_bytes=64)
    return path


def _toy_feeds(n: int = 6, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    causal = np.triu(np.full((n, n), -1_000_000_000, np.int64), 1)
    return {"x": (scale * rng.standard_normal((n, WIDTH))).astype(np.float32), "mask_i": causal}


def _convert(path: Path, out: Path, **options: Any) -> tuple[Path, ir.passes.PassResult]:
    bundle = load(path)
    result = Fp16(**options)(bundle[path.stem])
    save(bundle, out, progress=False)
    return out / path.name, result


def _run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _is_topological(graph: onnx.GraphProto) -> bool:
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    for node in graph.node:
        if not set(node.input) <= known:
            return False
        known |= set(node.output)
    return True


def test_toy_converts_and_matches(toy_path: Path, tmp_path: Path) -> None:
    out, result = _convert(toy_path, tmp_path / "out")
    assert result.modified
    proto = onnx.load(out)
    onnx.checker.check_model(proto, full_check=True)
    assert _is_topological(proto.graph)
    assert [i.type.tensor_type.elem_type for i in proto.graph.input] == [F, TensorProto.INT64]
    assert proto.graph.output[0].type.tensor_type.elem_type == F  # keep_io_types
    dtypes = {t.name: t.data_type for t in proto.graph.initializer}
    assert dtypes["wq"] == dtypes["wk"] == dtypes["big"] == F16
    feeds = _toy_feeds()
    (expected,), (actual,) = _run(toy_path, feeds), _run(out, feeds)
    assert np.isfinite(actual).all()
    kept = [0, *range(2, WIDTH)]  # column 1 reads the weight 1e5, clamped to 65504 on purpose
    assert _cosine(expected[:, kept], actual[:, kept]) >= 0.999


def test_external_data_really_fp16(toy_path: Path, tmp_path: Path) -> None:
    """onnxconverter-common #308: external tensors relabelled fp16 keep fp32 bytes. Ours halve."""
    out, _ = _convert(toy_path, tmp_path / "out")
    before = (toy_path.parent / "toy.onnx.data").stat().st_size
    model = load_model(out)
    converted = {
        name: v.const_value
        for name, v in model.graph.initializers.items()
        if v.dtype == ir.DataType.FLOAT16
    }
    assert isinstance(converted["big"], ir.ExternalTensor)
    assert converted["big"].nbytes == WIDTH * WIDTH * 2
    fp32_left = sum(
        v.const_value.nbytes
        for v in model.graph.initializers.values()
        if v.dtype == ir.DataType.FLOAT and v.const_value is not None
    )
    # Everything converted is stored in half the bytes; fp32 leftovers are the island scalars and
    # the shared bias kept in both versions. Alignment padding: at most 64 bytes per tensor.
    after = (out.parent / "toy.onnx.data").stat().st_size
    assert after <= (before - fp32_left) / 2 + fp32_left + 64 * len(model.graph.initializers)
    big = converted["big"].numpy()
    assert big.dtype == np.float16
    assert big[0, 0] == np.float16(3e4) and big[0, 1] == FP16_MAX  # clamped to ±65504, not 1e4


def test_existing_casts_stay_type_correct(toy_path: Path, tmp_path: Path) -> None:
    out, _ = _convert(toy_path, tmp_path / "out")
    graph = onnx.load(out).graph
    casts = {n.name: n for n in graph.node if n.op_type == "Cast"}
    assert "noop_cast" not in casts  # fp16 → Cast(to=fp16) is the identity: eliminated
    # The int mask cast now produces fp32 for the fp32 island (mask_add sits on the score path).
    assert oh.get_attribute_value(casts["mask_cast"].attribute[0]) == F
    chains = [
        n
        for n in graph.node
        if n.op_type == "Cast"
        and any(p.op_type == "Cast" and p.output[0] == n.input[0] for p in graph.node)
    ]
    assert not chains  # no back-to-back casts left
    _run(out, _toy_feeds())  # ONNX Runtime accepts every type


def test_shared_initializer_blocked_and_unblocked(toy_path: Path, tmp_path: Path) -> None:
    out, _ = _convert(toy_path, tmp_path / "out")
    graph = onnx.load(out).graph
    inits = {t.name: t.data_type for t in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    assert inits["shared"] == F and inits["shared_fp16"] == F16
    assert "shared" in nodes["max"].input  # blocked (Max): reads the fp32 original
    assert "shared_fp16" in nodes["bias_add"].input  # fp16 Add: reads the fp16 copy


def test_islands_fp32_by_default_and_optional(toy_path: Path, tmp_path: Path) -> None:
    def output_types(out: Path) -> dict[str, int]:
        graph = onnx.shape_inference.infer_shapes(onnx.load(out)).graph
        types = {v.name: v.type.tensor_type.elem_type for v in graph.value_info}
        return {n.name: types.get(n.output[0], F) for n in graph.node}

    island = ["norm.pow", "norm.mean", "norm.rsqrt", "norm.mul", "qk", "softcap.tanh", "softmax"]
    default = output_types(_convert(toy_path, tmp_path / "a")[0])
    assert all(default[name] == F for name in island)
    assert default["q_proj"] == default["pv"] == F16
    bare = output_types(_convert(toy_path, tmp_path / "b", fp32_islands=[])[0])
    assert all(bare[name] == F16 for name in island)


def test_block_lists_and_io_options(toy_path: Path, tmp_path: Path) -> None:
    out, _ = _convert(toy_path, tmp_path / "out", node_block_list=["q_*"], keep_io_types=False)
    proto = onnx.load(out)
    assert proto.graph.input[0].type.tensor_type.elem_type == F16
    assert proto.graph.output[0].type.tensor_type.elem_type == F16
    inits = {t.name: t.data_type for t in proto.graph.initializer}
    assert inits["wq"] == F and inits["wk"] == F16
    feeds = _toy_feeds()
    feeds16 = {**feeds, "x": feeds["x"].astype(np.float16)}
    kept = [0, *range(2, WIDTH)]
    assert _cosine(_run(toy_path, feeds)[0][:, kept], _run(out, feeds16)[0][:, kept]) >= 0.999
    out2, _ = _convert(toy_path, tmp_path / "out2", keep_io_types=["y"])
    proto2 = onnx.load(out2)
    assert proto2.graph.input[0].type.tensor_type.elem_type == F16
    assert proto2.graph.output[0].type.tensor_type.elem_type == F


def test_weights_stay_lazy_until_written(toy_path: Path) -> None:
    model = load_model(toy_path)
    Fp16()(model)
    converted = [v for v in model.graph.initializers.values() if v.dtype == ir.DataType.FLOAT16]
    assert converted and all(isinstance(v.const_value, ir.LazyTensor) for v in converted)


def test_weight_bytes_equal_numpy_clip_and_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Weights are converted by ONNX Runtime's Cast (for speed): the same bits as numpy's
    round-to-nearest-even of the clamped value, for the edge cases too, read from a memory map
    as the writer reads them, across block boundaries."""
    edge = np.array(
        [0.0, -0.0, 1.0, 65504.0, 65519.0, 65520.0, 1e6, -1e6, np.inf, -np.inf, np.nan,
         6e-8, 3e-8, 2.9e-8, 1e-40, 1 + 2**-11, 1 + 3 * 2**-11, -(1 + 2**-11)],
        dtype=np.float32,
    )  # fmt: skip
    values = np.random.default_rng(0).standard_normal(3 * 1000 + 7, dtype=np.float32) * 100
    path = tmp_path / "w.bin"
    np.concatenate([edge, values]).tofile(path)
    source = np.memmap(path, dtype=np.float32, mode="r").reshape(-1, 5)
    expected = np.clip(np.asarray(source), -FP16_MAX, FP16_MAX).astype(np.float16)
    monkeypatch.setattr(fp16_module, "_BLOCK_ELEMENTS", 1000)  # several blocks, a ragged last one
    converted = fp16_module._convert_array(source, ir.DataType.FLOAT16)
    assert converted.shape == source.shape
    np.testing.assert_array_equal(converted.view(np.uint16), expected.view(np.uint16))


def test_bfloat16_is_weight_storage(toy_path: Path, tmp_path: Path) -> None:
    out, result = _convert(toy_path, tmp_path / "out", dtype="bfloat16")
    assert result.modified
    proto = onnx.load(out)
    onnx.checker.check_model(proto, full_check=True)
    inits = {t.name: t.data_type for t in proto.graph.initializer}
    assert inits["big_bf16"] == TensorProto.BFLOAT16
    feeds = _toy_feeds()
    # bf16 keeps 8 significand bits (relative rounding 2⁻⁸ ≈ 3.9e-3) of the weights only.
    assert _cosine(_run(toy_path, feeds)[0], _run(out, feeds)[0]) >= 0.99


def test_options_validated_and_registered() -> None:
    assert get_pass("fp16") is Fp16
    with pytest.raises(pydantic.ValidationError):
        Fp16(fp32_islands=["layernorm"])
    with pytest.raises(pydantic.ValidationError):
        Fp16(keep_io_types="yes")


def test_refuses_fp16_input(toy_path: Path, tmp_path: Path) -> None:
    out, _ = _convert(toy_path, tmp_path / "out")
    from surgery import SurgeryError

    with pytest.raises(SurgeryError, match="already has float16 weights"):
        Fp16()(load_model(out))


# --- the exported PaliGemma 2 ----------------------------------------------------------------

IMAGE_TOKENS, PROMPT = 16, [2, 100, 101, 102, 103]


def _prefill_feeds(path: Path, checkpoint: Path, batch: int = 2) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    config = json.loads((checkpoint / "config.json").read_text())
    image_token = int(config["image_token_index"])
    ids = np.array([[image_token] * IMAGE_TOKENS + PROMPT] * batch, np.int64)
    length = ids.shape[1]
    feeds: dict[str, np.ndarray] = {
        "input_ids": ids,
        "pixel_values": np.random.default_rng(0)
        .standard_normal((batch, 3, 32, 32))
        .astype(np.float32),
        "attention_mask": np.ones((batch, length), np.int64),
        "position_ids": np.tile(np.arange(1, length + 1), (batch, 1)).astype(np.int64),
    }
    for value in session.get_inputs():
        if value.name.startswith("past_key_values"):
            feeds[value.name] = np.zeros((batch, value.shape[1], 0, value.shape[3]), np.float32)
    return feeds


def _greedy(path: Path, feeds: dict[str, np.ndarray], steps: int) -> list[list[int]]:
    """Drive the monolithic graph with its own presents as pasts; return the greedy tokens."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    feeds = dict(feeds)
    tokens: list[list[int]] = []
    for _ in range(steps):
        outputs = dict(zip(names, session.run(None, feeds), strict=True))
        next_ids = outputs["logits"][:, -1].argmax(-1)
        tokens.append(next_ids.tolist())
        batch, total = feeds["attention_mask"].shape
        feeds["input_ids"] = next_ids[:, None].astype(np.int64)
        feeds["attention_mask"] = np.ones((batch, total + 1), np.int64)
        feeds["position_ids"] = np.full((batch, 1), total + 1, np.int64)
        for name in list(feeds):
            if name.startswith("past_key_values."):
                feeds[name] = outputs[name.replace("past_key_values.", "present.")]
    return tokens


@pytest.fixture(scope="module")
def paligemma2_fp16(paligemma2_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    bundle = load(paligemma2_onnx)
    Fp16()(bundle["model"])
    out = tmp_path_factory.mktemp("pg2-fp16") / "out"
    return save(bundle, out, progress=False) / "model.onnx"


def test_paligemma2_prefill_cosine(
    paligemma2_onnx: Path, paligemma2_checkpoint: Path, paligemma2_fp16: Path
) -> None:
    onnx.checker.check_model(str(paligemma2_fp16), full_check=True)
    fp32_data = (paligemma2_onnx.parent / "model.onnx.data").stat().st_size
    assert (paligemma2_fp16.parent / "model.onnx.data").stat().st_size < 0.55 * fp32_data
    feeds = _prefill_feeds(paligemma2_onnx, paligemma2_checkpoint)
    session32 = ort.InferenceSession(str(paligemma2_onnx), providers=["CPUExecutionProvider"])
    session16 = ort.InferenceSession(str(paligemma2_fp16), providers=["CPUExecutionProvider"])
    assert [i.type for i in session16.get_inputs()] == [i.type for i in session32.get_inputs()]
    assert [o.type for o in session16.get_outputs()] == [o.type for o in session32.get_outputs()]
    names = [o.name for o in session32.get_outputs()]
    expected = dict(zip(names, session32.run(None, feeds), strict=True))
    actual = dict(zip(names, session16.run(None, feeds), strict=True))
    for name in ("logits", "image_features", "inputs_embeds"):
        assert np.isfinite(actual[name]).all(), name
        assert _cosine(expected[name], actual[name]) >= 0.999, name


def test_paligemma2_greedy_tokens_equal(
    paligemma2_onnx: Path, paligemma2_checkpoint: Path, paligemma2_fp16: Path
) -> None:
    feeds = _prefill_feeds(paligemma2_onnx, paligemma2_checkpoint)
    expected = _greedy(paligemma2_onnx, feeds, 24)
    assert len({t for step in expected for t in step}) > 1  # the tokens vary: a real check
    assert _greedy(paligemma2_fp16, feeds, 24) == expected


# --- stress: activations whose squares pass fp16's range -------------------------------------


def _reference_logits(model: ir.Model, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, int]:
    """Logits and the number of non-finite RMSNorm statistics, computed op by op in fp16."""
    for value in model.graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):
            value.const_value = ir.Tensor(value.const_value.numpy(), name=value.name)
    proto = ir.to_proto(model)
    evaluator = ReferenceEvaluator(proto)
    stats = [n.output[0] for n in proto.graph.node if n.op_type == "ReduceMean"]
    logits, *values = evaluator.run(["logits", *stats], feeds)
    return logits, sum(not np.isfinite(v).all() for v in values)


@pytest.mark.parametrize("islands", ["default", "none"])
def test_stress_rmsnorm_overflow(
    paligemma2_onnx: Path, paligemma2_checkpoint: Path, islands: str
) -> None:
    """Token embedding scale ×600 (RMS 600): ``x²`` passes 65504, ``x`` itself does not.

    Without islands the RMSNorm statistics overflow to inf and the normalized activations
    collapse to 0 (rsqrt(inf)): logits finite but wrong. With islands everything is finite.
    """

    def stressed() -> ir.Model:
        model = load_model(paligemma2_onnx)
        scale = next(
            v for n, v in model.graph.initializers.items() if n.endswith("embed_tokens.embed_scale")
        )
        assert scale.const_value is not None
        scale.const_value = ir.Tensor(scale.const_value.numpy() * np.float32(600), name=scale.name)
        return model

    feeds = _prefill_feeds(paligemma2_onnx, paligemma2_checkpoint, batch=1)
    expected, bad32 = _reference_logits(stressed(), feeds)
    assert bad32 == 0 and np.isfinite(expected).all()
    model = stressed()
    Fp16(fp32_islands=[] if islands == "none" else ["rmsnorm", "softcap", "softmax"])(model)
    actual, bad16 = _reference_logits(model, feeds)
    if islands == "none":
        assert bad16 > 0  # inf in the RMSNorm statistics
        assert _cosine(expected, actual) < 0.99
    else:
        assert bad16 == 0 and np.isfinite(actual).all()
        assert _cosine(expected, actual) >= 0.999
        assert (expected[0].argmax(-1) == actual[0].argmax(-1)).all()


# --- stress: attention logits past fp16's range (PaliGemma 1: no softcap to saturate them) -----


@pytest.fixture(scope="module")
def attention_stress_onnx(
    paligemma_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """PaliGemma 1 with q_proj and k_proj scaled ×300: Q·Kᵀ reaches ~1e5, past fp16's 65504."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from surgery.export import export_checkpoint

    folder = tmp_path_factory.mktemp("attention-stress")
    checkpoint = folder / "checkpoint"
    shutil.copytree(paligemma_checkpoint, checkpoint)
    for path in checkpoint.glob("*.safetensors"):
        tensors = load_file(path)
        for key in tensors:
            if ".self_attn.q_proj." in key or ".self_attn.k_proj." in key:
                tensors[key] = tensors[key] * np.float32(300)
        save_file(tensors, path, metadata={"format": "pt"})
    return export_checkpoint(checkpoint, folder / "model.onnx", progress=False), checkpoint


def _attention_scores_peak(model: ir.Model, feeds: dict[str, np.ndarray]) -> float:
    """The largest |score| entering any Softmax, computed in fp32 (for the test's premise)."""
    for value in model.graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):
            value.const_value = ir.Tensor(value.const_value.numpy(), name=value.name)
    proto = ir.to_proto(model)
    scores = [n.input[0] for n in proto.graph.node if n.op_type == "Softmax"]
    values = ReferenceEvaluator(proto).run(scores, feeds)
    return max(float(np.abs(v[np.isfinite(v)]).max()) for v in values)


@pytest.mark.parametrize("islands", ["default", "no-softmax"])
def test_stress_attention_logits_overflow(
    attention_stress_onnx: tuple[Path, Path], islands: str
) -> None:
    """Unprotected, Q·Kᵀ overflows to inf in fp16 and softmax turns it into NaN; the softmax
    island computes the scores in fp32 and everything stays finite."""
    path, checkpoint = attention_stress_onnx
    feeds = _prefill_feeds(path, checkpoint, batch=1)
    assert _attention_scores_peak(load_model(path), feeds) > 65504  # the premise holds
    expected, _ = _reference_logits(load_model(path), feeds)
    assert np.isfinite(expected).all()
    model = load_model(path)
    kept = ["rmsnorm", "softcap"] if islands == "no-softmax" else ["rmsnorm", "softcap", "softmax"]
    Fp16(fp32_islands=kept)(model)
    actual, _ = _reference_logits(model, feeds)
    if islands == "no-softmax":
        assert not np.isfinite(actual).all()  # NaN from softmax over inf scores
    else:
        assert np.isfinite(actual).all()
        # Scores of ~1e5 make attention almost one-hot, so fp16 rounding of q and k (relative
        # 5e-4, i.e. ~50 in a score) can move weight between keys: 0.996 was measured here, where
        # a wrong cast or a dropped island gives NaN or a cosine far below (0.83 on RMSNorm).
        assert _cosine(expected, actual) >= 0.99


def test_constant_of_shape_without_value_gets_an_fp16_zero(tmp_path: Path) -> None:
    """``ConstantOfShape`` with no ``value`` makes float32 zeros: retyped, it needs an fp16 zero."""
    nodes = [
        oh.make_node("Shape", ["x"], ["shape"]),
        oh.make_node("ConstantOfShape", ["shape"], ["zeros"], name="zeros"),
        oh.make_node("Add", ["x", "zeros"], ["sum"]),
        oh.make_node("Mul", ["sum", "w"], ["y"]),
    ]
    graph = oh.make_graph(
        nodes,
        "zeros_toy",
        [oh.make_tensor_value_info("x", F, [2, WIDTH])],
        [oh.make_tensor_value_info("y", F, [2, WIDTH])],
        [_init("w", np.full(WIDTH, 2.0))],
    )
    path = tmp_path / "zeros" / "zeros.onnx"
    path.parent.mkdir()
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 20)], ir_version=10), path)
    out, _ = _convert(path, tmp_path / "out")
    (node,) = [n for n in onnx.load(out).graph.node if n.name == "zeros"]
    assert onnx.numpy_helper.to_array(node.attribute[0].t).dtype == np.float16
    x = np.random.default_rng(0).standard_normal((2, WIDTH)).astype(np.float32)
    (y,) = _run(out, {"x": x})  # ONNX Runtime refused the float32 zeros typed fp16 before
    np.testing.assert_allclose(y, 2 * x, rtol=1e-3)  # fp16 rounding of x: 2⁻¹¹ relative
