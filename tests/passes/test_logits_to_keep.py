"""logits-to-keep: the lm_head sees only the kept positions, every form of lm_head, same numbers.

On a hand-built decoder tail (``lm_head`` as exported, folded by ``fold-transposes``, cut into row
blocks by ``split-large-tensors``) and on the decoders of the exported tiny PaliGemma 1 and 2:
``num_logits_to_keep = 0`` gives exactly the unfused logits, ``k`` their last ``k`` rows, presents
unchanged; the rule counts what it sliced and refuses what it must not touch, saying why.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto
from onnx import helper as oh

from passes import FoldTransposes, LogitsToKeep, SplitLargeTensors
from surgery import PassManager, SurgeryError, load, parse_recipe, save

F = TensorProto.FLOAT
HIDDEN, VOCAB = 8, 12


def _tail(reader: str = "softcap") -> ir.Model:
    """``h [b, s, 8]`` → final norm-like Mul → ``MatMul(·, Transpose(W))`` → softcap → ``logits``;
    ``reader`` replaces the softcap by a ReduceMean over positions ("mean") or adds a second output
    reading the full logits ("second-output")."""
    rng = np.random.default_rng(0)
    nodes = [
        oh.make_node("Mul", ["h", "norm"], ["normed"], name="norm"),
        oh.make_node("Transpose", ["W"], ["W_t"], perm=[1, 0], name="lm_head.transpose"),
        oh.make_node("MatMul", ["normed", "W_t"], ["raw"], name="lm_head"),
        oh.make_node("MatMul", ["h", "P"], ["projected"], name="projection"),
    ]
    if reader == "mean":
        nodes.append(oh.make_node("ReduceMean", ["raw", "axis1"], ["logits"], name="mean"))
    else:
        nodes += [
            oh.make_node("Div", ["raw", "cap"], ["div"], name="softcap.div"),
            oh.make_node("Tanh", ["div"], ["tanh"], name="softcap.tanh"),
            oh.make_node("Mul", ["tanh", "cap"], ["logits"], name="softcap.mul"),
        ]
    outputs = [
        oh.make_tensor_value_info("logits", F, ["b", "s" if reader != "mean" else 1, VOCAB]),
        oh.make_tensor_value_info("projected", F, ["b", "s", HIDDEN]),
    ]
    if reader == "second-output":
        outputs.append(oh.make_tensor_value_info("raw", F, ["b", "s", VOCAB]))
    inits = [
        onnx.numpy_helper.from_array(rng.standard_normal((VOCAB, HIDDEN), np.float32), "W"),
        onnx.numpy_helper.from_array(rng.standard_normal((HIDDEN, HIDDEN), np.float32), "P"),
        onnx.numpy_helper.from_array(rng.standard_normal(HIDDEN).astype(np.float32), "norm"),
        onnx.numpy_helper.from_array(np.array(3.0, np.float32), "cap"),
        onnx.numpy_helper.from_array(np.array([1], np.int64), "axis1"),
    ]
    graph = oh.make_graph(
        nodes,
        "tail",
        [oh.make_tensor_value_info("h", F, ["b", "s", HIDDEN])],
        outputs,
        inits,
        value_info=[oh.make_tensor_value_info("normed", F, ["b", "s", HIDDEN])],
    )
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 20)], ir_version=10)
    return ir.serde.deserialize_model(proto)


def _session(model: ir.Model) -> ort.InferenceSession:
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _assert_kept(got: np.ndarray, full: np.ndarray, k: int) -> None:
    """``k == 0``: every position, bitwise; else the last ``k`` (the MatMul then runs on fewer
    rows, which may block its sums differently: ≤ 1e-5)."""
    if k == 0:
        np.testing.assert_array_equal(got, full)
    else:
        np.testing.assert_allclose(got, full[:, -k:], rtol=0, atol=1e-5)


def _h(seq: int = 5) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((2, seq, HIDDEN), dtype=np.float32)


@pytest.mark.parametrize(
    ("form", "blocks"), [("exported", 1), ("folded", 1), ("split", 3), ("split-folded", 3)]
)
def test_every_lm_head_form_is_sliced_and_exact(form: str, blocks: int) -> None:
    model = _tail()
    before: list[object] = []
    if form.startswith("split"):
        before.append(SplitLargeTensors(max_bytes=4 * HIDDEN * 4))  # 4 rows a block: 3 blocks
    if form.endswith("folded"):
        before.append(FoldTransposes())
    for pass_ in before:
        assert pass_(model).modified  # type: ignore[operator]
    expected = _session(model).run(None, {"h": _h()})
    keep = LogitsToKeep(expect={"lm-head": blocks})
    assert keep(model).modified is True
    assert keep.statistics == {"lm-head": blocks}
    assert [v.name for v in model.graph.inputs] == ["h", "num_logits_to_keep"]
    session = _session(model)
    (keep_input,) = [i for i in session.get_inputs() if i.name == "num_logits_to_keep"]
    assert keep_input.type == "tensor(int64)" and keep_input.shape == []
    for k in (0, 1, 2, 5, 9):
        got = session.run(None, {"h": _h(), "num_logits_to_keep": np.array(k, np.int64)})
        _assert_kept(got[0], expected[0], k)
        np.testing.assert_array_equal(got[1], expected[1])  # other outputs untouched
    # Run again: the hidden states are already sliced, nothing fires, nothing changes.
    again = LogitsToKeep()
    assert again(model).modified is False
    assert again.statistics == {"lm-head": 0}
    assert [v.name for v in model.graph.inputs] == ["h", "num_logits_to_keep"]


@pytest.mark.parametrize(
    ("reader", "reason"),
    [
        ("mean", "its result is read by ReduceMean 'mean', which may mix positions"),
        ("second-output", "its result reaches the graph output 'raw', not only 'logits'"),
    ],
)
def test_refuses_a_head_whose_logits_mix_or_leak_positions(reader: str, reason: str) -> None:
    model = _tail(reader)
    before = ir.serde.serialize_model(model).SerializeToString()
    stream = io.StringIO()
    keep = LogitsToKeep(explain=True)
    keep.explain_stream = stream
    assert keep(model).modified is False
    assert keep.statistics == {"lm-head": 0}
    assert ir.serde.serialize_model(model).SerializeToString() == before, "no input left behind"
    assert stream.getvalue().startswith(
        "logits-to-keep: rule 'lm-head' did not fire: matched but its check failed"
    )
    assert reason in stream.getvalue()
    with pytest.raises(SurgeryError) as info:
        LogitsToKeep(expect={"lm-head": 1})(model)
    assert str(info.value) == "logits-to-keep: rule 'lm-head' fired 0 times in 'tail', expected 1"
    assert [v.name for v in model.graph.inputs] == ["h"]


def test_refuses_an_existing_input_of_another_type() -> None:
    model = _tail()
    model.graph.inputs.append(
        ir.Value(
            name="num_logits_to_keep", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([])
        )
    )
    with pytest.raises(SurgeryError) as info:
        LogitsToKeep()(model)
    assert str(info.value) == (
        "logits-to-keep: 'tail' already has an input 'num_logits_to_keep' that is not an int64 "
        "scalar; rename it first"
    )


SPLIT = """
name: split
passes:
  - pass: split
    options:
      parts:
        decoder_model_merged:
          inputs: [inputs_embeds, attention_mask, position_ids, "past_key_values.*"]
          outputs: [logits, "present.*"]
