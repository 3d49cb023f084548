"""quantize: where it fires, streaming (each weight quantized once, few held), bad input."""

from __future__ import annotations

import logging
import re
import tracemalloc
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from _onnx_quantizer import transformersjs_q8
from onnx import TensorProto, helper, numpy_helper

from passes.quantize import Quantize
from surgery import writer
from surgery.errors import SurgeryError
from surgery.io import load_model
from surgery.lazy import SharedComputation, SharedTensor
from surgery.recipe import parse_recipe

WIDTH = 256


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(
        model, path, save_as_external_data=True, location=f"{path.name}.data", size_threshold=0
    )
    return path


def _chain(tmp_path: Path, layers: int) -> Path:
    """``layers`` MatMuls in a row, each with its own [WIDTH, WIDTH] weight, on disk."""
    rng = np.random.default_rng(0)
    nodes, weights = [], []
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"h{i + 1}"], name=f"mm{i}"))
        weights.append(
            numpy_helper.from_array(
                rng.standard_normal((WIDTH, WIDTH), dtype=np.float32) / 16, f"w{i}"
            )
        )
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("h0", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info(f"h{layers}", TensorProto.FLOAT, ["batch", WIDTH])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return _save(model, tmp_path / f"chain{layers}.onnx")


def _tied(tmp_path: Path) -> Path:
    """A Linear, a tied embedding read by Gather and by Transpose → MatMul, a computed B, and a
    weight shared by two MatMuls."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("MatMul", ["x", "weight"], ["hidden"], name="linear"),
        helper.make_node("Gather", ["tied", "ids"], ["embedded"], axis=0, name="embed"),
        helper.make_node("Transpose", ["tied"], ["tied_t"], perm=[1, 0], name="tied_transpose"),
        helper.make_node("MatMul", ["hidden", "tied_t"], ["logits"], name="lm_head"),
        helper.make_node("MatMul", ["x", "shared"], ["a"], name="shared_a"),
        helper.make_node("MatMul", ["hidden", "shared"], ["b"], name="shared_b"),
        helper.make_node("Transpose", ["x"], ["x_t"], perm=[1, 0], name="x_transpose"),
        helper.make_node("MatMul", ["x", "x_t"], ["gram"], name="gram"),
    ]
    weights = {
        "weight": rng.standard_normal((64, 64), dtype=np.float32),
        "tied": rng.standard_normal((48, 64), dtype=np.float32),
        "shared": rng.standard_normal((64, 32), dtype=np.float32),
    }
    outputs = {"embedded": [3, 64], "logits": [3, 48], "a": [3, 32], "b": [3, 32], "gram": [3, 3]}
    graph = helper.make_graph(
        nodes,
        "tied",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 64]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [3]),
        ],
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in outputs.items()],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return _save(model, tmp_path / "tied.onnx")


def _groups(model: ir.Model) -> set[SharedComputation]:
    return {
        v.const_value.group
        for v in model.graph.initializers.values()
        if isinstance(v.const_value, SharedTensor)
    }


@pytest.mark.parametrize("mode", ["q4", "bnb4", "q8"])
def test_each_weight_is_quantized_once_and_only_a_few_are_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    import onnxruntime.quantization.quant_utils as quant_utils
    from onnxruntime.capi import _pybind_state

    calls: list[str] = []

    def counted(name: str, function: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return function(*args, **kwargs)

        return call

    kernels = types.SimpleNamespace(
        quantize_matmul_4bits=counted("4bits", _pybind_state.quantize_matmul_4bits),
        quantize_matmul_bnb4=counted("bnb4", _pybind_state.quantize_matmul_bnb4),
    )
    monkeypatch.setattr("passes.quantize._kernels", lambda: kernels)
    monkeypatch.setattr(  # once per weight per tensor, ahead of its row blocks' quantize_nparray
        quant_utils,
        "compute_data_quant_params",
        counted("8bits", quant_utils.compute_data_quant_params),
    )
    monkeypatch.setattr(writer, "AHEAD_BYTES", 64 * 1024)

    peaks = {}
    for layers in (12, 48):
        calls.clear()
        model = load_model(_chain(tmp_path, layers))
        assert Quantize(mode=mode)(model).modified
        groups = _groups(model)
        assert len(groups) == layers
        assert not calls, "nothing is quantized before the writer reaches it"
        held: list[int] = []
        tracemalloc.start()
        try:
            writer.save_model(
                model,
                tmp_path / f"out{layers}" / "q.onnx",
                progress=lambda _: held.append(sum(g.held_bytes for g in groups)),  # noqa: B023
            )
            peaks[layers] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert len(calls) == layers, calls  # one kernel call per weight: none twice
        assert all(g.computations == 1 for g in groups)
        assert sum(g.held_bytes for g in groups) == 0, "nothing is held after the write"
        # What the groups hold between writes: members not written yet (a weight's scales).
        assert max(held) <= writer.external_bytes(model) // layers
    source = 48 * WIDTH * WIDTH * 4
    assert peaks[48] < source // 4, peaks  # memory (numpy's, traced) far under the weights
    # Flat when the model grows: each added layer costs only its graph's bytes (the serialized
    # protobuf), far less than its quantized weight (>= 1/8 of the fp32 one in every mode). The
    # 12-layer peak itself varies with how far the writer's threads computed ahead.
    per_layer = (peaks[48] - peaks[12]) / (48 - 12)
    assert per_layer < WIDTH * WIDTH * 4 / 16, peaks


def _run(path: Path) -> list[np.ndarray]:
    feeds = {
        "x": np.random.default_rng(2).standard_normal((3, 64), dtype=np.float32),
        "ids": np.array([0, 7, 47], np.int64),
    }
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("mode", ["q4", "bnb4", "q8", "uint8"])
def test_transposed_tied_and_shared_weights(tmp_path: Path, mode: str) -> None:
    source = _tied(tmp_path)
    model = load_model(source)
    pass_ = Quantize(mode=mode)
    assert pass_(model).modified
    graph = model.graph
    eight_bit = mode in ("q8", "uint8")  # the Gather's table too, in uint8
    assert pass_.statistics == {
        "matmul": 5,
        "quantized": 4,
        "computed_b": 1,
        "blocked": 0,
        "small": 0,
        "gather": int(eight_bit),
        **({"conv": 0} if eight_bit else {}),
    }
    assert len(_groups(model)) == 3 + eight_bit, "the shared weight is quantized once for both"
    assert ("tied" in graph.initializers) is not eight_bit, "4 bits: the Gather keeps the float"
    assert "weight" not in graph.initializers and "shared" not in graph.initializers
    assert [n.name for n in graph if n.op_type == "Transpose"] == ["x_transpose"]
    assert sum(n.op_type == "MatMul" for n in graph) == 1  # the computed B stays float
    out = tmp_path / "out" / "q.onnx"
    writer.save_model(model, out)
    onnx.checker.check_model(str(out), full_check=True)
    want, got = _run(source), _run(out)
    if not eight_bit:
        np.testing.assert_array_equal(got[0], want[0])  # the Gather is untouched
    for g, w in zip(got[int(not eight_bit) :], want[int(not eight_bit) :], strict=True):
        assert np.abs(g - w).max() < 0.2 * np.abs(w).max(), "quantized, still close"


def test_block_lists_and_min_elements_leave_matmuls_float(tmp_path: Path) -> None:
    model = load_model(_tied(tmp_path))
    pass_ = Quantize(mode="q4", node_block_list=["shared_*"], min_elements=64 * 48 + 1)
    assert pass_(model).modified
    assert pass_.statistics == {
        "matmul": 5,
        "quantized": 1,
        "computed_b": 1,
        "blocked": 2,
        "small": 1,
        "gather": 0,
    }
    assert [n.name for n in model.graph if n.op_type == "MatMulNBits"] == ["linear_Q4"]


def test_a_part_without_eligible_matmul_warns_with_counts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = load_model(_tied(tmp_path))
    with caplog.at_level(logging.WARNING, logger="passes.quantize"):
        assert not Quantize(mode="q8", op_block_list=["MatMul", "Gather"])(model).modified
    assert caplog.messages == [
        "quantize: no eligible MatMul in part 'tied' (5 MatMul: 1 with a computed B, "
        "4 blocked, 0 under min_elements); it stays float"
    ]


def _embedding(tmp_path: Path, rows: int, cols: int) -> Path:
    """One Gather of a [rows, cols] table, in an opset-20 / IR 9 model (no int4 there yet)."""
    table = np.random.default_rng(3).standard_normal((rows, cols), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["embedded"], axis=0, name="embed")],
        "embedding",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])],
        [helper.make_tensor_value_info("embedded", TensorProto.FLOAT, [2, 3, cols])],
        [numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=9)
    return _save(model, tmp_path / "embedding.onnx")


@pytest.mark.parametrize("symmetric", [True, False])
def test_gather_tables_equal_onnx_runtime_quantizer_in_row_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, symmetric: bool
) -> None:
    """Chunks of 4 rows of 45 columns (odd: nibble pairs span rows) give the bytes
    ``MatMulNBitsQuantizer`` gives for the whole table, and the same outputs."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    monkeypatch.setattr("passes.quantize_kernels.GATHER_ROWS", 4)
    source = _embedding(tmp_path, 37, 45)
    model = load_model(source)
    pass_ = Quantize(mode="q4", block_size=16, symmetric=symmetric, gather=True)
    assert pass_(model).modified
    assert pass_.statistics["gather"] == 1
    out = tmp_path / "out" / "q.onnx"
    writer.save_model(model, out)
    onnx.checker.check_model(str(out), full_check=True)

    anchor = MatMulNBitsQuantizer(
        onnx.load(source),
        bits=4,
        block_size=16,
        is_symmetric=symmetric,
        op_types_to_quantize=("Gather",),
    )
    anchor.process()
    expected = anchor.model.model
    ours = onnx.load(out)
    names = ["table_Q4", "table_scales"] + ([] if symmetric else ["table_zero_points"])
    for want, got in zip(
        sorted(expected.graph.initializer, key=lambda t: t.name),
        sorted(ours.graph.initializer, key=lambda t: t.name),
        strict=True,
    ):
        assert got.name == want.name and got.name in names
        assert (got.data_type, list(got.dims)) == (want.data_type, list(want.dims))
        assert numpy_helper.to_array(got).tobytes() == numpy_helper.to_array(want).tobytes()
    assert [(n.op_type, n.domain) for n in ours.graph.node] == [
        ("GatherBlockQuantized", "com.microsoft")
    ]
    assert {(o.domain, o.version) for o in ours.opset_import} >= {("", 21)}
    assert ours.ir_version >= 10
    anchor_path = tmp_path / "anchor.onnx"
    onnx.save(expected, anchor_path)
    ids = {"ids": np.array([[0, 5, 36], [-1, 17, 4]], np.int64)}
    got_out, want_out = (
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, ids)[0]
        for p in (out, anchor_path)
    )
    np.testing.assert_array_equal(got_out, want_out)


