"""Pass ``quantize``: weights to 4 or 8 bits as Transformers.js's dtypes want, streamed.

Modes, each what ONNX Runtime's own quantizer writes (the route of Transformers.js's
``scripts/quantize.py``), initializer for initializer:

* ``q4`` (and ``q4f16``, which a later ``fp16`` step completes): ``com.microsoft.MatMulNBits``,
  4 bits, blocks of ``block_size`` along K, symmetric by default: ``MatMulNBitsQuantizer``
  (``DefaultWeightOnlyQuantizer.qbits_block_quant``, QOperator format); with ``gather`` the
  embedding tables of ``Gather`` too: ``com.microsoft.GatherBlockQuantized``, int4 blocks along
  each row, as ``MatMulNBitsQuantizer`` with Gather in ``op_types_to_quantize`` writes them. Off by
  default, because of what Transformers.js 4.3.1's runtimes run (``tests/test_gather_runtimes.py``
  checks it): onnxruntime-node 1.30 and onnxruntime-web 1.31's plain wasm build run it, but the
  build Transformers.js loads in browsers (``onnxruntime-web/webgpu``, the asyncify wasm, for
  device wasm too) has no CPU kernel for it ("Could not find an implementation for
  GatherBlockQuantized"); only its WebGPU execution provider has one;
* ``bnb4``: ``com.microsoft.MatMulBnb4``, NF4 or FP4, blocks of 64: ``MatMulBnb4Quantizer``;
* ``q8`` / ``int8`` / ``uint8``: dynamic 8-bit, what ``ONNXQuantizer`` in ``IntegerOps`` mode
  with ``MatMulConstBOnly`` writes when given every op type of ``IntegerOpsRegistry``, as
  Transformers.js's script calls it. Of that registry our graphs hold three ops (measured on the
  tiny parts, registry against MatMul only: nothing else changes; the decoder's ``Transpose`` stays
  float there too, as ONNX Runtime keeps a ``Transpose`` in 8 bits only after a quantized op):

  - ``MatMul``: ``DynamicQuantizeLinear`` on the activation, ``MatMulInteger``, ``Cast`` and
    ``Mul`` by the product of the scales (``operators/matmul.py``), per tensor or per channel
    (axis -1), optionally with a reduced range;
  - ``Conv`` (the vision patch embedding): ``ConvInteger`` likewise, the weight per tensor
    (``per_channel`` does not apply, as in ONNX Runtime), the bias added after a ``Reshape``
    (``operators/conv.py``);
  - ``Gather`` of a constant table (the embedding; with ``split-large-tensors`` each row block,
    each with its own scale, as ONNX Runtime quantizes the split graph): the table in uint8,
    asymmetric, per tensor (ONNX Runtime quantizes it as an activation, in every mode), the
    ``Gather`` reads it and a ``DequantizeLinear`` follows; a quantized reader (a MatMul) takes
    the uint8 rows as its activation instead (``operators/gather.py``).

  ``q8`` picks the weight type as Transformers.js does: uint8 when the part has ``Conv``,
  ``GroupQueryAttention`` or ``MultiHeadAttention``, else int8. That rule came from onnxruntime-web
  1.20, which had no int8 ``ConvInteger``; Transformers.js 4.3.1's runtimes (onnxruntime-node
  1.30, onnxruntime-web 1.31 plain and ``/webgpu``) run ``ConvInteger`` with both weight types
  and the uint8 ``Gather`` + ``DequantizeLinear``, compute what ONNX Runtime does, and
  :data:`RUNTIME_WEIGHT_TYPES` records it (``tests/test_integer_runtimes.py`` fails when a
  runtime changes). An op whose weight type a runtime lacks stays float in that mode, logged.

Reused, not re-implemented: the numbers come from ONNX Runtime's C++ packing kernels and, for 8
bits, from its quantizer's own ``quantize_data`` steps (over row blocks, so its whole-weight
temporaries are not made), called per weight as its quantizers call them
(:mod:`passes.quantize_kernels`), so every initializer is byte-identical to theirs; names follow
theirs too (``<w>_Q4``, ``<w>_scales``, ``<w>_zero_points``, ``<w>_Bnb4``, ``<w>_absmax``,
``<w>_quantized``, ``<w>_scale``, ``<w>_zero_point``). This module matches and rewrites the graph.

Where this departs, and why:

* it streams: ONNX Runtime's quantizers load the whole model and hold every result. Here each
  weight's outputs are lazy tensors sharing one computation (:class:`surgery.lazy.SharedComputation`)
  that runs when the writer reaches the first of them and is let go after the last, so a weight
  is quantized once and only a few are held at a time;
* it matches the tied ``lm_head`` through its ``Transpose`` (``MatMul(x, Transpose(W))``, as
  exported, before ``fold-transposes``): the kernels get the stored weight's transposed view (no
  copy where they can read it as stored) and quantize it as the folded initializer would be, under
  the folded initializer's name;
* only 2-D weights of MatMul (the exported graph has no other), and a Conv's weight only when it
  is a constant (ONNX Runtime would quantize a computed one at run time; ours are constants);
  ``Attention``, ``LSTM`` and ``EmbedLayerNormalization`` of the registry are not matched (the
  exported graph has none), nor a ``Transpose`` straight after a quantized ``Gather``, which ONNX
  Runtime would run on the uint8 rows (ours read the ``DequantizeLinear``'s floats: the same
  numbers; our graphs have no such ``Transpose``);
* a table that a MatMul reads directly and already quantized per channel stays float for its
  Gathers (ONNX Runtime would reuse the per-channel quantization under a per-tensor
  ``DequantizeLinear``, which it refuses); otherwise one quantization serves every reader, the
  first in graph order deciding, as ONNX Runtime's ``quantized_value_map``;
* a weight read by several MatMuls is quantized once and shared (``MatMulNBitsQuantizer`` would
  store one copy per reader); a weight with other readers keeps its float copy for them;
* ``op_block_list`` (op types, as Transformers.js's script's: ``MatMul``, ``Conv``, ``Gather``) /
  ``node_block_list`` / ``min_elements`` leave those ops float, as the ``fp16`` pass's block
  lists do.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import typing
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import onnx_ir as ir
import pydantic
from onnx import TensorProto

from passes.quantize_kernels import (
    bnb4_arrays,
    gather_q4_arrays,
    q4_arrays,
    q8_arrays,
    shared_initializers,
)
from passes.quantize_kernels import ort_kernels as _kernels
from surgery.pass_infra import ModelPass, PassOptions
from surgery.registry import register

__all__ = ["QUINT8_OPS", "RUNTIME_WEIGHT_TYPES", "Quantize", "QuantizeOptions"]

logger = logging.getLogger(__name__)

#: Ops whose presence makes ``q8`` store uint8 weights (Transformers.js's ``QUINT8_OPS``).
QUINT8_OPS = ("Conv", "GroupQueryAttention", "MultiHeadAttention")
#: The 8-bit weight types of the ops besides MatMul (``ConvInteger``; ``Gather`` of a uint8 table,
#: then ``DequantizeLinear``) that every runtime of Transformers.js 4.3.1 runs: onnxruntime-node,
#: onnxruntime-web, and the ``onnxruntime-web/webgpu`` build its browser bundle loads (device wasm
#: too). ``tests/test_integer_runtimes.py`` runs each and fails when this differs. An op whose
#: weight type is missing here stays float in that mode (logged).
RUNTIME_WEIGHT_TYPES: dict[str, frozenset[int]] = {
    "Conv": frozenset({TensorProto.INT8, TensorProto.UINT8}),
    "Gather": frozenset({TensorProto.UINT8}),
}
_EIGHT_BIT = ("q8", "int8", "uint8")
#: Default block size per 4-bit mode (Transformers.js's script: 32 for q4, 64 for bnb4).
_DEFAULT_BLOCK = {"q4": 32, "q4f16": 32, "bnb4": 64}
_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16)
_MS_DOMAIN = "com.microsoft"

Mode = Literal["q4", "q4f16", "bnb4", "q8", "int8", "uint8"]
#: Options that apply to some modes only: given for another mode, they are refused.
_APPLIES = {
    "block_size": ("q4", "q4f16", "bnb4"),
    "symmetric": ("q4", "q4f16"),
    "accuracy_level": ("q4", "q4f16"),
    "gather": ("q4", "q4f16"),
    "quant_type": ("bnb4",),
    "per_channel": ("q8", "int8", "uint8"),
    "reduce_range": ("q8", "int8", "uint8"),
}


class QuantizeOptions(PassOptions):
    """Options of :class:`Quantize`."""

    mode: Mode = pydantic.Field(
        description="q4 / q4f16 (MatMulNBits; q4f16 needs a later fp16 step), bnb4 (MatMulBnb4), "
        "q8 / int8 / uint8 (DynamicQuantizeLinear + MatMulInteger)"
    )
    block_size: int | None = pydantic.Field(
        default=None,
        description="4-bit modes: values per block along K, a power of two >= 16 "
        "(default 32 for q4, 64 for bnb4)",
    )
    symmetric: bool = pydantic.Field(
        default=True, description="q4: symmetric blocks (no zero points), as Transformers.js"
    )
    accuracy_level: int | None = pydantic.Field(
        default=None, ge=0, le=4, description="q4: MatMulNBits accuracy_level (0-4; unset: omitted)"
    )
    gather: bool = pydantic.Field(
        default=False,
        description="q4: also embedding tables read by Gather (GatherBlockQuantized, int4 blocks "
        "along each row); off by default: Transformers.js 4.3.1's browser build of "
        "onnxruntime-web has no wasm kernel for it",
    )
    quant_type: Literal["nf4", "fp4"] = pydantic.Field(
        default="nf4", description="bnb4: the 4-bit data type"
    )
    per_channel: bool = pydantic.Field(
        default=False, description="8-bit modes: one scale per output column instead of per tensor"
    )
    reduce_range: bool = pydantic.Field(
        default=False, description="8-bit modes: weights in 7 bits (for CPUs without VNNI)"
    )
    op_block_list: list[str] = pydantic.Field(
        default_factory=list,
        description="op types left float (MatMul; 8-bit modes: Conv, Gather; q4 gather: Gather)",
    )
    node_block_list: list[str] = pydantic.Field(
        default_factory=list, description="fnmatch patterns of node names left float"
    )
    min_elements: int = pydantic.Field(
        default=0,
        ge=0,
        description="ops whose weight (Gather: table) has fewer elements stay float",
    )

    @pydantic.field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int | None) -> int | None:
        if value is not None and (value < 16 or value & (value - 1)):
            raise ValueError(f"expected a power of two >= 16, got {value}")
        return value

    @pydantic.field_validator(*_APPLIES)
    @classmethod
    def _fits_mode(cls, value: object, info: pydantic.ValidationInfo) -> object:
        mode = info.data.get("mode")
        modes = _APPLIES[typing.cast(str, info.field_name)]
        if mode is not None and mode not in modes:
            raise ValueError(f"does not apply to mode {mode} (only to {', '.join(modes)})")
        return value

    @property
    def block(self) -> int:
        """The block size in effect for a 4-bit mode."""
        return self.block_size or _DEFAULT_BLOCK[self.mode]


@dataclasses.dataclass
class _Weight:
    """A MatMul weight as the quantizer sees it: ``[K, N]``, and where it comes from."""

    key: ir.Value  # the value the MatMuls read as B (the initializer, or a Transpose's output)
    name: str
    stored: ir.TensorProtocol  # the initializer's tensor: [K, N], or [N, K] under a Transpose
    transpose: ir.Node | None  # the Transpose between the initializer and the MatMuls

    @property
    def shape(self) -> tuple[int, int]:
        """``[K, N]``."""
        rows, cols = (int(d) for d in self.stored.shape.numpy())
        return (cols, rows) if self.transpose is not None else (rows, cols)

    def matrix(self, stored: np.ndarray) -> np.ndarray:
        """The ``[K, N]`` view of the stored array (a transposed view under a Transpose)."""
        return stored.T if self.transpose is not None else stored


def _node(
    graph: ir.Graph,
    anchor: ir.Node,
    op: str,
    inputs: Sequence[ir.Value | None],
    name: str,
    outputs: Sequence[str],
    domain: str = "",
    **attrs: int,
) -> list[ir.Value]:
    node = ir.Node(
        domain,
        op,
        inputs,
        attributes=[ir.AttrInt64(k, v) for k, v in attrs.items()],
        name=name,
        num_outputs=len(outputs),
    )
    for value, output in zip(node.outputs, outputs, strict=True):
        value.name = output
    graph.insert_before(anchor, node)
    return list(node.outputs)


def _integer_op(
    graph: ir.Graph, node: ir.Node, op: str, inputs: Sequence[ir.Value], name: str
) -> tuple[ir.Node, ir.Value]:
    """``op`` (``ConvInteger`` / ``MatMulInteger``) on ``inputs`` before ``node``, and its int32
    result cast to ``node``'s output type, named as ONNX Runtime's quantizer names them."""
    out = node.outputs[0]
    (integer,) = _node(graph, node, op, inputs, name, [f"{out.name}_output_quantized"])
    (cast,) = _node(
        graph,
        node,
        "Cast",
        [integer],
        f"{out.name}_output_quantized_cast",
        [f"{out.name}_output_quantized_cast_output"],
        to=int(out.dtype or ir.DataType.FLOAT),
    )
    return typing.cast(ir.Node, integer.producer()), cast


def _replace(graph: ir.Graph, node: ir.Node, result: ir.Value) -> None:
    """``result`` takes the place (uses, name, type) of ``node``'s output; ``node`` goes."""
    old = node.outputs[0]
    name = old.name
    result.type, result.shape = old.type, old.shape
    ir.convenience.replace_all_uses_with(old, result, replace_graph_outputs=True)
    old.name = f"{name}_float"
    graph.remove(node, safe=True)
    result.name = name


