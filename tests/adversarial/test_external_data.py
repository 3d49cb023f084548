"""External data is read only from inside the model's folder, by every path a tensor can take.

Each refusal happens at load, before any pass runs, for tensors in model-local functions,
``TENSORS`` lists and subgraphs nested in functions as much as for initializers.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.adversarial.conftest import assert_refused, digests, leftovers, run_cli
from tests.adversarial.hostile import (
    DOMAIN,
    add_function,
    constant_function,
    edit,
    external,
    initializer,
)

OUTSIDE = (
    "points to external data '{}' outside the model's folder; refusing to read it "
    "(keep data files beside the model)"
)


def _refused_everywhere(
    model: Path, tmp_path: Path, message: str, *, inlining: bool = False
) -> None:
    """``inspect`` and ``apply cleanup`` refuse alike (and ``optimize``, which inlines functions
    and so would read a function's constants, when ``inlining``)."""
    recipe = tmp_path / "optimize.yaml"
    recipe.write_text("name: optimize\npasses:\n  - optimize\n")
    before = digests(model.parent)
    assert_refused(run_cli("inspect", model), message)
    recipes: list[tuple[str, str | Path]] = [("cleanup", "cleanup")]
    for name, rcp in recipes + ([("optimize", recipe)] if inlining else []):
        dest = tmp_path / f"out-{name}"
        outcome = run_cli("apply", rcp, model, "-o", dest)
        line = assert_refused(outcome, message)
        assert line == f"surgery: error: {model}: {message}"
        assert not dest.exists()
        assert leftovers(dest) == []
    assert digests(model.parent) == before


def test_function_constant_with_absolute_location(model_path: Path, tmp_path: Path) -> None:
    edit(model_path, lambda m: constant_function(m, external("c", "/etc/passwd", (8,))))
    _refused_everywhere(
        model_path,
        tmp_path,
        "function 'evil::F' node 'const' attribute 'value' " + OUTSIDE.format("/etc/passwd"),
        inlining=True,
    )


def test_function_constant_reaching_out_with_dotdot(model_path: Path, tmp_path: Path) -> None:
    (tmp_path / "secret.bin").write_bytes(b"s" * 64)
    edit(model_path, lambda m: constant_function(m, external("c", "../secret.bin")))
    _refused_everywhere(
        model_path,
        tmp_path,
        "function 'evil::F' node 'const' attribute 'value' " + OUTSIDE.format("../secret.bin"),
    )


def test_tensors_list_attribute(model_path: Path, tmp_path: Path) -> None:
    def change(model: onnx.ModelProto) -> None:
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
        node = helper.make_node("Custom", ["x"], ["t"], domain=DOMAIN, name="custom")
        safe = numpy_helper.from_array(np.zeros(2, np.float32), "safe")
        node.attribute.append(helper.make_attribute("ts", [safe, external("bad", "/etc/passwd")]))
        model.graph.node.append(node)
        model.graph.output.append(helper.make_tensor_value_info("t", TensorProto.FLOAT, None))

    edit(model_path, change)
    _refused_everywhere(
        model_path, tmp_path, "node 'custom' attribute 'ts'[1] " + OUTSIDE.format("/etc/passwd")
    )


def test_constant_in_a_subgraph_inside_a_function(model_path: Path, tmp_path: Path) -> None:
    def branch(name: str, location: str) -> onnx.GraphProto:
        const = helper.make_node(
            "Constant", [], [f"{name}_c"], name=f"{name}_const", value=external("c", location)
        )
        out = helper.make_tensor_value_info(f"{name}_c", TensorProto.FLOAT, None)
        return helper.make_graph([const], name, [], [out])

    def change(model: onnx.ModelProto) -> None:
        add_function(
            model,
            [
                helper.make_node("ReduceSum", ["a"], ["s"], name="sum", keepdims=0),
                helper.make_node("Cast", ["s"], ["cond"], name="cast", to=TensorProto.BOOL),
                helper.make_node(
                    "If",
                    ["cond"],
                    ["o"],
                    name="if",
                    then_branch=branch("then", "m.onnx.data"),
                    else_branch=branch("else", "/etc/shadow"),
                ),
            ],
        )

    edit(model_path, change)
    _refused_everywhere(
        model_path,
        tmp_path,
        "function 'evil::F' node 'if' attribute 'else_branch' > node 'else_const' attribute "
        "'value' " + OUTSIDE.format("/etc/shadow"),
        inlining=True,
    )


def test_function_constant_resolves_against_the_model_folder(
    model_path: Path, tmp_path: Path
) -> None:
    """Not against the working directory, which here holds a decoy with other bytes."""
    edit(
        model_path,
        lambda m: constant_function(m, external("c", "m.onnx.data", (32,), offset=0, length=128)),
    )
    decoy = tmp_path / "cwd"
    decoy.mkdir()
    (decoy / "m.onnx.data").write_bytes(b"\xff" * 4096)
    before = digests(model_path.parent)
    dest = tmp_path / "out"
    outcome = run_cli("apply", "cleanup", model_path, "-o", dest, "-q", cwd=decoy)
    assert outcome.code == 0, outcome.stderr
    assert digests(model_path.parent) == before
    assert run_cli("inspect", dest / "m.onnx").code == 0
    written = onnx.load(dest / "m.onnx")
    value = written.functions[0].node[0].attribute[0].t
    expected = np.frombuffer((model_path.parent / "m.onnx.data").read_bytes()[:128], np.float32)
    np.testing.assert_array_equal(numpy_helper.to_array(value), expected)


def test_sparse_initializer_is_refused_not_dropped(model_path: Path, tmp_path: Path) -> None:
    def change(model: onnx.ModelProto) -> None:
        values = numpy_helper.from_array(np.ones(2, np.float32), "sp")
        indices = numpy_helper.from_array(np.array([0, 5], np.int64), "sp_indices")
        model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [8]))

    edit(model_path, change)
    _refused_everywhere(
        model_path,
        tmp_path,
        "graph 'synthetic' has a sparse initializer ('sp'); onnx-surgery cannot keep sparse "
        "tensors: store it as a dense initializer",
    )


