"""What a pass is: a name, typed options, the parts it touches, and one job.

Builds on ``onnx_ir.passes``: a :class:`ModelPass` *is* an ``onnx_ir.passes.InPlacePass``
(``call(model) -> PassResult`` with an exact ``modified`` flag, ``requires`` / ``ensures``
checked by ``PassBase.__call__``), so onnx_ir's own passes compose with ours. What onnx_ir lacks
and this module adds: a registered name and summary, a pydantic options model with
``extra="forbid"`` (a bad recipe fails before any work), and the selection of parts a pass runs
on. A :class:`BundlePass` sees the whole bundle, for passes that create or remove parts (split).
A :class:`PassContext`, given by the pass manager, tells passes what the pipeline knows beyond
the graph (the layout's chunk limit), so that no pass repeats a layout's setting.
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
import types
import typing
from collections.abc import Sequence
from typing import Any, ClassVar, Generic, TypeVar

import onnx_ir as ir
import pydantic

from surgery.bundle import Bundle

__all__ = [
    "BundlePass",
    "BundlePassResult",
    "ModelPass",
    "PassContext",
    "PassOptions",
    "SurgeryPass",
]


class PassOptions(pydantic.BaseModel):
    """Base of every pass's options: unknown keys and loose types are rejected."""

    model_config = pydantic.ConfigDict(extra="forbid", strict=True, frozen=True)


@dataclasses.dataclass
class BundlePassResult:
    """What a :class:`BundlePass` returns: the bundle and whether anything changed."""

    bundle: Bundle
    modified: bool


@dataclasses.dataclass(frozen=True)
class PassContext:
    """What the pipeline tells its passes about where the result goes (set by the PassManager).

    Attributes:
        layout: The name of the layout the result is written with ("": not known).
        max_chunk_bytes: That layout's size limit of one external-data chunk (None: unlimited).
    """

    layout: str = ""
    max_chunk_bytes: int | None = None


OptionsT = TypeVar("OptionsT", bound=PassOptions)


class SurgeryPass(Generic[OptionsT]):
    """Naming, options and part selection shared by model and bundle passes.

    Subclasses set ``name`` (kebab-case), ``summary`` (one line) and ``Options``, and name the
    options type as the class parameter (``class Fp16(ModelPass[Fp16Options])``) so that
    ``self.options`` is typed; the class docstring is what ``surgery passes NAME`` prints.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type[PassOptions]] = PassOptions
    options: OptionsT
    #: Counts from the last call (rules fired, nodes kept…), shown by ``--time-passes``.
    statistics: dict[str, int]
    #: The pipeline's context; the PassManager sets it before the pass runs.
    context: PassContext = PassContext()

    def __init__(
        self,
        options: PassOptions | None = None,
        *,
        parts: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Create the pass.

        Args:
            options: A validated options object, or None to build one from ``kwargs``.
            parts: The parts to run on; None means every part.
            **kwargs: Options by name, validated by ``Options`` (Python composition).
        """
        if options is None:
            options = self.Options(**kwargs)
        elif kwargs:
            raise TypeError(f"{self.name}: give options either as an object or as keywords")
        elif not isinstance(options, self.Options):
            raise TypeError(f"{self.name}: options must be {self.Options.__name__}")
        self.options = typing.cast(OptionsT, options)
        self.parts: list[str] | None = list(parts) if parts is not None else None
        self.statistics = {}
        super().__init__()

    def check_context(self, context: PassContext) -> None:
        """Refuse, before any work, a pipeline context this pass cannot work in.

        Raises:
            SurgeryError: What disagrees and what to change (the caller adds the recipe line).
        """

    def output_parts(self, parts: list[str] | None) -> list[str] | None:
        """The parts after this pass, given those before it (None: not known before loading)."""
        return parts

    def describe(self) -> dict[str, Any]:
        """This pass as a recipe entry: the inverse of recipe parsing.

        Options appear as written: those set explicitly are kept even when they equal the
        default (pydantic records them in ``model_fields_set``), untouched defaults are left out.
        """
        entry: dict[str, Any] = {"pass": self.name}
        if self.parts is not None:
            entry["parts"] = list(self.parts)
        options = self.options.model_dump(mode="json", exclude_unset=True)
        if options:
            entry["options"] = options
        return entry

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.options.model_dump().items())
        return f"{type(self).__name__}({args})"

    @classmethod
    def help(cls) -> str:
        """The full help text: docstring plus the options with their types and defaults."""
        lines = [f"{cls.name}: {cls.summary}", "", inspect.cleandoc(cls.__doc__ or "")]
        fields = cls.Options.model_fields
        if fields:
            lines += ["", "Options:"]
            for key, field in fields.items():
                default = (
                    "required"
                    if field.is_required()
                    else f"default {field.get_default(call_default_factory=True)!r}"
                )
                lines.append(f"  {key} ({_type_name(field.annotation)}, {default})")
                if field.description:
                    lines.append(f"      {field.description}")
        return "\n".join(lines)


def _type_name(annotation: Any) -> str:
    """An option's type as a user reads it: ``'io' | 'all'``, ``list[str]``, ``bool | None``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if annotation is type(None):
        return "None"
    if origin is not None and args:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", None) or str(annotation)


class ModelPass(SurgeryPass[OptionsT], ir.passes.InPlacePass):
    """A pass that transforms one part at a time, in place (an ``onnx_ir`` in-place pass)."""

    @abc.abstractmethod
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Transform ``model`` in place and say exactly whether it changed."""


class BundlePass(SurgeryPass[OptionsT], abc.ABC):
    """A pass that transforms the bundle as a whole (it may add, remove or rename parts).

    Called like an ``onnx_ir`` pass: ``pass_(bundle)`` checks :meth:`requires`, runs
    :meth:`call_bundle`, then checks :meth:`ensures`, raising onnx_ir's ``PreconditionError`` /
    ``PostconditionError`` as ``PassBase.__call__`` does, so the manager treats both kinds alike.
    """

    def __call__(self, bundle: Bundle) -> BundlePassResult:
        """Check the preconditions, transform ``bundle``, check the postconditions."""
        try:
            self.requires(bundle)
        except ir.passes.PreconditionError:
            raise
        except Exception as exc:
            raise ir.passes.PreconditionError(
                f"Pre-condition for pass '{type(self).__name__}' failed"
            ) from exc
        result = self.call_bundle(bundle)
        if not isinstance(result, BundlePassResult):
            raise TypeError(f"{self.name}: call_bundle must return a BundlePassResult")
        try:
            self.ensures(result.bundle)
        except ir.passes.PostconditionError:
            raise
        except Exception as exc:
            raise ir.passes.PostconditionError(
                f"Post-condition for pass '{type(self).__name__}' failed"
            ) from exc
        return result

    def requires(self, bundle: Bundle) -> None:
        """What the pass needs of its input; raise ``PreconditionError`` if it is not so."""

    def ensures(self, bundle: Bundle) -> None:
        """What the pass promises of its output; raise ``PostconditionError`` if it is not so."""

    @abc.abstractmethod
    def call_bundle(self, bundle: Bundle) -> BundlePassResult:
        """Transform ``bundle`` and say exactly whether it changed."""
