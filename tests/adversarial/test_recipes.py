"""Hostile recipes: alias bombs, deep nesting, huge files and values, and code run by ``use:``.

Each refusal is checked through the CLI: exit 1 with the pinned line, the recipe and the model
byte-identical afterwards, and nothing at or beside the destination. A subprocess timeout catches
a regression into the minutes these recipes used to take.
"""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import onnx_ir as ir
import pytest

from surgery import Bundle, SurgeryError, all_passes, parse_recipe
from surgery.recipe import MAX_RECIPE_BYTES, load_recipe

from .conftest import Outcome, assert_refused, digests, leftovers, run_cli

TIMEOUT = 20  # seconds; each case is refused in well under one

#: Nine aliases of nine aliases, eight levels deep: 9**9 values in about 300 bytes.
CHAIN = (
    "[&a0 [x, x, x, x, x, x, x, x, x], "
    + ", ".join(f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9))
    + "]"
)
VALUES = (
    "recipe refused: more than 10000 values once aliases are expanded; a recipe lists passes and "
    "their options, not data"
)
DEEP = "recipe refused: nested deeper than 32 levels"
USE_REFUSED = (
    "'use:' imports a module, which runs its code; if you trust this recipe, pass "
    "--allow-imports (in Python: imports='allow')"
)

# name: (recipe text, the line after "surgery: error: <recipe>")
CASES = {
    "alias bomb in options": (
        f"passes:\n  - pass: cse\n    options: {{size_limit: {CHAIN}}}\n",
        f":3: {VALUES}",
    ),
    "alias bomb in parts": (f"passes:\n  - pass: cse\n    parts: {CHAIN}\n", f":3: {VALUES}"),
    "alias bomb in passes": (f"passes: {CHAIN}\n", f":1: {VALUES}"),
    "alias bomb in a merge key": (
        f"passes:\n  - pass: cse\n    options: {{<<: {{k: {CHAIN}}}}}\n",
        f":3: {VALUES}",
    ),
    "5000 nested [": ("passes: " + "[" * 5000 + "]" * 5000 + "\n", f":1: {DEEP}"),
    "5000 nested {": ("passes: " + "{a: " * 5000 + "}" * 5000 + "\n", f":1: {DEEP}"),
    "100 nested block lists": (
        "passes:\n" + "".join(" " * i + "-\n" for i in range(100)),
        f":33: {DEEP}",
    ),
    "a value that contains itself": (
        "passes: &a [*a]\n",
        ":1: recipe refused: alias *a refers to a value that contains it; a recipe cannot be "
        "recursive",
    ),
    "over the size limit": (
        "passes: [cse]\n" + "#" * MAX_RECIPE_BYTES + "\n",
        ": recipe is over 262144 bytes; a recipe lists passes and their options, not data",
    ),
    "a 100,000-digit integer": (
        "passes:\n  - pass: cse\n    options: {size_limit: 0x" + "f" * 100_000 + "}\n",
        ":3: recipe refused: integer out of range: a recipe takes integers of at most 64 bits, "
        f"got '0x{'f' * 25}...{'f' * 28}'",
    ),
    "a 65-bit integer": (
        "passes: [{pass: cse, options: {size_limit: 36893488147419103232}}]\n",
        ":1: recipe refused: integer out of range: a recipe takes integers of at most 64 bits, "
        "got '36893488147419103232'",
    ),
    "a long string where an integer belongs": (
        "passes:\n  - pass: cse\n    options: {size_limit: '" + "y" * 100_000 + "'}\n",
        f":3: passes[0] (cse): size_limit: expected an integer, got '{'y' * 27}...{'y' * 28}'",
    ),
    "a long pass name": (
        "passes:\n  - " + "k" * 100_000 + "\n",
        f":2: passes[0] ({'k' * 59}…): unknown pass '{'k' * 27}...{'k' * 28}'; valid passes: ",
    ),
    "a long part list": (
        "passes:\n  - pass: cse\n    parts: [" + ", ".join(["p"] * 5000) + ", 7]\n",
        ":3: passes[0] (cse): parts: expected a non-empty list of part names, got "
        "['p', 'p', 'p', 'p', 'p', 'p', ...]",
    ),
    "a long unknown option": (
        "passes:\n  - pass: cse\n    options:\n      ? " + "o" * 100_000 + "\n      : 1\n",
        f":5: passes[0] (cse): {'o' * 39}…: unknown option; allowed: size_limit",
    ),
    "a list where a pass name belongs": (
        "passes: [{pass: [remove-unused]}]\n",
        ":1: passes[0] (['remove-unused']): pass: expected a string, got ['remove-unused']",
    ),
    "a relative import path": (
        "passes: [{use: .mine:MyPass}]\n",
        ":1: passes[0] (.mine:MyPass): '.mine:MyPass': expected an import path like "
        "'mypkg.module:MyPass'",
    ),
}


