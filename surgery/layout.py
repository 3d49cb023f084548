"""Layouts: where each part and its data chunks go inside an output folder, by name.

The :class:`Layout` base, the plain layout and the registry of layouts by name, apart from the
writer so that the writer and the layouts it writes with (:mod:`surgery.transformersjs`) need not
import each other: both import this module. Like the pass registry it is filled from above
(:mod:`surgery.builtins` imports the built-in layouts) and answers an unknown name alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pydantic

from surgery.bundle import Bundle
from surgery.registry import Registry

__all__ = [
    "Layout",
    "LayoutOptions",
    "PlainLayout",
    "get_layout",
    "layout_class",
    "register_layout",
]


class LayoutOptions(pydantic.BaseModel):
    """Base of every layout's options (given in a recipe's ``layout:`` mapping)."""

    model_config = pydantic.ConfigDict(extra="forbid", strict=True, frozen=True)


class Layout:
    """Where each part and its data chunks go inside an output folder, and what goes beside."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[LayoutOptions]] = LayoutOptions

    def __init__(self, options: LayoutOptions | None = None, **kwargs: Any) -> None:
        self.options = options if options is not None else self.Options(**kwargs)

    @property
    def max_chunk_bytes(self) -> int | None:
        """Size limit of one data chunk (None: unlimited)."""
        return None

    def model_file(self, part: str) -> str:
        """The part's model file, relative to the output folder."""
        raise NotImplementedError

    def data_file(self, part: str, chunk: int) -> str:
        """The name of the part's ``chunk``-th data file, beside its model file."""
        raise NotImplementedError

    def prepare(self, bundle: Bundle) -> None:
        """Check, before any work, that this layout can be written for ``bundle``.

        Everything checkable from names, files and configs (the files ``finish`` copies, say)
        fails here with a :class:`SurgeryError`: ``surgery apply`` calls it before the first
        pass, :func:`surgery.writer.save` before the first weight.
        """

    def finish(self, out_dir: Path, bundle: Bundle, chunks: dict[str, list[str]]) -> None:
        """Write what goes beside the models (configs); ``chunks`` maps part → data files."""

    def describe(self) -> str | dict[str, Any]:
        """This layout as a recipe's ``layout:`` value."""
        options = self.options.model_dump(mode="json", exclude_unset=True)  # as written
        return {"name": self.name, **options} if options else self.name


class PlainLayout(Layout):
    """``<part>.onnx`` with its weights in ``<part>.onnx.data``."""

    name = "plain"

    def model_file(self, part: str) -> str:
        return f"{part}.onnx"

    def data_file(self, part: str, chunk: int) -> str:
        return f"{part}.onnx.data"


_LAYOUTS: Registry[type[Layout]] = Registry("layout", "layouts")


def register_layout(cls: type[Layout]) -> type[Layout]:
    """Class decorator: make a layout available by name to recipes and :func:`save`."""
    _LAYOUTS.add(cls.name, cls)
    return cls


register_layout(PlainLayout)


def layout_class(name: object) -> type[Layout]:
    """The layout registered as ``name`` (the built-in ones: see :mod:`surgery.builtins`)."""
    return _LAYOUTS.get(name)


def get_layout(spec: str | dict[str, Any] | Layout) -> Layout:
    """A layout from its name, a recipe mapping ``{name: ..., <options>}``, or as is.

    Raises:
        SurgeryError: unknown name; ``pydantic.ValidationError``: bad options.
    """
    if isinstance(spec, Layout):
        return spec
    options = dict(spec) if isinstance(spec, dict) else {"name": spec}
    cls = layout_class(options.pop("name", None))
    return cls(cls.Options(**options))
