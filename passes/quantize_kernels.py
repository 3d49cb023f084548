"""The numbers of :mod:`passes.quantize`: ONNX Runtime's quantization kernels, one weight per call,
and the lazy initializers that share one call.

Reused, not re-implemented: ONNX Runtime's C++ packing kernels (``quantize_matmul_4bits``,
``quantize_matmul_bnb4``) and, for 8 bits, the quantizer's own ``compute_data_quant_params`` for
the scale and zero point (the first half of ``quant_utils.quantize_data``), called per weight as
its quantizers call them (same padding, transposes, shapes and dtypes), so every array is
byte-identical to theirs. Embedding tables (``GatherBlockQuantized``) have no C++ kernel in ONNX
Runtime: its ``MatMulNBitsQuantizer`` quantizes them in numpy
(``DefaultWeightOnlyQuantizer.quantize_ndarray``), and so do we, with that very function.
``quantize_matmul_4bits`` on the transposed table is not a substitute: it rounds differently
(measured: 5 of 20 random tables differ in a few nibbles, symmetric; 8 of 20 asymmetric).

Where this departs from the quantizers' own calls, for speed and memory, the bytes unchanged
(each tested against them): the 8-bit values come from ONNX Runtime's ``QuantizeLinear`` in a
one-node session over row blocks, not from ``quantize_nparray`` (the same arithmetic in one pass
instead of five, :func:`q8_arrays`); ``bnb4`` runs its kernel on strips of whole blocks
transposed in tiles, and ``q4`` on the weight itself where nothing needs padding, instead of on
whole transposed or padded copies (:func:`bnb4_arrays`, :func:`q4_arrays`). The kernels hold
Python's GIL while they run (``onnxruntime_pybind_quant.cc`` releases it nowhere) but spread each
call over their own intra-op thread pool (measured on 2 cores: 0.163 s of CPU in 0.087 s for a
2304 × 9216 q4 weight), so they keep the cores busy even while the writer's other threads wait.
Not done, measured: running them in worker processes (the weight mapped from its file there,
the packed arrays sent back through a pipe) made the half-scale bench 19.8 s instead of 17.6 s.

Each weight's arrays are computed once by a :class:`surgery.lazy.SharedComputation` when the
writer reaches the first of its initializers (:func:`shared_initializers`), and let go after the
last; its key (kernel and options) lets the writer copy the bytes of a second variant computing
the same (q4f16 after q4) instead of quantizing again. The kernels are passed in by the caller
(:func:`ort_kernels` imports them late: CLI start-up need not load ONNX Runtime).
"""

from __future__ import annotations

import functools
import math
import typing
from collections.abc import Callable, Hashable, Sequence

import numpy as np
import onnx_ir as ir
from onnx import TensorProto
from onnx import helper as oh

from surgery.lazy import SharedComputation
from surgery.transpose import transpose_into

if typing.TYPE_CHECKING:
    import onnxruntime as ort

__all__ = [
    "BLOCK_BYTES",
    "GATHER_ROWS",
    "bnb4_arrays",
    "gather_q4_arrays",
    "ort_kernels",
    "q4_arrays",
    "q8_arrays",
    "shared_initializers",
]


def ort_kernels() -> typing.Any:
    """ONNX Runtime's packing kernels (``onnxruntime.capi._pybind_state``)."""
    from onnxruntime.capi import _pybind_state

    return _pybind_state


#: Bytes of a weight read per step of the 4- and 8-bit paths: their temporaries (ONNX Runtime's
#: ``quantize_nparray`` makes a few float32 copies of what it is given) stay a few times this.
BLOCK_BYTES = 8 << 20


def _strip_into(out: np.ndarray, view: np.ndarray) -> None:
    """``out[...] = view``; tile by tile where ``view`` is a transposed view of a stored array."""
    if view.strides[0] < view.strides[1]:  # walks the stored array down its columns
        transpose_into(view.T, out)
    else:
        out[...] = view