def test_gather_option_off_or_blocked_leaves_the_table_float(tmp_path: Path) -> None:
    for options in (
        {},  # off by default
        {"gather": True, "op_block_list": ["Gather"]},
        {"gather": True, "node_block_list": ["emb*"]},
    ):
        model = load_model(_embedding(tmp_path, 8, 32))
        assert not Quantize(mode="q4", **options)(model).modified, options
        assert [n.op_type for n in model.graph] == ["Gather"]


def _recipe(*entries: str) -> str:
    return "passes:\n" + "".join(f"  - {e}\n" for e in entries)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            "{pass: quantize, options: {mode: q3}}",
            "<recipe>:2: passes[0] (quantize): mode: expected one of "
            "'q4', 'q4f16', 'bnb4', 'q8', 'int8' or 'uint8', got 'q3'",
        ),
        (
            "{pass: quantize, options: {mode: q4, block_size: 24}}",
            "<recipe>:2: passes[0] (quantize): block_size: expected a power of two >= 16, got 24",
        ),
        (
            "{pass: quantize, options: {mode: q4, block_size: 8}}",
            "<recipe>:2: passes[0] (quantize): block_size: expected a power of two >= 16, got 8",
        ),
        (
            "{pass: quantize, options: {mode: q8, block_size: 32}}",
            "<recipe>:2: passes[0] (quantize): block_size: does not apply to mode q8 "
            "(only to q4, q4f16, bnb4)",
        ),
        (
            "{pass: quantize, options: {mode: bnb4, gather: true}}",
            "<recipe>:2: passes[0] (quantize): gather: does not apply to mode bnb4 "
            "(only to q4, q4f16)",
        ),
        (
            "{pass: quantize, options: {mode: q4f16}}",
            "<recipe>:2: passes[0] (quantize): mode q4f16 needs an fp16 step (dtype float16) "
            "after it on the same parts; add `- pass: fp16` with those parts, or use mode q4",
        ),
    ],
)
def test_bad_options_are_refused_before_any_work(entry: str, message: str) -> None:
    with pytest.raises(SurgeryError) as info:
        parse_recipe(_recipe(entry))
    assert str(info.value) == message


