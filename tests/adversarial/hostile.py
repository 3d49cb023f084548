"""Builders of hostile models: edit the protobuf of a valid model, never its data file.

The ``.onnx`` file is read with ``onnx.load(load_external_data=False)`` and written back with
``SerializeToString``, so external references stay exactly as the edit leaves them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import onnx
from onnx import TensorProto, helper

#: The opset domain of the model-local functions the cases add.
DOMAIN = "evil"


def edit(path: Path, change: Callable[[onnx.ModelProto], None]) -> Path:
    """Apply ``change`` to the model at ``path`` in place (protobuf only) and return ``path``."""
    model = onnx.load(path, load_external_data=False)
    change(model)
    path.write_bytes(model.SerializeToString())  # onnx.save would touch external data
    return path


def external(
    name: str,
    location: str,
    dims: Sequence[int] = (4,),
    *,
    offset: int | None = None,
    length: int | None = None,
    data_type: int = TensorProto.FLOAT,
) -> TensorProto:
    """A tensor whose bytes are declared to live in ``location``."""
    tensor = TensorProto(name=name, data_type=data_type, dims=list(dims))
    tensor.data_location = TensorProto.EXTERNAL
    entries = {"location": location, "offset": offset, "length": length}
    for key, value in entries.items():
        if value is not None:
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
    return tensor


def initializer(model: onnx.ModelProto, name: str) -> TensorProto:
    """The main graph's initializer called ``name``."""
    return next(t for t in model.graph.initializer if t.name == name)


def add_function(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> None:
    """Add function ``evil::F(a) -> o`` made of ``nodes`` and call it on ``x`` (output ``fo``).

    ``nodes`` must compute ``o``; they may use ``a``.
    """
    function = helper.make_function(DOMAIN, "F", ["a"], ["o"], nodes, [helper.make_opsetid("", 21)])
    model.functions.append(function)
    model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    model.graph.node.append(helper.make_node("F", ["x"], ["fo"], domain=DOMAIN, name="call_f"))
    model.graph.output.append(helper.make_tensor_value_info("fo", TensorProto.FLOAT, None))


def constant_function(model: onnx.ModelProto, value: TensorProto) -> None:
    """Add ``evil::F(a) = a + Constant(value)``, called from the main graph."""
    add_function(
        model,
        [
            helper.make_node("Constant", [], ["c"], name="const", value=value),
            helper.make_node("Add", ["a", "c"], ["o"], name="add"),
        ],
    )
