"""Pass ``fp16``: float32 weights and compute to float16, streamed, with fp32 islands for Gemma.

What it does, on the ``onnx_ir`` graph (no ``ModelProto`` round trip), in three modules: this
one (the pass, its options and the weights), :mod:`passes.fp16_convert` (node precisions, value
types and casts) and :mod:`passes.fp16_slots` (which op slots may hold float16):

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

import functools
import logging
import typing
from typing import Literal

import ml_dtypes
import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common
import pydantic
from onnx import TensorProto
from onnx import helper as oh
from onnxconverter_common.float16 import DEFAULT_OP_BLOCK_LIST

from passes.fp16_convert import Converter, InitializerReads, cast_node
from passes.fp16_islands import ISLAND_KINDS, Fp32Islands, IslandKind
from surgery.constants import FP16_BLOCK_ELEMENTS as _BLOCK_ELEMENTS
from surgery.constants import INLINE_LIMIT_BYTES
from surgery.errors import SurgeryError
from surgery.lazy import DerivedTensor
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
    return DerivedTensor(
        source,
        lambda array: _convert_array(array, dtype),
        dtype=dtype,
        shape=_shape(source),
        name=name,
    )


def _convert_initializers(graph: ir.Graph, reads: InitializerReads) -> bool:
    """Initializers read in fp16 become lazy fp16 tensors (a second copy if fp32 nodes read them too)."""
    changed = False
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
            graph.register_initializer(copy)
            for node, index, want in readers:
                if want == _FLOAT16:
                    node.replace_input_with(index, copy)
            shared_bytes += source.nbytes
        changed = True
    if shared_bytes:
        logger.info(
            "fp16: initializers read by fp16 and fp32 nodes are stored twice (%d fp32 bytes)",
            shared_bytes,
        )
    return changed


def _convert_constants(nodes: list[ir.Node]) -> None:
    """The float32 values of ``Constant`` / ``ConstantOfShape`` nodes retyped to fp16."""
    for node in nodes:
        tensor = node.attributes["value"].as_tensor()
        converted = _convert_array(tensor.numpy(), _FLOAT16)
        node.attributes["value"] = ir.AttrTensor("value", ir.Tensor(converted, name=tensor.name))


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
        cast = cast_node(stored, _FLOAT, f"{value.name}_cast_fp32", _shape(source))
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

    _converter: Converter | None = None

    def ensures(self, model: ir.Model) -> None:
        """No value stays float32 between two fp16 nodes where both op schemas allow float16
        (values into and out of fp32 islands and blocked nodes go through Casts instead)."""
        converter = self._converter
        if converter is None:  # bfloat16 storage: compute stays float32
            return
        for node in converter.fp16_nodes:
            signature = converter.signature(node)
            if node.op_type == "Cast" or signature is None:
                continue
            for index, value in enumerate(node.outputs):
                if value.dtype != _FLOAT or not signature.output(index):
                    continue
                for user, slot in value.uses():
                    reads = converter.signature(user)
                    if (
                        user in converter.fp16_nodes
                        and user.op_type != "Cast"
                        and reads is not None
                        and reads.input(slot)
                    ):
                        raise ir.passes.PostconditionError(
                            f"fp16: '{value.name}' stays float32 between fp16 nodes "
                            f"'{node.name}' and '{user.name}'"
                        )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self._converter = None
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
        options = self.options
        self._converter = None
        islands = Fp32Islands(kinds=list(options.fp32_islands))
        islands(model)
        converter = Converter(
            graph,
            opset,
            keep_io_types=options.keep_io_types,
            op_block_list=options.op_block_list,
            node_block_list=options.node_block_list,
            fp32_nodes=islands.nodes,
        )
        converter.record_types()
        converter.choose_precisions()
        converter.retype_outputs()
        converter.fix_outputs()
        reads = converter.fix_uses()
        initializers_changed = _convert_initializers(graph, reads)
        _convert_constants(converter.constants)
        converter.eliminate_casts()
        self._converter = converter
        self.statistics = {
            **{f"{kind} islands": count for kind, count in islands.statistics.items()},
            "fp16 nodes": len(converter.fp16_nodes),
        }
        return ir.passes.PassResult(model, modified=converter.changed or initializers_changed)