def test_q4f16_needs_fp16_on_the_same_parts() -> None:
    q4f16 = "{pass: quantize, parts: [a, b], options: {mode: q4f16}}"
    with pytest.raises(SurgeryError, match="mode q4f16 needs an fp16 step"):
        parse_recipe(_recipe(q4f16, "{pass: fp16, parts: [a]}"))
    with pytest.raises(SurgeryError, match="mode q4f16 needs an fp16 step"):
        parse_recipe(_recipe("fp16", q4f16))  # before, not after
    parse_recipe(_recipe(q4f16, "{pass: fp16, parts: [b, a]}"))
    parse_recipe(_recipe(q4f16, "fp16"))


def _quantize_data_as_onnx_quantizer(
    weight: np.ndarray, qtype: int, per_channel: bool, reduce_range: bool
) -> tuple[np.ndarray, ...]:
    """ONNX Runtime's ``quantize_data`` on the whole weight (per tensor) or on each column (per
    channel, axis -1), as ``ONNXQuantizer`` calls it."""
    from onnxruntime.quantization.quant_utils import quantize_data

    symmetric = qtype == TensorProto.INT8
    if not per_channel:
        zero_point, scale, values = quantize_data(weight.flatten(), qtype, symmetric, reduce_range)
        return values.reshape(weight.shape), np.asarray(scale), np.asarray(zero_point)
    columns = [
        quantize_data(weight[:, i].flatten(), qtype, symmetric, reduce_range)
        for i in range(weight.shape[1])
    ]
    return (
        np.stack([q for _, _, q in columns], 1).reshape(weight.shape),
        np.hstack([s for _, s, _ in columns]),
        np.hstack([z for z, _, _ in columns]),
    )


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("reduce_range", [False, True], ids=["full", "reduce_range"])
@pytest.mark.parametrize("qtype", [TensorProto.INT8, TensorProto.UINT8], ids=["int8", "uint8"])
def test_q8_row_blocks_equal_quantize_data_byte_for_byte(
    monkeypatch: pytest.MonkeyPatch, qtype: int, per_channel: bool, reduce_range: bool
) -> None:
    from passes import quantize_kernels

    # 7 rows of 37 float32 per block: a 61-row weight ends in a ragged block of 5 rows.
    monkeypatch.setattr(quantize_kernels, "BLOCK_BYTES", 7 * 37 * 4)
    rng = np.random.default_rng(qtype * 4 + per_channel * 2 + reduce_range)
    weights = {
        "normal": rng.standard_normal((61, 37), dtype=np.float32),
        "positive": rng.uniform(0.5, 3.0, (61, 37)).astype(np.float32),
        "skewed": rng.uniform(-0.1, 7.0, (61, 37)).astype(np.float32),
        "zero_column": rng.standard_normal((61, 37), dtype=np.float32) * (np.arange(37) != 3),
        "one_block": rng.standard_normal((4, 37), dtype=np.float32),
        "empty": np.zeros((0, 37), np.float32),
    }
    for name, weight in weights.items():
        theirs = _quantize_data_as_onnx_quantizer(weight, qtype, per_channel, reduce_range)
        # As stored, and as the transposed view of a stored [N, K] (a tied lm_head's), which is
        # read in blocks of its [37, 61] rows (4 rows a block, the last block ragged: 1 row).
        for layout, view in (("stored", weight), ("transposed", np.ascontiguousarray(weight.T).T)):
            ours = quantize_kernels.q8_arrays(view, qtype, per_channel, reduce_range)
            for got, want in zip(ours, theirs, strict=True):
                assert got.shape == want.shape, (name, layout)
                assert got.tobytes() == want.astype(got.dtype).tobytes(), (name, layout)
                if got.size:
                    assert got.dtype == want.dtype, (name, layout)


