"""onnxscript's default optimizer, as a registered pass.

Runs the same sequence as ``onnxscript.optimizer.optimize_ir`` (inline functions, fold
constants, the default rewrite rules, unused-node removal, constant lifting, initializer dedup,
CSE, name fixes), assembled here from onnxscript's passes so that the ``modified`` flag is the
passes' own instead of being lost (``optimize_ir`` returns None). Folding is bounded by size
limits, so no large weight is materialised. Departs from onnxscript's rules in one place: it
folds a ``Transpose`` of a large single-use weight whatever its size, in memory (about 10 GB for
a 3B model); here no node reading a constant over ``input_size_limit`` is folded
(``fold-transposes`` does that one lazily).
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common
import pydantic

from surgery.pass_infra import ModelPass, PassOptions
from surgery.registry import register

__all__ = ["Optimize"]


class _OptimizeOptions(PassOptions):
    iterations: int = pydantic.Field(default=2, ge=1, description="fold/rewrite rounds at most")
    input_size_limit: int = pydantic.Field(
        default=8192,
        ge=0,
        description="do not fold nodes with an input larger than this (elements)",
    )
    output_size_limit: int = pydantic.Field(
        default=262144, ge=0, description="do not fold nodes whose output is larger than this"
    )
    inline: bool = pydantic.Field(default=True, description="inline model-local functions first")


@register
class Optimize(ModelPass[_OptimizeOptions]):
    """Constant folding, onnxscript's default rewrite rules and graph cleanups, until stable."""

    name = "optimize"
    summary = "onnxscript optimizer: fold constants, default rewrites, cleanups"
    Options = _OptimizeOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        # onnxscript is imported here, not at module level: it adds ~0.3 s to every CLI start.
        from onnxscript import rewriter
        from onnxscript.optimizer import constant_folding

        common = ir.passes.common
        options = self.options
        passes: list[ir.passes.PassBase] = [common.InlinePass()] if options.inline else []
        passes += [
            ir.passes.PassManager(
                [
                    constant_folding.FoldConstantsPass(
                        shape_inference=True,
                        input_size_limit=options.input_size_limit,
                        output_size_limit=options.output_size_limit,
                        should_fold=self._small_inputs_only,
                    ),
                    rewriter.RewritePass(rewriter._DEFAULT_REWRITE_RULES),
                    common.RemoveUnusedNodesPass(),
                    common.RemoveUnusedFunctionsPass(),
                    common.RemoveUnusedOpsetsPass(),
                ],
                steps=options.iterations,
                early_stop=True,
            ),
            common.RemoveUnusedNodesPass(),
            common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
            common.LiftSubgraphInitializersToMainGraphPass(),
            common.DeduplicateInitializersPass(),
            common.CommonSubexpressionEliminationPass(),
            common.OutputFixPass(),
            common.NameFixPass(),
        ]
        return ir.passes.Sequential(*passes)(model)

    def _small_inputs_only(self, node: ir.Node) -> bool | None:
        """``should_fold``: never fold a node that reads a large constant, else onnxscript's rules."""
        for value in node.inputs:
            tensor = value.const_value if value is not None else None
            if tensor is not None and tensor.size > self.options.input_size_limit:
                return False
        return None
