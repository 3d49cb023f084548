"""Cloning models so that no two parts share anything mutable but weight tensors.

``onnx_ir``'s cloner (``Model.clone``, ``convenience.extract``) makes new graphs, nodes and values
but keeps the *type and shape objects* of the originals. ``Value.dtype = …`` mutates the type
object in place, so a pass that converts one part (fp16 on ``decoder_model_merged_fp16``) would
silently retype the same value in its sibling (``decoder_model_merged``). Every clone made for a
new part goes through :func:`unshare`, which gives each value its own type and shape; tensors stay
shared (that is the point: no weight is copied in memory).
"""

from __future__ import annotations

import copy

import onnx_ir as ir

__all__ = ["clone_model", "unshare"]


def _values(graph: ir.Graph | ir.Function) -> list[ir.Value]:
    values = list(graph.inputs)
    if isinstance(graph, ir.Graph):
        values += list(graph.initializers.values())
    for node in ir.traversal.RecursiveGraphIterator(graph):
        values += list(node.outputs)
    return values


def unshare(model: ir.Model) -> ir.Model:
    """Give every value of ``model`` its own type and shape objects; return ``model``."""
    graphs: list[ir.Graph | ir.Function] = [model.graph, *model.functions.values()]
    for graph in graphs:
        for value in _values(graph):
            if value.type is not None:
                value.type = copy.deepcopy(value.type)
            if value.shape is not None:
                value.shape = ir.Shape(list(value.shape))
    return model


def clone_model(model: ir.Model) -> ir.Model:
    """A copy of ``model`` with new graphs, nodes, values, types and shapes; tensors shared.

    The in-memory ``meta`` (e.g. the folder the model was loaded from) comes along too.
    """
    copy = unshare(model.clone())
    copy.meta.update(model.meta)
    return copy
