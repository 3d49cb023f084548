"""Find the nodes of a Gemma graph that must compute in fp32 to stay finite under fp16 (islands).

A helper of :mod:`passes.fp16`, not a registered pass. onnxconverter-common has no notion of
this: it only blocks whole op types. Gemma needs finer cuts, found here by onnxscript pattern rules
on the exported graph, run by :class:`Fp32Islands`, a match-only :class:`surgery.rewrite.RewritePass`
(so match counts per kind, ``expect`` and ``explain`` come with it):

* ``rmsnorm``: rules ``ReduceMean(Pow(x, 2))`` and ``ReduceMean(Mul(x, x))``; on each match the
  island grows forward along the statistics (``Add`` eps → ``Sqrt`` → ``Reciprocal`` / ``Div``,
  ``Cast``, each with only constants beside it) to the ``Mul``/``Div`` that normalizes ``x``.
  ``x²`` passes 65504 as soon as ``|x| > 256``, which Gemma's residual stream does.
* ``softmax``: rule ``Softmax(scores)``; the island grows back along the score path to the
  activation × activation ``MatMul`` (``Q·Kᵀ``): scaling, softcap, mask ``Add``/``Where``. Logits
  past 65504 turn into ``inf - inf = NaN`` inside the softmax.
* ``softcap``: rules ``Mul(Tanh(Div|Mul(s, c)), c')`` (``c'`` on either side; ``c``, ``c'``
  one-element constants), Gemma 2's attention and final-logit softcapping; the island grows back
  along the score path from the ``Div``/``Mul``, as for ``softmax``. A ``MatMul`` with a weight
  input (``lm_head``) is never put in an island: its weight would have to stay fp32.

Why match-only rules and not rewrites that tag nodes: the fp16 converter needs a set of nodes, and
a rewrite re-creates what it matched (new node names and order, rule metadata), which would change
the graph fp16 converts. The parts a fixed pattern cannot say (a statistics chain or score path of
varying length) are the bounded walks of :meth:`Fp32Islands.on_match`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Literal

import onnx_ir as ir
import pydantic
from onnxscript.rewriter import pattern

from surgery.rewrite import RewriteOptions, RewritePass, scalar_constant

__all__ = ["ISLAND_KINDS", "Fp32Islands", "IslandKind", "find_islands"]

logger = logging.getLogger(__name__)

IslandKind = Literal["rmsnorm", "softcap", "softmax"]
#: The kinds of island :func:`find_islands` knows.
ISLAND_KINDS: tuple[IslandKind, ...] = ("rmsnorm", "softcap", "softmax")

#: Ops that may sit between ``Q·Kᵀ`` and the softmax: elementwise (scale, softcap, mask) and the
#: Reshape of ``grouped-attention`` (scores viewed ``[B, kv, n_rep·S, T]`` ↔ ``[B, H, S, T]``).
_SCORE_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Tanh", "Where", "Cast", "Neg", "Reshape"})
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


def _rmsnorm_closure(reduce_mean: ir.Node, square: ir.Node, x: ir.Value) -> set[ir.Node]:
    """``x²`` → ``ReduceMean`` and, forward from it, the statistics chain to the normalizing op."""
    found = {square, reduce_mean}
    frontier = [reduce_mean]
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
    return found


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


def _squared_by_pow(op: Any, x: Any, two: Any) -> Any:
    return op.ReduceMean(op.Pow(x, two), _allow_other_inputs=True)


def _squared_by_mul(op: Any, x: Any) -> Any:
    return op.ReduceMean(op.Mul(x, x), _allow_other_inputs=True)


def _is_two(context: Any, two: ir.Value, **_: Any) -> pattern.MatchResult:
    result = pattern.MatchResult()
    if scalar_constant(two) != 2.0:
        result.fail("the exponent is not the constant 2", two)
    return result


def _softmax(op: Any, scores: Any) -> Any:
    return op.Softmax(scores)


def _capped_div(op: Any, s: Any, c: Any, c_out: Any) -> Any:
    return op.Mul(op.Tanh(op.Div(s, c)), c_out)


def _capped_mul(op: Any, s: Any, c: Any, c_out: Any) -> Any:
    return op.Mul(op.Tanh(op.Mul(s, c)), c_out)


def _capped_div_left(op: Any, s: Any, c: Any, c_out: Any) -> Any:
    return op.Mul(c_out, op.Tanh(op.Div(s, c)))


def _capped_mul_left(op: Any, s: Any, c: Any, c_out: Any) -> Any:
    return op.Mul(c_out, op.Tanh(op.Mul(s, c)))


def _caps_are_scalars(context: Any, c: ir.Value, c_out: ir.Value, **_: Any) -> pattern.MatchResult:
    result = pattern.MatchResult()
    for value in (c, c_out):
        if scalar_constant(value) is None:
            return result.fail("the cap is not a one-element constant", value)
    return result


def _rule(kind: str, target: Any, condition: Any = None) -> pattern.RewriteRule:
    """A match-only rule: the replacement is never built (:class:`Fp32Islands` only matches)."""
    return pattern.RewriteRule(target, lambda op, **_: None, condition, name=kind)


#: The rules of each island kind (several rules of one kind share its name and its count).
_RULES: dict[str, list[pattern.RewriteRule]] = {
    "rmsnorm": [_rule("rmsnorm", _squared_by_pow, _is_two), _rule("rmsnorm", _squared_by_mul)],
    "softcap": [
        _rule("softcap", f, _caps_are_scalars)
        for f in (_capped_div, _capped_mul, _capped_div_left, _capped_mul_left)
    ],
    "softmax": [_rule("softmax", _softmax)],
}


class _IslandOptions(RewriteOptions):
    kinds: list[IslandKind] = pydantic.Field(default_factory=lambda: list(ISLAND_KINDS))


class Fp32Islands(RewritePass[_IslandOptions]):
    """Find the fp32 islands of a graph; after a call, ``nodes`` holds them (graph unchanged)."""

    name = "fp32-islands"
    summary = "find the nodes fp16 keeps in fp32 (RMSNorm statistics, softcap, softmax)"
    Options = _IslandOptions
    match_only = True

    def __init__(self, options: _IslandOptions | None = None, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        self.nodes: set[ir.Node] = set()
        self.by_kind: dict[str, set[ir.Node]] = {}

    def rules(self) -> list[pattern.RewriteRule]:
        return [rule for kind in self.options.kinds for rule in _RULES[kind]]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.by_kind = {kind: set() for kind in self.options.kinds}
        result = super().call(model)
        self.nodes = set().union(*self.by_kind.values())
        for kind, found in self.by_kind.items():
            logger.debug("fp32 island %s: %d nodes", kind, len(found))
        return result

    def on_match(self, rule: str, match: pattern.MatchResult) -> None:
        nodes = list(match.nodes)
        if rule == "rmsnorm":
            reduce_mean = next(n for n in nodes if n.op_type == "ReduceMean")
            square = next(n for n in nodes if n is not reduce_mean)
            found = _rmsnorm_closure(reduce_mean, square, match.bindings["x"])
        elif rule == "softmax":
            found = {nodes[0]} | _score_path(nodes[0])
        else:
            tanh = next(n for n in nodes if n.op_type == "Tanh")
            before = tanh.inputs[0].producer() if tanh.inputs[0] is not None else None
            assert before is not None
            found = set(nodes) | _score_path(before)
        self.by_kind[rule] |= found


def find_islands(model: ir.Model, kinds: Iterable[str]) -> set[ir.Node]:
    """The nodes of ``model``'s graph that the named island kinds keep in fp32.

    Args:
        model: The model to search (it is not changed).
        kinds: Names from :data:`ISLAND_KINDS`.

    Returns:
        The union of the islands found.
    """
    islands = Fp32Islands(kinds=list(kinds))
    islands(model)
    return islands.nodes
