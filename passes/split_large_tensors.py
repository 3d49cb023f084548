"""Pass ``split-large-tensors``: cut weights larger than a data chunk into row blocks, in the graph.

A Transformers.js data chunk must stay under about 2 GB (browsers cap an ArrayBuffer near 2 GiB),
and one tensor cannot span two files. PaliGemma 2 3B's tied embedding / ``lm_head`` is
257216 × 2304: 2.37 GB in fp32. So the tensor itself is split into row blocks, each its own
initializer, and its readers are rewritten to use the blocks without ever rebuilding the whole
tensor at run time (a ``Concat`` of the blocks would allocate the 2.37 GB again, in the browser):

* ``Gather(W, ids, axis=0)`` (the embedding): each block gathers with ids shifted into its range;
  ``Where`` keeps the block's rows for the ids it holds. Exact: the same rows are copied.
* ``MatMul(X, Transpose(W))`` (the tied ``lm_head``): each block computes its slice of the logits,
  ``Concat`` joins them on the last axis. Each logit is the same dot product as before.
* ``MatMul(X, W)``: the same with column blocks of ``W``.

Row blocks of a tensor still on disk are new references into the same file (no byte read until
written); other blocks are lazy slices. Any other reader of an oversized tensor is an error that
names it. Written here: onnxscript's rewriter matches patterns of nodes, not initializers by size,
and no library splits initializers.
"""

from __future__ import annotations

import itertools
import logging
import typing

import numpy as np
import onnx_ir as ir
import pydantic

from surgery.errors import SurgeryError
from surgery.lazy import DerivedTensor
from surgery.pass_infra import ModelPass, PassContext, PassOptions
from surgery.registry import register
from surgery.summary import format_bytes

__all__ = ["SplitLargeTensors"]

logger = logging.getLogger(__name__)


class _Options(PassOptions):
    max_bytes: int | None = pydantic.Field(
        default=None,
        gt=0,
        description="largest tensor allowed (default: the layout's max_chunk_bytes; not above it)",
    )


def _row_block(tensor: ir.TensorProtocol, start: int, stop: int, name: str) -> ir.TensorProtocol:
    """Rows ``start:stop`` of a 2-D tensor, without reading it now."""
    cols = tensor.shape.numpy()[1]
    row_bytes = cols * int(tensor.dtype.itemsize)
    shape = ir.Shape([stop - start, cols])
    if isinstance(tensor, ir.ExternalTensor):
        return ir.ExternalTensor(
            tensor.location,
            (tensor.offset or 0) + start * row_bytes,
            (stop - start) * row_bytes,
            tensor.dtype,
            shape=shape,
            name=name,
            base_dir=tensor.base_dir,
        )
    return DerivedTensor(
        tensor, lambda array: np.ascontiguousarray(array[start:stop]), shape=shape, name=name
    )


def _column_block(tensor: ir.TensorProtocol, start: int, stop: int, name: str) -> ir.TensorProtocol:
    """Columns ``start:stop`` of a 2-D tensor, computed when written."""
    return DerivedTensor(
        tensor,
        lambda array: np.ascontiguousarray(array[:, start:stop]),
        shape=ir.Shape([tensor.shape.numpy()[0], stop - start]),
        name=name,
    )