def _require_int4(model: ir.Model) -> None:
    """Opset 21 and IR version 10 at least: the first with int4 tensors."""
    for imports in (model.opset_imports, model.graph.opset_imports):
        if imports.get("", 21) < 21:
            imports[""] = 21
    model.ir_version = max(model.ir_version, 10)


def _matches(name: str | None, patterns: list[str]) -> bool:
    return bool(name) and any(fnmatch.fnmatchcase(name or "", p) for p in patterns)


class _EightBit:
    """The 8-bit modes' rewrites besides MatMul's: what ``ONNXQuantizer`` (IntegerOps) does with the
    other ops of its registry that our graphs hold (``Conv``: ``ConvInteger``; ``Gather``: the
    table in uint8, ``DequantizeLinear`` after), with one ``DynamicQuantizeLinear`` per activation
    and one quantization per initializer, shared by its readers (its ``quantized_value_map``).

    Args:
        options: The pass's options.
        graph: The part's graph.
        qtype: The weight type of MatMul and Conv (``TensorProto.INT8`` or ``UINT8``).
        quantized: Initializer (or transposed weight) → its quantized initializers, shared with
            the MatMul path.
    """

    def __init__(
        self,
        options: QuantizeOptions,
        graph: ir.Graph,
        qtype: int,
        quantized: dict[ir.Value, list[ir.Value]],
    ) -> None:
        self.options = options
        self.graph = graph
        self.qtype = qtype
        self.quantized = quantized
        self._activations: dict[ir.Value, list[ir.Value]] = {}
        self._dequantize: list[ir.Node] = []
        self._left_float: set[tuple[str, int]] = set()

    def initializers(
        self,
        source: ir.TensorProtocol,
        name: str,
        shape: list[int],
        qtype: int,
        per_channel: bool,
        reduce_range: bool,
        view: Callable[[np.ndarray], np.ndarray] = lambda array: array,
    ) -> list[ir.Value]:
        """``<name>_quantized``, ``_scale`` and ``_zero_point`` of ``view(source)`` (of ``shape``),
        as ``ONNXQuantizer.quantize_initializer`` (per tensor) or ``quantize_weight_per_channel``
        (axis -1) writes them, computed lazily in row blocks. The same source, name, shape and
        options give the same bytes in every part (the name says which view: a transposed weight
        is named after its fold), so the writer may copy them from one part to another."""
        itype = ir.DataType(qtype)
        params = [shape[-1]] if per_channel else []
        specs = [
            (f"{name}_quantized", itype, shape),
            (f"{name}_scale", source.dtype, params),
            (f"{name}_zero_point", itype, params),
        ]
        fn = lambda stored: q8_arrays(view(stored), qtype, per_channel, reduce_range)  # noqa: E731
        key = ("8-bit", qtype, per_channel, reduce_range, name, tuple(shape))
        return shared_initializers(self.graph, source, fn, specs, key)

    def per_tensor(
        self, value: ir.Value, tensor: ir.TensorProtocol, qtype: int, reduce_range: bool
    ) -> list[ir.Value]:
        """``value``'s quantized initializers, per tensor, made on its first reader: a later
        reader (a shared table) gets the first reader's, as in ONNX Runtime."""
        if value not in self.quantized:
            shape = [int(d) for d in tensor.shape.numpy()]
            self.quantized[value] = self.initializers(
                tensor, value.name or "", shape, qtype, False, reduce_range
            )
        return self.quantized[value]

    def activation(self, anchor: ir.Node, value: ir.Value) -> list[ir.Value]:
        """``value`` quantized, its scale and zero point: a quantized Gather's output as it is
        (no requantization, as ONNX Runtime), else one ``DynamicQuantizeLinear`` per value."""
        if value not in self._activations:
            self._activations[value] = _node(
                self.graph,
                anchor,
                "DynamicQuantizeLinear",
                [value],
                f"{value.name}_QuantizeLinear",
                [f"{value.name}_quantized", f"{value.name}_scale", f"{value.name}_zero_point"],
            )
        return self._activations[value]

    def rewrite(self, node: ir.Node) -> int:
        """Quantize a ``Conv`` or ``Gather`` whose weight (table) is a float initializer; 1 if it
        was rewritten, 0 if it stays float."""
        options, op = self.options, node.op_type
        index = 1 if op == "Conv" else 0
        value = node.inputs[index] if len(node.inputs) > index else None
        tensor = value.const_value if value is not None else None
        if (
            value is None
            or tensor is None
            or node.inputs[1 - index] is None
            or not value.is_initializer()
            or value.is_graph_input()
            or tensor.dtype not in _FLOATS
            or op in options.op_block_list
            or _matches(node.name, options.node_block_list)
            or tensor.size < options.min_elements
        ):
            return 0
        qtype = self.qtype if op == "Conv" else TensorProto.UINT8  # a table as an activation
        if qtype not in RUNTIME_WEIGHT_TYPES[op]:
            self._left_float.add((op, qtype))
            return 0
        if op == "Conv":
            self._conv(node, value, tensor)
            return 1
        return self._gather(node, value, tensor)

    def _conv(self, node: ir.Node, weight: ir.Value, tensor: ir.TensorProtocol) -> None:
        """``ConvInteger`` as ONNX Runtime's ``ConvInteger`` operator writes it: the weight per
        tensor (``per_channel`` does not apply), ``Cast``, ``Mul`` by the scales, the bias added
        after a ``Reshape`` to ``[1, -1, 1, ...]``."""
        graph, out = self.graph, node.outputs[0]
        x = typing.cast(ir.Value, node.inputs[0])
        rank = len(tensor.shape)
        w_q, w_scale, w_zp = self.per_tensor(weight, tensor, self.qtype, self.options.reduce_range)
        x_q, x_scale, x_zp = self.activation(node, x)
        name = f"{node.name}_quant" if node.name else ""
        integer, cast = _integer_op(graph, node, "ConvInteger", [x_q, w_q, x_zp, w_zp], name)
        integer.attributes.update(
            {a.name: ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()}
        )
        scales_name = f"{name}_scales_mul" if name else f"{x_scale.name}_{w_scale.name}_mul"
        (scales,) = _node(graph, node, "Mul", [x_scale, w_scale], scales_name, [f"{scales_name}:0"])
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        (result,) = _node(
            graph,
            node,
            "Mul",
            [cast, scales],
            f"{name}_output_scale_mul" if name else "",
            [f"{out.name}quant_scaled_output" if bias is not None else f"{out.name}_q8"],
        )
        if bias is not None:
            shape = np.ones(rank, np.int64)
            shape[1] = -1
            shape_name = f"{out.name}_bias_reshape_shape"
            target = ir.Value(
                name=shape_name,
                shape=ir.Shape([rank]),
                type=ir.TensorType(ir.DataType.INT64),
                const_value=ir.tensor(shape, name=shape_name),
            )
            graph.register_initializer(target)
            (reshaped,) = _node(
                graph, node, "Reshape", [bias, target], "", [f"{out.name}_bias_reshape_output"]
            )
            (result,) = _node(
                graph, node, "Add", [result, reshaped], f"{out.name}_bias_add", [f"{out.name}_q8"]
            )
        _replace(graph, node, result)

    def _gather(self, node: ir.Node, table: ir.Value, tensor: ir.TensorProtocol) -> int:
        """The Gather reads the table in uint8 (asymmetric, per tensor: ONNX Runtime quantizes it
        as an activation) and a ``DequantizeLinear`` gives its readers floats again; readers
        that are quantized themselves read the uint8 rows directly (the ``DequantizeLinear`` is
        then dropped). 0 if the table was already quantized per channel (by a MatMul reading it
        directly), which a per-tensor ``DequantizeLinear`` cannot undo: it stays float."""
        values, scale, zero_point = self.per_tensor(table, tensor, TensorProto.UINT8, False)
        if len(scale.shape or ()) != 0:
            return 0
        out = node.outputs[0]
        name = out.name or ""
        readers = list(out.uses())
        node.replace_input_with(0, values)
        dequantize = ir.Node(
            "",
            "DequantizeLinear",
            [out, scale, zero_point],
            name=f"{name}_DequantizeLinear",
            num_outputs=1,
        )
        result = dequantize.outputs[0]
        result.type, result.shape = ir.TensorType(tensor.dtype), out.shape
        self.graph.insert_after(node, dequantize)
        for reader in readers:
            reader.node.replace_input_with(reader.idx, result)
        outputs = self.graph.outputs
        for i, output in enumerate(outputs):
            if output is out:
                outputs[i] = result
        out.name, out.type = f"{name}_quantized", ir.TensorType(ir.DataType.UINT8)
        result.name = name
        self._activations[result] = [out, scale, zero_point]
        self._dequantize.append(dequantize)
        return 1

    def finish(self) -> None:
        """Drop the ``DequantizeLinear`` nodes no reader is left for; log the ops left float."""
        for node in self._dequantize:
            if not node.outputs[0].uses() and node.outputs[0] not in self.graph.outputs:
                self.graph.remove(node, safe=True)
        for op, qtype in sorted(self._left_float):
            logger.warning(
                "quantize (%s): %s left float in part '%s': not every runtime of "
                "Transformers.js runs it with %s weights (RUNTIME_WEIGHT_TYPES)",
                self.options.mode,
                op,
                self.graph.name or "model",
                ir.DataType(qtype).name.lower(),
            )


