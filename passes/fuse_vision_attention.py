"""Pass ``fuse-vision-attention``: SigLIP self-attention as ONNX Runtime's ``MultiHeadAttention``.

The exported SigLIP attention (``Reshape → Transpose`` of Q, K and V, ``Q·Kᵀ``, a scale,
``Softmax``, ``·V``, ``Transpose → Reshape``) materialises the ``[B, heads, S, S]`` score and
probability matrices: at 896 px (4096 tokens, 16 heads) 1 GiB each per layer in fp32. ONNX
Runtime's ``com.microsoft.MultiHeadAttention`` takes Q, K and V as ``[B, S, hidden]`` and, on
CPU without mask or past, computes attention in blocks without them (``MlasFlashAttention``).
Measured with ``benchmarks/vision.py`` (So400m widths, 2 layers, ONNX Runtime CPU, 2 threads):
at 896 px peak anonymous memory 2982 → 571 MiB and time 1945 → 1488 ms; at 448 px 453 → 252
MiB and 303 → 269 ms.

Runtimes (Transformers.js 4.3.1): onnxruntime-node runs the CPU kernel above; the
``onnxruntime-web/webgpu`` build has a WebGPU kernel (float, float16) and, for device wasm, the
same CPU kernel compiled to 32-bit wasm, which takes the unblocked path (it keeps the
probabilities) and fails with a SafeInt overflow once ``2 · head_dim · S²`` passes 2³¹ (SigLIP
at 896 px); see ``tests/test_vision_attention_runtimes.py``.

Reused, not rewritten: onnxscript 0.7's ORT fusion rules, applied in their own order as
:class:`surgery.rewrite.RewritePass` stages (counts per part, ``expect``, ``explain``):

1. ``sdpa``: onnxscript's ``SDPA`` rule (``ort_fusions.sdpa``), the scaled dot product (an
   additive mask allowed) with a scale it can read, to a temporary
   ``ai.onnxruntime._fusion.SDPA`` node;
2. ``attention``: onnxscript's plain ``MHA`` rule (``ort_fusions.mha``: no past, no rotary, no
   cross-attention), which takes the SDPA with its head split and merge to
   ``MultiHeadAttention(q, k, v, num_heads, scale)``.

Where this departs from onnxscript's ``optimize_for_ort`` and why:

* it stops at ``MultiHeadAttention``: ``optimize_for_ort`` goes on to ``com.microsoft.Attention``,
  which packs the Q, K and V weights into one (a ``Concat`` of weights in the graph), so
  ``quantize`` would no longer see the projection MatMuls, and on CPU it kept the probability
  matrix (peak 2.4 GiB at 896 px in the same benchmark);
* the bias Adds stay outside (no ``mha_bias`` rule), skip-LayerNorm is not fused, and there is no
  whole-graph pre-optimisation (the rules fire on the exported graph as it is): fewer contrib ops
  for ``fp16`` and the runtimes to know, and skip-LayerNorm gained nothing in the benchmark;
* an attention whose temporary ``SDPA`` no ``MHA`` rule would take (a past, rotary, a
  cross-attention… as Gemma 1's decoder attention) is left as exported, with a warning naming
  it, instead of being left as an ``SDPA`` op that no runtime has: the rules run once on a
  clone (weights shared) to find those, then for real with the SDPA rule refusing them.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import onnx_ir as ir
import onnx_ir.passes.common
from onnxscript.rewriter import pattern

from surgery.cloning import clone_model
from surgery.registry import register
from surgery.rewrite import RewriteOptions, RewritePass

__all__ = ["FuseVisionAttention"]

logger = logging.getLogger(__name__)

#: Rule names, in the order their stages run.
_STAGES = ("sdpa", "attention")
#: The temporary op onnxscript's SDPA rule writes (its MHA rules consume it).
_SDPA_DOMAIN = "ai.onnxruntime._fusion"


def _named(rule: Any, name: str) -> Any:
    """``rule`` counted under ``name`` (a shallow copy; onnxscript's rule is not touched)."""
    renamed = copy.copy(rule)
    renamed.name = name
    return renamed


class _Guarded:
    """onnxscript's SDPA rule, refusing the attentions whose result is named in ``refused``."""

    def __init__(self, rule: Any, refused: frozenset[str]) -> None:
        self.rule = rule
        self.refused = refused
        self.name = rule.name
        self.remove_nodes = rule.remove_nodes
        self.as_function = rule.as_function
        self.graph_pre_visitor = rule.graph_pre_visitor
        self.graph_post_visitor = rule.graph_post_visitor

    def match(self, *args: Any, **kwargs: Any) -> Any:
        return self.rule.match(*args, **kwargs)

    def try_rewrite(
        self, model: ir.Model, graph: ir.Graph | ir.Function, node: ir.Node, **kwargs: Any
    ) -> Any:
        if node.outputs and node.outputs[0].name in self.refused:
            return None
        return self.rule.try_rewrite(model, graph, node, **kwargs)


@register
class FuseVisionAttention(RewritePass[RewriteOptions]):
    """SigLIP self-attention to com.microsoft.MultiHeadAttention, Q/K/V MatMuls kept separate.

    Rules (stages, in this order): ``sdpa`` (onnxscript's scaled-dot-product rule, one per
    attention) and ``attention`` (onnxscript's plain MHA rule, one per vision layer). An
    attention that would stop at SDPA is left as exported, with a warning. The recipe runs it
    on ``vision_encoder`` after the q8 copy (onnxruntime-web's wasm kernel fails at 896 px)
    and before the fp16 and q4f16 copies.
    """

    name = "fuse-vision-attention"
    summary = "SigLIP attention to MultiHeadAttention (onnxscript's SDPA + MHA rules)"
    Options = RewriteOptions
    #: Results of the attentions the SDPA rule must leave alone (set by :meth:`call`).
    _refused: frozenset[str] = frozenset()

    def rules(self) -> list[pattern.RewriteRule]:
        from onnxscript.rewriter.ort_fusions import mha, sdpa

        plain = [rule for rule in mha.mha_rules_no_past.rules if rule.name == "MHA"]
        return [_Guarded(_named(r, "sdpa"), self._refused) for r in sdpa.sdpa_rules.rules] + [
            _named(rule, "attention") for rule in plain
        ]

    def _apply(
        self, model: ir.Model, rules: list[Any], *, tracer: pattern.MatchingTracer | None
    ) -> None:
        # The MHA rule matches the SDPA nodes the first stage writes: one stage after the other.
        for stage in _STAGES:
            super()._apply(model, [r for r in rules if r.name == stage], tracer=tracer)

    def _explain(self, model: ir.Model, rules: list[Any]) -> None:
        # Each stage is explained on its own clone where the earlier stages ran for real, the
        # SDPA rule unguarded (the MHA rule only sees SDPA nodes once they exist, and then says
        # why it refuses one).
        counts = dict(self.statistics)
        unguarded = [r.rule if isinstance(r, _Guarded) else r for r in rules]
        for index, stage in enumerate(_STAGES):
            clone = clone_model(model)
            for earlier in _STAGES[:index]:
                stage_rules = [r for r in unguarded if r.name == earlier]
                RewritePass._apply(self, clone, stage_rules, tracer=None)
            super()._explain(clone, [r for r in rules if r.name == stage])
        self.statistics = counts

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self._refused = self._not_taken(model)
        result = super().call(model)
        if result.modified:
            ir.passes.common.RemoveUnusedNodesPass()(model)
        return result

    def _not_taken(self, model: ir.Model) -> frozenset[str]:
        """Names of the attention results whose SDPA no MHA rule takes, found on a clone.

        The SDPA rule alone would leave a temporary op that no runtime has; these attentions
        are left as exported instead (the SDPA node keeps its root's output name).
        """
        self._refused = frozenset()
        rules = self._rule_list()
        self.statistics = dict.fromkeys((r.name for r in rules), 0)  # counted again for real
        clone = clone_model(model)
        self._apply(clone, rules, tracer=None)
        left = {node.outputs[0].name or "" for node in clone.graph if node.domain == _SDPA_DOMAIN}
        for name in sorted(left):
            logger.warning(
                "%s: the attention computing '%s' is left as exported: onnxscript's SDPA rule "
                "matches it but its plain MultiHeadAttention rule does not (a mask, a past, "
                "rotary or cross-attention?)",
                self.name,
                name,
            )
        return frozenset(left)
