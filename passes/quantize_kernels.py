"""The numbers of :mod:`passes.quantize`: ONNX Runtime's quantization kernels, one weight per call,
and the lazy initializers that share one call.

Reused, not re-implemented: ONNX Runtime's C++ packing kernels (``quantize_matmul_4bits``,
``quantize_matmul_bnb4``) and, for 8 bits, the quantizer's own ``quant_utils.quantize_data``
(scale, zero point and values), called per weight exactly as its quantizers call them (same
padding, transposes, shapes and dtypes), so every array is byte-identical to theirs.

Each weight's arrays are computed once by a :class:`surgery.lazy.SharedComputation` when the
writer reaches the first of its initializers (:func:`shared_initializers`), and let go after the
last. The kernels are passed in by the caller (:func:`ort_kernels` imports them late: CLI
start-up need not load ONNX Runtime).
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir
from onnx import TensorProto

from surgery.lazy import DerivedTensor, SharedComputation

__all__ = [
    "bnb4_arrays",
    "ort_kernels",
    "q4_arrays",
    "q8_arrays",
    "shared_initializers",
    "transposed",
]


def ort_kernels() -> typing.Any:
    """ONNX Runtime's packing kernels (``onnxruntime.capi._pybind_state``)."""
    from onnxruntime.capi import _pybind_state

    return _pybind_state


def q4_arrays(
    kernels: typing.Any, weight: np.ndarray, block_size: int, symmetric: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Packed values, scales and zero points: ``DefaultWeightOnlyQuantizer.qbits_block_quant``."""
    rows, cols = weight.shape
    k_blocks = (rows + block_size - 1) // block_size
    blob_size = (block_size + 1) // 2
    pad = k_blocks * block_size - rows
    if pad:
        weight = np.pad(weight, ((0, pad), (0, 0)), "constant")
    weight = np.ascontiguousarray(weight)
    packed = np.zeros((cols, k_blocks, blob_size), dtype=np.uint8)
    zero_points = np.zeros((cols, (k_blocks + 1) // 2), dtype=np.uint8)
    scales = np.zeros((cols, k_blocks), dtype=weight.dtype)
    kernels.quantize_matmul_4bits(
        packed, weight, scales, zero_points, block_size, cols, rows, symmetric
    )
    return packed, scales, zero_points


def bnb4_arrays(
    kernels: typing.Any, weight: np.ndarray, block_size: int, quant_type: int
) -> tuple[np.ndarray, ...]:
    """Packed values and absmax: ``MatMulBnb4Quantizer.bnb4_block_quant``."""
    transposed = weight.transpose().copy()
    rows, cols = weight.shape
    numel = rows * cols
    packed = np.zeros((numel + 1) // 2, dtype=np.uint8)
    absmax = np.zeros((numel + block_size - 1) // block_size, dtype=weight.dtype)
    kernels.quantize_matmul_bnb4(packed, transposed, absmax, block_size, quant_type, cols, rows)
    return packed, absmax


def q8_arrays(
    weight: np.ndarray, qtype: int, per_channel: bool, reduce_range: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantized values, scale and zero point as ``ONNXQuantizer.quantize_initializer`` (per
    tensor) or ``quantize_weight_per_channel`` (axis -1) compute them for a MatMul weight."""
    from onnxruntime.quantization.quant_utils import quantize_data

    symmetric = qtype == TensorProto.INT8  # BaseQuantizer.is_weight_symmetric
    dtype = np.int8 if qtype == TensorProto.INT8 else np.uint8
    if not per_channel:
        zero_point, scale, values = quantize_data(weight.flatten(), qtype, symmetric, reduce_range)
        return (
            np.asarray(values, dtype=dtype).reshape(weight.shape),
            np.asarray(scale, dtype=weight.dtype).reshape(()),
            np.asarray(zero_point, dtype=dtype).reshape(()),
        )
    columns = [
        quantize_data(weight.take(i, -1).flatten(), qtype, symmetric, reduce_range)
        for i in range(weight.shape[-1])
    ]
    values = np.concatenate([np.asarray(q).reshape(-1, 1) for _, _, q in columns], -1)
    return (
        np.asarray(values, dtype=dtype).reshape(weight.shape),
        np.hstack([s for _, s, _ in columns]).astype(weight.dtype),
        np.hstack([z for z, _, _ in columns]).astype(dtype),
    )


def transposed(source: ir.TensorProtocol, name: str) -> ir.TensorProtocol:
    """The transpose of a 2-D tensor, computed when read."""
    rows, cols = source.shape.numpy()
    return DerivedTensor(
        source,
        lambda array: np.ascontiguousarray(array.T),
        shape=ir.Shape([cols, rows]),
        name=name,
    )


def shared_initializers(
    graph: ir.Graph,
    source: ir.TensorProtocol,
    fn: Callable[[np.ndarray], Sequence[np.ndarray]],
    specs: Sequence[tuple[str, ir.DataType, list[int]]],
) -> list[ir.Value]:
    """One initializer of ``graph`` per ``(name, dtype, shape)`` of ``specs``, holding the arrays
    ``fn(source)`` gives in that order, computed once for all of them when first read."""
    group = SharedComputation(source, lambda array: fn(array)[: len(specs)])
    values = []
    for index, (name, dtype, shape) in enumerate(specs):
        tensor = group.member(index, name=name, dtype=dtype, shape=ir.Shape(shape))
        value = ir.Value(
            name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype), const_value=tensor
        )
        graph.register_initializer(value)
        values.append(value)
    return values
