"""copy-parts: variants side by side, weights shared in memory, written apart on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from passes import CopyParts, RemoveUnused
from surgery import PassManager, SurgeryError, load, parse_recipe, save
from surgery.synthetic import write_synthetic_model


def _run(path: Path) -> np.ndarray:
    x = np.ones((2, 32), np.float32)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[
        0
    ]


def test_copies_share_weights_and_run_alone(tmp_path: Path) -> None:
    source = write_synthetic_model(tmp_path / "m.onnx")
    bundle = load(source)
    PassManager([CopyParts(suffix="_v2"), RemoveUnused(parts=["m_v2"])]).run(bundle)
    assert bundle.parts == ["m", "m_v2"]
    weight = "layer0.weight"
    assert (
        bundle["m"].graph.initializers[weight].const_value
        is bundle["m_v2"].graph.initializers[weight].const_value
    )
    assert len(list(bundle["m"].graph)) == 12, "the original keeps its dead branch"
    assert len(list(bundle["m_v2"].graph)) == 11
    save(bundle, tmp_path / "out", progress=False)
    np.testing.assert_array_equal(_run(tmp_path / "out" / "m_v2.onnx"), _run(source))
    assert (tmp_path / "out" / "m_v2.onnx.data").stat().st_size == (
        tmp_path / "out" / "m.onnx.data"
    ).stat().st_size


def test_recipe_validation_knows_the_copies() -> None:
    recipe = "passes:\n  - pass: copy-parts\n    options: {suffix: _fp16}\n  - pass: cse\n    parts: [model_fp16]\n"
    parse_recipe(recipe, "r.yaml").manager().check_parts(["model"])
    with pytest.raises(SurgeryError) as info:
        parse_recipe(recipe.replace("model_fp16", "model_fp32"), "r.yaml").manager().check_parts(
            ["model"]
        )
    assert str(info.value) == (
        "r.yaml:4: passes[1] (cse): parts: no part named 'model_fp32' at this point; parts then: model, model_fp16"
    )
    with pytest.raises(SurgeryError, match=r"suffix: string should match pattern"):
        parse_recipe("passes: [{pass: copy-parts, options: {suffix: 'a b'}}]\n", "r.yaml")


def test_retyping_a_copy_leaves_the_original_alone(tmp_path: Path) -> None:
    # onnx_ir's clone shares type objects and `Value.dtype = …` mutates them in place: a copy
    # converted to fp16 must not retype the original.
    bundle = load(write_synthetic_model(tmp_path / "m.onnx"))
    PassManager([CopyParts(suffix="_v2")]).run(bundle)
    bundle["m_v2"].graph.inputs[0].dtype = ir.DataType.FLOAT16
    bundle["m_v2"].graph.outputs[0].shape = ir.Shape(["n", 32])
    assert bundle["m"].graph.inputs[0].dtype == ir.DataType.FLOAT
    assert str(bundle["m"].graph.outputs[0].shape) == "[batch_size,32]"
