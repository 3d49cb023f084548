"""Recipes: a YAML list of passes with their options, validated before any work starts.

```yaml
name: cleanup
layout: plain             # how `surgery apply` writes the result
passes:
  - remove-unused         # a registered pass, default options
  - pass: dedup-initializers
    parts: [model]        # optional; default every part
    options:
      size_limit: 4096
  - use: mypkg.module:MyPass   # a user's own pass, by import path
```

Every error names the file, the line, the entry (``passes[2] (fp16)``), the key and what was
expected, in the spirit of pre-commit's ``clientlib``; user input is echoed abbreviated
(:func:`surgery.errors.show`). YAML is read within bounds by :mod:`surgery.recipe_yaml`, so
that a hostile recipe is refused in milliseconds instead of exhausting memory.

A ``use:`` entry imports a module, that is, runs its code. Only ``imports="allow"`` (``surgery
apply --allow-imports``) imports; the default refuses such a recipe, and ``imports="skip"``
(``surgery validate``) checks the entry's syntax and leaves it unimported.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import os
import types
import typing
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml

from surgery.bundle import Bundle
from surgery.errors import SurgeryError, clip, show
from surgery.layout import Layout, get_layout, layout_class
from surgery.manager import PassManager, Step
from surgery.pass_infra import BundlePass, BundlePassResult, PassContext, SurgeryPass
from surgery.recipe_yaml import MAX_RECIPE_BYTES, _compose, _too_large
from surgery.registry import all_passes, check_import_path, get_pass, import_pass

__all__ = ["Imports", "Recipe", "find_recipe", "load_recipe", "parse_recipe"]


#: What to do with ``use:`` entries (import paths of a user's passes).
Imports = Literal["refuse", "skip", "allow"]

_TOP_KEYS = ("name", "description", "layout", "passes")
_ENTRY_KEYS = ("pass", "use", "parts", "options")

_EXPECTED = {
    "bool_type": "a boolean",
    "bool_parsing": "a boolean",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "string_type": "a string",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
}


@dataclasses.dataclass
class Recipe:
    """A parsed, validated recipe."""

    source: str
    steps: list[Step]
    name: str = ""
    description: str = ""
    layout: Layout = dataclasses.field(default_factory=lambda: get_layout("plain"))

    def not_imported(self) -> list[str]:
        """The import paths of ``use:`` entries read without importing them (abbreviated)."""
        return [clip(s.pass_.path) for s in self.steps if isinstance(s.pass_, _NotImported)]

    def manager(self, instruments: Any = ()) -> PassManager:
        """A pass manager that runs this recipe, telling its passes about the recipe's layout."""
        context = PassContext(self.layout.name, self.layout.max_chunk_bytes)
        return PassManager(self.steps, instruments, context)

    def to_yaml(self) -> str:
        """The resolved recipe as YAML that parses back to the same recipe."""
        doc: dict[str, Any] = {}
        if self.name:
            doc["name"] = self.name
        if self.description:
            doc["description"] = self.description
        doc["layout"] = self.layout.describe()
        doc["passes"] = [_entry(step.pass_) for step in self.steps]
        return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)


class _NotImported(BundlePass):
    """A ``use:`` entry read without importing it (``surgery validate``): it cannot run."""

    name = "not-imported"
    summary = "a use: entry whose module was not imported"

    def __init__(self, path: str, parts: list[str] | None, options: dict[str, Any]) -> None:
        super().__init__(parts=parts)
        self.path = path
        self.raw_options = options

    def output_parts(self, parts: list[str] | None) -> list[str] | None:
        return None  # it may add, remove or rename parts: unknown without its code

    def describe(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"use": self.path}
        if self.parts is not None:
            entry["parts"] = list(self.parts)
        if self.raw_options:
            entry["options"] = self.raw_options
        return entry

    def call_bundle(self, bundle: Bundle) -> BundlePassResult:
        raise SurgeryError(
            f"{show(self.path)} was not imported; load the recipe with imports='allow'"
        )


def _entry(pass_: SurgeryPass) -> dict[str, Any]:
    if isinstance(pass_, _NotImported):
        return pass_.describe()
    entry = pass_.describe()
    if all_passes().get(pass_.name) is not type(pass_):
        del entry["pass"]
        cls = type(pass_)
        entry = {"use": f"{cls.__module__}:{cls.__qualname__}", **entry}
    return entry


def _node_at(node: yaml.Node, path: tuple[str | int, ...]) -> yaml.Node:
    """The deepest YAML node along ``path`` (for its line number)."""
    for key in path:
        if isinstance(node, yaml.MappingNode):
            match = [v for k, v in node.value if k.value == key]
            if not match:
                break
            node = match[0]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            break
    return node


