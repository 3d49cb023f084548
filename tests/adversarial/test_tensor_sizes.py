"""Every tensor holds exactly the bytes its shape and dtype imply, or the model is refused.

Before, the writer copied the bytes that existed but recorded the length the shape implied:
exit 0 with an output the tool itself refused to read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from surgery.errors import SurgeryError
from surgery.writer import save_model
from tests.adversarial.conftest import (
    refused_at_load,
)
from tests.adversarial.hostile import edit, initializer

#: 2**91 float32 values: 2**93 bytes.
ABSURD = [2**31, 2**30, 2**30]


def _set_external(tensor: onnx.TensorProto, key: str, value: str) -> None:
    entry = next((e for e in tensor.external_data if e.key == key), None)
    if entry is None:
        entry = tensor.external_data.add()
        entry.key = key
    entry.value = value


def test_declared_length_shorter_than_the_shape(model_path: Path, tmp_path: Path) -> None:
    edit(model_path, lambda m: _set_external(initializer(m, "layer0.weight"), "length", "100"))
    refused_at_load(
        model_path,
        tmp_path,
        "initializer 'layer0.weight' declares 100 bytes in 'm.onnx.data' but its shape and "
        "dtype (FLOAT [32, 32]) need 4096; the model is corrupt",
    )


def test_inline_raw_data_shorter_than_the_shape(model_path: Path, tmp_path: Path) -> None:
    def change(model: onnx.ModelProto) -> None:
        tensor = initializer(model, "one_a")
        tensor.raw_data = tensor.raw_data[:100]

    edit(model_path, change)
    refused_at_load(
        model_path,
        tmp_path,
        "initializer 'one_a' (FLOAT [32]) needs 128 bytes but holds 100; the model is corrupt",
    )


def test_inline_typed_values_fewer_than_the_shape(model_path: Path, tmp_path: Path) -> None:
    def change(model: onnx.ModelProto) -> None:
        tensor = initializer(model, "one_a")
        tensor.ClearField("raw_data")
        tensor.float_data.extend([1.0] * 31)

    edit(model_path, change)
    refused_at_load(
        model_path,
        tmp_path,
        "initializer 'one_a' (FLOAT [32]) needs 32 values in float_data but holds 31; the "
        "model is corrupt",
    )


def test_absurd_dims_of_an_external_tensor(model_path: Path, tmp_path: Path) -> None:
    def change(model: onnx.ModelProto) -> None:
        tensor = initializer(model, "layer0.weight")
        del tensor.dims[:]
        tensor.dims.extend(ABSURD)
        tensor.ClearField("external_data")
        _set_external(tensor, "location", "m.onnx.data")

    edit(model_path, change)
    refused_at_load(
        model_path,
        tmp_path,
        f"initializer 'layer0.weight' needs bytes up to {2**93} of 'm.onnx.data', but the file "
        "has only 12288; the data file is truncated or belongs to another model",
    )


def test_absurd_dims_of_an_inline_tensor(model_path: Path, tmp_path: Path) -> None:
    def change(model: onnx.ModelProto) -> None:
        tensor = initializer(model, "one_a")
        del tensor.dims[:]
        tensor.dims.extend(ABSURD)

    edit(model_path, change)
    refused_at_load(
        model_path,
        tmp_path,
        f"initializer 'one_a' (FLOAT {ABSURD}) needs {2**93} bytes but holds 128; the model is "
        "corrupt",
    )


def test_negative_dim(model_path: Path, tmp_path: Path) -> None:
    def change(model: onnx.ModelProto) -> None:
        initializer(model, "one_a").dims[0] = -32

    edit(model_path, change)
    refused_at_load(
        model_path,
        tmp_path,
        "initializer 'one_a' has a negative or unknown dimension [-32]; the model is corrupt",
    )


def test_writer_refuses_a_tensor_that_gives_fewer_bytes_than_its_shape(tmp_path: Path) -> None:
    """The last guard, for tensors built in memory by a pass rather than loaded."""
    short = ir.LazyTensor(
        lambda: ir.Tensor(np.zeros(300, np.float32)),
        dtype=ir.DataType.FLOAT,
        shape=ir.Shape([1000]),
        name="w",
    )
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1000]))
    w = ir.Value(name="w", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1000]))
    w.const_value = short
    node = ir.Node("", "Add", [x, w], name="add", num_outputs=1)
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[w], opset_imports={"": 21})
    with pytest.raises(SurgeryError) as info:
        save_model(ir.Model(graph, ir_version=10), tmp_path / "m.onnx")
    assert str(info.value) == (
        "m.onnx: tensor 'w' gave 1200 bytes, but its shape and dtype need 4000; refusing to "
        "write a broken model"
    )
