"""onnx-surgery: export Hugging Face vision-language models once, then reshape the graph with passes.

The public API for composing passes in Python::

    from surgery import PassManager, TimePasses, load, save
    from passes import RemoveUnused, TopologicalSort

    bundle = load("model.onnx")
    PassManager([RemoveUnused(), TopologicalSort()], instruments=[TimePasses()]).run(bundle)
    save(bundle, "out")

To name the built-in passes and layouts in a recipe, ``import surgery.builtins`` first: it
registers them (the CLI does so).
"""

import importlib
import typing

if typing.TYPE_CHECKING:
    from surgery.adapters import gs_pass
    from surgery.bundle import Bundle
    from surgery.errors import SurgeryError
    from surgery.instruments import DumpAfterPass, ProgressLog, TimePasses, VerifyEach
    from surgery.io import load, load_model
    from surgery.layout import Layout, LayoutOptions, get_layout, register_layout
    from surgery.manager import Instrument, PassFailed, PassManager, Step
    from surgery.pass_infra import (
        BundlePass,
        BundlePassResult,
        ModelPass,
        PassContext,
        PassOptions,
    )
    from surgery.recipe import Recipe, load_recipe, parse_recipe
    from surgery.registry import all_passes, get_pass, register
    from surgery.writer import save

#: Where each public name lives. Imported on first use (PEP 562), so that ``surgery.cli`` starts
#: without onnx and onnx-ir and installs its signal handlers before any heavy import.
_HOMES = {
    "gs_pass": "surgery.adapters",
    "Bundle": "surgery.bundle",
    "SurgeryError": "surgery.errors",
    "DumpAfterPass": "surgery.instruments",
    "ProgressLog": "surgery.instruments",
    "TimePasses": "surgery.instruments",
    "VerifyEach": "surgery.instruments",
    "load": "surgery.io",
    "load_model": "surgery.io",
    "Layout": "surgery.layout",
    "LayoutOptions": "surgery.layout",
    "get_layout": "surgery.layout",
    "register_layout": "surgery.layout",
    "Instrument": "surgery.manager",
    "PassFailed": "surgery.manager",
    "PassManager": "surgery.manager",
    "Step": "surgery.manager",
    "BundlePass": "surgery.pass_infra",
    "BundlePassResult": "surgery.pass_infra",
    "ModelPass": "surgery.pass_infra",
    "PassContext": "surgery.pass_infra",
    "PassOptions": "surgery.pass_infra",
    "Recipe": "surgery.recipe",
    "load_recipe": "surgery.recipe",
    "parse_recipe": "surgery.recipe",
    "all_passes": "surgery.registry",
    "get_pass": "surgery.registry",
    "register": "surgery.registry",
    "save": "surgery.writer",
}


def __getattr__(name: str) -> typing.Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'surgery' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)


__all__ = [
    "Bundle",
    "BundlePass",
    "BundlePassResult",
    "DumpAfterPass",
    "Instrument",
    "Layout",
    "LayoutOptions",
    "ModelPass",
    "PassContext",
    "PassFailed",
    "PassManager",
    "PassOptions",
    "ProgressLog",
    "Recipe",
    "Step",
    "SurgeryError",
    "TimePasses",
    "VerifyEach",
    "all_passes",
    "get_layout",
    "get_pass",
    "gs_pass",
    "load",
    "load_model",
    "load_recipe",
    "parse_recipe",
    "register",
    "register_layout",
    "save",
]