def _refused_line(outcome: Outcome, recipe: Path, expected: str) -> str:
    line = assert_refused(outcome)
    assert line.startswith(f"surgery: error: {recipe}{expected}"), line
    # Bounded: at most a few hundred characters besides the path and our own list of pass names.
    ours = len(", ".join(all_passes())) if "valid passes: " in line else 0
    assert len(line) < 300 + len(str(recipe)) + ours, len(line)
    return line


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_recipe_is_refused(name: str, model_path: Path, tmp_path: Path) -> None:
    text, expected = CASES[name]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text, encoding="utf-8")
    dest = tmp_path / "out"
    before = digests(recipe, model_path.parent)
    for args in (("validate", recipe), ("apply", recipe, model_path, "-o", dest, "-q")):
        outcome = run_cli(*args, timeout=TIMEOUT)
        _refused_line(outcome, recipe, expected)
        assert outcome.stdout == ""
    assert digests(recipe, model_path.parent) == before
    assert not dest.exists()
    assert leftovers(dest) == []


def _at_bound(aliases: int) -> str:
    """A recipe of 18 values plus ``aliases`` aliases of one value."""
    return (
        "passes:\n"
        "  - pass: fp16\n"
        f"    options: {{node_block_list: [&n n, {', '.join(['*n'] * aliases)}]}}\n"
        "  - pass: cse\n"
        "    options: {size_limit: 0xffffffffffffffff}\n"
    )


def test_recipe_at_the_bounds_is_accepted() -> None:
    """Exactly 10,000 values with aliases expanded, 32 levels and a 64-bit integer are fine."""
    recipe = parse_recipe(_at_bound(9_982))
    assert len(recipe.steps[0].pass_.options.node_block_list) == 9_983  # type: ignore[attr-defined]
    assert recipe.steps[1].pass_.options.size_limit == 2**64 - 1  # type: ignore[attr-defined]
    with pytest.raises(SurgeryError) as info:
        parse_recipe(_at_bound(9_983), "r.yaml")
    assert str(info.value) == f"r.yaml:5: {VALUES}"  # the 10,001st value
    with pytest.raises(SurgeryError, match="passes\\[0\\]: expected a pass name or a mapping"):
        parse_recipe("passes: " + "[" * 31 + "]" * 31 + "\n")


# --- `use:` runs code: validate never imports, apply only with --allow-imports ---------------

PLUGIN = """\
from pathlib import Path

import onnx_ir as ir
from surgery import ModelPass

Path({marker!r}).write_text("imported")


class Tag(ModelPass):
    '''Set the producer name.'''

    name = "tag"
    summary = "set the producer name"

    def call(self, model):
        model.producer_name = "tagged"
        return ir.passes.PassResult(model, True)
"""


@pytest.fixture
def plugin(tmp_path: Path) -> tuple[Path, Path]:
    """``(folder holding plugin_with_effects.py, the marker file importing it writes)``."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    marker = tmp_path / "marker"
    (folder / "plugin_with_effects.py").write_text(PLUGIN.format(marker=str(marker)))
    return folder, marker


def _on_path(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Put ``folder`` on the child processes' PYTHONPATH, as a user who installs a plugin would."""
    inherited = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), *filter(None, [inherited])]))


