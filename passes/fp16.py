"""Pass ``fp16``: float32 weights and compute to float16, streamed, with fp32 islands for Gemma.

What it does, on the ``onnx_ir`` graph (no ``ModelProto`` round trip):

1. Decide per node whether it computes in fp16 or stays fp32: an op block list, a node block list
   (``fnmatch`` patterns on node names), fp32 islands (:mod:`passes.fp16_islands`: RMSNorm
   statistics, softcap, softmax), nodes holding subgraphs, and ops without a known schema.
2. Per input and output slot of an fp16 node, the op's schema says whether a float32 value becomes
   float16: a slot typed by a type variable that allows ``tensor(float16)`` does, a slot of fixed
   type (``Resize`` scales) keeps float32. ``Cast`` ``to``, ``Constant`` and ``ConstantOfShape``
   values are rewritten; ops whose output type comes from an attribute (``Random*``, ``EyeLike``…)
   are blocked.
3. Insert one ``Cast`` per value and target type where a producer and a consumer disagree (placed
   right after the producer, so the node order stays topological), keep float graph inputs and
   outputs float32 (``keep_io_types``: the Transformers.js contract), then remove back-to-back casts.
4. Initializers read only in fp16 become fp16 :class:`onnx_ir.LazyTensor` s computing
   ``clip(x, -65504, 65504)`` rounded to float16 (by ONNX Runtime's ``Cast``: six times numpy's
   speed, the same bits) block by block from the memory-mapped source when the writer reaches
   them; nothing holds all weights. An initializer read by fp16 *and* fp32 nodes keeps
   both versions (the original for fp32 readers, ``<name>_fp16`` for the others): readers of each
   get exact values without a run-time ``Cast`` of a weight, at the cost of storing it twice
   (logged; in Gemma these are scalars).

Reused from onnxconverter-common: its ``DEFAULT_OP_BLOCK_LIST`` (the starting block list) and its
design (block lists, ``keep_io_types``, casts at boundaries). Where this pass departs, and why:

* it streams: onnxconverter-common needs the whole ``ModelProto`` in memory (7 GiB and 47 s for a
  4 GiB model here) and, for external data, relabels the tensor fp16 while leaving fp32 bytes
  (onnxconverter-common #308); here the data file really halves;
* weights are clamped to fp16's range (±65504), not to 1e4, and small values are rounded, not
  raised to 1e-7: both of its defaults change weights that fp16 represents;
* existing ``Cast`` nodes stay type-correct (a ``Cast`` to float32 in the fp16 region casts to
  float16 when an fp16 node reads it, so no cast pair follows it; since 1.15
  onnxconverter-common can leave a ``Cast`` to float32 feeding fp16 nodes, which ONNX Runtime refuses);
* an initializer shared by a blocked and an unblocked node is handled (onnxconverter-common converts
  or skips it for all readers);
* fp32 islands keep Gemma finite, where onnxconverter-common only blocks whole op types.

``dtype: bfloat16`` stores weights only: every float initializer over 1 KiB becomes bfloat16 and is read
through a ``Cast`` to float32; compute stays float32. Measured with ONNX Runtime 1.32 on CPU:
``Add``, ``Mul``, ``MatMul``, ``Softmax``, ``Pow``… have no bfloat16 kernel (the session refuses
the model), so bf16 compute is not offered. Note also that on CPU, ONNX Runtime runs most fp16
ops in fp32 internally (``InsertCastTransformer``) and skips the casts inside chains of such ops,
which hides fp16 overflow there; GPUs (WebGPU in Transformers.js) compute in fp16.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import logging
import typing
from typing import Any, Literal

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common
import pydantic
from onnx import TensorProto
from onnx import helper as oh
from onnxconverter_common.float16 import DEFAULT_OP_BLOCK_LIST

from passes.fp16_islands import ISLAND_KINDS, IslandKind, find_islands
from surgery.constants import FP16_BLOCK_ELEMENTS as _BLOCK_ELEMENTS
from surgery.constants import INLINE_LIMIT_BYTES
from surgery.errors import SurgeryError
from surgery.pass_infra import ModelPass, PassOptions
from surgery.registry import register

if typing.TYPE_CHECKING:
    import onnxruntime as ort

__all__ = ["FP16_MAX", "OP_BLOCK_LIST", "Fp16", "Fp16Options"]

logger = logging.getLogger(__name__)

#: Largest finite float16.
FP16_MAX = 65504.0
#: onnxconverter-common's default block list plus ops whose output dtype comes from an attribute.
OP_BLOCK_LIST: tuple[str, ...] = (
    *DEFAULT_OP_BLOCK_LIST,
    "Bernoulli",
    "EyeLike",
    "Multinomial",
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
)
_FLOAT = ir.DataType.FLOAT
_FLOAT16 = ir.DataType.FLOAT16
_BFLOAT16 = ir.DataType.BFLOAT16
_ORT_DOMAINS = ("com.microsoft",)


class Fp16Options(PassOptions):
    """Options of :class:`Fp16`."""

    dtype: Literal["float16", "bfloat16"] = pydantic.Field(
        default="float16",
        description="float16: weights and compute; bfloat16: weight storage only, compute in fp32",
    )
    keep_io_types: bool | list[str] = pydantic.Field(
        default=True,
        description="float graph inputs/outputs that stay float32: all (true), none (false), "
        "or those whose names match these fnmatch patterns",
    )
    op_block_list: list[str] = pydantic.Field(
        default_factory=lambda: list(OP_BLOCK_LIST),
        description="op types that stay float32 (default: onnxconverter-common's + Random*, EyeLike…)",
    )
    node_block_list: list[str] = pydantic.Field(
        default_factory=list, description="fnmatch patterns of node names that stay float32"
    )
    fp32_islands: list[IslandKind] = pydantic.Field(
        default_factory=lambda: list(ISLAND_KINDS),
        description="subgraphs kept float32 so Gemma stays finite ([] disables them)",
    )


@dataclasses.dataclass(frozen=True)
class _Signature:
    """Which input and output slots of an op may hold float16."""

    inputs: tuple[bool, ...]
    outputs: tuple[bool, ...]
    variadic_input: bool
    variadic_output: bool

    def input(self, index: int) -> bool:
        return _slot(self.inputs, index, self.variadic_input)

    def output(self, index: int) -> bool:
        return _slot(self.outputs, index, self.variadic_output)


def _slot(slots: tuple[bool, ...], index: int, variadic: bool) -> bool:
    if index < len(slots):
        return slots[index]
    return variadic and bool(slots) and slots[-1]


def _signature(params: Any, formal_in: Any, formal_out: Any, type_str: str) -> _Signature:
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in params}

    def converts(param: Any) -> bool:
        kind = getattr(param, type_str)
        return "tensor(float16)" in allowed.get(kind, {kind})

    def variadic(formal: Any) -> bool:
        return bool(formal) and "Variadic" in str(formal[-1].option)

    return _Signature(
        tuple(converts(p) for p in formal_in),
        tuple(converts(p) for p in formal_out),
        variadic(formal_in),
        variadic(formal_out),
    )


@functools.cache
def _ort_schemas() -> dict[tuple[str, str], list[Any]]:
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    schemas: dict[tuple[str, str], list[Any]] = {}
    for schema in ort_state.get_all_operator_schema():
        if schema.domain in _ORT_DOMAINS:
            schemas.setdefault((schema.domain, schema.name), []).append(schema)
    return schemas


@functools.cache
def _op_signature(domain: str, op_type: str, version: int) -> _Signature | None:
    """The fp16-capable slots of an op, from ONNX's schemas (or ONNX Runtime's contrib ones)."""
    if domain in ("", "ai.onnx"):
        try:
            schema = onnx.defs.get_schema(op_type, max_inclusive_version=version, domain="")
        except onnx.defs.SchemaError:
            return None
        return _signature(schema.type_constraints, schema.inputs, schema.outputs, "type_str")
    candidates = [
        s for s in _ort_schemas().get((domain, op_type), []) if s.since_version <= max(version, 1)
    ]
    if not candidates:
        return None
    schema = max(candidates, key=lambda s: s.since_version)
    return _signature(schema.type_constraints, schema.inputs, schema.outputs, "typeStr")


@functools.cache
def _fp16_converter() -> ort.InferenceSession:
    """``Cast(Clip(x, -65504, 65504), to=float16)`` on a 1-D float32 input, on one thread.

    ONNX Runtime's ``Cast`` converts with the CPU's half-precision instructions (measured here:
    5.4 GiB/s on one core); numpy converts element by element (0.9 GiB/s), which made the
    conversion, not the disk, the cost of writing an fp16 model. Both round to nearest even.
    Imported here: ``surgery``'s start-up (every CLI command) need not load ONNX Runtime.
    """
    import onnxruntime as ort

    graph = oh.make_graph(
        [
            oh.make_node("Clip", ["x", "low", "high"], ["clipped"]),
            oh.make_node("Cast", ["clipped"], ["y"], to=TensorProto.FLOAT16),
        ],
        "clip_cast_fp16",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT16, ["n"])],
        [
            oh.make_tensor("low", TensorProto.FLOAT, [], [-FP16_MAX]),
            oh.make_tensor("high", TensorProto.FLOAT, [], [FP16_MAX]),
        ],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the writer already converts in parallel, tensor by tensor
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _convert_array(array: np.ndarray, dtype: ir.DataType) -> np.ndarray:
    """float32 → float16 (clamped to ±65504, block by block) or bfloat16."""
    flat = np.ascontiguousarray(array, dtype=np.float32).reshape(-1)
    if dtype != _FLOAT16:
        return flat.astype(ml_dtypes.bfloat16).reshape(np.shape(array))
    out = np.empty(flat.shape, dtype=np.float16)
    session = _fp16_converter()
    for start in range(0, flat.size, _BLOCK_ELEMENTS):
        block = flat[start : start + _BLOCK_ELEMENTS]
        binding = session.io_binding()
        binding.bind_cpu_input("x", block)
        binding.bind_output(
            "y", "cpu", 0, np.float16, [block.size], out[start : start + block.size].ctypes.data
        )
        session.run_with_iobinding(binding)
    return out.reshape(np.shape(array))


def _shape(tensor: ir.TensorProtocol) -> ir.Shape:
    """A tensor's (static) shape as an ``ir.Shape``."""
    return ir.Shape(typing.cast(ir.Shape, tensor.shape))


