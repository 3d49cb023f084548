"""The fp32 islands as pattern rules (:class:`passes.fp16_islands.Fp32Islands` on
:class:`surgery.rewrite.RewritePass`): counts, ``expect``, ``explain``, and the fp16 graphs of the
tiny PaliGemma 1 and 2 exports, pinned to what the hand-written matchers produced before."""

from __future__ import annotations

import collections
import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto
from onnx import helper as oh

from passes.fp16 import Fp16
from passes.fp16_islands import ISLAND_KINDS, Fp32Islands
from surgery import PassManager, SurgeryError, load
from surgery.instruments import TimePasses
from surgery.recipe import load_recipe

F = TensorProto.FLOAT


def _attention(cap_is_constant: bool) -> ir.Model:
    """``Softmax(Mul(Tanh(Div(Q·Kᵀ, 50)), cap_out))``: a softcap whose outer cap is a constant or
    a graph input (then the softcap rule matches its shape but its check refuses it)."""
    nodes = [
        oh.make_node("MatMul", ["q", "k"], ["scores"], name="qk"),
        oh.make_node("Div", ["scores", "cap"], ["capped"], name="softcap.div"),
        oh.make_node("Tanh", ["capped"], ["tanh"], name="softcap.tanh"),
        oh.make_node("Mul", ["tanh", "cap_out"], ["soft"], name="softcap.mul"),
        oh.make_node("Softmax", ["soft"], ["probs"], axis=-1, name="softmax"),
    ]
    caps = ["cap", "cap_out"] if cap_is_constant else ["cap"]
    inits = [onnx.numpy_helper.from_array(np.array(50.0, np.float32), c) for c in caps]
    inputs = ["q", "k"] if cap_is_constant else ["q", "k", "cap_out"]
    graph = oh.make_graph(
        nodes,
        "attention",
        [oh.make_tensor_value_info(n, F, [4, 4]) for n in inputs],
        [oh.make_tensor_value_info("probs", F, [4, 4])],
        inits,
    )
    return ir.serde.deserialize_model(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)]))


def test_islands_are_counted_per_kind_and_leave_the_graph_alone() -> None:
    model = _attention(cap_is_constant=True)
    before = ir.serde.serialize_model(model).SerializeToString()
    islands = Fp32Islands()
    result = islands(model)
    assert result.modified is False
    assert ir.serde.serialize_model(model).SerializeToString() == before
    assert islands.statistics == {"rmsnorm": 0, "softcap": 1, "softmax": 1}
    assert sorted(n.name for n in islands.nodes) == [
        "qk",
        "softcap.div",
        "softcap.mul",
        "softcap.tanh",
        "softmax",
    ]


def test_a_rule_that_does_not_fire_is_explained() -> None:
    stream = io.StringIO()
    islands = Fp32Islands(explain=True)
    islands.explain_stream = stream
    islands(_attention(cap_is_constant=False))
    assert stream.getvalue().splitlines() == [
        "fp32-islands: rule 'rmsnorm' did not fire: no node matched any part of its pattern",
        "fp32-islands: rule 'softcap' did not fire: matched but its check failed at node "
        "'softcap.mul' (Mul), 3 pattern nodes matched: the cap is not a one-element constant "
        "(at cap_out)",
    ]
    assert islands.statistics == {"rmsnorm": 0, "softcap": 0, "softmax": 1}


def test_expected_counts_are_enforced() -> None:
    Fp32Islands(expect={"softmax": 1})(_attention(cap_is_constant=True))
    with pytest.raises(SurgeryError) as info:
        Fp32Islands(expect={"softcap": 2})(_attention(cap_is_constant=True))
    assert (
        str(info.value) == "fp32-islands: rule 'softcap' fired 1 times in 'attention', expected 2"
    )
    with pytest.raises(SurgeryError) as unknown:
        Fp32Islands(kinds=["softmax"], expect={"softcap": 1})(_attention(cap_is_constant=True))
    assert str(unknown.value) == "fp32-islands: expect: no rule named 'softcap'; rules: softmax"


