"""Find the nodes of a Gemma graph that must compute in fp32 to stay finite under fp16 (islands).

A helper of :mod:`passes.fp16`, not a pass. onnxconverter-common has no notion of this: it only
blocks whole op types. Gemma needs finer cuts, found here by pattern on the exported graph:

* ``rmsnorm``: the RMSNorm statistics, ``Pow(x, 2)`` (or ``Mul(x, x)``) → ``ReduceMean`` → ``Add``
  eps → ``Sqrt`` → ``Reciprocal`` (or ``Div``) and the ``Mul``/``Div`` that normalizes ``x``. ``x²``
  passes 65504 as soon as ``|x| > 256``, which Gemma's residual stream does.
* ``softmax``: each ``Softmax`` and the score path behind it back to the activation × activation
  ``MatMul`` (``Q·Kᵀ``): scaling, softcap, mask ``Add``/``Where``. Logits past 65504 turn into
  ``inf - inf = NaN`` inside the softmax.
* ``softcap``: each ``Div``/``Mul`` → ``Tanh`` → ``Mul`` by constants (Gemma 2's attention and final
  logit softcapping) plus, like ``softmax``, the score path back to an activation-only ``MatMul``.
  A ``MatMul`` with a weight input (``lm_head``) is never put in an island: its weight would have
  to stay fp32.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Literal

import numpy as np
import onnx_ir as ir

__all__ = ["ISLAND_KINDS", "IslandKind", "find_islands"]

logger = logging.getLogger(__name__)

IslandKind = Literal["rmsnorm", "softcap", "softmax"]
#: The kinds of island :func:`find_islands` knows.
ISLAND_KINDS: tuple[IslandKind, ...] = ("rmsnorm", "softcap", "softmax")

#: Elementwise ops that may sit between ``Q·Kᵀ`` and the softmax (scale, softcap, mask).
_SCORE_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Tanh", "Where", "Cast", "Neg"})
#: Ops of the RMSNorm statistics chain after ``ReduceMean``.
_STAT_OPS = frozenset({"Add", "Sqrt", "Reciprocal", "Div", "Cast"})
#: How far back from a softmax or softcap the score path is followed.
_MAX_SCORE_DEPTH = 8


def _is_constant(value: ir.Value | None) -> bool:
    if value is None:
        return True
    if value.const_value is not None:
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant"


def _scalar(value: ir.Value | None) -> float | None:
    """The value of a one-element constant, or None."""
    if value is None:
        return None
    tensor = value.const_value
    if tensor is None:
        producer = value.producer()
        if producer is None or producer.op_type != "Constant" or "value" not in producer.attributes:
            return None
        tensor = producer.attributes["value"].as_tensor()
    if tensor.size != 1:
        return None
    return float(np.asarray(tensor.numpy()).reshape(-1)[0])


def _rmsnorm(graph: ir.Graph) -> set[ir.Node]:
    island: set[ir.Node] = set()
    for node in graph:
        if node.op_type != "ReduceMean" or node.inputs[0] is None:
            continue
        square = node.inputs[0].producer()
        if square is None:
            continue
        is_pow = square.op_type == "Pow" and _scalar(square.inputs[1]) == 2.0
        is_mul = square.op_type == "Mul" and square.inputs[0] is square.inputs[1]
        if not (is_pow or is_mul):
            continue
        x = square.inputs[0]
        found = {square, node}
        frontier = [node]
        while frontier:
            current = frontier.pop()
            for output in current.outputs:
                for user, _ in output.uses():
                    if user in found:
                        continue
                    if user.op_type in ("Mul", "Div") and x in user.inputs:
                        found.add(user)
                    elif user.op_type in _STAT_OPS and all(
                        _is_constant(v) or v is output for v in user.inputs
                    ):
                        found.add(user)
                        frontier.append(user)
        island |= found
    return island


def _score_path(start: ir.Node) -> set[ir.Node]:
    """Nodes on paths from an activation-only ``MatMul`` to ``start`` through score ops."""
    memo: dict[ir.Node, bool] = {}

    def reaches(node: ir.Node, depth: int) -> bool:
        if node in memo:
            return memo[node]
        if node.op_type == "MatMul":
            result = not any(_is_constant(v) for v in node.inputs)
        elif node.op_type not in _SCORE_OPS or depth >= _MAX_SCORE_DEPTH:
            result = False
        else:
            result = False
            for value in node.inputs:
                producer = value.producer() if value is not None else None
                if producer is not None and reaches(producer, depth + 1):
                    result = True
        memo[node] = result
        return result

    path: set[ir.Node] = set()
    for value in start.inputs:
        producer = value.producer() if value is not None else None
        if producer is not None and reaches(producer, 1):
            path |= {node for node, hit in memo.items() if hit}
    return path


def _softmax(graph: ir.Graph) -> set[ir.Node]:
    island: set[ir.Node] = set()
    for node in graph:
        if node.op_type == "Softmax":
            island |= {node} | _score_path(node)
    return island


def _softcap(graph: ir.Graph) -> set[ir.Node]:
    island: set[ir.Node] = set()
    for node in graph:
        if node.op_type != "Tanh" or node.inputs[0] is None:
            continue
        before = node.inputs[0].producer()
        if (
            before is None
            or before.op_type not in ("Div", "Mul")
            or _scalar(before.inputs[1]) is None
        ):
            continue
        after = [
            user
            for user, _ in node.outputs[0].uses()
            if user.op_type == "Mul" and any(_scalar(v) is not None for v in user.inputs)
        ]
        if not after:
            continue
        island |= {before, node, *after} | _score_path(before)
    return island


def find_islands(graph: ir.Graph, kinds: Iterable[str]) -> set[ir.Node]:
    """The nodes of ``graph`` (not its subgraphs) that the named island kinds keep in fp32.

    Args:
        graph: The graph to search.
        kinds: Names from :data:`ISLAND_KINDS`.

    Returns:
        The union of the islands found.
    """
    finders = {"rmsnorm": _rmsnorm, "softcap": _softcap, "softmax": _softmax}
    island: set[ir.Node] = set()
    for kind in kinds:
        found = finders[kind](graph)
        logger.debug("fp32 island %s: %d nodes", kind, len(found))
        island |= found
    return island
