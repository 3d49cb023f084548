"""The graph side of :mod:`passes.fp16`: node precisions, retyped values and the casts between them.

:class:`Converter` works on one graph: it records every value's original type, decides which
nodes compute in fp16 (everything but blocked ops, blocked node names, the fp32 islands it is
given, nodes holding subgraphs and ops without a known schema), retypes the outputs the op
schemas allow (:mod:`passes.fp16_slots`), inserts one ``Cast`` per value and target type where a
producer and a consumer disagree, keeps graph inputs/outputs float32 as asked, and removes
back-to-back casts. It never touches weight bytes: it reports the initializers read in fp16 and the
``Constant`` nodes retyped, and :mod:`passes.fp16` converts those (lazily, for initializers).
"""

from __future__ import annotations

import fnmatch
import logging

import onnx_ir as ir

from passes.fp16_slots import Signature, op_signature

__all__ = ["Converter", "InitializerReads", "cast_node"]

logger = logging.getLogger(__name__)

_FLOAT = ir.DataType.FLOAT
_FLOAT16 = ir.DataType.FLOAT16
_BFLOAT16 = ir.DataType.BFLOAT16

#: Initializer → the (reader, input index, type wanted) of each of its reads.
InitializerReads = dict[ir.Value, list[tuple[ir.Node, int, ir.DataType]]]


def _name_matches(name: str | None, patterns: list[str]) -> bool:
    return bool(name) and any(fnmatch.fnmatchcase(name or "", p) for p in patterns)


def cast_node(value: ir.Value, to: ir.DataType, name: str, shape: ir.Shape | None) -> ir.Node:
    """A new ``Cast(value, to)`` node named ``name``, its output typed ``to`` with ``shape``."""
    node = ir.Node("", "Cast", [value], attributes=[ir.AttrInt64("to", to)], name=name)
    node.outputs[0].dtype = to
    node.outputs[0].shape = ir.Shape(shape) if shape is not None else None
    return node