@pytest.mark.parametrize("transposed", [False, True], ids=["stored", "transposed"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
def test_q8_temporaries_are_bounded_by_the_row_block(per_channel: bool, transposed: bool) -> None:
    from passes.quantize_kernels import BLOCK_BYTES, q8_arrays

    weight = np.random.default_rng(0).standard_normal((4096, 1024), dtype=np.float32)
    assert weight.nbytes == 2 * BLOCK_BYTES
    if transposed:  # a tied lm_head's [N, K] as its MatMul reads it: no whole copy either
        weight = weight.T
    tracemalloc.start()
    try:
        values, _, _ = q8_arrays(weight, TensorProto.UINT8, per_channel, False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Beside the int8 result, a few float32 copies of one row block (measured: 2.0 to 2.3 blocks);
    # quantize_data on the whole weight made about three copies of it (measured: 5.7 blocks).
    assert peak - values.nbytes < 3 * BLOCK_BYTES


def _assert_same_arrays(ours: Any, theirs: Any, layout: str) -> None:
    """Our kernel's arrays equal ONNX Runtime's quantizer's: shapes, dtypes and bytes."""
    for got, want in zip(ours, theirs, strict=True):
        assert (got.shape, got.dtype) == (want.shape, want.dtype), layout
        assert got.tobytes() == want.tobytes(), layout


@pytest.mark.parametrize("rows", [45, 64], ids=["padded", "whole_blocks"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
def test_q4_column_strips_equal_onnx_runtime_byte_for_byte(
    monkeypatch: pytest.MonkeyPatch, symmetric: bool, rows: int
) -> None:
    from onnxruntime.capi import _pybind_state
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    from passes import quantize_kernels
    from surgery import transpose

    # K = 45 rows padded to 64 (block 32): 64 * 4 bytes a column, 3 columns a strip, 37 columns
    # end in a ragged strip of 1. K = 64 needs no padding: stored, the weight goes to the kernel
    # whole and uncopied; transposed, in strips copied tile by tile.
    monkeypatch.setattr(quantize_kernels, "BLOCK_BYTES", 3 * 64 * 4)
    monkeypatch.setattr(transpose, "TILE_ROWS", 2)  # several tiles per strip
    monkeypatch.setattr(transpose, "TILE_COLS", 16)
    weight = np.random.default_rng(symmetric).standard_normal((rows, 37), dtype=np.float32)
    quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(32, symmetric))
    theirs = quantizer.qbits_block_quant(weight)
    for layout, view in (("stored", weight), ("transposed", np.ascontiguousarray(weight.T).T)):
        _assert_same_arrays(
            quantize_kernels.q4_arrays(_pybind_state, view, 32, symmetric), theirs, layout
        )


def _registry_graph(tmp_path: Path) -> Path:
    """What the 8-bit modes rewrite besides MatMul: an embedding over the chunk limit (row blocks
    after split-large-tensors), a Gather read by a MatMul, a table read by a Gather and by a
    MatMul, and two Convs, with and without bias."""
    rng = np.random.default_rng(4)
    arrays = {
        "table": rng.standard_normal((40, 32), dtype=np.float32),  # 5120 bytes: 3 row blocks
        "rows": rng.standard_normal((6, 16), dtype=np.float32),
        "projection": rng.standard_normal((16, 8), dtype=np.float32),
        "shared": rng.standard_normal((16, 32), dtype=np.float32),
        "kernel": rng.standard_normal((8, 3, 4, 4), dtype=np.float32),
        "kernel2": rng.standard_normal((4, 3, 2, 2), dtype=np.float32),
        "bias": rng.standard_normal(8, dtype=np.float32),
    }
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["embedded"], axis=0, name="embed"),
        helper.make_node("Gather", ["rows", "small_ids"], ["picked"], axis=0, name="pick"),
        helper.make_node("MatMul", ["picked", "projection"], ["projected"], name="project"),
        helper.make_node("Gather", ["shared", "small_ids"], ["shared_rows"], axis=0, name="take"),
        helper.make_node("MatMul", ["x", "shared"], ["mixed"], name="mix"),
        helper.make_node("Conv", ["pixels", "kernel", "bias"], ["patches"], strides=[4, 4],
                         name="patch_embedding"),
        helper.make_node("Conv", ["pixels", "kernel2"], ["patches2"], strides=[2, 2]),
    ]  # fmt: skip
    outputs = {
        "embedded": [2, 4, 32],
        "projected": [2, 8],
        "shared_rows": [2, 32],
        "mixed": [3, 32],
        "patches": [1, 8, 4, 4],
        "patches2": [1, 4, 8, 8],
    }
    graph = helper.make_graph(
        nodes,
        "registry",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 4]),
            helper.make_tensor_value_info("small_ids", TensorProto.INT64, [2]),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 16]),
            helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [1, 3, 16, 16]),
        ],
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in outputs.items()],
        [numpy_helper.from_array(v, k) for k, v in arrays.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return _save(model, tmp_path / "registry.onnx")


def _registry_feeds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    return {
        "ids": np.array([[0, 13, 14, 39], [26, 27, -1, 5]], np.int64),  # block edges, negative
        "small_ids": np.array([5, 1], np.int64),
        "x": rng.standard_normal((3, 16), dtype=np.float32),
        "pixels": rng.standard_normal((1, 3, 16, 16), dtype=np.float32),
    }


@pytest.mark.parametrize(("mode", "per_channel"), [("q8", False), ("int8", False), ("uint8", True)])
def test_eight_bit_modes_equal_onnx_quantizer_with_its_whole_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, per_channel: bool
) -> None:
    """As Transformers.js's script calls ONNXQuantizer (IntegerOps, every op of
    IntegerOpsRegistry), on the graph as split-large-tensors leaves it: every initializer
    byte-identical, the same ops, the same outputs. Each row block of the embedding is quantized
    on its own (as the quantizer does with the split graph), read in row blocks of 2 rows."""
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    from passes import SplitLargeTensors, quantize_kernels
    from surgery import PassManager, load

    bundle = load(_registry_graph(tmp_path))
    assert PassManager([SplitLargeTensors(max_bytes=2048)]).run(bundle)
    split = tmp_path / "split" / "registry.onnx"
    writer.save_model(bundle["registry"], split)
    blocks = [t.name for t in onnx.load(split, load_external_data=False).graph.initializer]
    assert [b for b in blocks if re.fullmatch(r"table\.rows\d", b)] == [
        f"table.rows{i}" for i in range(3)
    ]

    monkeypatch.setattr(quantize_kernels, "BLOCK_BYTES", 2 * 32 * 4)
    model = load_model(split)
    pass_ = Quantize(mode=mode, per_channel=per_channel, reduce_range=per_channel)
    assert pass_(model).modified
    assert (pass_.statistics["gather"], pass_.statistics["conv"]) == (5, 2)
    out = tmp_path / "out" / "q.onnx"
    writer.save_model(model, out)
    onnx.checker.check_model(str(out), full_check=True)

    unsigned = mode == "uint8" or mode == "q8"  # q8: the part has a Conv (QUINT8_OPS)
    anchor = transformersjs_q8(
        onnx.load(split),
        per_channel=per_channel,
        reduce_range=per_channel,
        unsigned=unsigned,
        op_types=IntegerOpsRegistry,
    )
    ours = onnx.load(out)
    want = {t.name: numpy_helper.to_array(t) for t in anchor.graph.initializer}
    got = {t.name: numpy_helper.to_array(t) for t in ours.graph.initializer}
    assert sorted(got) == sorted(want)
    for name, array in want.items():
        assert (got[name].dtype, got[name].shape) == (array.dtype, array.shape), name
        assert got[name].tobytes() == array.tobytes(), name
    assert sorted(n.op_type for n in ours.graph.node) == sorted(
        n.op_type for n in anchor.graph.node
    )
    # The Gather read by a MatMul feeds MatMulInteger its uint8 rows: no DequantizeLinear there.
    readers = {i for n in ours.graph.node if n.op_type == "MatMulInteger" for i in n.input}
    assert "picked_quantized" in readers and "picked" not in {
        o for n in ours.graph.node for o in n.output
    }
    anchor_path = tmp_path / "anchor.onnx"
    onnx.save(anchor, anchor_path)
    feeds = _registry_feeds()
    results = [
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)
        for p in (out, anchor_path)
    ]
    for g, w in zip(*results, strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)
    source = ort.InferenceSession(str(split), providers=["CPUExecutionProvider"]).run(None, feeds)
    for g, w in zip(results[0], source, strict=True):
        assert np.abs(g - w).max() < 0.1 * np.abs(w).max(), "quantized, still close"


