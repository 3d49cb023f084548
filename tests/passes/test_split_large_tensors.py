"""split-large-tensors: every tensor under the limit, the same outputs, on a toy and on PaliGemma."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from passes import SplitLargeTensors
from surgery import PassContext, PassManager, SurgeryError, load, parse_recipe, save
from surgery.cli import main
from surgery.verify import verify

ROWS, COLS = 10, 32  # 1280-byte tables: over the 1 KiB inline limit, so they are external


def _toy(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    table = rng.standard_normal((ROWS, COLS), dtype=np.float32)
    projection = rng.standard_normal((COLS, ROWS), dtype=np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["embedded"], axis=0),
        helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "table_t"], ["tied_logits"]),
        helper.make_node("MatMul", ["x", "projection"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "toy",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", COLS]),
        ],
        [
            helper.make_tensor_value_info("embedded", TensorProto.FLOAT, ["batch", "seq", COLS]),
            helper.make_tensor_value_info("tied_logits", TensorProto.FLOAT, ["batch", ROWS]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", ROWS]),
        ],
        [
            numpy_helper.from_array(table, "table"),
            numpy_helper.from_array(projection, "projection"),
        ],
    )
    path = tmp_path / "toy.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.save(
        model, path, save_as_external_data=True, location="toy.onnx.data", size_threshold=1024
    )
    return path


def _run(path: Path) -> list[np.ndarray]:
    ids = np.array([[0, 2, 3, 9], [-1, 5, 6, -10]], dtype=np.int64)  # block edges, negatives
    x = np.random.default_rng(1).standard_normal((2, COLS), dtype=np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"ids": ids, "x": x})


def test_toy_outputs_unchanged_and_every_tensor_under_the_limit(tmp_path: Path) -> None:
    source = _toy(tmp_path)
    bundle = load(source)
    limit = 3 * COLS * 4  # at most three rows a block: four blocks of 2, 3, 2, 3 rows
    assert PassManager([SplitLargeTensors(max_bytes=limit)]).run(bundle) is True
    graph = bundle["toy"].graph
    sizes = {
        n: v.const_value.nbytes for n, v in graph.initializers.items() if v.const_value is not None
    }
    assert max(sizes.values()) <= limit
    assert "table" not in sizes and "projection" not in sizes
    blocks = [n for n in sizes if re.fullmatch(r"table\.rows\d+", n)]
    assert len(blocks) == 4, "one set of row blocks, shared by both readers"
    assert sorted(sizes[n] // (COLS * 4) for n in blocks) == [2, 2, 3, 3], "balanced blocks"
    made = [v for node in graph for v in node.outputs if node.op_type in ("MatMul", "Transpose")]
    untyped = [v.name for v in made if v.dtype is None or v.shape is None]
    assert not untyped, "later passes (fp16 after quantize) need every new value typed"
    tied = {v.name: list(v.shape) for v in made if v.name.endswith(".matmul_out")}  # type: ignore[arg-type]
    assert all(shape[0] == "batch" and shape[1] in (2, 3) for shape in tied.values()), tied
    save(bundle, tmp_path / "out", progress=False)
    before, after = _run(source), _run(tmp_path / "out" / "toy.onnx")
    np.testing.assert_array_equal(after[0], before[0])  # Gather: the very same rows
    # MatMul blocks: each output is the same dot product; only kernel blocking could reorder sums.
    np.testing.assert_allclose(after[1], before[1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(after[2], before[2], rtol=1e-6, atol=1e-6)
    assert PassManager([SplitLargeTensors(max_bytes=limit)]).run(bundle) is False


def test_unsupported_reader_is_named(tmp_path: Path) -> None:
    source = _toy(tmp_path)
    bundle = load(source)
    graph = bundle["toy"].graph
    table = graph.initializers["table"]
    gather = next(n for n in graph if n.op_type == "Gather")
    gather.attributes["axis"] = ir.Attr("axis", ir.AttributeType.INT, 1)
    with pytest.raises(SurgeryError) as info:
        PassManager([SplitLargeTensors(max_bytes=100)]).run(bundle)
    assert str(info.value).endswith(
        f"toy: tensor 'table' (1.2 KiB) is over max_bytes and is read by Gather '{gather.name}' "
        "(input 0), which split-large-tensors cannot rewrite (it handles Gather on axis 0, MatMul "
        "and Transpose→MatMul)"
    )
    assert table.const_value is not None


def test_exported_paligemma2_generates_the_same_tokens(
    paligemma2_onnx: Path, paligemma2_checkpoint: Path, tmp_path: Path
) -> None:
    bundle = load(paligemma2_onnx)
    limit = 150_000  # the tied 1600 x 64 embedding / lm_head (409,600 bytes) becomes 3 blocks
    assert PassManager([SplitLargeTensors(max_bytes=limit)]).run(bundle) is True
    graph = bundle["model"].graph
    assert max(v.const_value.nbytes for v in graph.initializers.values() if v.const_value) <= limit
    save(bundle, tmp_path / "out", progress=False)
    ok, report = verify(tmp_path / "out" / "model.onnx", paligemma2_checkpoint, max_new_tokens=20)
    assert ok, report


def test_limit_defaults_to_the_layout_chunk_limit(tmp_path: Path) -> None:
    """Without max_bytes the pass splits at the pipeline's (the layout's) max_chunk_bytes."""
    bundle = load(_toy(tmp_path))
    limit = 3 * COLS * 4
    manager = PassManager([SplitLargeTensors()], context=PassContext(max_chunk_bytes=limit))
    assert manager.run(bundle) is True
    graph = bundle["toy"].graph
    assert max(v.const_value.nbytes for v in graph.initializers.values() if v.const_value) <= limit


def test_no_limit_anywhere_is_refused_before_any_work(tmp_path: Path) -> None:
    bundle = load(_toy(tmp_path))
    with pytest.raises(SurgeryError) as info:
        PassManager([SplitLargeTensors()]).run(bundle)
    assert str(info.value) == (
        "passes[0] (split-large-tensors): max_bytes is required: the pipeline has no chunk limit "
        "to split at"
    )
    assert "table" in bundle["toy"].graph.initializers
    with pytest.raises(SurgeryError) as info:
        parse_recipe("layout: plain\npasses:\n  - split-large-tensors\n", "r.yaml")
    assert str(info.value) == (
        "r.yaml:3: passes[0] (split-large-tensors): max_bytes is required: the 'plain' layout has "
        "no chunk limit to split at"
    )


MISMATCH = """\
layout: {name: transformers.js, max_chunk_bytes: 1000}
passes:
  - remove-unused
  - pass: split-large-tensors
    options: {max_bytes: 2000}
