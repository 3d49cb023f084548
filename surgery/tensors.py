"""The one walker over every tensor a model holds, and how to put another tensor in its place.

onnx_ir's ``model.graphs()`` misses model-local functions, and nothing in onnx_ir lists ``TENSORS``
attributes; the load checks (:mod:`surgery.model_checks`), the writer and ``inspect`` all need
every tensor, so they share :func:`tensor_slots`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import onnx_ir as ir

__all__ = ["NAME_CHARS", "TensorSlot", "iter_tensors", "short", "tensor_slots"]

#: Names from the model are cut to this many characters in messages.
NAME_CHARS = 80


def short(text: str | bytes) -> str:
    """``text`` on one line, cut to :data:`NAME_CHARS` (protobuf gives bytes for bad UTF-8)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = text.replace("\n", " ")
    return text if len(text) <= NAME_CHARS else text[: NAME_CHARS - 1] + "…"


@dataclasses.dataclass(frozen=True)
class TensorSlot:
    """One place in a model that holds a tensor, and how to put another tensor there."""

    where: str
    tensor: ir.TensorProtocol
    replace: Callable[[ir.TensorProtocol], None]


def _set_initializer(value: ir.Value) -> Callable[[ir.TensorProtocol], None]:
    def replace(tensor: ir.TensorProtocol) -> None:
        value.const_value = tensor

    return replace


def _set_attribute(
    node: ir.Node, name: str, index: int | None
) -> Callable[[ir.TensorProtocol], None]:
    def replace(tensor: ir.TensorProtocol) -> None:
        attr = node.attributes[name]
        if index is None:
            node.attributes[name] = ir.AttrTensor(name, tensor, doc_string=attr.doc_string)
        else:
            tensors = list(attr.as_tensors())
            tensors[index] = tensor
            node.attributes[name] = ir.AttrTensors(name, tensors, doc_string=attr.doc_string)

    return replace


def _graph_slots(graph: ir.Graph | ir.Function, scope: str) -> Iterator[TensorSlot]:
    if isinstance(graph, ir.Graph):
        for value in graph.initializers.values():
            if value.const_value is not None:
                where = f"{scope}initializer '{short(value.name or '')}'"
                yield TensorSlot(where, value.const_value, _set_initializer(value))
    for node in graph:
        name = short(node.name or f"<unnamed {node.op_type}>")
        for attr in list(node.attributes.values()):
            if attr.is_ref():
                continue
            where = f"{scope}node '{name}' attribute '{short(attr.name)}'"
            if attr.type == ir.AttributeType.TENSOR:
                yield TensorSlot(where, attr.as_tensor(), _set_attribute(node, attr.name, None))
            elif attr.type == ir.AttributeType.TENSORS:
                for i, tensor in enumerate(attr.as_tensors()):
                    yield TensorSlot(f"{where}[{i}]", tensor, _set_attribute(node, attr.name, i))
            elif attr.type == ir.AttributeType.GRAPH:
                yield from _graph_slots(attr.as_graph(), f"{where} > ")
            elif attr.type == ir.AttributeType.GRAPHS:
                for i, subgraph in enumerate(attr.as_graphs()):
                    yield from _graph_slots(subgraph, f"{where}[{i}] > ")


def tensor_slots(model: ir.Model) -> Iterator[TensorSlot]:
    """Every tensor the model holds: initializers and ``TENSOR``/``TENSORS`` attributes of the
    main graph, of model-local functions and of every subgraph nested in either.

    This is the walker every safety check uses; onnx_ir's ``model.graphs()`` misses functions
    and its ``set_base_dir`` misses functions and ``TENSORS`` lists.
    """
    yield from _graph_slots(model.graph, "")
    for function in model.functions.values():
        domain, name, overload = function.identifier()
        label = f"{domain}::{name}" + (f":{overload}" if overload else "")
        yield from _graph_slots(function, f"function '{short(label)}' ")


def iter_tensors(model: ir.Model) -> Iterator[tuple[str, ir.TensorProtocol]]:
    """Yield ``(where, tensor)`` for every tensor of :func:`tensor_slots`."""
    for slot in tensor_slots(model):
        yield slot.where, slot.tensor
