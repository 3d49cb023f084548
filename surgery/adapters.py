"""Adapters that turn other people's passes into registered-style passes.

* :func:`gs_pass` adapts a plain function over an onnx-graphsurgeon ``gs.Graph`` into a
  :class:`~surgery.pass_infra.ModelPass`. Weights are never loaded: before the graph goes to
  graphsurgeon, every tensor larger than the inline limit is replaced by an external-data
  *placeholder* reference (graphsurgeon keeps such tensors as ``LazyValues`` and exports them
  untouched), and the placeholders are swapped back for the original tensor objects afterwards,
  so memory-mapped weights stay memory-mapped and computed ones stay lazy.
* :func:`wrap_ir_pass` wraps an ``onnx_ir.passes.PassBase`` subclass that takes no arguments.
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import onnx
import onnx_ir as ir

from surgery.constants import INLINE_LIMIT_BYTES
from surgery.pass_infra import ModelPass

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

__all__ = ["gs_pass", "wrap_ir_pass"]

_PLACEHOLDER = "__surgery_placeholder__"


def _adopt(model: ir.Model, result: ir.Model) -> None:
    """Make ``model`` the functional pass's ``result``: graph (and its opset imports), functions,
    IR version and model-level fields; ours is in place, so the object must stay the same."""
    model.graph = result.graph
    model.functions.clear()
    model.functions.update(result.functions)
    model.metadata_props.clear()
    model.metadata_props.update(result.metadata_props)
    for field in (
        "ir_version",
        "producer_name",
        "producer_version",
        "domain",
        "model_version",
        "doc_string",
    ):
        setattr(model, field, getattr(result, field))


def wrap_ir_pass(cls: type[ir.passes.PassBase], *, name: str) -> type[ModelPass]:
    """Wrap an argument-free ``onnx_ir`` pass class as a :class:`ModelPass`."""

    def call(self: ModelPass, model: ir.Model) -> ir.passes.PassResult:
        result = cls()(model)
        if result.model is not model:
            _adopt(model, result.model)
        return ir.passes.PassResult(model, result.modified)

    return type(
        cls.__name__,
        (ModelPass,),
        {
            "name": name,
            "summary": (cls.__doc__ or cls.__name__).strip().splitlines()[0],
            "__doc__": cls.__doc__,
            "call": call,
        },
    )


def _structure(graph: onnx.GraphProto) -> tuple[Any, ...]:
    """What a graph computes, independent of node order and value_info."""
    nodes = sorted(n.SerializeToString(deterministic=True) for n in graph.node)
    return (
        nodes,
        [i.SerializeToString(deterministic=True) for i in graph.input],
        [o.SerializeToString(deterministic=True) for o in graph.output],
        sorted(t.SerializeToString(deterministic=True) for t in graph.initializer),
    )


def _graph_to_proto(model: ir.Model) -> tuple[onnx.ModelProto, list[ir.TensorProtocol]]:
    """Serialize ``model`` with large tensors as placeholders; return the proto and the tensors."""
    stash: list[ir.TensorProtocol] = []
    originals: list[tuple[ir.Value, ir.TensorProtocol]] = []
    try:
        for value in model.graph.initializers.values():
            tensor = value.const_value
            small = tensor is not None and tensor.nbytes <= INLINE_LIMIT_BYTES
            if tensor is None or (small and not isinstance(tensor, ir.ExternalTensor)):
                continue
            originals.append((value, tensor))
            value.const_value = ir.ExternalTensor(
                _PLACEHOLDER,
                len(stash),
                tensor.nbytes,
                tensor.dtype,
                shape=typing.cast(ir.Shape, tensor.shape),
                name=tensor.name or value.name or "",
            )
            stash.append(tensor)
        return ir.serde.serialize_model(model), stash
    finally:
        for value, tensor in originals:
            value.const_value = tensor


def _restore_placeholders(model: ir.Model, stash: list[ir.TensorProtocol]) -> None:
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor) and str(tensor.location) == _PLACEHOLDER:
            value.const_value = stash[tensor.offset or 0]


def gs_pass(
    fn: Callable[[gs.Graph], gs.Graph | None] | None = None,
    *,
    name: str | None = None,
    summary: str | None = None,
) -> Any:
    """Adapt ``fn(graph: gs.Graph) -> gs.Graph | None`` into a pass class.

    Usable as ``@gs_pass`` or ``@gs_pass(name="my-pass")``. The function edits the graph in place
    or returns a new one; ``cleanup().toposort()`` runs afterwards, as in graphsurgeon's own
    examples. The result is a :class:`ModelPass` subclass, so it can be composed in Python or
    named in a recipe by import path.
    """
    if fn is None:
        return functools.partial(gs_pass, name=name, summary=summary)

    def call(self: ModelPass, model: ir.Model) -> ir.passes.PassResult:
        import onnx_graphsurgeon as gs

        proto, stash = _graph_to_proto(model)
        before = _structure(proto.graph)
        graph = gs.import_onnx(proto)
        graph = fn(graph) or graph
        graph.cleanup().toposort()
        new_proto = gs.export_onnx(graph)
        if _structure(new_proto.graph) == before:
            return ir.passes.PassResult(model, False)
        new_model = ir.serde.deserialize_model(new_proto)
        _restore_placeholders(new_model, stash)
        model.graph = new_model.graph
        model.opset_imports.update(new_model.opset_imports)
        return ir.passes.PassResult(model, True)

    pass_name = name or fn.__name__.replace("_", "-")
    doc = fn.__doc__ or f"graphsurgeon function {fn.__qualname__}"
    return type(
        fn.__name__,
        (ModelPass,),
        {
            "name": pass_name,
            "summary": summary or doc.strip().splitlines()[0],
            "__doc__": doc,
            "__module__": fn.__module__,
            "call": call,
        },
    )
