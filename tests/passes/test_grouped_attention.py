"""grouped-attention: Gemma attention without the repeat_kv copy, on the exported tiny PaliGemmas.

The rule fires once per layer (softcap or none), no Expand is left, and the rewritten graph gives
the logits and presents of the exported one in ONNX Runtime (max |Δ| ≤ 1e-4; printed with
``pytest -s``): prefill with an image and a left-padded row, then decode steps with the past,
including a prompt longer than the sliding window. A graph that is not what the exporter writes
is left alone, and ``explain`` says why.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from passes import GroupedAttention
from surgery import PassManager, SurgeryError, load, save
from tests.passes.decoder_parity import step_deltas

MODELS = ["paligemma", "paligemma2", "paligemma2_window"]


@pytest.mark.parametrize("prefix", MODELS)
def test_fires_per_layer_and_matches_the_exported_graph(
    prefix: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    exported: Path = request.getfixturevalue(f"{prefix}_onnx")
    checkpoint: Path = request.getfixturevalue(f"{prefix}_checkpoint")
    layers = json.loads((checkpoint / "config.json").read_text())["text_config"][
        "num_hidden_layers"
    ]
    bundle = load(exported)
    grouped = GroupedAttention(expect={"attention": layers})
    assert PassManager([grouped]).run(bundle) is True
    assert grouped.statistics == {"attention": layers}
    graph = bundle["model"].graph
    assert not [n for n in graph if n.op_type == "Expand"], "no repeat_kv copy is left"
    fused_path = save(bundle, tmp_path / "fused", progress=False) / "model.onnx"
    window = json.loads((checkpoint / "config.json").read_text())["text_config"].get(
        "sliding_window"
    )
    deltas = step_deltas(exported, fused_path, checkpoint)
    for step, (length, delta) in enumerate(deltas):
        print(f"{prefix} step {step} (total {length}, window {window}): max |delta| {delta:.3g}")
        assert delta <= 1e-4, (step, delta)
    if window is not None and prefix.endswith("window"):
        assert deltas[-1][0] > window + 2, "prefill and decode past the window"


def _mutated(model: ir.Model, how: str) -> None:
    """Change every layer's attention into something the rule must not rewrite."""
    graph = model.graph
    for node in list(graph):
        if how == "cap" and node.op_type == "Tanh":
            (mul,) = [use.node for use in node.outputs[0].uses()]
            other = ir.Value(name=f"{mul.name}.cap", type=ir.TensorType(ir.DataType.FLOAT))
            other.const_value = ir.tensor(np.array(20.0, np.float32), name=other.name)
            graph.register_initializer(other)
            mul.replace_input_with(1, other)
        if how == "repeat" and node.op_type == "Expand":
            unsqueeze = node.inputs[0].producer()  # type: ignore[union-attr]
            assert unsqueeze is not None and unsqueeze.op_type == "Unsqueeze"
            axes = ir.Value(name=f"{unsqueeze.name}.axes", type=ir.TensorType(ir.DataType.INT64))
            axes.const_value = ir.tensor(np.array([1], np.int64), name=axes.name)
            graph.register_initializer(axes)
            unsqueeze.replace_input_with(1, axes)


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("cap", "matched but its check failed at node"),
        ("repeat", "matched but its check failed at node"),
    ],
)
def test_refuses_attention_it_does_not_know(how: str, reason: str, paligemma2_onnx: Path) -> None:
    model = load(paligemma2_onnx)["model"]
    _mutated(model, how)
    before = ir.serde.serialize_model(model).SerializeToString()
    stream = io.StringIO()
    grouped = GroupedAttention(explain=True)
    grouped.explain_stream = stream
    assert grouped(model).modified is False
    assert grouped.statistics == {"attention": 0}
    assert ir.serde.serialize_model(model).SerializeToString() == before
    text = stream.getvalue()
    assert text.startswith("grouped-attention: rule 'attention' did not fire: ")
    assert reason in text
    detail = {
        "cap": "the softcap is not c·tanh(s/c) with one constant c",
        "repeat": "does not unsqueeze axis 2",
    }[how]
    assert detail in text, text
    with pytest.raises(SurgeryError) as info:
        GroupedAttention(expect={"attention": 4})(model)
    assert str(info.value) == (
        f"grouped-attention: rule 'attention' fired 0 times in '{model.graph.name}', expected 4"
    )


def test_explain_leaves_the_graph_as_the_plain_run_does(paligemma2_onnx: Path) -> None:
    """``explain``'s dry run happens on a clone: onnxscript's leaves the replacements it built
    and dropped as users of the matched values (16 here), which later passes would count."""

    def uses(explain: bool) -> list[tuple[str, int]]:
        model = load(paligemma2_onnx)[paligemma2_onnx.stem]
        fuse = GroupedAttention(explain=explain)
        fuse.explain_stream = io.StringIO()
        fuse(model)
        values = {v for node in model.graph for v in (*node.inputs, *node.outputs) if v}
        return sorted((v.name or "", len(v.uses())) for v in values)

    assert uses(explain=True) == uses(explain=False)