def test_time_passes_shows_fp16_island_counts(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(ir.serde.serialize_model(_attention(cap_is_constant=True)), path)
    stream = io.StringIO()
    PassManager([Fp16()], [TimePasses(stream)]).run(load(path))
    row = stream.getvalue().splitlines()[2]
    assert row.endswith("rmsnorm islands 0, softcap islands 1, softmax islands 1, fp16 nodes 0")


def _digest(names: set[str]) -> str:
    return hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()[:16]


#: Captured from the hand-written matchers (before the pattern rules), on the fp16 parts of the
#: paligemma2 recipe: node count, op histogram, island nodes per kind, and the sha256 (first 16
#: hex digits) of the sorted names of all island nodes.
_BEFORE: dict[str, dict[str, Any]] = {
    "paligemma": {
        "vision_encoder_fp16": (
            73,
            {"Add": 18, "Cast": 8, "Conv": 1, "Gelu": 2, "LayerNormalization": 5, "MatMul": 17,
             "Mul": 2, "Reshape": 9, "Softmax": 2, "Transpose": 9},
            {"rmsnorm": 0, "softcap": 0, "softmax": 6},
            "0fe2c6c2aa0238aa",
        ),
        "embed_tokens_fp16": (
            3, {"Cast": 1, "Gather": 1, "Mul": 1},
            {"rmsnorm": 0, "softcap": 0, "softmax": 0}, "e3b0c44298fc1c14",
        ),
        "decoder_model_merged_fp16": (
            217,  # logits-to-keep: + Constant 3, Neg, Reshape, Slice
            {"Add": 20, "And": 1, "Cast": 28, "Concat": 19, "Constant": 3, "Cos": 1, "Equal": 1,
             "Expand": 4, "Gelu": 2, "LessOrEqual": 1, "MatMul": 19, "Mul": 23, "Neg": 5, "Or": 1,
             "Pow": 5, "Range": 2, "Reciprocal": 5, "ReduceMean": 5, "Reshape": 17, "Shape": 7,
             "Sin": 1, "Slice": 10, "Softmax": 2, "Sqrt": 5, "Squeeze": 6, "Transpose": 11,
             "Unsqueeze": 12, "Where": 1},
            {"rmsnorm": 30, "softcap": 0, "softmax": 8},
            "7d760bda8fc6ff10",
        ),
    },
}  # fmt: skip


def _fp16_parts(model_path: Path) -> tuple[dict[str, ir.Model], dict[str, dict[str, set[str]]]]:
    """The recipe's passes up to fp16; the fp16 parts and their islands per kind, by name."""
    bundle = load(model_path)
    recipe = load_recipe("paligemma2")
    context = recipe.manager().context  # the layout's chunk limit, for split-large-tensors
    steps = [
        s
        for s in recipe.steps
        if s.name
        not in ("fold-transposes", "quantize", "grouped-attention", "fuse-vision-attention")
        and not any(p.endswith("_q4f16") for p in s.pass_.parts or ())  # only the _fp16 dtype
    ]
    PassManager([s for s in steps if s.name != "fp16"], context=context).run(bundle)
    islands: dict[str, dict[str, set[str]]] = {}
    for part in [p for p in bundle.parts if p.endswith("_fp16")]:
        islands[part] = {}
        for kind in ISLAND_KINDS:
            finder = Fp32Islands(kinds=[kind])
            finder(bundle[part])
            islands[part][kind] = {n.name or "" for n in finder.nodes}
    PassManager([s for s in steps if s.name == "fp16"], context=context).run(bundle)
    return {p: m for p, m in bundle.items() if p.endswith("_fp16")}, islands


def _check(model_path: Path, before: dict[str, Any]) -> None:
    parts, islands = _fp16_parts(model_path)
    assert sorted(parts) == sorted(before)
    for part, (count, histogram, kinds, digest) in before.items():
        graph = parts[part].graph
        assert len(graph) == count, part
        assert dict(collections.Counter(n.op_type for n in graph)) == histogram, part
        assert {k: len(v) for k, v in islands[part].items()} == kinds, part
        assert _digest(set().union(*islands[part].values())) == digest, part


def test_paligemma_fp16_graph_as_before(paligemma_onnx: Path) -> None:
    _check(paligemma_onnx, _BEFORE["paligemma"])


_BEFORE["paligemma2"] = {
    "vision_encoder_fp16": (
        73,
        {"Add": 18, "Cast": 8, "Conv": 1, "Gelu": 2, "LayerNormalization": 5, "MatMul": 17,
         "Mul": 2, "Reshape": 9, "Softmax": 2, "Transpose": 9},
        {"rmsnorm": 0, "softcap": 0, "softmax": 6},
        "1572fa50fe822e60",
    ),
    "embed_tokens_fp16": (
        3, {"Cast": 1, "Gather": 1, "Mul": 1},
        {"rmsnorm": 0, "softcap": 0, "softmax": 0}, "e3b0c44298fc1c14",
    ),
    "decoder_model_merged_fp16": (
        481,  # logits-to-keep: + Constant 3, Neg, Reshape, Slice
        {"Add": 46, "And": 3, "Cast": 68, "Concat": 35, "Constant": 3, "Cos": 1, "Div": 5,
         "Equal": 1, "Expand": 8, "Gelu": 4, "Greater": 1, "LessOrEqual": 1, "MatMul": 37,
         "Mul": 64, "Neg": 9, "Or": 2, "Pow": 17, "Range": 2, "Reciprocal": 17, "ReduceMean": 17,
         "Reshape": 33, "Shape": 11, "Sin": 1, "Slice": 18, "Softmax": 4, "Sqrt": 17,
         "Squeeze": 10, "Sub": 1, "Tanh": 5, "Transpose": 21, "Unsqueeze": 17, "Where": 2},
        {"rmsnorm": 102, "softcap": 24, "softmax": 28},
        "339dfc59d7fd3d5f",  # logits-to-keep renames the lm_head MatMul (it is in an island)
    ),
}  # fmt: skip


def test_paligemma2_fp16_graph_as_before(paligemma2_onnx: Path) -> None:
    _check(paligemma2_onnx, _BEFORE["paligemma2"])
