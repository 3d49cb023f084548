"""Pass ``grouped-attention``: Gemma attention without the ``repeat_kv`` copy of the past.

HF's eager Gemma attention (what ``surgery export`` writes, see :mod:`surgery.export_wrapper`)
repeats each key/value head ``n_rep = heads / kv_heads`` times before ``Q·Kᵀ`` and ``P·V``:
``Reshape(Expand(Unsqueeze(present, 2)))`` copies the whole past, every layer, every decode step
(20 % of a decode step at past 4112 on ONNX Runtime CPU). Head ``h`` reads kv head
``h // n_rep``, so the query heads of one group can instead be stacked along the rows:

* ``Q [B, H, S, D]`` viewed as ``[B, kv, n_rep·S, D]`` (a Reshape, no copy) against
  ``K [B, kv, T, D]``: ``scores [B, kv, n_rep·S, T]``, the same dot products;
* the scale and softcap (elementwise) stay there; the scores are viewed back as ``[B, H, S, T]``
  for the mask ``Add`` (the exported ``[B, 1, S, T]`` bias broadcasts as before) and ``Softmax``;
* ``P`` viewed as ``[B, kv, n_rep·S, T]`` against ``V [B, kv, T, D]``, the result viewed back as
  ``[B, H, S, D]``.

No Expand, the same graph for prefill and decode, the weights untouched; this is option (a) of
issue 12 (standard ops, so every runtime runs it). One rule, ``attention``, in two forms (with
Gemma 2's softcap ``c·tanh(s/c)`` or without, Gemma 1), on onnxscript's rewriter through
:class:`surgery.rewrite.RewritePass` (counts per part, ``expect``, ``explain``). Its check
accepts only what the exporter writes: the past/present ``Concat`` on the sequence axis feeding
``Unsqueeze(·, [2]) → Expand → Reshape`` that repeats kv heads (read from the recorded shapes:
``[B, kv, 1, T, D] → [B, kv, n_rep, T, D] → [B, kv·n_rep, T, D]``), ``Transpose(0, 1, 3, 2)``, a
one-element scale, equal one-element caps, a ``[B, 1, S, T]`` additive mask and ``Softmax`` on the
last axis; anything else is refused with the reason. Written here: onnxscript's SDPA/GQA rules
fail at the softcap's ``Tanh``, and ONNX Runtime's ``GroupQueryAttention`` is always causal (it
cannot express PaliGemma's bidirectional prefill).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common
from onnxscript.rewriter import pattern

from surgery.registry import register
from surgery.rewrite import RewriteOptions, RewritePass, scalar_constant

__all__ = ["GroupedAttention"]

logger = logging.getLogger(__name__)

RULE = "attention"


def _repeated(op: Any, kv: Any, axes: Any, shape5: Any, shape4: Any, name: str) -> Any:
    expanded = op.Expand(op.Unsqueeze(kv, axes), shape5, _outputs=[f"{name}_rep5"])
    return op.Reshape(expanded, shape4, _outputs=[f"{name}_rep"])


def _scores(op: Any, q: Any, k: Any, k_axes: Any, k_shape5: Any, k_shape4: Any, scale: Any) -> Any:
    k_rep = _repeated(op, k, k_axes, k_shape5, k_shape4, "k")
    return op.Mul(op.MatMul(q, op.Transpose(k_rep, _outputs=["k_t"])), scale)


def _attend(
    op: Any, scores: Any, mask: Any, v: Any, v_axes: Any, v_shape5: Any, v_shape4: Any
) -> Any:
    probs = op.Softmax(op.Add(scores, mask), _outputs=["probs"])
    return op.MatMul(probs, _repeated(op, v, v_axes, v_shape5, v_shape4, "v"))


def _capped(op: Any, q: Any, k: Any, v: Any, mask: Any, scale: Any, cap: Any, cap_out: Any,
            k_axes: Any, k_shape5: Any, k_shape4: Any, v_axes: Any, v_shape5: Any,
            v_shape4: Any) -> Any:  # fmt: skip
    scores = _scores(op, q, k, k_axes, k_shape5, k_shape4, scale)
    capped = op.Mul(op.Tanh(op.Div(scores, cap)), cap_out)
    return _attend(op, capped, mask, v, v_axes, v_shape5, v_shape4)


def _plain(op: Any, q: Any, k: Any, v: Any, mask: Any, scale: Any,
           k_axes: Any, k_shape5: Any, k_shape4: Any, v_axes: Any, v_shape5: Any,
           v_shape4: Any) -> Any:  # fmt: skip
    scores = _scores(op, q, k, k_axes, k_shape5, k_shape4, scale)
    return _attend(op, scores, mask, v, v_axes, v_shape5, v_shape4)


def _ints(value: ir.Value | None) -> list[int] | None:
    tensor = value.const_value if value is not None else None
    return None if tensor is None else [int(x) for x in np.asarray(tensor.numpy()).reshape(-1)]


def _dims(value: ir.Value | None) -> list[Any] | None:
    """The recorded shape: ints for static dims, names (or None) for dynamic ones."""
    if value is None or value.shape is None:
        return None
    return [d if isinstance(d, int) else getattr(d, "value", None) for d in value.shape]


class _Geometry:
    """kv heads, repeats and head size, read from the recorded shapes of one repeat_kv chain."""

    def __init__(self, kv: ir.Value, axes: ir.Value, repeated: ir.Value, out: ir.Value) -> None:
        self.reason: str | None = None
        self.kv_heads = self.n_rep = self.head_dim = 0
        present = kv.producer()
        if present is None or present.op_type != "Concat" or len(present.inputs) != 2:
            self.reason = f"'{kv.name}' is not a past/present Concat of two values"
            return
        if present.attributes.get_int("axis", 0) not in (2, -2):
            self.reason = f"Concat '{present.name}' does not join on the sequence axis"
            return
        if _ints(axes) != [2]:
            self.reason = f"the repeat of '{kv.name}' does not unsqueeze axis 2"
            return
        shape_in, shape_rep, shape_out = _dims(kv), _dims(repeated), _dims(out)
        if shape_in is None or shape_rep is None or shape_out is None:
            self.reason = f"the shapes around the repeat of '{kv.name}' are not recorded"
            return
        if len(shape_in) != 4 or len(shape_rep) != 5 or len(shape_out) != 4:
            self.reason = f"the repeat of '{kv.name}' is not [B, kv, T, D] → [B, kv, n, T, D]"
            return
        kv_heads, n_rep, head_dim = shape_rep[1], shape_rep[2], shape_rep[4]
        if not all(isinstance(x, int) for x in (kv_heads, n_rep, head_dim)):
            self.reason = f"kv heads, repeats or head size of '{kv.name}' are not static"
            return
        if (
            shape_in[1] != kv_heads
            or shape_in[3] != head_dim
            or shape_out[1] != kv_heads * n_rep
            or shape_out[3] != head_dim
        ):
            self.reason = (
                f"the Expand/Reshape of '{kv.name}' is not a repeat of each kv head: "
                f"{shape_in} → {shape_rep} → {shape_out}"
            )
            return
        self.kv_heads, self.n_rep, self.head_dim = kv_heads, n_rep, head_dim


@register
class GroupedAttention(RewritePass[RewriteOptions]):
    """Gemma attention without the repeat_kv copy: query heads stacked per kv head.

    Rule ``attention`` (one per decoder layer) rewrites the exported eager attention (softcap or
    none) to MatMuls of ``Q`` viewed ``[B, kv, n_rep·S, D]`` against the unrepeated present
    ``K``/``V``; the mask, softmax and presents are as before; the repeats' shape computations,
    dead then, are removed. Run on ``decoder_model_merged``.
    """

    name = "grouped-attention"
    summary = "attention without the repeat_kv copy of the past (Gemma 1 and 2, standard ops)"
    Options = RewriteOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = super().call(model)
        if result.modified:  # the repeats' shape computations are dead now
            ir.passes.common.RemoveUnusedNodesPass()(model)
        return result

    def rules(self) -> list[pattern.RewriteRule]:
        return [
            pattern.RewriteRule(_capped, _replace_capped, _check, name=RULE),
            pattern.RewriteRule(_plain, _replace_plain, _check, name=RULE),
        ]


def _check(
    context: Any,
    q: ir.Value,
    k: ir.Value,
    v: ir.Value,
    mask: ir.Value,
    scale: ir.Value,
    k_axes: ir.Value,
    v_axes: ir.Value,
    k_rep5: ir.Value,
    k_rep: ir.Value,
    v_rep5: ir.Value,
    v_rep: ir.Value,
    k_t: ir.Value,
    probs: ir.Value,
    cap: ir.Value | None = None,
    cap_out: ir.Value | None = None,
    **_: Any,
) -> pattern.MatchResult:
    result = pattern.MatchResult()
    transpose = k_t.producer()
    assert transpose is not None
    if list(transpose.attributes.get_ints("perm", []) or []) != [0, 1, 3, 2]:
        return result.fail("the key is not transposed by perm [0, 1, 3, 2]", k_t)
    softmax = probs.producer()
    assert softmax is not None
    if softmax.attributes.get_int("axis", -1) not in (-1, 3):
        return result.fail("the softmax is not over the last axis", probs)
    if scalar_constant(scale) is None:
        return result.fail("the score scale is not a one-element constant", scale)
    if cap is not None and (
        scalar_constant(cap) is None or scalar_constant(cap) != scalar_constant(cap_out)
    ):
        return result.fail("the softcap is not c·tanh(s/c) with one constant c", cap)
    key = _Geometry(k, k_axes, k_rep5, k_rep)
    if key.reason:
        return result.fail(key.reason, k)
    value = _Geometry(v, v_axes, v_rep5, v_rep)
    if value.reason:
        return result.fail(value.reason, v)
    if (key.kv_heads, key.n_rep, key.head_dim) != (value.kv_heads, value.n_rep, value.head_dim):
        return result.fail("the key and value repeats differ", v)
    q_dims, mask_dims = _dims(q), _dims(mask)
    if q_dims is None or len(q_dims) != 4 or q_dims[1] != key.kv_heads * key.n_rep:
        return result.fail(f"the query is not [B, {key.kv_heads * key.n_rep}, S, D]", q)
    if q_dims[3] != key.head_dim:
        return result.fail("the query and key head sizes differ", q)
    if mask_dims is None or len(mask_dims) != 4 or mask_dims[1] != 1:
        return result.fail("the mask is not an additive [B, 1, S, T] bias", mask)
    return result


def _grouped(op: Any, q: ir.Value, k: ir.Value, v: ir.Value, mask: ir.Value, scale: ir.Value,
             cap: ir.Value | None) -> Any:  # fmt: skip
    """The replacement: Q·Kᵀ and P·V per kv head, rows of each group's query heads stacked."""
    q_dims, k_dims = _dims(q), _dims(k)
    assert q_dims is not None and k_dims is not None
    heads, kv_heads, head_dim = q_dims[1], k_dims[1], k_dims[3]

    def shape(*dims: int) -> Any:
        return op.Constant(value_ints=list(dims))

    grouped_q = op.Reshape(q, shape(0, kv_heads, -1, head_dim))
    scores = op.Mul(op.MatMul(grouped_q, op.Transpose(k, perm=[0, 1, 3, 2])), scale)
    if cap is not None:
        scores = op.Mul(op.Tanh(op.Div(scores, cap)), cap)
    scores = op.Reshape(scores, shape(0, heads, -1, 0))  # [B, H, S, T]: the mask as exported
    probs = op.Softmax(op.Add(scores, mask), axis=-1)
    out = op.MatMul(op.Reshape(probs, shape(0, kv_heads, -1, 0)), v)
    return op.Reshape(out, shape(0, heads, -1, head_dim))


def _replace_capped(op: Any, q: ir.Value, k: ir.Value, v: ir.Value, mask: ir.Value,
                    scale: ir.Value, cap: ir.Value, **_: Any) -> Any:  # fmt: skip
    return _grouped(op, q, k, v, mask, scale, cap)


def _replace_plain(op: Any, q: ir.Value, k: ir.Value, v: ir.Value, mask: ir.Value,
                   scale: ir.Value, **_: Any) -> Any:  # fmt: skip
    return _grouped(op, q, k, v, mask, scale, None)
