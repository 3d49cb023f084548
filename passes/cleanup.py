"""Graph cleanup passes: thin registered wrappers around ``onnx_ir``'s common passes.

Nothing is re-implemented here; each class exposes one onnx_ir pass under a name, with its
arguments as validated options, so recipes and ``surgery passes`` can use it.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common
import pydantic

from surgery.pass_infra import ModelPass, PassOptions
from surgery.registry import register

__all__ = [
    "CommonSubexpressionElimination",
    "DeduplicateInitializers",
    "RemoveUnused",
    "ShapeInference",
    "TopologicalSort",
]


@register
class RemoveUnused(ModelPass[PassOptions]):
    """Remove nodes, functions and opset imports that no graph output depends on.

    Runs onnx_ir's RemoveUnusedNodesPass, RemoveUnusedFunctionsPass and RemoveUnusedOpsetsPass.
    Initializers that nothing reads are dropped with the nodes (weights are never loaded).
    """

    name = "remove-unused"
    summary = "remove nodes, functions and opsets that no output depends on"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        common = ir.passes.common
        return ir.passes.Sequential(
            common.RemoveUnusedNodesPass(),
            common.RemoveUnusedFunctionsPass(),
            common.RemoveUnusedOpsetsPass(),
        )(model)


@register
class TopologicalSort(ModelPass[PassOptions]):
    """Sort nodes so every node comes after the nodes it reads from (onnx_ir TopologicalSortPass)."""

    name = "topological-sort"
    summary = "sort nodes topologically"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.common.TopologicalSortPass()(model)


class _DedupOptions(PassOptions):
    size_limit: int = pydantic.Field(
        default=1024,
        ge=0,
        description="only initializers of at most this many elements are compared",
    )


@register
class DeduplicateInitializers(ModelPass[_DedupOptions]):
    """Merge initializers with identical dtype, shape and bytes into one.

    onnx_ir's DeduplicateInitializersPass. Comparing reads the bytes of the initializers it
    considers, so only small ones are compared by default; raise ``size_limit`` with care.
    """

    name = "dedup-initializers"
    summary = "merge identical initializers"
    Options = _DedupOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.common.DeduplicateInitializersPass(self.options.size_limit)(model)


class _CseOptions(PassOptions):
    size_limit: int = pydantic.Field(
        default=10,
        ge=0,
        description="constant tensors with more elements than this are not compared",
    )


@register
class CommonSubexpressionElimination(ModelPass[_CseOptions]):
    """Replace nodes that compute the same thing from the same inputs by one node (onnx_ir CSE)."""

    name = "cse"
    summary = "common subexpression elimination"
    Options = _CseOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.common.CommonSubexpressionEliminationPass(self.options.size_limit)(model)


class _ShapeInferenceOptions(PassOptions):
    strict: bool = pydantic.Field(default=True, description="fail on shape errors")
    data_prop: bool = pydantic.Field(default=True, description="propagate shape-computing values")


@register
class ShapeInference(ModelPass[_ShapeInferenceOptions]):
    """Annotate values with ONNX shape inference, run on a weight-free copy of the graph.

    onnx_ir's ShapeInferencePass: large initializers are set aside around the ONNX C API, so a
    model of any size works and no weight is read.
    """

    name = "shape-inference"
    summary = "infer value shapes and types (weights not loaded)"
    Options = _ShapeInferenceOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.common.ShapeInferencePass(
            strict_mode=self.options.strict, data_prop=self.options.data_prop
        )(model)