@register
class Quantize(ModelPass[QuantizeOptions]):
    """Quantize weights to 4 or 8 bits, byte for byte as ONNX Runtime's quantizers do.

    q4: MatMulNBits (4 bits, block_size along K, symmetric by default, accuracy_level);
    q4f16: q4, to be followed by an fp16 step on the same parts (checked before any work);
    bnb4: MatMulBnb4 (nf4 or fp4, blocks of 64); q8 / int8 / uint8: DynamicQuantizeLinear +
    MatMulInteger, per tensor or per_channel, reduce_range, and as ONNXQuantizer's whole
    IntegerOps registry (Transformers.js's route) also Conv (ConvInteger) and Gather tables
    (uint8 + DequantizeLinear); q8 stores uint8 weights when the part has Conv /
    GroupQueryAttention / MultiHeadAttention, else int8 (Transformers.js's rule).
    MatMuls are rewritten whose B is a constant 2-D float weight, directly or through a Transpose
    (the tied lm_head); with q4's gather option (off by default: Transformers.js's browser
    wasm has no kernel for it), Gathers of a constant 2-D float table become
    GatherBlockQuantized. Weights are quantized with ONNX Runtime's kernels when written, each
    once; a part with nothing to quantize is reported with counts.
    """

    name = "quantize"
    summary = "weights to q4 / q4f16 / bnb4 / q8 / int8 / uint8 (ONNX Runtime's kernels, streamed)"
    Options = QuantizeOptions

    def check_following(self, later: Sequence[ModelPass[typing.Any] | typing.Any]) -> str | None:
        """q4f16 needs an ``fp16`` step after this one on each of its parts (None: fine)."""
        if self.options.mode != "q4f16":
            return None
        mine = self.parts
        for pass_ in later:
            if getattr(pass_, "name", None) != "fp16":
                continue
            if getattr(pass_.options, "dtype", "float16") != "float16":
                continue
            theirs = pass_.parts
            if theirs is None or (mine is not None and set(mine) <= set(theirs)):
                return None
        return (
            "mode q4f16 needs an fp16 step (dtype float16) after it on the same parts; "
            "add `- pass: fp16` with those parts, or use mode q4"
        )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        options = self.options
        counts = {"matmul": 0, "quantized": 0, "computed_b": 0, "blocked": 0, "small": 0}
        weights: dict[ir.Value, list[ir.Value]] = {}
        tables = self._quantize_gathers(graph) if self._gathers_too() else {}
        counts["gather"] = sum(len(readers) for readers in tables.values())
        eight_bit = None
        if options.mode in _EIGHT_BIT:  # the weight type is chosen before any op is rewritten
            eight_bit = _EightBit(options, graph, self._q8_type(graph), weights)
            counts["conv"] = 0
        rewrite = self._rewriter(graph, eight_bit)
        for node in list(graph):
            if node.domain != "":
                continue
            if eight_bit is not None and node.op_type in ("Conv", "Gather"):
                counts[node.op_type.lower()] += eight_bit.rewrite(node)
                continue
            if node.op_type != "MatMul":
                continue
            counts["matmul"] += 1
            weight = self._weight(node)
            if weight is None:
                counts["computed_b"] += 1
            elif "MatMul" in options.op_block_list or _matches(node.name, options.node_block_list):
                counts["blocked"] += 1
            elif weight.stored.size < options.min_elements:
                counts["small"] += 1
            else:
                if weight.key not in weights:
                    weights[weight.key] = self._quantized_initializers(graph, weight, eight_bit)
                rewrite(node, weight, weights[weight.key])
                counts["quantized"] += 1
        if eight_bit is not None:
            eight_bit.finish()
        for key in [*weights, *tables]:
            self._drop_float(graph, key)
        self.statistics = counts
        if tables:  # int4 initializers: ONNX Runtime's quantizer raises the opset and IR as well
            _require_int4(model)
        if not weights and not tables:
            logger.warning(
                "quantize: no eligible MatMul in part '%s' (%d MatMul: %d with a computed B, "
                "%d blocked, %d under min_elements); it stays float",
                graph.name or "model",
                counts["matmul"],
                counts["computed_b"],
                counts["blocked"],
                counts["small"],
            )
            return ir.passes.PassResult(model, modified=False)
        if options.mode not in _EIGHT_BIT:
            model.opset_imports.setdefault(_MS_DOMAIN, 1)
            graph.opset_imports.setdefault(_MS_DOMAIN, 1)
        logger.info(
            "quantize (%s): %d MatMul, %d Conv and %d Gather rewritten, %d weights and tables in "
            "part '%s'",
            options.mode,
            counts["quantized"],
            counts.get("conv", 0),
            counts["gather"],
            len(weights) + len(tables),
            graph.name or "model",
        )
        return ir.passes.PassResult(model, modified=True)

    def _gathers_too(self) -> bool:
        options = self.options
        return (
            options.mode in ("q4", "q4f16")
            and options.gather
            and "Gather" not in options.op_block_list
        )

    def _quantize_gathers(self, graph: ir.Graph) -> dict[ir.Value, list[ir.Node]]:
        """Rewrite each ``Gather`` of a constant 2-D float table as ``GatherBlockQuantized``, as
        ``MatMulNBitsQuantizer`` does with ``op_types_to_quantize`` including Gather (quantize
        axis 1: blocks along each row; the Gather's axis kept). A table read by several Gathers
        is quantized once. Returns table → the new nodes reading its quantized form."""
        options = self.options
        block, symmetric = options.block, options.symmetric
        tables: dict[ir.Value, list[ir.Node]] = {}
        quantized: dict[ir.Value, list[ir.Value]] = {}
        for node in list(graph):
            if node.op_type != "Gather" or node.domain != "" or len(node.inputs) != 2:
                continue
            table, ids = node.inputs
            tensor = table.const_value if table is not None else None
            if (
                table is None
                or ids is None
                or tensor is None
                or not table.is_initializer()
                or table.is_graph_input()
                or tensor.dtype not in _FLOATS
                or len(tensor.shape) != 2
                or _matches(node.name, options.node_block_list)
                or tensor.size < options.min_elements
            ):
                continue
            if table not in quantized:
                rows, cols = (int(d) for d in tensor.shape.numpy())
                k_blocks = -(-cols // block)
                itype = ir.DataType.INT4 if symmetric else ir.DataType.UINT4
                specs = [
                    (f"{table.name}_Q4", itype, [rows, cols]),
                    (f"{table.name}_scales", tensor.dtype, [rows, k_blocks]),
                ]
                if not symmetric:
                    specs.append((f"{table.name}_zero_points", itype, [rows, k_blocks]))
                fn = lambda array: gather_q4_arrays(array, block, symmetric)  # noqa: E731
                key = ("gather-q4", block, symmetric)
                quantized[table] = shared_initializers(graph, tensor, fn, specs, key)
            data, scales, *zero_points = quantized[table]
            (result,) = _node(
                graph,
                node,
                "GatherBlockQuantized",
                [data, ids, scales, *zero_points],
                f"{node.name}_Q4" if node.name else "",
                [f"{node.outputs[0].name}_Q4"],
                _MS_DOMAIN,
                gather_axis=node.attributes.get_int("axis", 0),
                quantize_axis=1,
                block_size=block,
            )
            _replace(graph, node, result)
            tables.setdefault(table, []).append(typing.cast(ir.Node, result.producer()))
        return tables

    def _weight(self, node: ir.Node) -> _Weight | None:
        """The MatMul's B as a constant ``[K, N]`` float weight, or None if it is not one."""
        b = node.inputs[1] if len(node.inputs) > 1 else None
        a = node.inputs[0]
        if b is None or a is None or a.const_value is not None:
            return None
        transpose = b.producer()
        source = b
        if transpose is not None:
            if (
                transpose.op_type != "Transpose"
                or transpose.domain != ""
                or list(transpose.attributes.get_ints("perm", [1, 0]) or []) != [1, 0]
                or transpose.inputs[0] is None
            ):
                return None
            source = transpose.inputs[0]
        tensor = source.const_value
        if (
            tensor is None
            or not source.is_initializer()
            or source.is_graph_input()
            or tensor.dtype not in _FLOATS
            or len(tensor.shape) != 2
        ):
            return None
        return _Weight(b, b.name or f"{source.name}_transposed", tensor, transpose)

    def _quantized_initializers(
        self, graph: ir.Graph, weight: _Weight, eight_bit: _EightBit | None
    ) -> list[ir.Value]:
        """The lazily quantized initializers of one weight, declared together, sharing one run."""
        options = self.options
        k, n = weight.shape
        dtype = weight.stored.dtype
        w = weight.name
        fn: Callable[[np.ndarray], Sequence[np.ndarray]]
        specs: list[tuple[str, ir.DataType, list[int]]]
        if options.mode in ("q4", "q4f16"):
            block, symmetric = options.block, options.symmetric
            k_blocks = -(-k // block)
            fn = lambda array: q4_arrays(_kernels(), array, block, symmetric)  # noqa: E731
            fn_key: tuple[object, ...] = ("q4", block, symmetric)
            specs = [
                (f"{w}_Q4", ir.DataType.UINT8, [n, k_blocks, (block + 1) // 2]),
                (f"{w}_scales", dtype, [n, k_blocks]),
            ]
            if not symmetric:
                specs.append((f"{w}_zero_points", ir.DataType.UINT8, [n, (k_blocks + 1) // 2]))
        elif options.mode == "bnb4":
            block, kind = options.block, 1 if options.quant_type == "nf4" else 0
            fn = lambda array: bnb4_arrays(_kernels(), array, block, kind)  # noqa: E731
            fn_key = ("bnb4", block, kind)
            specs = [
                (f"{w}_Bnb4", ir.DataType.UINT8, [(k * n + 1) // 2]),
                (f"{w}_absmax", dtype, [-(-(k * n) // block)]),
            ]
        else:
            assert eight_bit is not None
            return eight_bit.initializers(
                weight.stored,
                w,
                [k, n],
                eight_bit.qtype,
                options.per_channel,
                options.reduce_range,
                weight.matrix,
            )
        key = (fn_key, weight.transpose is not None)  # the arrays, given the stored weight
        return shared_initializers(
            graph, weight.stored, lambda stored: fn(weight.matrix(stored)), specs, key
        )

    def _q8_type(self, graph: ir.Graph) -> int:
        """The 8-bit weight type: int8 or uint8 by mode; q8 by the ops of the part as given."""
        mode = self.options.mode
        if mode == "int8" or (
            mode == "q8" and not any(n.op_type in QUINT8_OPS for n in graph.all_nodes())
        ):
            return TensorProto.INT8
        return TensorProto.UINT8

    def _rewriter(
        self, graph: ir.Graph, eight_bit: _EightBit | None
    ) -> Callable[[ir.Node, _Weight, list[ir.Value]], None]:
        """The function replacing one MatMul by its quantized form, per mode."""
        options = self.options
        if options.mode in ("q4", "q4f16", "bnb4"):

            def four_bit(node: ir.Node, weight: _Weight, inits: list[ir.Value]) -> None:
                k, n = weight.shape
                a = node.inputs[0]
                if options.mode == "bnb4":
                    op, tag = "MatMulBnb4", "Bnb4"
                    attrs = {"K": k, "N": n, "block_size": options.block}
                    attrs["quant_type"] = 1 if options.quant_type == "nf4" else 0
                else:
                    op, tag = "MatMulNBits", "Q4"
                    attrs = {"K": k, "N": n, "bits": 4, "block_size": options.block}
                    if options.accuracy_level:  # as ONNX Runtime: 0 is left out
                        attrs["accuracy_level"] = options.accuracy_level
                (result,) = _node(
                    graph,
                    node,
                    op,
                    [a, *inits],
                    f"{node.name}_{tag}" if node.name else "",
                    [f"{node.outputs[0].name}_{tag}"],
                    _MS_DOMAIN,
                    **attrs,
                )
                _replace(graph, node, result)

            return four_bit

        assert eight_bit is not None

        def eight_bit_matmul(node: ir.Node, weight: _Weight, inits: list[ir.Value]) -> None:
            a = node.inputs[0]
            assert a is not None
            out = node.outputs[0]
            base = node.name or f"{out.name}_matmul"
            a_q, a_scale, a_zp = eight_bit.activation(node, a)
            b_q, b_scale, b_zp = inits
            _, cast = _integer_op(
                graph, node, "MatMulInteger", [a_q, b_q, a_zp, b_zp], f"{base}_quant"
            )
            (scales,) = _node(
                graph,
                node,
                "Mul",
                [a_scale, b_scale],
                f"{base}_scales_mul",
                [f"{base}_scales_mul:0"],
            )
            (result,) = _node(
                graph, node, "Mul", [cast, scales], f"{base}_output_scale_mul", [f"{out.name}_q8"]
            )
            _replace(graph, node, result)

        return eight_bit_matmul

    def _drop_float(self, graph: ir.Graph, key: ir.Value) -> None:
        """Remove the float weight (and its Transpose) once no reader is left."""
        producer = key.producer()
        if producer is not None:
            if key.uses() or key in graph.outputs:
                return
            source = producer.inputs[0]
            graph.remove(producer, safe=True)
            key = typing.cast(ir.Value, source)
        name = key.name or ""
        if not key.uses() and key not in graph.outputs and name in graph.initializers:
            graph.initializers.pop(name)