def test_eight_bit_block_lists_leave_convs_and_gathers_float(tmp_path: Path) -> None:
    """op_block_list takes op types as Transformers.js's script does; node_block_list and
    min_elements apply to Conv and Gather as to MatMul."""
    for options, conv, gather, dequantize in (
        ({"op_block_list": ["Conv", "Gather"]}, 0, 0, 0),
        ({"node_block_list": ["patch_*", "embed"]}, 1, 2, 1),  # pick's rows go to MatMulInteger
        ({"min_elements": 16 * 8 + 1}, 1, 2, 2),  # kernel2 (48) and rows (96) stay float
    ):
        model = load_model(_registry_graph(tmp_path))
        pass_ = Quantize(mode="q8", **options)
        assert pass_(model).modified
        assert (pass_.statistics["conv"], pass_.statistics["gather"]) == (conv, gather), options
        assert sum(n.op_type == "Conv" for n in model.graph) == 2 - conv
        assert sum(n.op_type == "DequantizeLinear" for n in model.graph) == dequantize


@pytest.mark.parametrize("quant_type", [0, 1], ids=["fp4", "nf4"])
@pytest.mark.parametrize("rows", [45, 48, 64])
def test_bnb4_strips_equal_onnx_runtime_byte_for_byte(
    monkeypatch: pytest.MonkeyPatch, rows: int, quant_type: int
) -> None:
    """Strips of the transposed weight, each a whole number of 64-value blocks (K = 45: 64 rows
    a step, the flat blocks crossing rows; K = 48: 4 rows; K = 64: 1), the last one ragged and
    ending in a partial block where K * N is not a multiple of 64."""
    from onnxruntime.capi import _pybind_state
    from onnxruntime.quantization.matmul_bnb4_quantizer import MatMulBnb4Quantizer

    from passes import quantize_kernels
    from surgery import transpose

    monkeypatch.setattr(quantize_kernels, "BLOCK_BYTES", 8 * rows * 4)  # 8 columns a strip
    monkeypatch.setattr(transpose, "TILE_ROWS", 5)
    monkeypatch.setattr(transpose, "TILE_COLS", 3)
    weight = np.random.default_rng(rows).standard_normal((rows, 151), dtype=np.float32)
    quantizer = MatMulBnb4Quantizer(onnx.ModelProto(), quant_type, 64)
    theirs = quantizer.bnb4_block_quant(weight)
    for layout, view in (("stored", weight), ("transposed", np.ascontiguousarray(weight.T).T)):
        ours = quantize_kernels.bnb4_arrays(_pybind_state, view, 64, quant_type)
        _assert_same_arrays(ours, theirs, layout)