def _lazy_converted(source: ir.TensorProtocol, dtype: ir.DataType, name: str) -> ir.LazyTensor:
    """A tensor whose converted bytes are computed from ``source`` each time they are read."""

    def make() -> ir.TensorProtocol:
        return ir.Tensor(_convert_array(source.numpy(), dtype), dtype=dtype, name=name)

    return ir.LazyTensor(make, dtype=dtype, shape=_shape(source), name=name)


def _name_matches(name: str | None, patterns: list[str]) -> bool:
    return bool(name) and any(fnmatch.fnmatchcase(name or "", p) for p in patterns)


class _Rewriter:
    """The state of one conversion of one graph: original types, node precisions, casts."""

    def __init__(self, graph: ir.Graph, opset: int, options: Fp16Options) -> None:
        self.graph = graph
        self.opset = opset
        self.options = options
        self.original: dict[ir.Value, ir.DataType | None] = {}
        self.fp16_nodes: set[ir.Node] = set()
        self.casts: dict[tuple[ir.Value, ir.DataType], ir.Value] = {}
        self.created: set[ir.Node] = set()
        self.changed = False

    def keep_io(self, value: ir.Value) -> bool:
        keep = self.options.keep_io_types
        return keep if isinstance(keep, bool) else _name_matches(value.name, keep)

    def signature(self, node: ir.Node) -> _Signature | None:
        version = self.graph.opset_imports.get(node.domain or "", self.opset)
        return _op_signature(node.domain or "", node.op_type, version)

    def choose_precisions(self) -> None:
        options = self.options
        islands = find_islands(self.graph, options.fp32_islands)
        blocked_ops = set(options.op_block_list)
        for node in self.graph:
            if (
                node in islands
                or node.op_type in blocked_ops
                or _name_matches(node.name, options.node_block_list)
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
            if node.op_type in ("Constant", "ConstantOfShape") and "value" in node.attributes:
                tensor = node.attributes["value"].as_tensor()
                if tensor.dtype == _FLOAT:
                    converted = _convert_array(tensor.numpy(), _FLOAT16)
                    node.attributes["value"] = ir.AttrTensor(
                        "value", ir.Tensor(converted, name=tensor.name)
                    )
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
        node = ir.Node(
            "",
            "Cast",
            [value],
            attributes=[ir.AttrInt64("to", to)],
            name=f"{base}_cast_{suffix}",
            num_outputs=1,
        )
        output = node.outputs[0]
        output.name = name or f"{base}_{suffix}"
        output.dtype = to
        output.shape = ir.Shape(value.shape) if value.shape is not None else None
        producer = value.producer()
        if producer is not None and producer.graph is self.graph:
            self.graph.insert_after(producer, node)
        else:
            self.graph.insert_before(self.graph.node(0), node)
        self.casts[key] = output
        self.created.add(node)
        self.changed = True
        return output

    def fix_uses(self) -> dict[ir.Value, list[tuple[ir.Node, int, ir.DataType]]]:
        """Insert casts where a consumer needs another type; return initializer readers."""
        initializer_reads: dict[ir.Value, list[tuple[ir.Node, int, ir.DataType]]] = {}
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

    def convert_initializers(
        self, reads: dict[ir.Value, list[tuple[ir.Node, int, ir.DataType]]]
    ) -> None:
        shared_bytes = 0
        for value, readers in reads.items():
            wanted = {want for _, _, want in readers}
            if _FLOAT16 not in wanted:
                continue
            source = value.const_value
            assert source is not None and value.name is not None
            if wanted == {_FLOAT16}:
                value.const_value = _lazy_converted(source, _FLOAT16, value.name)
                value.dtype = _FLOAT16
            else:
                copy = ir.Value(
                    name=f"{value.name}_fp16",
                    shape=_shape(source),
                    type=ir.TensorType(_FLOAT16),
                    const_value=_lazy_converted(source, _FLOAT16, f"{value.name}_fp16"),
                )
                self.graph.register_initializer(copy)
                for node, index, want in readers:
                    if want == _FLOAT16:
                        node.replace_input_with(index, copy)
                shared_bytes += source.nbytes
            self.changed = True
        if shared_bytes:
            logger.info(
                "fp16: initializers read by fp16 and fp32 nodes are stored twice (%d fp32 bytes)",
                shared_bytes,
            )

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


def _bf16_storage(graph: ir.Graph) -> bool:
    """Store every float initializer as bfloat16, read through a Cast to float32."""
    changed = False
    first = graph.node(0) if len(graph) else None
    for value in list(graph.initializers.values()):
        source = value.const_value
        if (
            value.dtype != _FLOAT
            or source is None
            or source.nbytes <= INLINE_LIMIT_BYTES
            or value.is_graph_input()
            or not value.uses()
        ):
            continue
        assert value.name is not None
        stored = ir.Value(
            name=f"{value.name}_bf16",
            shape=_shape(source),
            type=ir.TensorType(_BFLOAT16),
            const_value=_lazy_converted(source, _BFLOAT16, f"{value.name}_bf16"),
        )
        graph.register_initializer(stored)
        cast = ir.Node(
            "",
            "Cast",
            [stored],
            attributes=[ir.AttrInt64("to", _FLOAT)],
            name=f"{value.name}_cast_fp32",
            num_outputs=1,
        )
        cast.outputs[0].dtype = _FLOAT
        cast.outputs[0].shape = _shape(source)
        graph.initializers.pop(value.name)
        value.replace_all_uses_with(cast.outputs[0], replace_graph_outputs=True)
        cast.outputs[0].name, value.name = value.name, f"{value.name}_fp32_unused"
        if first is not None:
            graph.insert_before(first, cast)
        else:
            graph.append(cast)
        changed = True
    return changed


@register
class Fp16(ModelPass[Fp16Options]):
    """Convert float32 weights and compute to float16, keeping Gemma finite.

    Float initializers become fp16 lazily, one tensor at a time when written, clamped to ±65504.
    Nodes compute in fp16 except those in op_block_list, node_block_list and the fp32 islands
    (RMSNorm statistics, softcap, softmax), which read fp32 through inserted Casts. Float graph
    inputs and outputs stay float32 by default (keep_io_types), as Transformers.js expects.
    dtype: bfloat16 stores weights as bfloat16 read through a Cast to float32 (compute stays
    float32: ONNX Runtime has almost no bfloat16 kernels).
    """

    name = "fp16"
    summary = "float32 to float16 (streamed, clamped, fp32 islands for Gemma); or bf16 storage"
    Options = Fp16Options

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        if self.options.dtype == "bfloat16":
            return ir.passes.PassResult(model, modified=_bf16_storage(graph))
        if any(v.dtype == _FLOAT16 for v in graph.initializers.values()):
            raise SurgeryError(
                f"{graph.name or 'model'}: already has float16 weights; run fp16 on the float32 model"
            )
        if any(v.dtype is None for node in graph for v in node.outputs):
            ir.passes.common.ShapeInferencePass()(model)  # types decide where casts go
        untyped = [v.name for node in graph for v in node.outputs if v.dtype is None]
        if untyped:
            raise SurgeryError(
                f"{graph.name or 'model'}: {len(untyped)} values have no known type (first: "
                f"'{untyped[0]}'); fp16 needs every value typed; run shape-inference first"
            )
        opset = graph.opset_imports.get("", model.opset_imports.get("", 0))
        rewriter = _Rewriter(graph, opset, self.options)
        rewriter.record_types()
        rewriter.choose_precisions()
        rewriter.retype_outputs()
        rewriter.fix_outputs()
        reads = rewriter.fix_uses()
        rewriter.convert_initializers(reads)
        rewriter.eliminate_casts()
        return ir.passes.PassResult(model, modified=rewriter.changed)
