"""Tests for the ``split`` pass on a small hand-built graph and, end to end, on tiny PaliGemma 2.

Parity is asserted bitwise, on the hand-built graph and on PaliGemma 2 (prefill and one decode
step): the parts run the same kernels on the same inputs as the whole graph, and the float32 merge
of image features copies values. The measured difference is printed (``pytest -s``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from passes import Split
from surgery import Bundle, SurgeryError, parse_recipe, save

FLOAT = TensorProto.FLOAT


def _model() -> ir.Model:
    """x, y [batch, 4] -> out = Mul(Relu(Double(x + W)), y) + ConstantOfShape(Shape(x)); also b."""
    double = helper.make_function(
        "custom",
        "Double",
        ["i"],
        ["o"],
        [helper.make_node("Add", ["i", "i"], ["o"])],
        [helper.make_opsetid("", 20)],
    )
    nodes = [
        helper.make_node("Add", ["x", "W"], ["a"]),
        helper.make_node("Double", ["a"], ["d"], domain="custom"),
        helper.make_node("Relu", ["d"], ["b"]),
        helper.make_node("Mul", ["b", "y"], ["c"]),
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node(
            "ConstantOfShape", ["s"], ["z"], value=helper.make_tensor("v", FLOAT, [1], [1.0])
        ),
        helper.make_node("Add", ["c", "z"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, FLOAT, ["batch", 4]) for n in ("x", "y")],
        [helper.make_tensor_value_info(n, FLOAT, ["batch", 4]) for n in ("out", "b")],
        initializer=[helper.make_tensor("W", FLOAT, [4], [0.5, -1.0, 2.0, -0.25])],
        value_info=[helper.make_tensor_value_info("a", FLOAT, ["batch", 4])],
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("custom", 1)],
        functions=[double],
    )
    helper.set_model_props(proto, {"origin": "test"})
    return ir.serde.deserialize_model(proto)


def _split(bundle: Bundle, **options: object) -> bool:
    return Split(Split.Options.model_validate(options)).call_bundle(bundle).modified


def _run(model: ir.Model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(
        ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds), strict=True))


HEAD_TAIL = {
    "head": {"inputs": ["x"], "outputs": ["a"]},
    "tail": {"inputs": ["a", "y"], "outputs": ["out", "b"]},
}


def test_split_parts_run_chained_like_the_source() -> None:
    source = _model()
    bundle = Bundle({"model": _model()})
    assert _split(bundle, parts=HEAD_TAIL) is True
    assert bundle.parts == ["head", "tail"]
    head, tail = bundle["head"], bundle["tail"]
    assert [v.name for v in head.graph.outputs] == ["a"]
    assert [(v.name, str(v.shape)) for v in tail.graph.inputs] == [
        ("a", "[batch,4]"),
        ("y", "[batch,4]"),
    ]
    # tail read x only through Shape(x): it now reads the same named dims from a.
    shape_node = next(n for n in tail.graph if n.op_type == "Shape")
    assert shape_node.inputs[0] is tail.graph.inputs[0]
    for part in (head, tail):
        onnx.checker.check_model(ir.serde.serialize_model(part), full_check=True)
    feeds = {
        "x": np.random.default_rng(0).standard_normal((3, 4), dtype=np.float32),
        "y": np.random.default_rng(1).standard_normal((3, 4), dtype=np.float32),
    }
    expected = _run(source, feeds)
    got = _run(tail, {"a": _run(head, {"x": feeds["x"]})["a"], "y": feeds["y"]})
    np.testing.assert_array_equal(got["out"], expected["out"])
    np.testing.assert_array_equal(got["b"], expected["b"])


def test_split_shares_weights_and_keeps_opsets_functions_metadata() -> None:
    bundle = Bundle({"model": _model()})
    weight = bundle["model"].graph.initializers["W"].const_value
    _split(bundle, parts=HEAD_TAIL)
    head, tail = bundle["head"], bundle["tail"]
    assert head.graph.initializers["W"].const_value is weight
    assert "W" not in tail.graph.initializers
    assert list(head.functions) == []
    assert list(tail.functions) == [("custom", "Double", "")]
    for part, name in ((head, "head"), (tail, "tail")):
        assert part.graph.opset_imports == {"": 20, "custom": 1}
        assert part.metadata_props == {"origin": "test"}
        assert part.graph.name == name


def test_split_keep_source_and_position_in_bundle() -> None:
    other = _model()
    bundle = Bundle({"first": other, "model": _model(), "last": other})
    _split(bundle, source="model", keep_source=True, parts={"head": HEAD_TAIL["head"]})
    assert bundle.parts == ["first", "model", "head", "last"]
    # Retyping a value of the new part (as fp16 does) leaves the source alone.
    bundle["head"].graph.outputs[0].dtype = ir.DataType.FLOAT16
    bundle["head"].graph.inputs[0].shape[1] = 8  # type: ignore[index]
    source = ir.convenience.create_value_mapping(bundle["model"].graph)
    assert source["a"].dtype == ir.DataType.FLOAT
    assert str(source["x"].shape) == "[batch,4]"


def test_split_unused_input_is_an_error_unless_allowed() -> None:
    parts = {"head": {"inputs": ["x", "y"], "outputs": ["a"]}}
    with pytest.raises(SurgeryError) as info:
        _split(Bundle({"model": _model()}), parts=parts)
    assert str(info.value) == (
        "part 'head': 'y' is not needed by its outputs; remove it from inputs, or set "
        "allow_unused_inputs: true to keep unused inputs"
    )
    bundle = Bundle({"model": _model()})
    _split(bundle, parts=parts, allow_unused_inputs=True)
    assert [v.name for v in bundle["head"].graph.inputs] == ["x", "y"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"inputs": ["a"], "outputs": ["out"]},
            "part 'p' is not closed: it needs 'y' (a graph input of 'model' not in its inputs), "
            "reached from 'out'; add it to inputs or cut earlier",
        ),
        (
            {"inputs": [], "outputs": ["b", "out"]},
            "part 'p' is not closed: it needs 'x' (a graph input of 'model' not in its inputs), "
            "reached from 'b', and also 'y'; add them to inputs or cut earlier",
        ),
        (
            {"inputs": ["x", "y"], "outputs": ["ot"]},
            "part 'p': outputs: no value named 'ot' in 'model'; nearest: 'out'",
        ),
        (
            {"inputs": ["past.*"], "outputs": ["out"]},
            "part 'p': inputs: 'past.*' matches no graph input of 'model'; graph inputs: 'x', 'y'",
        ),
        (
            {"inputs": ["x", "y"], "outputs": ["present.*"]},
            "part 'p': outputs: 'present.*' matches no graph output of 'model'; "
            "graph outputs: 'out', 'b'",
        ),
    ],
)
def test_split_errors_name_the_part_and_the_value(spec: dict[str, list[str]], message: str) -> None:
    bundle = Bundle({"model": _model()})
    with pytest.raises(SurgeryError) as info:
        _split(bundle, parts={"p": spec})
    assert str(info.value) == message
    assert bundle.parts == ["model"]


def test_split_needs_a_source_when_several_parts() -> None:
    bundle = Bundle({"a": _model(), "b": _model()})
    with pytest.raises(SurgeryError) as info:
        _split(bundle, parts=HEAD_TAIL)
    assert str(info.value) == (
        "the bundle has 2 parts (a, b); say which one to split with the 'source' option"
    )


def test_split_error_through_the_manager_names_the_pass() -> None:
    recipe = parse_recipe(
        "passes:\n- pass: split\n  options:\n    parts:\n      p: {inputs: [a], outputs: [out]}\n",
        "r.yaml",
    )
    with pytest.raises(SurgeryError) as info:
        recipe.manager().run(Bundle({"model": _model()}))
    assert str(info.value) == (
        "r.yaml:2: passes[0] (split): pass 'split' failed on the bundle, as the first pass: "
        "part 'p' is not closed: it needs 'y' (a graph input of 'model' not in its inputs), "
        "reached from 'out'; add it to inputs or cut earlier"
    )


RECIPE_HEAD = "passes:\n- pass: split\n  options:\n    parts:\n"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "      p: {inputs: [1], outputs: [out]}\n",
            "r.yaml:5: passes[0] (split): parts.p.inputs[0]: expected a string, got 1",
        ),
        (
            "      p: {inputs: x, outputs: [out]}\n",
            "r.yaml:5: passes[0] (split): parts.p.inputs: expected a list, got 'x'",
        ),
        (
            "      p: {inputs: [x]}\n",
            "r.yaml:5: passes[0] (split): parts.p.outputs: required option is missing",
        ),
        (
            "      p: {inputs: [x], outputs: [out]}\n    keep_sources: true\n",
            "r.yaml:6: passes[0] (split): keep_sources: unknown option; did you mean "
            "'keep_source'? allowed: source, parts, keep_source, allow_unused_inputs",
        ),
        (
            "      p: {inputs: [x], outputs: [out]}\n- pass: topological-sort\n  parts: [q]\n",
            "r.yaml:6: passes[1] (topological-sort): parts: no part named 'q' at this point; "
            "parts then: p",
        ),
    ],
)
def test_split_recipe_options_are_checked_before_work(body: str, message: str) -> None:
    with pytest.raises(SurgeryError) as info:
        parse_recipe(RECIPE_HEAD + body, "r.yaml")
    assert str(info.value) == message


def test_split_recipe_unknown_key_in_a_part() -> None:
    with pytest.raises(SurgeryError) as info:
        parse_recipe(RECIPE_HEAD + "      p: {inputs: [x], output: [out]}\n", "r.yaml")
    assert str(info.value) == (
        "r.yaml:5: passes[0] (split): parts.p.output: unknown option; did you mean 'outputs'? "
        "allowed: inputs, outputs"
    )


def test_split_recipe_selects_new_parts() -> None:
    recipe = parse_recipe(
        RECIPE_HEAD
        + "      p: {inputs: [x], outputs: [a]}\n- pass: topological-sort\n  parts: [p]\n"
    )
    assert recipe.steps[0].pass_.output_parts(["model"]) == ["p"]


PALIGEMMA2_RECIPE = """\
passes:
  - pass: split
    options:
      parts:
        vision_encoder: {inputs: [pixel_values], outputs: [image_features]}
        embed_tokens: {inputs: [input_ids], outputs: [token_embeddings]}
        decoder_model_merged:
          inputs: [inputs_embeds, attention_mask, position_ids, "past_key_values.*"]
          outputs: [logits, "present.*"]
  - pass: rename-io
    parts: [embed_tokens]
    options:
      values: {token_embeddings: inputs_embeds}