class _Errors:
    """Builds messages that read like a path to the bad value."""

    def __init__(self, source: str, root: yaml.Node | None) -> None:
        self.source = source
        self.root = root

    def line(self, path: tuple[str | int, ...]) -> int:
        if self.root is None:
            return 1
        return _node_at(self.root, path).start_mark.line + 1

    def where(self, path: tuple[str | int, ...]) -> str:
        return f"{self.source}:{self.line(path)}"

    def __call__(self, path: tuple[str | int, ...], message: str) -> SurgeryError:
        return SurgeryError(f"{self.where(path)}: {message}")


def _suggest(key: str, allowed: tuple[str, ...] | list[str]) -> str:
    nearest = difflib.get_close_matches(key, allowed, n=1)
    hint = f"did you mean '{nearest[0]}'? " if nearest else ""
    return f"{hint}allowed: {', '.join(allowed)}"


def _fields_at(model: type[pydantic.BaseModel], loc: tuple[str | int, ...]) -> list[str]:
    """The option names allowed at ``loc`` inside ``model`` (nested models, dicts and lists)."""
    annotation: Any = model
    for key in loc:
        if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
            field = annotation.model_fields.get(str(key))
            if field is None:
                return []
            annotation = field.annotation
        else:
            args = typing.get_args(annotation)
            annotation = args[-1] if args else None
        if annotation is not None and typing.get_origin(annotation) in (
            typing.Union,
            types.UnionType,
        ):
            annotation = next((a for a in typing.get_args(annotation) if a is not type(None)), None)
    while not (isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel)):
        args = typing.get_args(annotation)
        if not args:
            return []
        annotation = args[-1]
    return list(annotation.model_fields)


def _first_error(exc: pydantic.ValidationError) -> Any:
    """The error to report: an unknown key first (a typo also makes its intended key "missing")."""
    errors = exc.errors()
    return next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])


def _describe_option_error(error: Any, options: type[pydantic.BaseModel]) -> tuple[str, str]:
    """``(key path, message)`` for one pydantic validation error."""
    loc = tuple(error["loc"])
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{clip(str(p), 40)}" for p in loc)
    key = key.lstrip(".")
    kind = error["type"]
    got = show(error.get("input"))
    if kind == "extra_forbidden":
        fields = _fields_at(options, loc[:-1])
        hint = _suggest(str(loc[-1]), fields) if fields else "this pass takes no options"
        return key, f"unknown option; {hint}"
    if kind == "missing":
        return key, "required option is missing"
    if kind == "literal_error":
        return key, f"expected one of {error['ctx']['expected']}, got {got}"
    if kind in _EXPECTED:
        return key, f"expected {_EXPECTED[kind]}, got {got}"
    # A validator's message may quote the input: bounded like every echo of it.
    message = clip(f"{error['msg'][0].lower()}{error['msg'][1:]}", 200)
    if kind == "value_error":  # raised by a validator: its message says what is wrong
        return key, message.removeprefix("value error, ")
    return key, f"{message}, got {got}"


def _parse_entry(
    index: int, raw: Any, errors: _Errors, imports: Imports
) -> tuple[SurgeryPass, str]:
    path: tuple[str | int, ...] = ("passes", index)
    if isinstance(raw, str):
        raw = {"pass": raw}
    if not isinstance(raw, dict):
        raise errors(path, f"passes[{index}]: expected a pass name or a mapping, got {show(raw)}")
    label = raw.get("pass") or raw.get("use") or "?"
    prefix = f"passes[{index}] ({clip(str(label), 60)})"
    for key in raw:
        if key not in _ENTRY_KEYS:
            raise errors(
                (*path, key),
                f"{prefix}: unknown key {show(key)}; {_suggest(str(key), _ENTRY_KEYS)}",
            )
    if ("pass" in raw) == ("use" in raw):
        raise errors(
            path,
            f"{prefix}: give exactly one of 'pass' (a registered name) or 'use' (an import path)",
        )
    which = "pass" if "pass" in raw else "use"
    if not isinstance(raw[which], str):
        raise errors(
            (*path, which), f"{prefix}: {which}: expected a string, got {show(raw[which])}"
        )
    parts = raw.get("parts")
    if parts is not None and (
        not isinstance(parts, list) or not parts or not all(isinstance(p, str) for p in parts)
    ):
        raise errors(
            (*path, "parts"),
            f"{prefix}: parts: expected a non-empty list of part names, got {show(parts)}",
        )
    options = raw.get("options") or {}
    if not isinstance(options, dict):
        raise errors(
            (*path, "options"), f"{prefix}: options: expected a mapping, got {show(options)}"
        )
    try:
        if which == "use":
            check_import_path(raw["use"])
            if imports == "skip":
                return _NotImported(raw["use"], parts, options), f"{errors.where(path)}: {prefix}"
            if imports == "refuse":
                raise SurgeryError(
                    "'use:' imports a module, which runs its code; if you trust this recipe, pass "
                    "--allow-imports (in Python: imports='allow')"
                )
        cls = get_pass(raw["pass"]) if which == "pass" else import_pass(raw["use"])
    except SurgeryError as exc:
        raise errors((*path, which), f"{prefix}: {exc}") from None
    prefix = f"passes[{index}] ({cls.name})"
    try:
        pass_ = cls(cls.Options(**options), parts=parts)
    except pydantic.ValidationError as exc:
        first = _first_error(exc)
        key, message = _describe_option_error(first, cls.Options)
        loc = tuple(first["loc"])
        raise errors((*path, "options", *loc), f"{prefix}: {key}: {message}") from None
    return pass_, f"{errors.where(path)}: {prefix}"