def q4_arrays(
    kernels: typing.Any, weight: np.ndarray, block_size: int, symmetric: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Packed values, scales and zero points: ``DefaultWeightOnlyQuantizer.qbits_block_quant``.

    A contiguous weight whose K is a multiple of ``block_size`` is given to the kernel as it is
    (its quantizer pads a copy, with nothing to pad here). Otherwise one call per strip of about
    :data:`BLOCK_BYTES` of ``weight``'s columns, padded (each column is quantized alone, so the
    bytes equal one call's), so a transposed view is not copied whole."""
    rows, cols = weight.shape
    k_blocks = (rows + block_size - 1) // block_size
    blob_size = (block_size + 1) // 2
    pad = k_blocks * block_size - rows
    packed = np.zeros((cols, k_blocks, blob_size), dtype=np.uint8)
    zero_points = np.zeros((cols, (k_blocks + 1) // 2), dtype=np.uint8)
    scales = np.zeros((cols, k_blocks), dtype=weight.dtype)
    if pad == 0 and weight.flags.c_contiguous:
        kernels.quantize_matmul_4bits(
            packed, weight, scales, zero_points, block_size, cols, rows, symmetric
        )
        return packed, scales, zero_points
    strip = max(1, BLOCK_BYTES // max(1, weight.dtype.itemsize * (rows + pad)))
    part = np.zeros((rows + pad, min(strip, cols)), weight.dtype)  # the padding rows stay 0
    for start in range(0, cols, strip):
        columns = slice(start, min(start + strip, cols))
        width = columns.stop - columns.start
        if width < part.shape[1]:  # the last strip
            part = np.zeros((rows + pad, width), weight.dtype)
        _strip_into(part[:rows], weight[:, columns])
        part_packed = np.zeros((width, k_blocks, blob_size), dtype=np.uint8)
        part_zero_points = np.zeros((width, (k_blocks + 1) // 2), dtype=np.uint8)
        part_scales = np.zeros((width, k_blocks), dtype=weight.dtype)
        kernels.quantize_matmul_4bits(
            part_packed, part, part_scales, part_zero_points, block_size, width, rows, symmetric
        )
        packed[columns], scales[columns], zero_points[columns] = (
            part_packed,
            part_scales,
            part_zero_points,
        )
    return packed, scales, zero_points


def bnb4_arrays(
    kernels: typing.Any, weight: np.ndarray, block_size: int, quant_type: int
) -> tuple[np.ndarray, ...]:
    """Packed values and absmax: ``MatMulBnb4Quantizer.bnb4_block_quant``, which gives the
    kernel the transpose of ``weight`` (``[N, K]``), whose blocks run over its flat values.

    Here one call per strip of about :data:`BLOCK_BYTES` of that transpose's rows, each a whole
    number of blocks (so the bytes equal one call's), transposed in tiles
    (:mod:`surgery.transpose`): no whole transposed copy, and none at all where ``weight`` is
    already a transposed view (a tied lm_head under its Transpose)."""
    rows, cols = weight.shape  # K, N
    numel = rows * cols
    packed = np.zeros((numel + 1) // 2, dtype=np.uint8)
    absmax = np.zeros((numel + block_size - 1) // block_size, dtype=weight.dtype)
    step = block_size // math.gcd(rows, block_size)  # rows of the transpose per whole blocks
    strip = max(step, BLOCK_BYTES // max(1, rows * weight.dtype.itemsize) // step * step)
    stored = weight.T.flags.c_contiguous
    buffer = None if stored else np.empty((min(strip, cols), rows), weight.dtype)
    for start in range(0, cols, strip):
        view = weight[:, start : start + strip].T  # [strip, K]
        if buffer is None:
            source = view
        else:
            source = buffer[: view.shape[0]]
            transpose_into(weight[:, start : start + strip], source)
        first, count = start * rows, view.shape[0] * rows
        kernels.quantize_matmul_bnb4(
            packed[first // 2 : (first + count + 1) // 2],
            source,
            absmax[first // block_size : (first + count + block_size - 1) // block_size],
            block_size,
            quant_type,
            view.shape[0],
            rows,
        )
    return packed, absmax


def _row_blocks(weight: np.ndarray) -> list[slice]:
    """Slices of about :data:`BLOCK_BYTES` of ``weight``'s rows (the last one ragged)."""
    rows = max(1, BLOCK_BYTES // max(1, weight[:1].nbytes))
    return [slice(start, start + rows) for start in range(0, weight.shape[0], rows)]


def q8_arrays(
    weight: np.ndarray, qtype: int, per_channel: bool, reduce_range: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantized values, scale and zero point as ``ONNXQuantizer.quantize_initializer`` (per
    tensor) or ``quantize_weight_per_channel`` (axis -1) compute them for a ``[K, N]`` MatMul
    weight.

    Its ``quantize_data`` would make several whole-weight float32 temporaries, so it is split in
    its own two steps: the minimum and maximum (of the weight, or of each column) are gathered over
    row blocks, ``compute_data_quant_params`` turns them into the scale and zero point (given the
    two-element array ``[min, max]``, whose extremes are the weight's), and ``quantize_nparray``
    quantizes one row block at a time into the result. Both steps are elementwise or exact
    reductions, so the bytes equal one ``quantize_data`` call's (the values by ONNX Runtime's
    ``QuantizeLinear``: :func:`_quantize_rows`). A ``weight`` that is the transposed view of a
    stored array is read in blocks of the stored rows, not copied."""
    from onnxruntime.quantization.quant_utils import compute_data_quant_params

    symmetric = qtype == TensorProto.INT8  # BaseQuantizer.is_weight_symmetric
    dtype = np.int8 if qtype == TensorProto.INT8 else np.uint8
    values = np.empty(weight.shape, dtype)
    flip = not weight.flags.c_contiguous and weight.T.flags.c_contiguous  # stored as [N, K]
    stored, out = (weight.T, values.T) if flip else (weight, values)
    blocks = _row_blocks(stored) if weight.size else []

    def params(low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        extremes = np.array([low, high], weight.dtype) if blocks else np.empty(0, weight.dtype)
        return compute_data_quant_params(extremes, qtype, symmetric, reduce_range)

    if not per_channel:
        zero_point, scale = params(
            np.min([stored[rows].min() for rows in blocks] or [0]),
            np.max([stored[rows].max() for rows in blocks] or [0]),
        )
        for rows in blocks:
            _quantize_rows(qtype, stored[rows], scale, zero_point, 0, out[rows])
        return (
            values,
            np.asarray(scale, dtype=weight.dtype).reshape(()),
            np.asarray(zero_point, dtype=dtype).reshape(()),
        )
    columns = weight.shape[-1]
    low = np.full(columns, np.inf, weight.dtype)
    high = np.full(columns, -np.inf, weight.dtype)
    for rows in blocks:  # a channel is a column of weight: a row of stored when flipped
        if flip:
            low[rows], high[rows] = stored[rows].min(1), stored[rows].max(1)
        else:
            np.minimum(low, stored[rows].min(0), out=low)
            np.maximum(high, stored[rows].max(0), out=high)
    channels = [params(low[i], high[i]) for i in range(columns)]
    zero_points = np.hstack([z for z, _ in channels]).astype(dtype)
    scales = np.hstack([s for _, s in channels]).astype(weight.dtype)
    for rows in blocks:
        if flip:
            _quantize_rows(qtype, stored[rows], scales[rows], zero_points[rows], 0, out[rows])
        else:
            _quantize_rows(qtype, stored[rows], scales, zero_points, 1, out[rows])
    return values, scales, zero_points


@functools.cache
def _quantize_linear(qtype: int, axis: int) -> ort.InferenceSession:
    """``QuantizeLinear(x, scale, zero_point, axis)`` on a 2-D float32 ``x``, on one thread (the
    writer already quantizes in parallel, weight by weight)."""
    import onnxruntime as ort

    graph = oh.make_graph(
        [oh.make_node("QuantizeLinear", ["x", "scale", "zero_point"], ["y"], axis=axis)],
        "quantize_linear",
        [
            oh.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", "cols"]),
            oh.make_tensor_value_info("scale", TensorProto.FLOAT, None),
            oh.make_tensor_value_info("zero_point", qtype, None),
        ],
        [oh.make_tensor_value_info("y", qtype, ["rows", "cols"])],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _quantize_rows(
    qtype: int,
    rows: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray,
    axis: int,
    out: np.ndarray,
) -> None:
    """``out[...] = quantize_nparray(qtype, rows, scale, zero_point)``, the scale and zero point
    scalars or 1-D along ``axis``.

    A C-contiguous float32 block goes through ONNX Runtime's ``QuantizeLinear`` instead (measured:
    0.055 s against numpy's 0.33 s for 256 MiB, whose five whole-block passes it does in one):
    both compute ``x / scale`` in float32, round half to even, add the zero point and saturate to
    the type's range, so the bytes are the same (tested against ``quantize_nparray``, ties
    included). Other blocks (and a ``Conv``'s 4-D weight, a few MiB) take ``quantize_nparray``
    itself."""
    if rows.dtype != np.float32 or not rows.flags.c_contiguous or rows.ndim != 2:
        if scale.ndim == 1 and axis == 0:
            scale, zero_point = scale[:, None], zero_point[:, None]
        from onnxruntime.quantization.quant_utils import quantize_nparray

        out[...] = quantize_nparray(qtype, rows, scale, zero_point)
        return
    target = out if out.flags.c_contiguous else np.empty(rows.shape, out.dtype)
    session = _quantize_linear(qtype, axis)  # once: two threads' first calls may make two
    binding = session.io_binding()
    binding.bind_cpu_input("x", rows)
    binding.bind_cpu_input("scale", np.ascontiguousarray(scale, np.float32))
    binding.bind_cpu_input("zero_point", np.ascontiguousarray(zero_point, out.dtype))
    binding.bind_output("y", "cpu", 0, out.dtype, list(rows.shape), target.ctypes.data)
    session.run_with_iobinding(binding)
    if target is not out:  # a transposed view of the result (a tied lm_head's)
        transpose_into(target, out.T)


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


def shared_initializers(
    graph: ir.Graph,
    source: ir.TensorProtocol,
    fn: Callable[[np.ndarray], Sequence[np.ndarray]],
    specs: Sequence[tuple[str, ir.DataType, list[int]]],
    key: Hashable,
) -> list[ir.Value]:
    """One initializer of ``graph`` per ``(name, dtype, shape)`` of ``specs``, holding the arrays
    ``fn(source)`` gives in that order, computed once for all of them when first read. ``key``
    says what ``fn`` computes from ``source`` (kernel and options): another part's initializers
    of the same source and key (q4 and q4f16) are the same bytes, which the writer copies."""
    group = SharedComputation(source, lambda array: fn(array)[: len(specs)], key=key)
    values = []
    for index, (name, dtype, shape) in enumerate(specs):
        tensor = group.member(index, name=name, dtype=dtype, shape=ir.Shape(shape))
        value = ir.Value(
            name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype), const_value=tensor
        )
        graph.register_initializer(value)
        values.append(value)
    return values