"""


def test_recipe_over_the_layout_limit_is_refused_at_validation() -> None:
    with pytest.raises(SurgeryError) as info:
        parse_recipe(MISMATCH, "r.yaml")
    assert str(info.value) == (
        "r.yaml:4: passes[1] (split-large-tensors): max_bytes (2000) is over the 'transformers.js' "
        "layout's max_chunk_bytes (1000): blocks that large cannot be written; leave max_bytes out "
        "to split at the layout's limit"
    )
    parse_recipe(MISMATCH.replace("2000", "1000"), "r.yaml")  # equal (or smaller) is fine


def test_cli_refuses_the_mismatch_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _toy(tmp_path)
    before = source.with_suffix(".onnx.data").read_bytes()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(MISMATCH)
    out = tmp_path / "out"
    for args in (["validate", str(recipe)], ["apply", str(recipe), str(source), "-o", str(out)]):
        assert main(args) == 1
        err = capsys.readouterr().err
        assert err == (
            f"surgery: error: {recipe}:4: passes[1] (split-large-tensors): max_bytes (2000) is "
            "over the 'transformers.js' layout's max_chunk_bytes (1000): blocks that large cannot "
            "be written; leave max_bytes out to split at the layout's limit\n"
        )
    assert not out.exists()
    assert source.with_suffix(".onnx.data").read_bytes() == before
