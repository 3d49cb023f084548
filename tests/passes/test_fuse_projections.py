"""fuse-projections: Q/K/V and gate/up as one MatMul and a Split, on the exported tiny PaliGemmas.

Rule ``qkv`` fires once per attention (text and vision layers), ``gate-up`` once per text layer;
the joined weights are lazy concatenations (nothing computed in the pass) and the old weights are
gone; the fused graph gives the logits and presents of the exported one in ONNX Runtime (max
|Δ| ≤ 1e-4; printed with ``pytest -s``): prefill with an image and a left-padded row, decode steps
with the past, past the sliding window. ``quantize`` (q4) then packs the joined weight into
exactly the unfused weights' packed blocks, side by side. A weight with a second reader is not
joined, and ``explain`` says why.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from passes import FuseProjections, Quantize
from surgery import PassManager, SurgeryError, load, save
from surgery.lazy import ConcatenatedTensor
from tests.passes.decoder_parity import step_deltas

MODELS = ["paligemma", "paligemma2", "paligemma2_window"]


def _layers(checkpoint: Path) -> tuple[int, int]:
    config = json.loads((checkpoint / "config.json").read_text())
    return config["text_config"]["num_hidden_layers"], config["vision_config"]["num_hidden_layers"]


@pytest.mark.parametrize("prefix", MODELS)
def test_fires_per_layer_and_matches_the_exported_graph(
    prefix: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    exported: Path = request.getfixturevalue(f"{prefix}_onnx")
    checkpoint: Path = request.getfixturevalue(f"{prefix}_checkpoint")
    text, vision = _layers(checkpoint)
    bundle = load(exported)
    graph = bundle["model"].graph
    matmuls = sum(n.op_type == "MatMul" for n in graph)
    fuse = FuseProjections(expect={"qkv": text + vision, "gate-up": text})
    assert PassManager([fuse]).run(bundle) is True
    assert fuse.statistics == {"qkv": text + vision, "gate-up": text}
    assert sum(n.op_type == "MatMul" for n in graph) == matmuls - 2 * (text + vision) - text
    splits = [n for n in graph if n.op_type == "Split"]
    assert len(splits) == 2 * text + vision
    for split in splits:
        weight = split.inputs[0].producer().inputs[1]  # type: ignore[union-attr]
        assert isinstance(weight.const_value, ConcatenatedTensor), weight.name
        assert weight.is_initializer()
        for source in weight.const_value.sources:
            assert source.name not in graph.initializers, "the separate weights are removed"
    fused_path = save(bundle, tmp_path / "fused", progress=False) / "model.onnx"
    for step, (length, delta) in enumerate(step_deltas(exported, fused_path, checkpoint)):
        print(f"{prefix} step {step} (total {length}): max |delta| {delta:.3g}")
        assert delta <= 1e-4, (step, delta)


def test_quantize_packs_the_joined_weight_as_the_separate_ones(paligemma2_onnx: Path) -> None:
    unfused = load(paligemma2_onnx)["model"]
    fused = load(paligemma2_onnx)["model"]
    FuseProjections()(fused)
    joined = {
        value.name: [s.name for s in value.const_value.sources]
        for value in fused.graph.initializers.values()
        if isinstance(value.const_value, ConcatenatedTensor)
    }
    assert joined
    Quantize(mode="q4")(unfused)
    Quantize(mode="q4")(fused)
    for name, sources in joined.items():
        for suffix in ("_Q4", "_scales"):
            got = fused.graph.initializers[f"{name}{suffix}"].const_value
            parts = [unfused.graph.initializers[f"{s}{suffix}"].const_value for s in sources]
            assert got is not None and all(p is not None for p in parts)
            np.testing.assert_array_equal(
                got.numpy(),
                np.concatenate([p.numpy() for p in parts], axis=0),  # type: ignore[union-attr]
                err_msg=f"{name}{suffix}",
            )


def test_refuses_a_weight_with_another_reader(
    paligemma2_onnx: Path, paligemma2_checkpoint: Path
) -> None:
    model = load(paligemma2_onnx)["model"]
    graph = model.graph
    # In every attention the K projection reads the Q weight too: that weight has two readers.
    shared = []
    for node in list(graph):
        siblings = [u for u, i in node.inputs[0].uses() if i == 0 and u.op_type == "MatMul"]
        if node.op_type == "MatMul" and len(siblings) == 3 and siblings[0] is node:
            siblings[1].replace_input_with(1, node.inputs[1])
            shared.append(node.inputs[1])
    text, vision = _layers(paligemma2_checkpoint)
    assert len(shared) == text + vision
    stream = io.StringIO()
    fuse = FuseProjections(explain=True)
    fuse.explain_stream = stream
    fuse(model)
    assert fuse.statistics == {"qkv": 0, "gate-up": text}
    for weight in shared:
        assert weight.name in graph.initializers and len(weight.uses()) == 2, weight.name
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        "fuse-projections: rule 'qkv' did not fire: matched but its check failed at node "
    )
    assert "has other readers (joining it would store it twice)" in lines[0]
    with pytest.raises(SurgeryError) as info:
        FuseProjections(expect={"qkv": 1})(model)
    assert str(info.value) == (
        f"fuse-projections: rule 'qkv' fired 0 times in '{graph.name}', expected 1"
    )


def test_joined_weight_is_computed_when_read() -> None:
    a = ir.tensor(np.arange(6, dtype=np.float32).reshape(2, 3), name="a")
    b = ir.tensor(np.arange(4, dtype=np.float32).reshape(2, 2), name="b")
    joined = ConcatenatedTensor([a, b], axis=1, name="ab")
    assert list(joined.shape) == [2, 5] and joined.dtype == ir.DataType.FLOAT
    np.testing.assert_array_equal(joined.numpy(), np.concatenate([a.numpy(), b.numpy()], 1))