@pytest.mark.parametrize("first", ["q4", "q4f16"])
def test_q4_and_q4f16_in_one_save_quantize_each_weight_once(tmp_path: Path, first: str) -> None:
    """q4 and q4f16 quantize each weight alike. Saved together (sharing source tensors, as
    copy-parts parts do), the later variant's packed weights are copied from the earlier one's
    chunk and, after q4, q4f16's fp16 scales are converted from q4's written scales: no second
    quantization, nothing left held, and every file equal to saving each variant alone. (Scales
    here are over the 1 KiB inline limit: an inline tensor is serialized with the graph, from its
    group, not copied; the tiny PaliGemma of ``tests/test_quantize_anchor.py`` has both kinds and a
    tied lm_head.)"""
    from passes.fp16 import Fp16
    from surgery.bundle import Bundle
    from surgery.cloning import clone_model

    path = _chain(tmp_path, 3)
    source = load_model(path)
    order = [first, "q4f16" if first == "q4" else "q4"]

    def variant(model: ir.Model, mode: str) -> ir.Model:
        ir.passes.common.ShapeInferencePass()(model)  # fp16 wants every value typed
        assert Quantize(mode=mode)(model).modified
        if mode == "q4f16":
            assert Fp16()(model).modified
        return model

    for mode in order:  # alone: each its own save, from its own load
        writer.save(
            Bundle({mode: variant(load_model(path), mode)}),
            tmp_path / f"alone-{mode}",
            progress=False,
        )
    together = Bundle({mode: variant(clone_model(source), mode) for mode in order})
    groups = {mode: _groups(model) for mode, model in together.items()}
    writer.save(together, tmp_path / "together", progress=False)

    assert all(g.computations == 1 for g in groups[first])
    # q4f16 after q4 quantizes nothing; q4 after q4f16 computes its float32 scales (q4f16 wrote
    # fp16 ones), but copies its packed weights.
    assert all(g.computations == (1 if first == "q4f16" else 0) for g in groups[order[1]])
    assert all(g.held_bytes == 0 for gs in groups.values() for g in gs), "nothing is held"
    for mode in order:
        files = sorted(p.name for p in (tmp_path / f"alone-{mode}").iterdir())
        assert files == [f"{mode}.onnx", f"{mode}.onnx.data"]
        for name in files:
            alone = (tmp_path / f"alone-{mode}" / name).read_bytes()
            assert (tmp_path / "together" / name).read_bytes() == alone, name


