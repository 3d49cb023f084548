"""Pass ``fold-transposes``: ``Transpose(weight)`` becomes a transposed weight, computed when written.

``torch.onnx.export`` writes every ``nn.Linear`` as ``MatMul(x, Transpose(W))``. Constant folding
(onnxscript's optimizer, ONNX Runtime at session start) would turn each into a transposed copy *in
memory*: onnxscript's ``FoldConstantsPass`` folds a Transpose of a large initializer when that
initializer has no other reader, which for a 3B model means about 10 GB of anonymous memory at
export time. Here the fold is lazy instead: the new initializer is an ``onnx_ir.LazyTensor`` that
transposes the source when the writer reaches it, one tensor at a time (a matrix in strips:
:class:`surgery.lazy.TransposedTensor`), so the graph is the folded one and memory stays bounded.
A weight with other readers (a tied embedding read by ``Gather``) is left alone: folding it would
store it twice.
"""

from __future__ import annotations

import logging
import typing

import numpy as np
import onnx_ir as ir
import pydantic

from surgery.lazy import DerivedTensor, TransposedTensor
from surgery.pass_infra import ModelPass, PassOptions
from surgery.registry import register

__all__ = ["FoldTransposes"]

logger = logging.getLogger(__name__)


class _Options(PassOptions):
    min_elements: int = pydantic.Field(
        default=0, ge=0, description="fold only weights with at least this many elements"
    )


def _transposed(source: ir.TensorProtocol, perm: list[int], name: str) -> ir.LazyTensor:
    if perm == [1, 0] and source.dtype.bitwidth >= 8:  # a matrix: streamed, in tiles
        return TransposedTensor(source, name=name)
    dims = source.shape.numpy()
    return DerivedTensor(
        source,
        lambda array: np.ascontiguousarray(array.transpose(perm)),
        shape=ir.Shape([dims[p] for p in perm]),
        name=name,
    )


@register
class FoldTransposes(ModelPass[_Options]):
    """Replace Transpose nodes on single-use initializers by lazily transposed initializers."""

    name = "fold-transposes"
    summary = "fold Transpose of weights into transposed weights, computed when written"
    Options = _Options

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        folded = 0
        for node in list(graph):
            source = node.inputs[0] if node.inputs else None
            if (
                node.op_type != "Transpose"
                or node.domain != ""
                or source is None
                or source.const_value is None
                or not source.is_initializer()
                or source.is_graph_input()
                or len(source.uses()) != 1
                or source.const_value.size < self.options.min_elements
            ):
                continue
            tensor = source.const_value
            rank = len(tensor.shape)
            perm = list(node.attributes.get_ints("perm", list(reversed(range(rank)))) or [])
            output = node.outputs[0]
            name = output.name or f"{source.name}_transposed"
            lazy = _transposed(tensor, perm, name)
            folded_value = ir.Value(
                name=name, shape=typing.cast(ir.Shape, lazy.shape), type=ir.TensorType(tensor.dtype)
            )
            folded_value.const_value = lazy
            ir.convenience.replace_all_uses_with(output, folded_value, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            graph.initializers.pop(source.name or "")
            output.name = None  # its name now belongs to the folded initializer
            graph.register_initializer(folded_value)
            folded += 1
        logger.debug("folded %d transposes", folded)
        return ir.passes.PassResult(model, modified=folded > 0)
