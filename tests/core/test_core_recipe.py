"""Recipe parsing and validation: exact messages that read like a path to the bad value."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from surgery import SurgeryError, all_passes, get_pass, parse_recipe
from surgery.cli import main
from surgery.recipe import Imports, load_recipe


def _error(text: str, imports: Imports = "refuse") -> str:
    with pytest.raises(SurgeryError) as info:
        parse_recipe(textwrap.dedent(text), "r.yaml", imports=imports)
    return str(info.value)


def test_yaml_syntax_error_names_the_line() -> None:
    message = _error(
        """\
        passes:
          - remove-unused
          - pass: [unclosed
        """
    )
    assert message == "r.yaml:4: not valid YAML: expected ',' or ']', but got '<stream end>'"


def test_unknown_pass_suggests_the_nearest_and_lists_all() -> None:
    message = _error(
        """\
        passes:
          - remove-unused
          - pass: topological-srot
        """
    )
    valid = ", ".join(all_passes())
    assert {"cse", "remove-unused", "topological-sort"} <= set(all_passes())
    assert message == (
        "r.yaml:3: passes[1] (topological-srot): unknown pass 'topological-srot'; did you mean "
        f"'topological-sort'? valid passes: {valid}"
    )


def test_bad_option_type() -> None:
    message = _error(
        """\
        passes:
          - remove-unused
          - pass: shape-inference
            options:
              strict: yes please
        """
    )
    assert message == (
        "r.yaml:5: passes[1] (shape-inference): strict: expected a boolean, got 'yes please'"
    )


def test_integer_option_refuses_a_string() -> None:
    message = _error(
        """\
        passes:
          - pass: dedup-initializers
            options: {size_limit: "4096"}
        """
    )
    assert (
        message
        == "r.yaml:3: passes[0] (dedup-initializers): size_limit: expected an integer, got '4096'"
    )


def test_option_bound() -> None:
    message = _error("passes: [{pass: cse, options: {size_limit: -1}}]\n")
    assert message == (
        "r.yaml:1: passes[0] (cse): size_limit: input should be greater than or equal to 0, got -1"
    )


def test_unknown_option_suggests() -> None:
    message = _error(
        """\
        passes:
          - pass: dedup-initializers
            options:
              size_limt: 10
        """
    )
    assert message == (
        "r.yaml:4: passes[0] (dedup-initializers): size_limt: unknown option; did you mean "
        "'size_limit'? allowed: size_limit"
    )


def test_unknown_entry_key_and_top_key() -> None:
    assert _error("passes:\n  - pass: cse\n    option: {}\n") == (
        "r.yaml:3: passes[0] (cse): unknown key 'option'; did you mean 'options'? "
        "allowed: pass, use, parts, options"
    )
    assert _error("pases: []\n") == (
        "r.yaml:1: unknown key 'pases'; did you mean 'passes'? allowed: name, description, layout, passes"
    )


def test_parts_must_be_a_list_of_names() -> None:
    assert _error("passes:\n  - pass: cse\n    parts: decoder\n") == (
        "r.yaml:3: passes[0] (cse): parts: expected a non-empty list of part names, got 'decoder'"
    )


def test_wrong_part_name_is_rejected_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from surgery.synthetic import write_synthetic_model

    model = write_synthetic_model(tmp_path / "m.onnx")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - remove-unused\n  - pass: cse\n    parts: [decoder]\n")
    assert main(["apply", str(recipe), str(model), "-o", str(tmp_path / "out"), "-q"]) == 1
    assert capsys.readouterr().err.strip() == (
        f"surgery: error: {recipe}:3: passes[1] (cse): parts: no part named 'decoder' at this "
        "point; parts then: m"
    )
    assert not (tmp_path / "out").exists()


def test_pass_and_use_are_exclusive() -> None:
    assert _error("passes: [{pass: cse, use: 'x:Y'}]\n") == (
        "r.yaml:1: passes[0] (cse): give exactly one of 'pass' (a registered name) or 'use' (an import path)"
    )


def test_user_pass_by_import_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_passes.py").write_text(
        textwrap.dedent(
            """\
            import onnx_ir as ir
            import pydantic
            from surgery import ModelPass, PassOptions

            class Opts(PassOptions):
                label: str = "x"

            class Tag(ModelPass):
                '''Set the producer name.'''
                name = "tag"
                summary = "set the producer name"
                Options = Opts

                def call(self, model):
                    changed = model.producer_name != self.options.label
                    model.producer_name = self.options.label
                    return ir.passes.PassResult(model, changed)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = parse_recipe(
        "passes:\n  - use: my_passes:Tag\n    options: {label: hello}\n", "r.yaml", imports="allow"
    )
    assert recipe.steps[0].pass_.options.label == "hello"  # type: ignore[attr-defined]
    assert recipe.to_yaml().endswith("- use: my_passes:Tag\n  options:\n    label: hello\n")
    assert _error("passes:\n  - use: my_passes:Nope\n", "allow") == (
        "r.yaml:2: passes[0] (my_passes:Nope): 'my_passes:Nope': module 'my_passes' has no attribute 'Nope'"
    )
    assert _error("passes:\n  - use: my_passes:Tag\n    options: {labl: 1}\n", "allow").startswith(
        "r.yaml:3: passes[0] (tag): labl: unknown option; did you mean 'label'?"
    )
    sys.modules.pop("my_passes", None)


def test_print_back_parses_to_the_same_recipe() -> None:
    text = (
        "name: mine\nlayout: plain\npasses:\n- pass: remove-unused\n"
        "- pass: dedup-initializers\n  parts:\n  - m\n  options:\n    size_limit: 7\n"
        "- pass: optimize\n  options:\n    iterations: 3\n    inline: false\n"
    )
    recipe = parse_recipe(text, "r.yaml")
    assert recipe.to_yaml() == text
    assert parse_recipe(recipe.to_yaml()).to_yaml() == text


def test_shipped_recipes_validate(capsys: pytest.CaptureFixture[str]) -> None:
    shipped = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))
    assert shipped
    for path in shipped:
        assert main(["validate", path.stem]) == 0
        assert load_recipe(path).steps
    assert "ok" in capsys.readouterr().out


def test_validate_reports_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - remove-unusd\n")
    assert main(["validate", str(recipe)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"surgery: error: {recipe}:2: passes[0] (remove-unusd): unknown pass")
    assert "\n" not in err


def test_help_text_lists_options() -> None:
    text = get_pass("dedup_initializers").help()
    assert text.startswith("dedup-initializers: merge identical initializers")
    assert "size_limit (int, default 1024)" in text
