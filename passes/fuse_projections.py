"""Pass ``fuse-projections``: sibling projections of one activation become one MatMul and a Split.

The exporter writes each ``nn.Linear`` as ``MatMul(x, W)`` with ``W`` stored ``[K, N]``. A
transformer layer reads its normalized input three times for Q, K and V, and the MLP's input twice
for gate and up. Here such siblings become one ``MatMul(x, concat(W₀, W₁, …))`` over the weights
joined along N, followed by ``Split`` on the last axis into the original outputs: one GEMM over a
wider weight instead of several (what onnxruntime-genai's model builder writes as its fused
``qkv_proj`` / ``gate_up_proj``). Each output column is the same dot product as before, so the
results are those of the unfused graph up to the GEMM's summation order.

The joined weight is a :class:`surgery.lazy.ConcatenatedTensor`: read from the memory-mapped
sources when the writer reaches it, never held in the pipeline. A later ``quantize`` sees one
MatMul with a constant ``[K, ΣN]`` weight, which it quantizes as any other (4-bit blocks run along
K, so each column packs exactly as before; 8-bit per tensor shares one scale over the joined
weight); ``fp16`` converts it lazily like any initializer.

Rules on onnxscript's rewriter through :class:`surgery.rewrite.RewritePass` (counts, ``expect``,
``explain``): ``qkv`` (three sibling MatMuls) and ``gate-up`` (two). The patterns have several
output nodes; onnxscript's default matcher tries every combination of same-type nodes in the graph
for them (cubic in the MatMuls of a 3B model), so :class:`_SiblingMatcher` narrows the candidates
to the other readers of the first node's input, which are the only nodes that can match. A rule's
check accepts only the exporter's form: every MatMul reading the activation is in the match (no
fourth reader left out), each weight a 2-D float initializer with this MatMul as its only reader
(a weight read elsewhere would be stored twice) and the same K and dtype.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import onnx_ir as ir
import onnx_ir.passes.common
from onnxscript.rewriter import _matcher, pattern

from surgery.lazy import ConcatenatedTensor
from surgery.registry import register
from surgery.rewrite import RewriteOptions, RewritePass

__all__ = ["FuseProjections"]

logger = logging.getLogger(__name__)

_FLOATS = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})


def _readers(value: ir.Value) -> list[tuple[ir.Node, int]]:
    """The uses of ``value`` by nodes in a graph. A dry run under ``explain`` builds replacement
    nodes it never inserts, and a node holds a use of each input from birth: those do not count.
    """
    return [(user, index) for user, index in value.uses() if user.graph is not None]


class _SiblingMatcher(_matcher.SimplePatternMatcher):
    """onnxscript's matcher, with multi-output candidates limited to readers of one input.

    For a pattern whose output nodes all read one value (the projections of ``x``), the other
    output nodes are looked for among the other readers of the first node's input 0, in graph
    order, each node once; onnxscript's default tries every node of the same op type.
    """

    def match(
        self,
        model: ir.Model,
        graph_or_function: ir.Graph | ir.Function,
        node: ir.Node,
        *,
        verbose: int = 0,
        remove_nodes: bool = True,
        tracer: Any = None,
    ) -> Any:
        if self.pattern.has_single_output_node:
            return super().match(
                model,
                graph_or_function,
                node,
                verbose=verbose,
                remove_nodes=remove_nodes,
                tracer=tracer,
            )
        self._tracer = tracer
        self._graph = (
            graph_or_function
            if isinstance(graph_or_function, ir.Graph)
            else graph_or_function.graph
        )
        shared = node.inputs[0] if node.inputs else None
        siblings = (
            []
            if shared is None
            else list(
                dict.fromkeys(
                    user
                    for user, index in _readers(shared)
                    if index == 0 and user is not node and user.op_type == node.op_type
                )
            )
        )
        count = len(self.pattern.output_nodes)
        match = pattern.MatchResult()
        match.fail(f"'{getattr(shared, 'name', None)}' has {len(siblings) + 1} {node.op_type} "
                   f"readers, fewer than {count}")  # fmt: skip
        for others in itertools.permutations(siblings, count - 1):
            self._init_match(verbose)
            match = self._multi_match((node, *others), check_removable=remove_nodes)
            if match:
                return match
        return match


def _three(op: Any, x: Any, w0: Any, w1: Any, w2: Any) -> Any:
    return op.MatMul(x, w0), op.MatMul(x, w1), op.MatMul(x, w2)


def _two(op: Any, x: Any, w0: Any, w1: Any) -> Any:
    return op.MatMul(x, w0), op.MatMul(x, w1)


def _weights(bindings: dict[str, Any]) -> list[ir.Value]:
    return [bindings[f"w{i}"] for i in range(3) if f"w{i}" in bindings]


def _check(context: Any, x: ir.Value, **bindings: Any) -> pattern.MatchResult:
    result = pattern.MatchResult()
    weights = _weights(bindings)
    readers = {user for user, index in _readers(x) if user.op_type == "MatMul" and index == 0}
    if len(readers) != len(weights):
        return result.fail(
            f"'{x.name}' is read by {len(readers)} MatMuls, not {len(weights)}: the rule for "
            f"{len(readers)} projections applies",
            x,
        )
    ks, dtypes = set(), set()
    for weight in weights:
        tensor = weight.const_value
        if tensor is None or not weight.is_initializer() or weight.is_graph_input():
            return result.fail(f"'{weight.name}' is not a constant initializer", weight)
        if len(tensor.shape) != 2 or tensor.dtype not in _FLOATS:
            return result.fail(f"'{weight.name}' is not a 2-D float weight", weight)
        if len(_readers(weight)) != 1:
            return result.fail(
                f"'{weight.name}' has other readers (joining it would store it twice)", weight
            )
        ks.add(tensor.shape[0])
        dtypes.add(tensor.dtype)
    if len(ks) != 1 or len(dtypes) != 1:
        return result.fail("the weights differ in K or dtype", *weights)
    return result


def _fused(op: Any, x: ir.Value, weights: list[ir.Value]) -> Any:
    """``Split(MatMul(x, concat(weights)))`` on the last axis, one output per weight."""
    tensors = [w.const_value for w in weights if w.const_value is not None]
    assert len(tensors) == len(weights)  # the check accepted only constant weights
    name = "+".join(w.name or "w" for w in weights)
    joined = op.initializer(ConcatenatedTensor(tensors, axis=1, name=name), name=name)
    widths = [int(t.shape.numpy()[1]) for t in tensors]
    fused = op.MatMul(x, joined)
    return op.Split(fused, op.Constant(value_ints=widths), axis=-1, _outputs=len(weights))


def _replace_three(op: Any, x: ir.Value, w0: ir.Value, w1: ir.Value, w2: ir.Value) -> Any:
    return _fused(op, x, [w0, w1, w2])


def _replace_two(op: Any, x: ir.Value, w0: ir.Value, w1: ir.Value) -> Any:
    return _fused(op, x, [w0, w1])


@register
class FuseProjections(RewritePass[RewriteOptions]):
    """Join the weights of sibling MatMuls (Q/K/V; gate/up) into one MatMul followed by Split.

    Rule ``qkv``: the three MatMuls reading one activation (attention's Q, K and V, decoder and
    vision encoder). Rule ``gate-up``: the two reading one activation (Gemma's MLP gate and up).
    The joined weight is computed when written; the original weights are removed.
    """

    name = "fuse-projections"
    summary = "Q/K/V and gate/up MatMuls become one MatMul over joined weights and a Split"
    Options = RewriteOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = super().call(model)
        if result.modified:  # the separate weights are unused now
            ir.passes.common.RemoveUnusedNodesPass()(model)
        return result

    def rules(self) -> list[pattern.RewriteRule]:
        return [
            pattern.RewriteRule(_three, _replace_three, _check, name="qkv",
                                matcher=_SiblingMatcher),
            pattern.RewriteRule(_two, _replace_two, _check, name="gate-up",
                                matcher=_SiblingMatcher),
        ]  # fmt: skip
