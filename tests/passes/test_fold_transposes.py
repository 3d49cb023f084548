"""fold-transposes: Transpose(weight) becomes a lazily transposed weight; outputs unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from passes import FoldTransposes
from surgery import PassManager, load, save


def _linear_and_tied(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((48, 32), dtype=np.float32)  # a Linear's weight: one reader
    tied = rng.standard_normal((10, 32), dtype=np.float32)  # read by Gather and Transpose
    nodes = [
        helper.make_node("Transpose", ["weight"], ["weight_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "weight_t"], ["hidden"]),
        helper.make_node("Gather", ["tied", "ids"], ["embedded"], axis=0),
        helper.make_node("Transpose", ["tied"], ["tied_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "tied_t"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "linear",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"]),
        ],
        [
            helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", 48]),
            helper.make_tensor_value_info("embedded", TensorProto.FLOAT, ["batch", 32]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10]),
        ],
        [numpy_helper.from_array(weight, "weight"), numpy_helper.from_array(tied, "tied")],
    )
    path = tmp_path / "linear.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.save(
        model, path, save_as_external_data=True, location="linear.onnx.data", size_threshold=0
    )
    return path


def _run(path: Path) -> list[np.ndarray]:
    feeds = {
        "x": np.random.default_rng(1).standard_normal((3, 32), dtype=np.float32),
        "ids": np.array([0, 4, 9], np.int64),
    }
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_single_use_weight_is_folded_lazily_and_tied_one_kept(tmp_path: Path) -> None:
    source = _linear_and_tied(tmp_path)
    bundle = load(source)
    assert PassManager([FoldTransposes()]).run(bundle) is True
    graph = bundle["linear"].graph
    assert [n.op_type for n in graph].count("Transpose") == 1, "the tied weight keeps its Transpose"
    folded = graph.initializers["weight_t"]
    assert isinstance(folded.const_value, ir.LazyTensor), "computed when written, not now"
    assert "weight" not in graph.initializers
    assert PassManager([FoldTransposes()]).run(bundle) is False
    save(bundle, tmp_path / "out", progress=False)
    for got, expected in zip(_run(tmp_path / "out" / "linear.onnx"), _run(source), strict=True):
        # The same products; MatMul may block a pre-transposed weight differently.
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