class Converter:
    """The state of one conversion of one graph: original types, node precisions, casts."""

    def __init__(
        self,
        graph: ir.Graph,
        opset: int,
        *,
        keep_io_types: bool | list[str],
        op_block_list: list[str],
        node_block_list: list[str],
        fp32_nodes: set[ir.Node],
    ) -> None:
        self.graph = graph
        self.opset = opset
        self.keep_io_types = keep_io_types
        self.op_block_list = op_block_list
        self.node_block_list = node_block_list
        self.fp32_nodes = fp32_nodes
        #: ``Constant`` / ``ConstantOfShape`` nodes retyped to fp16 whose value is still float32.
        self.constants: list[ir.Node] = []
        self.original: dict[ir.Value, ir.DataType | None] = {}
        self.fp16_nodes: set[ir.Node] = set()
        self.casts: dict[tuple[ir.Value, ir.DataType], ir.Value] = {}
        self.created: set[ir.Node] = set()
        self.changed = False

    def keep_io(self, value: ir.Value) -> bool:
        keep = self.keep_io_types
        return keep if isinstance(keep, bool) else _name_matches(value.name, keep)

    def signature(self, node: ir.Node) -> Signature | None:
        version = self.graph.opset_imports.get(node.domain or "", self.opset)
        return op_signature(node.domain or "", node.op_type, version)

    def choose_precisions(self) -> None:
        islands = self.fp32_nodes
        blocked_ops = set(self.op_block_list)
        for node in self.graph:
            if (
                node in islands
                or node.op_type in blocked_ops
                or _name_matches(node.name, self.node_block_list)
                or any(
                    a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                    for a in node.attributes.values()
                )
                or self.signature(node) is None
            ):
                continue
            if node.op_type == "Constant" and set(node.attributes) != {"value"}:
                continue
            self.fp16_nodes.add(node)
        logger.info(
            "fp16: %d of %d nodes in fp16 (%d in fp32 islands)",
            len(self.fp16_nodes),
            len(self.graph),
            len(islands),
        )

    def record_types(self) -> None:
        for value in self.graph.inputs:
            self.original[value] = value.dtype
        for value in self.graph.initializers.values():
            self.original[value] = value.dtype
        for node in self.graph.all_nodes():
            for item in (*node.inputs, *node.outputs):
                if item is not None and item not in self.original:
                    self.original[item] = item.dtype

    def wants(self, node: ir.Node, index: int) -> ir.DataType | None:
        """The type ``node`` needs at input ``index``, None if any type does (or not float)."""
        value = node.inputs[index]
        if value is None or self.original.get(value) != _FLOAT:
            return None
        if node.op_type == "Cast" and node in self.fp16_nodes:
            return None
        if node in self.fp16_nodes:
            signature = self.signature(node)
            assert signature is not None
            if signature.input(index):
                return _FLOAT16
        return _FLOAT

    def retype_outputs(self) -> None:
        for value in self.graph.inputs:
            if value.dtype == _FLOAT and not self.keep_io(value):
                value.dtype = _FLOAT16
                self.changed = True
        for node in self.graph:
            if node not in self.fp16_nodes:
                continue
            signature = self.signature(node)
            assert signature is not None
            if node.op_type == "Cast":
                output = node.outputs[0]
                readers_want = {self.wants(user, index) for user, index in output.uses()}
                if node.attributes["to"].as_int() == _FLOAT and _FLOAT16 in readers_want:
                    node.attributes["to"] = ir.AttrInt64("to", _FLOAT16)
                    node.outputs[0].dtype = _FLOAT16
                    self.changed = True
                continue
            if node.op_type == "ConstantOfShape" and "value" not in node.attributes:
                # Its default value is a float32 zero: an explicit fp16 zero makes the same zeros.
                if node.outputs[0].dtype == _FLOAT and signature.output(0):
                    zero = ir.tensor([0.0], dtype=_FLOAT16)
                    node.attributes["value"] = ir.AttrTensor("value", zero)
                    node.outputs[0].dtype = _FLOAT16
                    self.changed = True
                continue
            if node.op_type in ("Constant", "ConstantOfShape") and "value" in node.attributes:
                tensor = node.attributes["value"].as_tensor()
                if tensor.dtype == _FLOAT:
                    self.constants.append(node)
                    node.outputs[0].dtype = _FLOAT16
                    self.changed = True
                continue
            for index, value in enumerate(node.outputs):
                if value.dtype == _FLOAT and signature.output(index):
                    value.dtype = _FLOAT16
                    self.changed = True

    def cast(self, value: ir.Value, to: ir.DataType, name: str | None = None) -> ir.Value:
        """The value ``Cast(value, to)``, created once, right after ``value`` is produced."""
        key = (value, to)
        if key in self.casts:
            return self.casts[key]
        suffix = "fp16" if to == _FLOAT16 else "fp32"
        base = value.name or "value"
        node = cast_node(value, to, f"{base}_cast_{suffix}", value.shape)
        output = node.outputs[0]
        output.name = name or f"{base}_{suffix}"
        producer = value.producer()
        if producer is not None and producer.graph is self.graph:
            self.graph.insert_after(producer, node)
        else:
            self.graph.insert_before(self.graph.node(0), node)
        self.casts[key] = output
        self.created.add(node)
        self.changed = True
        return output

    def fix_uses(self) -> InitializerReads:
        """Insert casts where a consumer needs another type; return initializer readers."""
        initializer_reads: InitializerReads = {}
        for node in list(self.graph.all_nodes()):
            if node in self.created:
                continue
            for index, value in enumerate(node.inputs):
                if value is None:
                    continue
                want = self.wants(node, index) if node.graph is self.graph else _FLOAT
                if want is None or self.original.get(value) != _FLOAT:
                    continue
                if value.is_initializer() and not value.is_graph_input():
                    initializer_reads.setdefault(value, []).append((node, index, want))
                elif value.dtype != want:
                    node.replace_input_with(index, self.cast(value, want))
        return initializer_reads

    def fix_outputs(self) -> None:
        for position, value in enumerate(list(self.graph.outputs)):
            if self.original.get(value) != _FLOAT:
                continue
            want = _FLOAT if self.keep_io(value) else _FLOAT16
            if value.dtype == want or value.is_initializer():
                continue
            name = value.name
            value.name = f"{name}_{'fp16' if value.dtype == _FLOAT16 else 'fp32'}"
            self.graph.outputs[position] = self.cast(value, want, name=name)

    def eliminate_casts(self) -> None:
        """Bypass lossless cast pairs (fp16 → fp32 → X) and drop casts to the type they read."""
        outputs = set(self.graph.outputs)
        for node in list(self.graph):
            if node.op_type != "Cast" or node.inputs[0] is None:
                continue
            source = node.inputs[0]
            first = source.producer()
            if (
                first is not None
                and first.op_type == "Cast"
                and first.inputs[0] is not None
                and first.inputs[0].dtype in (_FLOAT16, _BFLOAT16)
                and source.dtype == _FLOAT
            ):
                node.replace_input_with(0, first.inputs[0])
                if not source.uses() and source not in outputs:
                    self.graph.remove(first, safe=True)
                source = first.inputs[0]
                self.changed = True
            output = node.outputs[0]
            if source.dtype == node.attributes["to"].as_int() and output not in outputs:
                output.replace_all_uses_with(source)
                self.graph.remove(node, safe=True)
                self.changed = True
