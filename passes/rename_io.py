"""Rename graph inputs and outputs by template, and symbolic dims by name.

```yaml
- pass: rename-io
  parts: [decoder_model_merged]
  options:
    values:
      "past.{layer}.{kind}": "past_key_values.{layer}.{kind}"
      token_embeddings: inputs_embeds
    dims: {s0: sequence_length}
```

A template's ``{field}`` matches one dot-separated name segment (one or more characters other
than ``.``) and the whole name must match; the target is the template with the captured fields
substituted. The first template (in order) that matches a name renames it; names are renamed once,
never chained. By default only graph inputs and outputs are renamed (``scope: all`` renames every
value, initializers included). ``dims`` renames symbolic dims in the shapes of every value, graph
inputs and outputs included, subgraphs too; static dims (kv heads, head_dim) are never touched.
Renaming two dims to one name declares them equal, as in ONNX; it is not checked.

Decisions: a rename that would give two values one name, or a value the name of another value that
keeps it, is refused before anything changes, naming both. A template or dim that matches nothing
in a part is logged as a warning and the part is left as it is, since a recipe runs the pass on
every part by default and a decoder's cache names are absent from the vision encoder; with
``strict: true`` it is an error instead.

Reused: onnx_ir's ``Value.name`` setter (which keeps the initializer table consistent),
``onnx_ir.convenience.create_value_mapping`` for the names in use, and ``Shape`` item assignment.
Templates are parsed with :class:`string.Formatter`, the parser of ``str.format``. Nothing in
onnx_ir or onnxscript renames by pattern (onnx_ir's ``NameFixPass`` only makes names unique).
"""

from __future__ import annotations

import logging
import re
import string
from typing import Literal

import onnx_ir as ir
import pydantic
import pydantic_core

from surgery.errors import SurgeryError
from surgery.pass_infra import ModelPass, PassOptions
from surgery.registry import register

__all__ = ["RenameIO"]

logger = logging.getLogger(__name__)


def _fields(template: str) -> list[str]:
    """The ``{field}`` names of ``template``, in order (``ValueError`` if malformed)."""
    fields = []
    for _, field, spec, conversion in string.Formatter().parse(template):
        if field is None:
            continue
        if not field.isidentifier() or spec or conversion:
            raise ValueError(f"'{{{field}}}' is not a placeholder; use a plain name like {{layer}}")
        fields.append(field)
    return fields


def _pattern(template: str) -> re.Pattern[str]:
    """The regular expression a source template stands for."""
    parts = []
    for literal, field, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field is not None:
            parts.append(f"(?P<{field}>[^.]+)")
    return re.compile("".join(parts))


class _RenameOptions(PassOptions):
    values: dict[str, str] = pydantic.Field(
        default_factory=dict,
        description="source template -> target template, e.g. 'past.{layer}.{kind}': "
        "'past_key_values.{layer}.{kind}'",
    )
    dims: dict[str, str] = pydantic.Field(
        default_factory=dict, description="symbolic dim renames, e.g. s0: sequence_length"
    )
    scope: Literal["io", "all"] = pydantic.Field(
        default="io", description="rename graph inputs and outputs only (io), or every value"
    )
    strict: bool = pydantic.Field(
        default=False, description="a template or dim that matches nothing is an error"
    )

    @pydantic.field_validator("values")
    @classmethod
    def _check_templates(cls, values: dict[str, str]) -> dict[str, str]:
        for source, target in values.items():
            try:
                captured = _fields(source)
                used = _fields(target)
            except ValueError as exc:
                raise _bad_template(f"'{source}': {exc}") from None
            repeated = next((f for f in captured if captured.count(f) > 1), None)
            if repeated:
                raise _bad_template(f"'{source}': placeholder {{{repeated}}} appears twice")
            unknown = next((f for f in used if f not in captured), None)
            if unknown:
                raise _bad_template(
                    f"'{target}' uses {{{unknown}}}, which '{source}' does not capture"
                )
        return values


def _bad_template(detail: str) -> pydantic_core.PydanticCustomError:
    """A validation error whose message is ``detail`` (braces kept as they are)."""
    return pydantic_core.PydanticCustomError("bad_template", "{detail}", {"detail": detail})


