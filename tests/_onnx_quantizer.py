"""The anchor of the 8-bit tests: ONNX Runtime's ``ONNXQuantizer`` called as Transformers.js's
``scripts/quantize.py`` calls it in ``quantize_q8`` (IntegerOps, dynamic, uint8 activations,
``EnableSubgraph`` and ``MatMulConstBOnly``)."""

from __future__ import annotations

from collections.abc import Iterable

import onnx


def transformersjs_q8(
    model: onnx.ModelProto,
    *,
    per_channel: bool,
    reduce_range: bool,
    unsigned: bool,
    op_types: Iterable[str],
) -> onnx.ModelProto:
    """``model`` quantized to 8 bits: uint8 weights if ``unsigned`` else int8, ``op_types`` only."""
    from onnxruntime.quantization import QuantizationMode, QuantType
    from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer

    quantizer = ONNXQuantizer(
        model,
        per_channel,
        reduce_range,
        mode=QuantizationMode.IntegerOps,
        static=False,
        weight_qType=QuantType.QUInt8 if unsigned else QuantType.QInt8,
        activation_qType=QuantType.QUInt8,
        tensors_range=None,
        nodes_to_quantize=[],
        nodes_to_exclude=[],
        op_types_to_quantize=set(op_types),
        extra_options={"EnableSubgraph": True, "MatMulConstBOnly": True},
    )
    return quantizer.quantize_model()
