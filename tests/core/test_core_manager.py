"""The pass manager and its instruments: errors with context, dumps, timing, verification."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from _util import run_onnx

from passes import DeduplicateInitializers, RemoveUnused, TopologicalSort
from surgery import ModelPass, PassFailed, PassManager, SurgeryError, gs_pass, load, save
from surgery.adapters import wrap_ir_pass
from surgery.cli import main
from surgery.instruments import DumpAfterPass, TimePasses, VerifyEach


class _Explode(ModelPass):
    """Fails on purpose."""

    name = "explode"
    summary = "fails"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        raise ValueError("kaboom")


class _UserMistake(ModelPass):
    """Fails with a user error."""

    name = "user-mistake"
    summary = "fails with a user error"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        raise SurgeryError("option x does not fit this model")


class _BreakGraph(ModelPass):
    """Drops the node that produces the graph output: an invalid model."""

    name = "break-graph"
    summary = "breaks the graph"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        out = model.graph.outputs[0]
        node = out.producer()
        assert node is not None
        model.graph.remove(node, safe=False)
        return ir.passes.PassResult(model, True)


def test_modified_flag_is_exact(model_path: Path) -> None:
    bundle = load(model_path)
    assert PassManager([RemoveUnused()]).run(bundle) is True
    assert PassManager([RemoveUnused()]).run(bundle) is False
    assert PassManager([DeduplicateInitializers()]).run(bundle) is True  # one_a == one_b
    assert PassManager([DeduplicateInitializers(), TopologicalSort()]).run(bundle) is False


def test_failure_names_pass_position_part_and_history(model_path: Path) -> None:
    bundle = load(model_path)
    manager = PassManager([RemoveUnused(), TopologicalSort(), _Explode()])
    with pytest.raises(PassFailed) as info:
        manager.run(bundle)
    assert str(info.value) == (
        "passes[2] (explode): pass 'explode' failed on part 'm', after remove-unused, "
        "topological-sort: kaboom"
    )
    with pytest.raises(SurgeryError) as user:
        PassManager([_UserMistake()]).run(bundle)
    assert str(user.value) == (
        "passes[0] (user-mistake): pass 'user-mistake' failed on part 'm', as the first pass: "
        "option x does not fit this model"
    )


def test_bug_exits_3_with_traceback_in_a_log(
    model_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    (tmp_path / "boom.py").write_text(
        "from surgery import ModelPass\n"
        "class Boom(ModelPass):\n"
        "    '''Fails.'''\n"
        "    name = 'boom'\n"
        "    summary = 'fails'\n"
        "    def call(self, model):\n"
        "        raise ZeroDivisionError('bad math')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - remove-unused\n  - use: boom:Boom\n")
    out = tmp_path / "out"
    code = main(["apply", str(recipe), str(model_path), "-o", str(out), "-q", "--allow-imports"])
    err = capsys.readouterr().err
    assert code == 3
    assert (
        f"surgery: internal error: PassFailed: {recipe}:3: passes[1] (boom): pass 'boom' failed on part 'm', after remove-unused: bad math"
        in err
    )
    log = next(tmp_path.glob("surgery-crash-*.log"))
    assert "ZeroDivisionError: bad math" in log.read_text()
    assert not (tmp_path / "out").exists()


def test_dumps_open_without_and_with_weights(model_path: Path, tmp_path: Path) -> None:
    dumps = tmp_path / "dumps"
    bundle = load(model_path)
    PassManager([RemoveUnused(), TopologicalSort()], [DumpAfterPass(dumps)]).run(bundle)
    folders = sorted(p.name for p in dumps.iterdir())
    assert folders == ["00-input", "01-remove-unused", "02-topological-sort"]
    for folder in folders:
        graph_only = onnx.load(dumps / folder / "m.onnx", load_external_data=False)
        assert graph_only.ByteSize() < 4096, "graph files stay small: weights are external"
        full = onnx.load(dumps / folder / "m.onnx")
        assert {t.name for t in full.graph.initializer} >= {"layer0.weight", "layer2.weight"}
        np.testing.assert_array_equal(run_onnx(dumps / folder / "m.onnx"), run_onnx(model_path))
    ops = [n.op_type for n in onnx.load(dumps / "01-remove-unused" / "m.onnx").graph.node]
    assert "Neg" not in ops


def test_dump_changed_skips_passes_that_changed_nothing(model_path: Path, tmp_path: Path) -> None:
    dumps = tmp_path / "dumps"
    bundle = load(model_path)
    PassManager([RemoveUnused(), RemoveUnused()], [DumpAfterPass(dumps, only_changed=True)]).run(
        bundle
    )
    assert sorted(p.name for p in dumps.iterdir()) == ["00-input", "01-remove-unused"]


def test_time_passes_table(model_path: Path) -> None:
    stream = io.StringIO()
    PassManager([RemoveUnused(), TopologicalSort()], [TimePasses(stream)]).run(load(model_path))
    lines = stream.getvalue().splitlines()
    assert lines[0].split() == [
        "pass",
        "part",
        "wall",
        "s",
        "peak",
        "anon",
        "MiB",
        "nodes",
        "ops",
        "changed",
    ]
    assert lines[2].split()[:2] == ["remove-unused", "m"]
    assert lines[2].endswith("12 → 11  Neg -1")
    assert lines[3].split()[:2] == ["topological-sort", "m"]


def test_verify_each_catches_an_invalid_model(model_path: Path) -> None:
    with pytest.raises(
        SurgeryError,
        match=r"passes\[1\] \(break-graph\): --verify-each: pass 'break-graph' left an invalid model in part 'm'",
    ):
        PassManager([RemoveUnused(), _BreakGraph()], [VerifyEach()]).run(load(model_path))


@gs_pass
def insert_identity_before_output(graph):  # type: ignore[no-untyped-def]
    """Route the graph output through an Identity node."""
    import onnx_graphsurgeon as gs

    out = graph.outputs[0]
    fresh = gs.Variable("y_inner", dtype=out.dtype, shape=out.shape)
    out.inputs[0].outputs = [fresh]
    graph.nodes.append(gs.Node("Identity", inputs=[fresh], outputs=[out]))
    return graph


@gs_pass(name="gs-noop")
def gs_noop(graph):  # type: ignore[no-untyped-def]
    """Changes nothing."""


def test_gs_pass_keeps_weights_on_disk_and_outputs_equal(model_path: Path, tmp_path: Path) -> None:
    bundle = load(model_path)
    weight_before = bundle["m"].graph.initializers["layer1.weight"].const_value
    # graphsurgeon's cleanup() removes the dead branch, which is a change...
    assert PassManager([gs_noop()]).run(bundle) is True
    # ...and once it is gone, a function that edits nothing reports no change.
    assert PassManager([gs_noop()]).run(bundle) is False
    assert PassManager([insert_identity_before_output()]).run(bundle) is True
    graph = bundle["m"].graph
    assert graph.initializers["layer1.weight"].const_value is weight_before, "weights not reloaded"
    assert [n.op_type for n in graph][-1] == "Identity"
    save(bundle, tmp_path / "out", progress=False)
    np.testing.assert_array_equal(run_onnx(tmp_path / "out" / "m.onnx"), run_onnx(model_path))
    assert insert_identity_before_output.name == "insert-identity-before-output"


def test_cli_apply_with_every_flag(
    model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, dumps = tmp_path / "out", tmp_path / "dumps"
    code = main(
        [
            "apply",
            "cleanup",
            str(model_path),
            "-o",
            str(out),
            "--dump-dir",
            str(dumps),
            "--dump-changed",
            "--time-passes",
            "--verify-each",
            "-q",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "remove-unused" in captured.err and "peak anon MiB" in captured.err
    assert sorted(p.name for p in dumps.iterdir()) == [
        "00-input",
        "01-remove-unused",
        "02-dedup-initializers",
    ]
    np.testing.assert_array_equal(run_onnx(out / "m.onnx"), run_onnx(model_path))


class _DoubleThroughLocalFunction(ir.passes.FunctionalPass):
    """Returns a new model whose output is doubled by a model-local function ``local.Twice``."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        new = model.clone()
        x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT))
        add = ir.Node("", "Add", [x, x], num_outputs=1)
        body = ir.Graph([x], add.outputs, nodes=[add], opset_imports={"": 18})
        function = ir.Function("local", "Twice", graph=body, attributes=[])
        new.functions[function.identifier()] = function
        new.opset_imports["local"] = 1
        twice = ir.Node("local", "Twice", [new.graph.outputs[0]], num_outputs=1, name="twice")
        twice.outputs[0].name = "doubled"
        twice.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        new.graph.append(twice)
        new.graph.outputs[0] = twice.outputs[0]
        return ir.passes.PassResult(new, True)


def test_wrap_ir_pass_keeps_functions_and_opsets_of_a_functional_result(
    model_path: Path, tmp_path: Path
) -> None:
    wrapped = wrap_ir_pass(_DoubleThroughLocalFunction, name="double")
    bundle = load(model_path)
    assert PassManager([wrapped()]).run(bundle) is True
    model = bundle["m"]
    assert list(model.functions) == [("local", "Twice", "")]
    assert model.opset_imports["local"] == 1
    save(bundle, tmp_path / "out")
    np.testing.assert_allclose(run_onnx(tmp_path / "out" / "m.onnx"), 2 * run_onnx(model_path))