"""


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_split_paligemma2_parts_reproduce_the_exported_graph(
    paligemma2_onnx: Path, paligemma2_checkpoint: Path, tmp_path: Path
) -> None:
    from surgery import load

    bundle = load(paligemma2_onnx)
    assert parse_recipe(PALIGEMMA2_RECIPE).manager().run(bundle)
    out = save(bundle, tmp_path / "out", progress=False)
    vision, embed, decoder = (
        _session(out / f"{p}.onnx")
        for p in ("vision_encoder", "embed_tokens", "decoder_model_merged")
    )
    whole = _session(paligemma2_onnx)
    for part in bundle:
        onnx.checker.check_model(str(out / f"{part}.onnx"), full_check=True)
    assert [i.name for i in decoder.get_inputs()][:3] == [
        "inputs_embeds",
        "attention_mask",
        "position_ids",
    ]
    assert decoder.get_inputs()[0].shape == ["batch_size", "sequence_length", 64]
    assert [o.name for o in embed.get_outputs()] == ["inputs_embeds"]

    config = json.loads((paligemma2_checkpoint / "config.json").read_text())
    text = config["text_config"]
    layers, kv_heads, head_dim = (
        text["num_hidden_layers"],
        text["num_key_value_heads"],
        text["head_dim"],
    )
    image_token = config["image_token_index"]
    image_tokens = whole.get_outputs()[-3].shape[1]
    size = config["vision_config"]["image_size"]
    rng = np.random.default_rng(0)
    batch, prompt = 2, 5
    ids = np.concatenate(
        [
            np.full((batch, image_tokens), image_token),
            rng.integers(2, image_token, (batch, prompt)),
        ],
        axis=1,
    ).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row
    pixels = rng.standard_normal((batch, 3, size, size), dtype=np.float32)
    positions = np.where(mask == 0, 1, np.cumsum(mask, -1)).astype(np.int64)
    layer_kinds = [f"{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    past_names = [f"past_key_values.{n}" for n in layer_kinds]
    present_names = [f"present.{n}" for n in layer_kinds]
    past = [np.zeros((batch, kv_heads, 0, head_dim), np.float32)] * len(past_names)

    for step in ("prefill", "decode"):
        expected = whole.run(
            ["logits", *present_names],
            {
                "input_ids": ids,
                "pixel_values": pixels,
                "attention_mask": mask,
                "position_ids": positions,
                **dict(zip(past_names, past, strict=True)),
            },
        )
        embeds = embed.run(None, {"input_ids": ids})[0]
        if step == "prefill":
            features = vision.run(None, {"pixel_values": pixels})[0]
            is_image = ids == image_token
            embeds[is_image] = features.reshape(-1, features.shape[-1])[: int(is_image.sum())]
        got = decoder.run(
            ["logits", *present_names],
            {
                "inputs_embeds": embeds,
                "attention_mask": mask,
                "position_ids": positions,
                **dict(zip(past_names, past, strict=True)),
            },
        )
        delta = max(float(np.abs(g - e).max()) for g, e in zip(got, expected, strict=True))
        print(f"split paligemma2 {step}: max |delta| logits+presents = {delta:.3g}")
        assert delta == 0, step  # same kernels on the same inputs
        ids = expected[0][:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones_like(ids)], axis=-1)
        positions = positions[:, -1:] + 1
        past = expected[1:]


def test_split_declares_each_parts_weights_in_the_source_order(paligemma2_onnx: Path) -> None:
    """The same split writes the same files: each part declares its initializers in the order of
    the source graph (``onnx_ir``'s ``extract`` gave a set's order, which changed between runs,
    and the writer places weights in declaration order)."""
    from surgery import load

    bundle = load(paligemma2_onnx)
    source = list(bundle["model"].graph.initializers)
    assert parse_recipe(PALIGEMMA2_RECIPE).manager().run(bundle)
    for part, model in bundle.items():
        names = list(model.graph.initializers)
        assert len(names) >= 2, part
        assert names == sorted(names, key=source.index), part