class _Splitter:
    """Rewrites the readers of one oversized 2-D initializer."""

    def __init__(self, graph: ir.Graph, value: ir.Value, max_bytes: int) -> None:
        self.graph = graph
        self.value = value
        self.max_bytes = max_bytes
        tensor = value.const_value
        assert tensor is not None
        self.tensor = tensor
        self.name = value.name or "weight"
        self._row_blocks: dict[int, ir.Value] = {}
        self._uses = 0

    def _rows(self, i: int, start: int, stop: int) -> ir.Value:
        """The initializer of row block ``i``, shared by every reader."""
        if i not in self._row_blocks:
            tag = f"{self.name}.rows{i}"
            self._row_blocks[i] = self._initializer(_row_block(self.tensor, start, stop, tag))
        return self._row_blocks[i]

    def _tag(self, kind: str, i: int) -> str:
        """A unique name prefix for the nodes made for block ``i`` of the current reader."""
        return f"{self.name}.{kind}{i}.use{self._uses}"

    def _blocks(self, length: int, other: int) -> list[tuple[int, int]]:
        """As few blocks as fit under ``max_bytes``, of equal size (±1): the largest tensor is
        what computing it at write time (a transpose, an fp16 conversion) holds in memory."""
        most = max(1, self.max_bytes // (other * int(self.tensor.dtype.itemsize)))
        count = -(-length // most)
        edges = [i * length // count for i in range(count + 1)]
        return list(itertools.pairwise(edges))

    def _initializer(self, tensor: ir.TensorProtocol) -> ir.Value:
        value = ir.Value(
            name=tensor.name,
            shape=typing.cast(ir.Shape, tensor.shape),
            type=ir.TensorType(tensor.dtype),
        )
        value.const_value = tensor
        self.graph.register_initializer(value)
        return value

    def _scalar(self, name: str, number: int, dtype: ir.DataType) -> ir.Value:
        return self._initializer(ir.tensor(np.array(number, dtype=dtype.numpy()), name=name))

    def _insert(
        self, anchor: ir.Node, op: str, inputs: list[ir.Value], name: str, **attrs: typing.Any
    ) -> ir.Value:
        node = ir.Node(
            "",
            op,
            inputs,
            attributes=[ir.Attr(k, _attr_type(v), v) for k, v in attrs.items()],
            name=name,
            num_outputs=1,
        )
        node.outputs[0].name = f"{name}_out"
        self.graph.insert_before(anchor, node)
        return node.outputs[0]

    def _replace(self, node: ir.Node, result: ir.Value) -> None:
        old = node.outputs[0]
        result.type, result.shape = old.type, old.shape
        was_output = old in self.graph.outputs
        ir.convenience.replace_all_uses_with(old, result, replace_graph_outputs=True)
        if was_output:
            old_name = old.name
            old.name = f"{old_name}_replaced"
            result.name = old_name
        self.graph.remove(node, safe=True)

    def split_gather(self, node: ir.Node) -> None:
        self._uses += 1
        rows, cols = self.tensor.shape.numpy()
        raw_ids = node.inputs[1]
        assert raw_ids is not None
        id_type = raw_ids.dtype or ir.DataType.INT64
        # Gather allows negative indices (counted from the end): make them positive first.
        zero = self._scalar(f"{self.name}.use{self._uses}.zero", 0, id_type)
        count = self._scalar(f"{self.name}.use{self._uses}.rows", rows, id_type)
        negative = self._insert(
            node, "Less", [raw_ids, zero], f"{self.name}.use{self._uses}.negative"
        )
        wrapped = self._insert(
            node, "Add", [raw_ids, count], f"{self.name}.use{self._uses}.wrapped"
        )
        ids = self._insert(
            node, "Where", [negative, wrapped, raw_ids], f"{self.name}.use{self._uses}.ids"
        )
        result: ir.Value | None = None
        for i, (start, stop) in enumerate(self._blocks(rows, cols)):
            tag = self._tag("rows", i)
            block = self._rows(i, start, stop)
            first = self._scalar(f"{tag}.start", start, id_type)
            last = self._scalar(f"{tag}.stop", stop, id_type)
            inside = self._insert(
                node,
                "And",
                [
                    self._insert(node, "GreaterOrEqual", [ids, first], f"{tag}.ge"),
                    self._insert(node, "Less", [ids, last], f"{tag}.lt"),
                ],
                f"{tag}.inside",
            )
            local = self._insert(
                node,
                "Where",
                [inside, self._insert(node, "Sub", [ids, first], f"{tag}.sub"), zero],
                f"{tag}.local",
            )
            rows_i = self._insert(node, "Gather", [block, local], f"{tag}.gather", axis=0)
            if result is None:
                result = rows_i
            else:
                mask = self._insert(
                    node,
                    "Unsqueeze",
                    [inside, self._scalar(f"{tag}.axis", -1, ir.DataType.INT64)],
                    f"{tag}.mask",
                )
                result = self._insert(node, "Where", [mask, rows_i, result], f"{tag}.select")
        assert result is not None
        self._replace(node, result)

    def split_matmul(self, node: ir.Node, transposed: bool) -> None:
        self._uses += 1
        rows, cols = self.tensor.shape.numpy()
        x = node.inputs[0]
        assert x is not None
        outputs = []
        if transposed:  # X @ W^T: row blocks of W are column blocks of the output
            for i, (start, stop) in enumerate(self._blocks(rows, cols)):
                tag = self._tag("rows", i)
                block = self._rows(i, start, stop)
                block_t = self._insert(node, "Transpose", [block], f"{tag}.transpose", perm=[1, 0])
                block_t.type, block_t.shape = block.type, ir.Shape([cols, stop - start])
                outputs.append(self._matmul(node, x, block_t, stop - start, f"{tag}.matmul"))
        else:
            for i, (start, stop) in enumerate(self._blocks(cols, rows)):
                tag = self._tag("cols", i)
                block = self._initializer(_column_block(self.tensor, start, stop, tag))
                outputs.append(self._matmul(node, x, block, stop - start, f"{tag}.matmul"))
        concat = self._insert(
            node, "Concat", outputs, f"{self.name}.concat.use{self._uses}", axis=-1
        )
        self._replace(node, concat)

    def _matmul(
        self, anchor: ir.Node, x: ir.Value, block: ir.Value, width: int, name: str
    ) -> ir.Value:
        """``MatMul(x, block)`` typed like ``x`` with its last dim ``width`` (later passes, e.g.
        fp16 after quantize turns it into a contrib op, need every value typed)."""
        out = self._insert(anchor, "MatMul", [x, block], name)
        out.type = x.type
        if x.shape is not None:
            out.shape = ir.Shape([*list(x.shape)[:-1], width])
        return out

    def run(self) -> None:
        for use in list(self.value.uses()):
            node, index = use.node, use.idx
            axis = node.attributes.get_int("axis", 0)
            if node.op_type == "Gather" and node.domain == "" and index == 0 and axis == 0:
                self.split_gather(node)
            elif node.op_type == "MatMul" and node.domain == "" and index == 1:
                self.split_matmul(node, transposed=False)
            elif (
                node.op_type == "Transpose"
                and node.domain == ""
                and list(node.attributes.get_ints("perm", [1, 0]) or []) == [1, 0]
                and all(u.node.op_type == "MatMul" and u.idx == 1 for u in node.outputs[0].uses())
            ):
                for matmul_use in list(node.outputs[0].uses()):
                    self.split_matmul(matmul_use.node, transposed=True)
                self.graph.remove(node, safe=True)
            else:
                raise SurgeryError(
                    f"{self.graph.name or 'model'}: tensor '{self.name}' "
                    f"({format_bytes(self.tensor.nbytes)}) is over max_bytes and is read by "
                    f"{node.op_type} '{node.name}' (input {index}), which split-large-tensors "
                    "cannot rewrite (it handles Gather on axis 0, MatMul and Transpose→MatMul)"
                )
        self.graph.initializers.pop(self.name)


def _attr_type(value: typing.Any) -> ir.AttributeType:
    return ir.AttributeType.INTS if isinstance(value, list) else ir.AttributeType.INT


@register
class SplitLargeTensors(ModelPass[_Options]):
    """Split every initializer larger than ``max_bytes`` into row (or column) blocks.

    Readers are rewritten to use the blocks without rebuilding the whole tensor at run time:
    Gather on axis 0 (embeddings), MatMul, and Transpose → MatMul (a tied lm_head). The limit
    is the layout's chunk limit (one tensor cannot span two files), read from the pipeline's
    context; ``max_bytes`` may set a smaller one, never a larger one.
    """

    name = "split-large-tensors"
    summary = "split weights larger than a data chunk into blocks (embedding, lm_head)"
    Options = _Options

    def check_context(self, context: PassContext) -> None:
        self._limit(context)

    def _limit(self, context: PassContext) -> int:
        """The split size: ``max_bytes``, else the layout's chunk limit (checked to agree)."""
        layout = f"the '{context.layout}' layout" if context.layout else "the pipeline"
        limit, chunk = self.options.max_bytes, context.max_chunk_bytes
        if limit is None and chunk is None:
            raise SurgeryError(f"max_bytes is required: {layout} has no chunk limit to split at")
        if limit is not None and chunk is not None and limit > chunk:
            raise SurgeryError(
                f"max_bytes ({limit}) is over {layout}'s max_chunk_bytes ({chunk}): blocks "
                "that large cannot be written; leave max_bytes out to split at the layout's limit"
            )
        return limit if limit is not None else typing.cast(int, chunk)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        max_bytes = self._limit(self.context)
        large = [
            v
            for v in graph.initializers.values()
            if v.const_value is not None and v.const_value.nbytes > max_bytes
        ]
        for value in large:
            tensor = value.const_value
            assert tensor is not None
            if len(tensor.shape) != 2:
                raise SurgeryError(
                    f"{graph.name or 'model'}: tensor '{value.name}' ({format_bytes(tensor.nbytes)}) "
                    f"is over max_bytes and has {len(tensor.shape)} dimensions; only 2-D weights "
                    "(embeddings, projections) can be split"
                )
            logger.info("splitting %s (%s)", value.name, format_bytes(tensor.nbytes))
            _Splitter(graph, value, max_bytes).run()
        return ir.passes.PassResult(model, modified=bool(large))