def test_location_with_a_nul_byte(model_path: Path, tmp_path: Path) -> None:
    edit(
        model_path,
        lambda m: (
            initializer(m, "layer0.weight")
            .external_data[0]
            .__setattr__("value", "m.onnx.data\x00/etc/passwd")
        ),
    )
    _refused_everywhere(
        model_path,
        tmp_path,
        "initializer 'layer0.weight' has an external data location with a NUL byte "
        "('m.onnx.data\\x00/etc/passwd'); the model is corrupt or hostile",
    )


def _point_layer0_at(model_path: Path, location: str) -> None:
    def change(model: onnx.ModelProto) -> None:
        entry = next(
            e for e in initializer(model, "layer0.weight").external_data if e.key == "location"
        )
        entry.value = location

    edit(model_path, change)


NOT_REGULAR = (
    "initializer 'layer0.weight' points to external data '{}', which is not a regular file "
    "(a folder, FIFO, socket or device); refusing to open it"
)


def test_data_file_that_is_a_fifo_is_never_opened(model_path: Path, tmp_path: Path) -> None:
    os.mkfifo(model_path.parent / "pipe")
    _point_layer0_at(model_path, "pipe")
    # Opening a FIFO blocks until a writer comes: a hang here would time the CLI out.
    _refused_everywhere(model_path, tmp_path, NOT_REGULAR.format("pipe"))


def test_data_file_that_is_a_socket(model_path: Path, tmp_path: Path) -> None:
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(model_path.parent / "sock"))
        _point_layer0_at(model_path, "sock")
        _refused_everywhere(model_path, tmp_path, NOT_REGULAR.format("sock"))
    finally:
        server.close()


def test_data_file_that_is_a_folder(model_path: Path, tmp_path: Path) -> None:
    (model_path.parent / "sub").mkdir()
    _point_layer0_at(model_path, "sub")
    _refused_everywhere(model_path, tmp_path, NOT_REGULAR.format("sub"))


def test_symlink_to_a_file_inside_the_folder_is_allowed(model_path: Path, tmp_path: Path) -> None:
    folder = model_path.parent
    (folder / "m.onnx.data").rename(folder / "real.bin")
    (folder / "m.onnx.data").symlink_to("real.bin")
    before = digests(folder)
    dest = tmp_path / "out"
    outcome = run_cli("apply", "cleanup", model_path, "-o", dest, "-q")
    assert outcome.code == 0, outcome.stderr
    assert digests(folder) == before
    assert run_cli("inspect", dest / "m.onnx").code == 0
    assert not (dest / "m.onnx.data").is_symlink()


def test_symlink_pointing_outside_is_refused(model_path: Path, tmp_path: Path) -> None:
    folder = model_path.parent
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (folder / "m.onnx.data").rename(elsewhere / "m.onnx.data")
    (folder / "m.onnx.data").symlink_to(elsewhere / "m.onnx.data")
    _refused_everywhere(
        model_path, tmp_path, "initializer 'layer0.weight' " + OUTSIDE.format("m.onnx.data")
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a device node needs root")
def test_data_file_that_is_a_device(model_path: Path, tmp_path: Path) -> None:
    os.mknod(model_path.parent / "zero", 0o600 | 0o020000, os.makedev(1, 5))  # char /dev/zero
    _point_layer0_at(model_path, "zero")
    _refused_everywhere(model_path, tmp_path, NOT_REGULAR.format("zero"))
