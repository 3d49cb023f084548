"""The numbers of :mod:`passes.quantize`: ONNX Runtime's quantization kernels, one weight per call,
and the lazy initializers that share one call.

Reused, not re-implemented: ONNX Runtime's C++ packing kernels (``quantize_matmul_4bits``,
``quantize_matmul_bnb4``) and, for 8 bits, the quantizer's own ``quant_utils.quantize_data``
(scale, zero point and values), called per weight exactly as its quantizers call them (same
padding, transposes, shapes and dtypes), so every array is byte-identical to theirs. Embedding
tables (``GatherBlockQuantized``) have no C++ kernel in ONNX Runtime: its ``MatMulNBitsQuantizer``
quantizes them in numpy (``DefaultWeightOnlyQuantizer.quantize_ndarray``), and so do we, with that
very function. ``quantize_matmul_4bits`` on the transposed table is not a substitute: it rounds
differently (measured: 5 of 20 random tables differ in a few nibbles, symmetric; 8 of 20
asymmetric).

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
    "GATHER_ROWS",
    "bnb4_arrays",
    "gather_q4_arrays",
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


#: Rows of an embedding table per call of ONNX Runtime's Gather quantizer (even, so a chunk's
#: int4 values and zero points start on a byte boundary): a few MiB of its temporaries per call.
GATHER_ROWS = 4096


def gather_q4_arrays(
    table: np.ndarray, block_size: int, symmetric: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Packed int4 (uint4 when asymmetric) values, scales and packed zero points of a ``[rows,
    cols]`` table quantized along its rows: ``MatMulNBitsQuantizer``'s Gather path
    (``DefaultWeightOnlyQuantizer.quantize_ndarray``, axis 1), called on chunks of
    :data:`GATHER_ROWS` rows into preallocated results. Rows are quantized independently, so the
    bytes equal one call on the whole table's without its whole-table temporaries."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantizer

    rows, cols = table.shape
    k_blocks = -(-cols // block_size)
    packed = np.empty(-(-rows * cols // 2), np.uint8)
    scales = np.empty((rows, k_blocks), table.dtype)
    zero_points = np.empty(0 if symmetric else -(-rows * k_blocks // 2), np.uint8)
    for start in range(0, rows, GATHER_ROWS):
        stop = min(start + GATHER_ROWS, rows)
        values, chunk_scales, chunk_zero_points = DefaultWeightOnlyQuantizer.quantize_ndarray(
            table[start:stop], 1, block_size, symmetric
        )
        packed[start * cols // 2 : start * cols // 2 + values.size] = values
        scales[start:stop] = chunk_scales
        if chunk_zero_points is not None:
            offset = start * k_blocks // 2
            zero_points[offset : offset + chunk_zero_points.size] = chunk_zero_points
    return packed, scales, zero_points


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