"""


@pytest.mark.parametrize("prefix", ["paligemma", "paligemma2"])
def test_exported_decoder_keeps_exact_logits_and_presents(
    prefix: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    exported = request.getfixturevalue(f"{prefix}_onnx")
    bundle = load(exported)
    assert parse_recipe(SPLIT).manager().run(bundle)
    unfused = save(bundle, tmp_path / "unfused", progress=False) / "decoder_model_merged.onnx"
    keep = LogitsToKeep(expect={"lm-head": 1})
    assert PassManager([keep]).run(bundle) is True
    fused = save(bundle, tmp_path / "fused", progress=False) / "decoder_model_merged.onnx"
    before = ort.InferenceSession(str(unfused), providers=["CPUExecutionProvider"])
    after = ort.InferenceSession(str(fused), providers=["CPUExecutionProvider"])
    assert [i.name for i in after.get_inputs()] == [
        *(i.name for i in before.get_inputs()),
        "num_logits_to_keep",
    ]
    rng = np.random.default_rng(0)
    batch, length = 2, 9
    hidden = before.get_inputs()[0].shape[-1]
    mask = np.ones((batch, length), np.int64)
    mask[1, :3] = 0  # a left-padded row
    feeds = {
        "inputs_embeds": rng.standard_normal((batch, length, hidden), dtype=np.float32),
        "attention_mask": mask,
        "position_ids": np.where(mask == 0, 1, np.cumsum(mask, -1)).astype(np.int64),
    }
    for value in before.get_inputs():
        if value.name.startswith("past_key_values."):
            feeds[value.name] = np.zeros((batch, value.shape[1], 0, value.shape[3]), np.float32)
    expected = before.run(None, feeds)
    for k in (0, 1, 4):
        got = after.run(None, {**feeds, "num_logits_to_keep": np.array(k, np.int64)})
        _assert_kept(got[0], expected[0], k)
        for present, reference in zip(got[1:], expected[1:], strict=True):
            np.testing.assert_array_equal(present, reference)