def test_validate_does_not_import(tmp_path: Path) -> None:
    recipe = tmp_path / "zen.yaml"
    recipe.write_text("passes:\n  - remove-unused\n  - use: this:s\n")
    outcome = run_cli("validate", recipe, timeout=TIMEOUT)
    assert (outcome.code, outcome.stderr) == (0, "")
    assert outcome.stdout == (
        f"{recipe}: ok, 2 passes; not imported, options unchecked: this:s\n"
    )  # and no Zen of Python
    printed = run_cli("validate", "--print", recipe, timeout=TIMEOUT)
    assert "Beautiful is better than ugly" not in printed.stdout + printed.stderr
    assert "- use: this:s\n" in printed.stdout


def test_apply_refuses_use_without_permission(
    plugin: tuple[Path, Path], model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, marker = plugin
    _on_path(monkeypatch, folder)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - remove-unused\n  - use: plugin_with_effects:Tag\n")
    dest = tmp_path / "out"
    before = digests(recipe, model_path.parent, folder)

    validated = run_cli("validate", recipe, timeout=TIMEOUT)
    assert (validated.code, validated.stdout) == (
        0,
        f"{recipe}: ok, 2 passes; not imported, options unchecked: plugin_with_effects:Tag\n",
    )
    assert not marker.exists()

    outcome = run_cli("apply", recipe, model_path, "-o", dest, "-q", timeout=TIMEOUT)
    assert assert_refused(outcome) == (
        f"surgery: error: {recipe}:3: passes[1] (plugin_with_effects:Tag): {USE_REFUSED}"
    )
    assert not marker.exists()
    assert digests(recipe, model_path.parent, folder) == before
    assert not dest.exists()
    assert leftovers(dest) == []

    allowed = run_cli(
        "apply", recipe, model_path, "-o", dest, "-q", "--allow-imports", timeout=TIMEOUT
    )
    assert (allowed.code, allowed.stderr) == (0, ""), allowed.stderr
    assert marker.read_text() == "imported"
    assert (dest / "m.onnx").is_file()
    assert run_cli("inspect", dest, timeout=TIMEOUT).code == 0


def test_apply_does_not_import_from_the_working_directory(
    plugin: tuple[Path, Path], model_path: Path, tmp_path: Path
) -> None:
    """`python -m` puts the working directory on sys.path; a plugin there is not picked up."""
    folder, marker = plugin
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - use: plugin_with_effects:Tag\n")
    dest = tmp_path / "out"
    outcome = run_cli(
        "apply",
        recipe,
        model_path,
        "-o",
        dest,
        "-q",
        "--allow-imports",
        cwd=folder,
        timeout=TIMEOUT,
    )
    assert assert_refused(outcome) == (
        f"surgery: error: {recipe}:2: passes[0] (plugin_with_effects:Tag): "
        "'plugin_with_effects:Tag': cannot import module 'plugin_with_effects': No module named "
        "'plugin_with_effects'"
    )
    assert not marker.exists()
    assert not dest.exists()
    assert leftovers(dest) == []


def test_python_api_imports_only_when_allowed(
    plugin: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, marker = plugin
    monkeypatch.syspath_prepend(str(folder))
    text = "passes:\n  - use: plugin_with_effects:Tag\n    parts: [m]\n"
    with pytest.raises(SurgeryError) as info:
        parse_recipe(text, "r.yaml")
    assert str(info.value) == f"r.yaml:2: passes[0] (plugin_with_effects:Tag): {USE_REFUSED}"
    skipped = parse_recipe(text, "r.yaml", imports="skip")
    assert skipped.not_imported() == ["plugin_with_effects:Tag"]
    assert skipped.to_yaml().endswith("- use: plugin_with_effects:Tag\n  parts:\n  - m\n")
    with pytest.raises(SurgeryError, match="'plugin_with_effects:Tag' was not imported"):
        skipped.manager().run(Bundle({"m": ir.Model(ir.Graph([], [], nodes=[]), ir_version=10)}))
    assert not marker.exists()
    try:
        allowed = parse_recipe(text, "r.yaml", imports="allow")
        assert marker.read_text() == "imported"
        assert allowed.steps[0].name == "tag"
    finally:
        sys.modules.pop("plugin_with_effects", None)


def test_shipped_recipes_import_nothing() -> None:
    """Shipped recipes are named without a path: they load under the default, imports refused."""
    shipped = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))
    assert shipped
    for path in shipped:
        assert load_recipe(path.stem).not_imported() == []
        assert "use:" not in textwrap.dedent(path.read_text())