@pytest.mark.parametrize("qtype", [TensorProto.INT8, TensorProto.UINT8], ids=["int8", "uint8"])
def test_q8_values_by_quantize_linear_equal_quantize_nparray_ties_included(qtype: int) -> None:
    """The 8-bit values come from ONNX Runtime's QuantizeLinear, not from the quantizer's
    ``quantize_nparray``: the same bytes, at exact halves (rounded to even) and past the range."""
    from onnxruntime.quantization.quant_utils import quantize_nparray

    from passes.quantize_kernels import _quantize_rows

    dtype = np.int8 if qtype == TensorProto.INT8 else np.uint8
    rng = np.random.default_rng(qtype)
    halves = (np.arange(-600, 600) + 0.5).astype(np.float32).reshape(40, 30) / 4  # ties at 1/4
    noise = rng.standard_normal((40, 30), dtype=np.float32) * 50
    zero_point = np.asarray(0 if qtype == TensorProto.INT8 else 128, dtype)
    for x in (halves, noise):
        for scale in (np.asarray(0.25, np.float32), np.asarray(0.3, np.float32)):
            want = quantize_nparray(qtype, x, scale, zero_point)
            for layout in ("stored", "transposed"):
                got = (
                    np.empty(x.shape, dtype)
                    if layout == "stored"
                    else np.empty(x.shape[::-1], dtype).T
                )
                _quantize_rows(qtype, x, scale, zero_point, 0, got)
                assert np.ascontiguousarray(got).tobytes() == want.tobytes(), layout
        scales = rng.uniform(0.1, 1, 30).astype(np.float32)  # per channel, along columns
        zero_points = (
            rng.integers(-5, 5, 30).astype(dtype)
            if qtype == TensorProto.INT8
            else (rng.integers(100, 150, 30).astype(dtype))
        )
        want = quantize_nparray(qtype, x, scales, zero_points)
        got = np.empty(x.shape, dtype)
        _quantize_rows(qtype, x, scales, zero_points, 1, got)
        assert got.tobytes() == want.tobytes()
