"""Input errors that used to exit 3: a cycle, a hard-linked data file, a zero-size tensor."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from tests.adversarial.conftest import (
    digests,
    refused_at_load,
    run_cli,
)
from tests.adversarial.hostile import edit, external


def test_graph_with_a_cycle_is_refused_at_load(model_path: Path, tmp_path: Path) -> None:
    """Caught at load, so ``inspect`` refuses too, not only the sorting pass."""

    def change(model: onnx.ModelProto) -> None:
        add = next(n for n in model.graph.node if n.name == "layer1.add")
        add.input[1] = "layer1.relu_out"  # layer1.add needs layer1.relu, which needs it

    edit(model_path, change)
    refused_at_load(
        model_path,
        tmp_path,
        "graph 'synthetic' has a cycle (layer1.add → layer1.relu → layer1.add); an ONNX "
        "graph must be acyclic",
    )


def test_node_that_reads_its_own_output(model_path: Path, tmp_path: Path) -> None:
    def change(model: onnx.ModelProto) -> None:
        neg = next(n for n in model.graph.node if n.name == "dead_branch")
        neg.input[0] = neg.output[0]

    edit(model_path, change)
    refused_at_load(
        model_path,
        tmp_path,
        "graph 'synthetic' has a cycle (dead_branch → dead_branch); an ONNX graph must be acyclic",
    )


def test_data_file_with_a_second_hard_link(model_path: Path, tmp_path: Path) -> None:
    os.link(model_path.parent / "m.onnx.data", tmp_path / "another-name")
    refused_at_load(
        model_path,
        tmp_path,
        "external data file 'm.onnx.data' has 2 hard links; onnx-ir refuses hard-linked data "
        "(a link can expose a file from outside the folder): give the model its own copy, "
        "e.g. cp 'm.onnx.data' tmp && mv tmp 'm.onnx.data'",
    )
    # The advice works: after it, the same model is accepted.
    data = model_path.parent / "m.onnx.data"
    (model_path.parent / "tmp").write_bytes(data.read_bytes())
    (model_path.parent / "tmp").replace(data)
    assert run_cli("inspect", model_path).code == 0


def test_dedup_initializers_on_zero_size_tensors(model_path: Path, tmp_path: Path) -> None:
    """Two identical zero-size external initializers: merged, no empty AssertionError."""

    def change(model: onnx.ModelProto) -> None:
        model.graph.initializer.extend(
            [
                external("z1", "m.onnx.data", (0, 32), offset=0, length=0),
                external("z2", "m.onnx.data", (0, 32), offset=0, length=0),
            ]
        )
        model.graph.node.append(helper.make_node("Concat", ["z1", "z2"], ["zc"], axis=0))
        model.graph.output.append(helper.make_tensor_value_info("zc", TensorProto.FLOAT, None))

    edit(model_path, change)
    before = digests(model_path.parent)
    dest = tmp_path / "out"
    outcome = run_cli("apply", "cleanup", model_path, "-o", dest, "-q")
    assert outcome.code == 0, outcome.stderr
    assert digests(model_path.parent) == before
    assert run_cli("inspect", dest / "m.onnx").code == 0
    written = onnx.load(dest / "m.onnx")
    zero = [t for t in written.graph.initializer if t.name in ("z1", "z2")]
    assert [list(t.dims) for t in zero] == [[0, 32]]  # merged into one


def test_name_that_is_not_utf8(model_path: Path, tmp_path: Path) -> None:
    """Protobuf hands such a string over as bytes; writing it back used to crash (exit 3)."""
    data = model_path.read_bytes()
    assert data.count(b"layer0.matmul_out") == 3  # MatMul output, Add input, value_info
    model_path.write_bytes(data.replace(b"layer0.matmul_out", b"layer0.matm\xf5l_out"))
    refused_at_load(
        model_path,
        tmp_path,
        "model.graph.value_info[8].name is not valid UTF-8 ('layer0.matm\ufffdl_out'); the "
        "model is corrupt",
    )


def test_node_that_reads_a_missing_value(model_path: Path, tmp_path: Path) -> None:
    """Was exit 0 with an output no runtime accepts (and onnx-ir's warning before it)."""

    def change(model: onnx.ModelProto) -> None:
        next(n for n in model.graph.node if n.name == "layer1.matmul").input[0] = "no_such_value"

    edit(model_path, change)
    refused_at_load(
        model_path,
        tmp_path,
        "graph 'synthetic': node 'layer1.matmul' reads 'no_such_value', which is defined by no "
        "node, input or initializer; the model is corrupt",
    )


def test_graph_output_that_nothing_defines(model_path: Path, tmp_path: Path) -> None:
    edit(model_path, lambda m: m.graph.output[0].__setattr__("name", "no_such_output"))
    refused_at_load(
        model_path,
        tmp_path,
        "graph 'synthetic': output 'no_such_output' is defined by no node, input or "
        "initializer; the model is corrupt",
    )
