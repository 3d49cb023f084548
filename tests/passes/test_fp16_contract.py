"""The fp16 pass's postcondition: no value left float32 between two fp16 nodes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto
from onnx import helper as oh

from passes.fp16 import Fp16
from passes.fp16_convert import Converter
from surgery import Bundle, PassFailed, PassManager

F = TensorProto.FLOAT


def _chain() -> ir.Model:
    nodes = [
        oh.make_node("Add", ["x", "b"], ["h"], name="add"),
        oh.make_node("Mul", ["h", "c"], ["y"], name="mul"),
    ]
    inits = [onnx.numpy_helper.from_array(np.ones(4, np.float32), n) for n in ("b", "c")]
    graph = oh.make_graph(
        nodes,
        "chain",
        [oh.make_tensor_value_info("x", F, [4])],
        [oh.make_tensor_value_info("y", F, [4])],
        inits,
    )
    return ir.serde.deserialize_model(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)]))


def test_fp16_holds_its_contract() -> None:
    result = Fp16()(_chain())
    assert result.model.graph.node("add").outputs[0].dtype == ir.DataType.FLOAT16


def test_a_float32_value_between_fp16_nodes_breaks_the_contract(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A converter that neither retypes outputs nor inserts casts leaves ``h`` float32 between
    two fp16 nodes: the postcondition catches it (a bug: exit 3, not a user error)."""
    monkeypatch.setattr(Converter, "retype_outputs", lambda self: None)
    monkeypatch.setattr(Converter, "fix_uses", lambda self: {})
    with pytest.raises(PassFailed) as info:
        PassManager([Fp16()]).run(Bundle({"m": _chain()}))
    assert str(info.value) == (
        "passes[0] (fp16): pass 'fp16' failed on part 'm', as the first pass: "
        "fp16: 'h' stays float32 between fp16 nodes 'add' and 'mul'"
    )
