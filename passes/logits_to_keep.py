"""Pass ``logits-to-keep``: an int64 input ``num_logits_to_keep`` that slices the hidden states
before the ``lm_head``, so generation computes the vocabulary projection for one position only.

Transformers.js 4.x feeds ``num_logits_to_keep`` (an int64 scalar) to ``decoder_model_merged``
whenever the session declares it (``setNumLogitsToKeep``): 1 during ``generate``, 0 in a plain
forward. 0 keeps every position's logits; ``k > 0`` the last ``k`` (all of them when ``k`` is
longer than the sequence). The hidden states ``[batch, sequence, hidden]`` are sliced with
``Slice(h, starts=[-k], ends=[INT64_MAX], axes=[1])`` (``-0`` is ``0``: the whole sequence), so
the ``lm_head`` MatMul and everything after it (the final softcap, Casts) see only the kept rows.
At prefill this skips ``(sequence - 1) × hidden × vocab`` multiply-adds: with PaliGemma 2's
vocabulary of 257,216 about a fifth of the prompt's compute.

One pattern rule, ``lm-head``, on onnxscript's rewriter through :class:`surgery.rewrite.RewritePass`
(counts, ``expect``, ``explain``): ``MatMul(h, W)`` where ``W`` is a weight, stored as exported
(``Transpose(W)``) or already transposed (after ``fold-transposes``), whose result reaches the
graph output ``logits`` only through ops that act on each position alone: a ``Concat`` on the last
axis of other such blocks (``split-large-tensors`` cuts a tied ``lm_head`` into row blocks, each
matched and counted), elementwise ops with a one-element constant (softcap ``Div``/``Mul``, ``Tanh``)
and ``Cast``. Anything else (a MatMul inside the layers, a reduction over positions on the way, a
second reader of the full logits) is refused, and ``explain`` says why. Written here: onnxscript
has no rule that adds a graph input, and ``optimize_for_ort`` keeps every position's logits.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from surgery.errors import SurgeryError
from surgery.registry import register
from surgery.rewrite import RewriteOptions, RewritePass, scalar_constant

__all__ = ["KEEP_INPUT", "LOGITS_OUTPUT", "LogitsToKeep"]

logger = logging.getLogger(__name__)

#: The input Transformers.js feeds (``setNumLogitsToKeep``).
KEEP_INPUT = "num_logits_to_keep"
#: The output whose positions the input selects.
LOGITS_OUTPUT = "logits"
#: The sequence axis of values computed from the sliced hidden states (the kept positions).
KEPT_DIM = "num_logits"

#: Elementwise ops allowed between the lm_head and the logits, with a one-element constant beside.
_SCALAR_OPS = frozenset({"Div", "Mul", "Add", "Sub"})
#: Ops with one input, allowed on the way (the softcap's Tanh, fp16's Casts).
_UNARY_OPS = frozenset({"Tanh", "Cast", "Identity"})
_INT64_MAX = np.iinfo(np.int64).max


def _is_weight(value: ir.Value) -> bool:
    return value.const_value is not None and value.is_initializer() and not value.is_graph_input()


def _weight_reason(w: ir.Value) -> str | None:
    """None if ``w`` is a 2-D weight or ``Transpose`` of one, else why not."""
    producer = w.producer()
    if producer is not None and producer.op_type == "Transpose" and producer.domain == "":
        source = producer.inputs[0]
        perm = list(producer.attributes.get_ints("perm", [1, 0]) or [])
        if source is None or not _is_weight(source) or perm != [1, 0]:
            return "the second input is a Transpose, but not [1, 0] of a weight"
        w = source
    elif not _is_weight(w):
        return "the second input is not a weight (an initializer) nor a Transpose of one"
    tensor = w.const_value
    assert tensor is not None
    if len(tensor.shape) != 2:
        return f"the weight has {len(tensor.shape)} dimensions, not 2"
    return None


def _slice_source(value: ir.Value) -> ir.Value | None:
    """``h`` if ``value`` is this pass's ``Slice(h, -Reshape(num_logits_to_keep))``, else None."""
    node = value.producer()
    if node is None or node.op_type != "Slice" or node.inputs[1] is None:
        return None
    neg = node.inputs[1].producer()
    negated = neg.inputs[0] if neg is not None and neg.op_type == "Neg" else None
    reshape = negated.producer() if negated is not None else None
    keep = reshape.inputs[0] if reshape is not None and reshape.op_type == "Reshape" else None
    return node.inputs[0] if keep is not None and keep.name == KEEP_INPUT else None


def _head_block(value: ir.Value, h: ir.Value) -> bool:
    """Whether ``value`` is ``MatMul(h, W)`` with a weight ``W`` (another lm_head block, possibly
    already rewritten to read the sliced ``h``)."""
    node = value.producer()
    first = node.inputs[0] if node is not None else None
    return (
        node is not None
        and node.op_type == "MatMul"
        and node.domain == ""
        and first is not None
        and (first is h or _slice_source(first) is h)
        and node.inputs[1] is not None
        and _weight_reason(node.inputs[1]) is None
    )


