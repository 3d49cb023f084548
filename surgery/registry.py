"""Named registries: the passes by kebab-case name, and the helper every registry shares.

Modelled on LLVM's ``PassRegistry.def``: one place that knows every pass by name, so recipes,
``surgery passes`` and error messages agree. The registry is filled from above and knows nothing
of what fills it: each built-in pass module registers its pass when imported, and
:mod:`surgery.builtins` (imported by the CLI, the exporter and the demo) imports them all. A
user's own pass is registered the same way, or named in a recipe by import path instead.
Layouts (:mod:`surgery.layout`) use the same :class:`Registry`, so both answer an unknown name
alike: the nearest name, then every valid one.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import Generic, TypeVar

import onnx_ir as ir

from surgery.errors import SurgeryError, clip, show
from surgery.pass_infra import SurgeryPass

__all__ = ["Registry", "all_passes", "check_import_path", "get_pass", "import_pass", "register"]

_T = TypeVar("_T", bound=type)


class Registry(Generic[_T]):
    """Classes of one kind (passes, layouts) by name, with nearest-name suggestions.

    Args:
        kind: What is registered, singular, for messages (``"pass"``).
        plural: Its plural (``"passes"``).
        normalize: Maps a name as written to its registered spelling.
    """

    def __init__(
        self, kind: str, plural: str, normalize: Callable[[str], str] = lambda name: name
    ) -> None:
        self.kind = kind
        self.plural = plural
        self.normalize = normalize
        self._classes: dict[str, _T] = {}

    def add(self, name: str, cls: _T) -> None:
        """Register ``cls`` as ``name``; a name taken by another class is a bug."""
        existing = self._classes.get(name)
        if existing is not None and existing is not cls:
            raise TypeError(f"{self.kind} name '{name}' is taken by {existing.__qualname__}")
        self._classes[name] = cls

    def all(self) -> dict[str, _T]:
        """Every registered class, by name, sorted."""
        return dict(sorted(self._classes.items()))

    def get(self, name: object) -> _T:
        """The class registered as ``name``; raise a :class:`SurgeryError` that suggests one."""
        known = self.all()
        key = self.normalize(name) if isinstance(name, str) else None
        if key is not None and key in known:
            return known[key]
        if not known:
            raise SurgeryError(
                f"unknown {self.kind} {show(name)}; no {self.plural} are registered "
                "(import surgery.builtins for the built-in ones)"
            )
        nearest = difflib.get_close_matches(key, known, n=1) if key is not None else []
        hint = f"did you mean '{nearest[0]}'? " if nearest else ""
        raise SurgeryError(
            f"unknown {self.kind} {show(name)}; {hint}valid {self.plural}: {', '.join(known)}"
        )


_PASSES: Registry[type[SurgeryPass]] = Registry(
    "pass", "passes", lambda name: name.replace("_", "-")
)
_P = TypeVar("_P", bound=type[SurgeryPass])


def register(cls: _P) -> _P:
    """Class decorator: register a pass under its ``name``."""
    if not cls.name or not cls.summary:
        raise TypeError(f"{cls.__qualname__} needs a name and a one-line summary to register")
    _PASSES.add(cls.name, cls)
    return cls


def all_passes() -> dict[str, type[SurgeryPass]]:
    """Every registered pass, by name, sorted."""
    return _PASSES.all()


def get_pass(name: str) -> type[SurgeryPass]:
    """The pass registered as ``name`` (``_`` and ``-`` are interchangeable)."""
    return _PASSES.get(name)


def check_import_path(path: str) -> tuple[str, str]:
    """``(module, attribute)`` of ``package.module:ClassName``, checked without importing.

    Absolute module names only: a relative one (``.mod``) has no package to be relative to.
    """
    module_name, sep, attr = path.partition(":")
    if (
        not sep
        or not all(p.isidentifier() for p in module_name.split("."))
        or not attr.isidentifier()
    ):
        raise SurgeryError(f"{show(path)}: expected an import path like 'mypkg.module:MyPass'")
    return module_name, attr


def import_pass(path: str) -> type[SurgeryPass]:
    """Import a user's pass class from ``package.module:ClassName``.

    A plain ``onnx_ir.passes.PassBase`` subclass without options is accepted too and wrapped.
    """
    module_name, attr = check_import_path(path)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SurgeryError(
            f"{show(path)}: cannot import module {show(module_name)}: {clip(str(exc))}"
        ) from None
    obj = getattr(module, attr, None)
    if obj is None:
        raise SurgeryError(
            f"{show(path)}: module {show(module_name)} has no attribute {show(attr)}"
        )
    if isinstance(obj, type) and issubclass(obj, SurgeryPass):
        return obj
    if isinstance(obj, type) and issubclass(obj, ir.passes.PassBase):
        from surgery.adapters import wrap_ir_pass

        return wrap_ir_pass(obj, name=path)
    raise SurgeryError(
        f"{show(path)} is not a pass class; subclass surgery.ModelPass (or onnx_ir.passes.InPlacePass), "
        "or adapt a graphsurgeon function with surgery.gs_pass"
    )
