"""optimize: onnxscript's optimizer, except that no node reading a large constant is folded."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from passes import Optimize
from surgery import Bundle, PassManager


def _linear(rows: int) -> ir.Model:
    """``y = x @ Transpose(W)`` with ``W`` of ``rows × 100`` float32, read only by the Transpose."""
    weight = ir.Value(
        name="weight", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([rows, 100])
    )
    weight.const_value = ir.Tensor(np.ones((rows, 100), np.float32), name="weight")
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", 100]))
    transpose = ir.node("Transpose", [weight], attributes={"perm": [1, 0]})
    matmul = ir.node("MatMul", [x, transpose.outputs[0]])
    matmul.outputs[0].name = "y"
    graph = ir.Graph(
        [x],
        matmul.outputs,
        nodes=[transpose, matmul],
        initializers=[weight],
        opset_imports={"": 21},
    )
    return ir.Model(graph, ir_version=10)


def _ops(bundle: Bundle) -> list[str]:
    return [node.op_type for node in bundle["model"].graph]


def test_large_weight_is_not_folded_in_memory() -> None:
    """onnxscript alone folds a single-use Transpose of any size; here 10,000 elements stay."""
    bundle = Bundle({"model": _linear(100)})
    PassManager([Optimize()]).run(bundle)
    assert _ops(bundle) == ["Transpose", "MatMul"]
    assert bundle["model"].graph.initializers["weight"].const_value is not None


def test_weight_under_the_limit_is_folded() -> None:
    bundle = Bundle({"model": _linear(100)})
    assert PassManager([Optimize(input_size_limit=10_000)]).run(bundle) is True
    assert _ops(bundle) == ["MatMul"]