def _path_reason(start: ir.Value, h: ir.Value, graph: ir.Graph) -> str | None:
    """None if every path from ``start`` ends at the ``logits`` output through per-position ops."""
    outputs = {id(v): v.name for v in graph.outputs}
    reached = False
    frontier, seen = [start], set()
    while frontier:
        value = frontier.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if id(value) in outputs:
            if outputs[id(value)] != LOGITS_OUTPUT:
                return f"its result reaches the graph output '{outputs[id(value)]}', not only '{LOGITS_OUTPUT}'"
            reached = True
        for user, _ in value.uses():
            op = user.op_type if user.domain == "" else f"{user.domain}.{user.op_type}"
            others = [v for v in user.inputs if v is not value]
            if op == "Concat":
                rank = len(value.shape) if value.shape is not None else None
                axis = user.attributes.get_int("axis", 0)
                if not (axis == -1 or (rank is not None and axis == rank - 1)):
                    return (
                        f"its result is joined by Concat '{user.name}' on axis {axis}, not the last"
                    )
                if not all(v is not None and _head_block(v, h) for v in others):
                    return f"Concat '{user.name}' joins it with values that are not lm_head blocks"
            elif op in _SCALAR_OPS:
                if not all(scalar_constant(v) is not None for v in others):
                    return f"{op} '{user.name}' combines it with a value that is not a one-element constant"
            elif op not in _UNARY_OPS:
                return f"its result is read by {op} '{user.name}', which may mix positions"
            frontier.extend(user.outputs)
    if not reached:
        return f"its result does not reach the graph output '{LOGITS_OUTPUT}'"
    return None


@register
class LogitsToKeep(RewritePass[RewriteOptions]):
    """Add the int64 scalar input ``num_logits_to_keep`` (0: every position's logits, k: the last k).

    The hidden states are sliced before the ``lm_head`` MatMul (each row block of a split one) and
    the final softcap. Rule ``lm-head`` counts the MatMuls sliced (1, or the number of blocks of a
    split ``lm_head``). Run on ``decoder_model_merged``; a graph where no rule fires is left as it
    was, without the input.
    """

    name = "logits-to-keep"
    summary = (
        "slice the hidden states before the lm_head: input num_logits_to_keep (Transformers.js)"
    )
    Options = RewriteOptions

    def __init__(self, options: RewriteOptions | None = None, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        self._keep: ir.Value | None = None

    def rules(self) -> list[pattern.RewriteRule]:
        return [pattern.RewriteRule(_lm_head, self._sliced, self._check, name="lm-head")]

    def _check(self, context: Any, h: ir.Value, w: ir.Value, **_: Any) -> pattern.MatchResult:
        result = pattern.MatchResult()
        reason = _weight_reason(w)
        if reason is not None:
            return result.fail(reason, w)
        if h.shape is None or len(h.shape) != 3:
            return result.fail("the hidden states are not known to be [batch, sequence, hidden]", h)
        if _slice_source(h) is not None:
            return result.fail(f"the hidden states are already sliced by {KEEP_INPUT}", h)
        reason = _path_reason(context.root.outputs[0], h, context.graph_or_function)
        if reason is not None:
            return result.fail(reason, context.root.outputs[0])
        return result

    def _sliced(self, op: Any, h: ir.Value, w: ir.Value, **_: Any) -> Any:
        assert self._keep is not None
        starts = op.Neg(op.Reshape(self._keep, op.Constant(value_ints=[1])))
        ends = op.Constant(value_ints=[int(_INT64_MAX)])
        axes = op.Constant(value_ints=[1])
        return op.MatMul(op.Slice(h, starts, ends, axes), w)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        existing = next((v for v in graph.inputs if v.name == KEEP_INPUT), None)
        if existing is not None and (
            existing.dtype != ir.DataType.INT64 or existing.shape is None or len(existing.shape)
        ):
            raise SurgeryError(
                f"{self.name}: '{graph.name}' already has an input '{KEEP_INPUT}' that is not an "
                "int64 scalar; rename it first"
            )
        self._keep = existing or ir.Value(
            name=KEEP_INPUT, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([])
        )
        if existing is None:
            graph.inputs.append(self._keep)
        try:
            result = super().call(model)
        finally:
            if existing is None and not self._keep.uses():
                graph.inputs.remove(self._keep)
        if result.modified:
            _rename_kept_axis(self._keep)
        return result


def _rename_kept_axis(keep: ir.Value) -> None:
    """Name the sequence axis of every [batch, sequence, x] value computed from ``keep`` (the
    sliced hidden states, the lm_head blocks, the softcap, ``logits``) :data:`KEPT_DIM`.

    The rewrite leaves them the shapes they had before the slice; a runtime that trusts dim names
    (ONNX Runtime reuses buffers of equal symbolic shape) would take them for prompt-long.
    """
    frontier, seen = [keep], set()
    while frontier:
        value = frontier.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if value.shape is not None and len(value.shape) == 3:
            dims = list(value.shape)
            dims[1] = ir.SymbolicDim(KEPT_DIM)
            value.shape = ir.Shape(dims)
        for user, _ in value.uses():
            frontier.extend(user.outputs)


def _lm_head(op: Any, h: Any, w: Any) -> Any:
    return op.MatMul(h, w)