@register
class RenameIO(ModelPass[_RenameOptions]):
    """Rename graph inputs and outputs by template, and symbolic dims by name.

    ``values`` maps source templates to targets: ``{field}`` matches one dot-separated name
    segment and is substituted in the target (``past.{layer}.{kind}`` ->
    ``past_key_values.{layer}.{kind}``); plain names rename one value. The first matching template
    wins. ``scope: all`` renames every value, not only graph inputs and outputs. ``dims`` renames
    symbolic dims in every value's shape; static dims are never changed. A rename onto a name in
    use, or of two values to one name, is refused naming both. A template or dim that matches
    nothing in a part is a warning (an error with ``strict: true``).
    """

    name = "rename-io"
    summary = "rename graph inputs/outputs by template and symbolic dims by name"
    Options = _RenameOptions

    def _unmatched(self, what: str, names: list[str], model: ir.Model) -> None:
        if not names:
            return
        listed = ", ".join(f"'{n}'" for n in names)
        message = f"rename-io: {what} {listed} matched nothing in graph '{model.graph.name}'"
        if self.options.strict:
            raise SurgeryError(f"{message}; fix the name or select parts with 'parts:'")
        logger.warning("%s", message)

    def _plan(self, model: ir.Model) -> dict[ir.Value, str]:
        """New names by value, checked for collisions; nothing is changed yet."""
        graph = model.graph
        if self.options.scope == "io":
            candidates = list(dict.fromkeys([*graph.inputs, *graph.outputs]))
        else:
            candidates = list(ir.convenience.create_value_mapping(graph).values())
        rules = [(_pattern(s), t, s) for s, t in self.options.values.items()]
        matched: set[str] = set()
        plan: dict[ir.Value, str] = {}
        for value in candidates:
            for pattern, target, source in rules:
                found = pattern.fullmatch(value.name or "")
                if found:
                    matched.add(source)
                    if target.format(**found.groupdict()) != value.name:
                        plan[value] = target.format(**found.groupdict())
                    break
        self._unmatched("template", [s for _, _, s in rules if s not in matched], model)
        taken: dict[str, ir.Value] = {}
        for value, new in plan.items():
            if new in taken:
                raise SurgeryError(
                    f"rename-io: '{taken[new].name}' and '{value.name}' would both be renamed "
                    f"to '{new}'; make the templates tell them apart"
                )
            taken[new] = value
        in_use = ir.convenience.create_value_mapping(graph)
        for value, new in plan.items():
            other = in_use.get(new)
            if other is not None and other is not value and other not in plan:
                raise SurgeryError(
                    f"rename-io: renaming '{value.name}' to '{new}' collides with the existing "
                    f"value '{new}'; rename that one too or choose another name"
                )
        return plan

    def _rename_dims(self, model: ir.Model) -> bool:
        dims = self.options.dims
        seen: set[str] = set()
        for graph in model.graphs():
            values = [*graph.inputs, *graph.initializers.values()]
            values += [v for node in graph for v in node.outputs]
            for value in values:
                shape = value.shape
                if shape is None:
                    continue
                hits = [
                    i
                    for i, d in enumerate(shape)
                    if isinstance(d, ir.SymbolicDim) and d.value in dims
                ]
                if not hits:
                    continue
                new = shape.copy() if shape.frozen else shape
                for i in hits:
                    old = shape[i]
                    assert isinstance(old, ir.SymbolicDim) and old.value is not None
                    seen.add(old.value)
                    new[i] = ir.SymbolicDim(dims[old.value])
                value.shape = new
        self._unmatched("dim", [d for d in dims if d not in seen], model)
        return any(dims[d] != d for d in seen)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Rename the planned values (two steps, so swaps work), then the dims."""
        plan = self._plan(model)
        for value, new in plan.items():
            logger.info("rename-io: '%s' -> '%s'", value.name, new)
            value.name = f"{value.name}\0renaming"
        for value, new in plan.items():
            value.name = new
        changed = self._rename_dims(model)
        return ir.passes.PassResult(model, modified=bool(plan) or changed)
