"""Tests for the ``rename-io`` pass on small hand-built graphs."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from passes import RenameIO
from surgery import SurgeryError, parse_recipe

FLOAT = TensorProto.FLOAT


def _model() -> ir.Model:
    """past.{0,1}.key [s0, 2, s1, 4] -> present.{0,1}.key = past + 1; also t = Neg(past.0.key)."""
    shape = ["s0", 2, "s1", 4]
    nodes = [
        helper.make_node("Add", [f"past.{i}.key", "one"], [f"present.{i}.key"]) for i in (0, 1)
    ]
    nodes.append(helper.make_node("Neg", ["past.0.key"], ["t"]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(f"past.{i}.key", FLOAT, shape) for i in (0, 1)],
        [
            helper.make_tensor_value_info(n, FLOAT, shape)
            for n in ("present.0.key", "present.1.key", "t")
        ],
        initializer=[helper.make_tensor("one", FLOAT, [], [1.0])],
    )
    return ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    )


def _io(model: ir.Model) -> list[tuple[str | None, str]]:
    return [(v.name, str(v.shape)) for v in (*model.graph.inputs, *model.graph.outputs)]


def test_rename_io_templates_and_dims() -> None:
    model = _model()
    result = RenameIO(
        values={"past.{layer}.{kind}": "past_key_values.{layer}.{kind}", "t": "neg"},
        dims={"s0": "batch_size", "s1": "past_sequence_length"},
    )(model)
    assert result.modified is True
    shape = "[batch_size,2,past_sequence_length,4]"
    assert _io(result.model) == [
        ("past_key_values.0.key", shape),
        ("past_key_values.1.key", shape),
        ("present.0.key", shape),
        ("present.1.key", shape),
        ("neg", shape),
    ]
    proto = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(proto, full_check=True)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    past = np.arange(16, dtype=np.float32).reshape(1, 2, 2, 4)
    out = session.run(
        ["present.0.key"], {"past_key_values.0.key": past, "past_key_values.1.key": past}
    )
    np.testing.assert_array_equal(out[0], past + 1)


def test_rename_io_first_template_wins_and_swaps_work() -> None:
    result = RenameIO(
        values={"present.0.key": "present.1.key", "present.{i}.key": "present.0.key"}
    )(_model())
    assert [v.name for v in result.model.graph.outputs] == ["present.1.key", "present.0.key", "t"]
    assert result.modified is True


def test_rename_io_scope_all_renames_intermediates() -> None:
    result = RenameIO(values={"one": "ONE"}, scope="all")(_model())
    assert list(result.model.graph.initializers) == ["ONE"]
    assert RenameIO(values={"one": "ONE"})(_model()).modified is False


def test_rename_io_nothing_to_do_is_unmodified_and_warned(caplog: pytest.LogCaptureFixture) -> None:
    model = _model()
    before = _io(model)
    with caplog.at_level(logging.WARNING, logger="passes.rename_io"):
        result = RenameIO(values={"cache.{i}": "past.{i}"}, dims={"s9": "x"})(model)
    assert result.modified is False
    assert _io(model) == before
    assert [r.getMessage() for r in caplog.records] == [
        "rename-io: template 'cache.{i}' matched nothing in graph 'g'",
        "rename-io: dim 's9' matched nothing in graph 'g'",
    ]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"values": {"present.{i}.key": "out"}},
            "rename-io: 'present.0.key' and 'present.1.key' would both be renamed to 'out'; "
            "make the templates tell them apart",
        ),
        (
            {"values": {"t": "one"}},
            "rename-io: renaming 't' to 'one' collides with the existing value 'one'; "
            "rename that one too or choose another name",
        ),
        (
            {"values": {"cache.{i}": "past.{i}"}, "strict": True},
            "rename-io: template 'cache.{i}' matched nothing in graph 'g'; fix the name or "
            "select parts with 'parts:'",
        ),
    ],
)
def test_rename_io_refuses_collisions(options: dict[str, object], message: str) -> None:
    model = _model()
    before = _io(model)
    with pytest.raises(SurgeryError) as info:
        RenameIO(RenameIO.Options.model_validate(options))(model)
    assert str(info.value) == message
    assert _io(model) == before


HEAD = "passes:\n- pass: rename-io\n  options:\n    values:\n"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "      'past.{layer}': 'p.{layr}'\n",
            "r.yaml:5: passes[0] (rename-io): values: 'p.{layr}' uses {layr}, which "
            "'past.{layer}' does not capture, got {'past.{layer}': 'p.{layr}'}",
        ),
        (
            "      'p.{i}.{i}': 'q.{i}'\n",
            "r.yaml:5: passes[0] (rename-io): values: 'p.{i}.{i}': placeholder {i} appears "
            "twice, got {'p.{i}.{i}': 'q.{i}'}",
        ),
        (
            "      'p.{i': 'q'\n",
            "r.yaml:5: passes[0] (rename-io): values: 'p.{i': expected '}' before end of "
            "string, got {'p.{i': 'q'}",
        ),
        (
            "      a: 1\n",
            "r.yaml:5: passes[0] (rename-io): values.a: expected a string, got 1",
        ),
    ],
)
def test_rename_io_recipe_options_checked_before_work(body: str, message: str) -> None:
    with pytest.raises(SurgeryError) as info:
        parse_recipe(HEAD + body, "r.yaml")
    assert str(info.value) == message
