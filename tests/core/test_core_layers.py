"""Dependencies point down only: the layer rules of README "Development", checked on the source.

Layers, top to bottom (a module may import its own layer and the ones below):

* **entry points**: ``surgery/cli.py``, ``surgery/demo.py``, the exporter ``surgery/export.py``,
  the generation checker ``surgery/verify.py`` (a tool the CLI and the demo run, as the exporter
  is) and ``surgery/builtins.py`` (the list of built-in passes and layouts). They may import
  anything.
* **passes**: ``passes/``. They build on the core, but never on the writer, the layout base or a
  layout (a pass reads what it needs from its ``PassContext``), nor on the ``surgery`` package
  facade (which imports the writer), nor on an entry point.
* **core**: every other module of ``surgery/``, ``surgery/__init__.py`` included. It never
  imports ``passes`` or ``recipes`` (shipped recipes are read as package data, never imported as
  code), nor an entry point. Within it, the writer and the layouts (modules defining a
  ``Layout`` subclass) never import each other, and the layout base ``surgery/layout.py``
  imports neither.

Imports are read with :mod:`ast`, wherever they are (module level, inside functions, under
``TYPE_CHECKING``), in every form: ``import a.b``, ``from a import b`` (``a.b`` too, in case it
is a module), relative imports, and ``importlib.import_module("a.b")`` with a literal name.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
ENTRY = {"surgery.cli", "surgery.demo", "surgery.export", "surgery.verify", "surgery.builtins"}
WRITER = "surgery.writer"
LAYOUT_BASE = "surgery.layout"


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(root: Path, path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` for every module ``path`` imports (or may import, for ``from``)."""
    module = _module_name(root, path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            if base:
                found.append((node.lineno, base))
            found += [(node.lineno, ".".join(filter(None, [base, a.name]))) for a in node.names]
        elif (
            isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id == "__import__")
            )
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def _defines_layout(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ClassDef):
            for base in node.bases:
                name = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", "")
                if name == "Layout":
                    return True
    return False


def _is(name: str, module: str) -> bool:
    return name == module or name.startswith(module + ".")


def violations(root: Path) -> list[str]:
    """Every upward import under ``root`` (a tree with ``surgery/`` and ``passes/``)."""
    files = sorted([*(root / "surgery").rglob("*.py"), *(root / "passes").rglob("*.py")])
    names = {_module_name(root, f): f for f in files}
    layouts = {m for m, f in names.items() if m != LAYOUT_BASE and _defines_layout(f)}
    found: list[str] = []
    for module, path in names.items():
        where = path.relative_to(root)

        def refuse(line: int, name: str, why: str, *, _where: Path = where) -> None:
            found.append(f"{_where}:{line}: imports {name}: {why}")

        refused: set[tuple[int, str]] = set()
        for line, name in imports_of(root, path):
            if module in ENTRY or any(at == line and _is(name, r) for at, r in refused):
                continue  # (``from a import b, c``: a is reported once, not a.b and a.c again)
            count = len(found)
            if any(_is(name, e) for e in ENTRY):
                refuse(line, name, "an entry point; only entry points import it")
            elif module.startswith("passes"):
                if (
                    _is(name, WRITER)
                    or _is(name, LAYOUT_BASE)
                    or any(_is(name, x) for x in layouts)
                ):
                    refuse(line, name, "a pass never imports the writer or a layout")
                elif name.count(".") == 1 and name.startswith("surgery.") and name not in names:
                    refuse(line, name, "a pass imports core modules, not the package facade")
            else:  # the core
                if _is(name, "passes") or _is(name, "recipes"):
                    refuse(line, name, "the core never imports passes or recipes")
                elif module == WRITER and any(_is(name, x) for x in layouts):
                    refuse(line, name, "the writer never imports a layout")
                elif module in layouts and _is(name, WRITER):
                    refuse(line, name, "a layout never imports the writer")
                elif module == LAYOUT_BASE and (
                    _is(name, WRITER) or any(_is(name, x) for x in layouts)
                ):
                    refuse(line, name, "the layout base imports neither the writer nor a layout")
            if len(found) > count:
                refused.add((line, name))
    return found


def test_dependencies_point_down() -> None:
    assert violations(ROOT) == []


def test_the_rules_know_the_layers() -> None:
    """The rules are not vacuous: the modules they name exist and the layouts are found."""
    assert all((ROOT / (m.replace(".", "/") + ".py")).is_file() for m in [*ENTRY, WRITER])
    assert _defines_layout(ROOT / "surgery" / "transformersjs.py")
    assert not _defines_layout(ROOT / "surgery" / "writer.py")


