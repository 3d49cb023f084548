"""The named registry of passes: kebab-case name → pass class.

Modelled on LLVM's ``PassRegistry.def``: one place that knows every pass by name, so recipes,
``surgery passes`` and error messages agree. Passes from the ``passes`` package register
themselves on import; a user's own pass is named in a recipe by import path instead.
"""

from __future__ import annotations

import difflib
import importlib
from typing import TypeVar

import onnx_ir as ir

from surgery.errors import SurgeryError, clip, show
from surgery.pass_infra import SurgeryPass

__all__ = ["all_passes", "check_import_path", "get_pass", "import_pass", "register"]

_REGISTRY: dict[str, type[SurgeryPass]] = {}
_P = TypeVar("_P", bound=type[SurgeryPass])


def register(cls: _P) -> _P:
    """Class decorator: register a pass under its ``name``."""
    if not cls.name or not cls.summary:
        raise TypeError(f"{cls.__qualname__} needs a name and a one-line summary to register")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise TypeError(f"pass name '{cls.name}' is taken by {existing.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin_passes() -> None:
    importlib.import_module("passes")


def all_passes() -> dict[str, type[SurgeryPass]]:
    """Every registered pass, by name, sorted."""
    _load_builtin_passes()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[SurgeryPass]:
    """The pass registered as ``name`` (``_`` and ``-`` are interchangeable)."""
    passes = all_passes()
    key = name.replace("_", "-")
    if key in passes:
        return passes[key]
    nearest = difflib.get_close_matches(key, passes, n=1)
    hint = f"did you mean '{nearest[0]}'? " if nearest else ""
    raise SurgeryError(f"unknown pass {show(name)}; {hint}valid passes: {', '.join(passes)}")


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
