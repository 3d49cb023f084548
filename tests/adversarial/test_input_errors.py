"""Input errors that used to exit 3: a cycle, a hard-linked data file, a zero-size tensor."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from tests.adversarial.conftest import assert_refused, digests, leftovers, run_cli
from tests.adversarial.hostile import edit, external


def _refused(model: Path, tmp_path: Path, message: str) -> None:
    before = digests(model.parent)
    assert assert_refused(run_cli("inspect", model)) == f"surgery: error: {model}: {message}"
    dest = tmp_path / "out"
    line = assert_refused(run_cli("apply", "cleanup", model, "-o", dest))
    assert line == f"surgery: error: {model}: {message}"
    assert not dest.exists()
    assert leftovers(dest) == []
    assert digests(model.parent) == before


def test_graph_with_a_cycle_is_refused_at_load(model_path: Path, tmp_path: Path) -> None:
    """Caught at load, so ``inspect`` refuses too, not only the sorting pass."""

    def change(model: onnx.ModelProto) -> None:
        add = next(n for n in model.graph.node if n.name == "layer1.add")
        add.input[1] = "layer1.relu_out"  # layer1.add needs layer1.relu, which needs it

    edit(model_path, change)
    _refused(
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
    _refused(
        model_path,
        tmp_path,
        "graph 'synthetic' has a cycle (dead_branch → dead_branch); an ONNX graph must be acyclic",
    )


def test_data_file_with_a_second_hard_link(model_path: Path, tmp_path: Path) -> None:
    os.link(model_path.parent / "m.onnx.data", tmp_path / "another-name")
    _refused(
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
