"""Tiled transposes (surgery.transpose) and the streamed TransposedTensor: numpy's bytes."""

from __future__ import annotations

import io
import tracemalloc
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest

from surgery import lazy, transpose
from surgery.lazy import TransposedTensor, computed_whole_when_written


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16, np.int8, np.int64])
def test_tiled_transposes_equal_numpys(monkeypatch: pytest.MonkeyPatch, dtype: type) -> None:
    monkeypatch.setattr(transpose, "TILE_ROWS", 4)  # ragged tiles on both sides
    monkeypatch.setattr(transpose, "TILE_COLS", 7)
    array: np.ndarray = (np.arange(23 * 30) % 120 - 60).astype(dtype).reshape(23, 30)
    for source in (array, array.T, array[3:17, 2:29], array[:, 2:29].T, array[:0], array[:1]):
        want = np.ascontiguousarray(source.T)
        got = transpose.transposed(source)
        assert got.flags.c_contiguous and got.dtype == want.dtype
        assert got.tobytes() == want.tobytes()
    with pytest.raises(ValueError, match="expected"):
        transpose.transpose_into(array, np.empty((23, 30), dtype))


def test_transposed_tensor_streams_strips_with_numpys_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    array = np.random.default_rng(0).standard_normal((1000, 300), dtype=np.float32)
    tensor = TransposedTensor(ir.Tensor(array), name="t")
    assert tensor.shape == ir.Shape([300, 1000]) and tensor.dtype == ir.DataType.FLOAT
    assert not computed_whole_when_written(tensor), "written by its own tofile, strip by strip"
    want = np.ascontiguousarray(array.T).tobytes()
    assert tensor.numpy().tobytes() == want
    monkeypatch.setattr(lazy, "STRIP_BYTES", 7 * 1000 * 4)  # 7 rows a strip, the last one ragged
    tracemalloc.start()
    try:
        with open(tmp_path / "t.data", "wb") as file:
            tensor.tofile(file)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (tmp_path / "t.data").read_bytes() == want
    assert peak < 2 * lazy.STRIP_BYTES < len(want) // 10, "a strip at a time, not the whole"
    buffer = io.BytesIO()  # a file without a descriptor
    tensor.tofile(buffer)
    assert buffer.getvalue() == want


def test_transposed_tensor_refuses_what_it_cannot_stream() -> None:
    with pytest.raises(ValueError, match="2-D tensor of whole bytes"):
        TransposedTensor(ir.Tensor(np.zeros((2, 3, 4), np.float32)), name="cube")
    with pytest.raises(ValueError, match="2-D tensor of whole bytes"):
        TransposedTensor(ir.Tensor(np.zeros((2, 4), np.int8), dtype=ir.DataType.INT4), name="n")