def _parse_layout(raw: Any, errors: _Errors) -> Layout:
    if not isinstance(raw, str | dict):
        raise errors(("layout",), f"layout: expected a layout name or a mapping, got {show(raw)}")
    options = dict(raw) if isinstance(raw, dict) else {"name": raw}
    try:
        cls = layout_class(options.pop("name", None))
    except SurgeryError as exc:
        raise errors(("layout",), f"layout: {exc}") from None
    try:
        return cls(cls.Options(**options))
    except pydantic.ValidationError as exc:
        first = _first_error(exc)
        key, message = _describe_option_error(first, cls.Options)
        raise errors(("layout", *first["loc"]), f"layout: {key}: {message}") from None


def parse_recipe(text: str, source: str = "<recipe>", *, imports: Imports = "refuse") -> Recipe:
    """Parse and validate recipe text; raise :class:`SurgeryError` naming the bad line.

    Args:
        text: The recipe (YAML).
        source: Its name in messages, e.g. the file it came from.
        imports: What to do with ``use:`` entries, which name a user's pass by import path:
            ``"refuse"`` them (the default: importing runs the module's code), ``"allow"``
            (import them: trust the recipe as you trust code), or ``"skip"`` (check their
            syntax only; the recipe cannot run, as in ``surgery validate``).
    """
    root, data = _compose(text, source)
    errors = _Errors(source, root)
    if not isinstance(data, dict):
        raise errors((), "a recipe is a mapping with a 'passes' list")
    for key in data:
        if key not in _TOP_KEYS:
            raise errors((key,), f"unknown key {show(key)}; {_suggest(str(key), _TOP_KEYS)}")
    passes = data.get("passes")
    if not isinstance(passes, list):
        raise errors(("passes",), "passes: expected a list of passes")
    layout = _parse_layout(data.get("layout", "plain"), errors)
    for key in ("name", "description"):
        if not isinstance(data.get(key, ""), str):
            raise errors((key,), f"{key}: expected a string, got {show(data[key])}")
    steps = []
    for index, raw in enumerate(passes):
        pass_, origin = _parse_entry(index, raw, errors, imports)
        steps.append(Step(index, pass_, origin))
    recipe = Recipe(source, steps, data.get("name", ""), data.get("description", ""), layout)
    manager = recipe.manager()
    manager.check_parts(None)
    manager.check_context()
    return recipe


def _shipped_recipes() -> dict[str, Traversable]:
    """The recipes installed with onnx-surgery (the ``recipes`` package), by name."""
    folder = importlib.resources.files("recipes")
    return {p.name.removesuffix(".yaml"): p for p in folder.iterdir() if p.name.endswith(".yaml")}


def find_recipe(name_or_path: str | os.PathLike[str]) -> Path:
    """A recipe file by path, or by name among the recipes shipped with onnx-surgery."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = _shipped_recipes()
    if path.suffix == "" and str(name_or_path) in shipped:
        return Path(str(shipped[str(name_or_path)]))
    nearest = difflib.get_close_matches(path.stem, shipped, n=1)
    hint = f" did you mean '{nearest[0]}'?" if nearest and path.parent == Path() else ""
    listing = f"{hint} shipped recipes: {', '.join(sorted(shipped))}" if shipped else ""
    raise SurgeryError(f"{name_or_path}: no such recipe file" + (f";{listing}" if listing else ""))


def load_recipe(name_or_path: str | os.PathLike[str], *, imports: Imports = "refuse") -> Recipe:
    """Read, parse and validate a recipe file (or a shipped recipe by name).

    ``imports`` is :func:`parse_recipe`'s: ``use:`` entries are imported only with ``"allow"``.
    """
    path = find_recipe(name_or_path)
    try:
        with path.open("rb") as file:
            data = file.read(MAX_RECIPE_BYTES + 1)  # never more, whatever the file is
        if len(data) > MAX_RECIPE_BYTES:
            raise _too_large(str(path))
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SurgeryError(f"{path}: cannot read recipe: {exc}") from None
    return parse_recipe(text, str(path), imports=imports)