#: A layout module for the synthetic trees below.
LAY = "from surgery.layout import Layout\n\n\nclass L(Layout):\n    pass\n"

UPWARD = {
    "import passes\n": "surgery/core.py:1: imports passes: the core never imports passes",
    "def f():\n    from passes.fp16 import Fp16\n": "surgery/core.py:2: imports passes.fp16:",
    "from .cli import main\n": "surgery/core.py:1: imports surgery.cli: an entry point",
    "import importlib\nimportlib.import_module('recipes')\n": "surgery/core.py:2: imports recipes:",
    "from surgery import cli\n": "surgery/core.py:1: imports surgery.cli: an entry point",
}


@pytest.mark.parametrize("source", list(UPWARD))
def test_core_importing_upward_is_caught(source: str, tmp_path: Path) -> None:
    _tree(tmp_path, {"surgery/core.py": source})
    assert any(v.startswith(UPWARD[source]) for v in violations(tmp_path)), violations(tmp_path)


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (
            {"passes/p.py": "import surgery.writer\n"},
            "passes/p.py:1: imports surgery.writer: a pass",
        ),
        (
            {"passes/p.py": "from surgery.writer import save\n"},
            "passes/p.py:1: imports surgery.writer",
        ),
        (
            {"passes/p.py": "from surgery import lay\n"},
            "passes/p.py:1: imports surgery.lay: a pass",
        ),
        (
            {"passes/p.py": "from surgery import Bundle\n"},
            "passes/p.py:1: imports surgery.Bundle: a pass",
        ),
        (
            {"surgery/writer.py": "from surgery.lay import L\n"},
            "surgery/writer.py:1: imports surgery.lay",
        ),
        (
            {"surgery/lay.py": "import surgery.writer as w\n" + LAY},
            "surgery/lay.py:1: imports surgery.writer",
        ),
        ({"surgery/layout.py": "from . import lay\n"}, "surgery/layout.py:1: imports surgery.lay"),
    ],
)
def test_passes_and_layouts_importing_upward_are_caught(
    files: dict[str, str], expected: str, tmp_path: Path
) -> None:
    _tree(tmp_path, files)
    assert any(v.startswith(expected) for v in violations(tmp_path)), violations(tmp_path)


def test_entry_points_may_import_anything(tmp_path: Path) -> None:
    _tree(
        tmp_path, {"surgery/cli.py": "import passes\nimport surgery.lay\nimport surgery.writer\n"}
    )
    assert violations(tmp_path) == []


def _tree(root: Path, files: dict[str, str]) -> None:
    """A minimal project: a layout module ``surgery/lay.py`` plus ``files``."""
    base = {
        "surgery/__init__.py": "",
        "surgery/layout.py": "class Layout:\n    pass\n",
        "surgery/lay.py": LAY,
        "surgery/writer.py": "from surgery.layout import Layout\n",
        "passes/__init__.py": "",
    }
    for name, text in {**base, **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")


def test_readme_examples_import_only_the_public_api() -> None:
    """README's Python examples import from ``surgery`` and ``passes``, not from submodules."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, re.DOTALL)
    ours = [
        name
        for block in blocks
        for node in ast.walk(ast.parse(block))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for name in (
            [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else [a.name for a in node.names]
        )
        if _is(name, "surgery") or _is(name, "passes")
    ]
    assert ours and set(ours) <= {"surgery", "passes"}, ours


def test_pass_and_layout_registries_answer_alike() -> None:
    """One Registry helper: an unknown layout gets the nearest name, as an unknown pass does."""
    from surgery import SurgeryError, parse_recipe

    with pytest.raises(SurgeryError) as info:
        parse_recipe("layout: transformers-js\npasses: []\n", "r.yaml")
    assert str(info.value) == (
        "r.yaml:1: layout: unknown layout 'transformers-js'; did you mean 'transformers.js'? "
        "valid layouts: plain, transformers.js"
    )


def test_an_empty_registry_says_how_to_fill_it() -> None:
    from surgery import SurgeryError
    from surgery.registry import Registry

    with pytest.raises(SurgeryError) as info:
        Registry("layout", "layouts").get("plain")
    assert str(info.value) == (
        "unknown layout 'plain'; no layouts are registered (import surgery.builtins for the "
        "built-in ones)"
    )
