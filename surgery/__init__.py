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

from surgery.adapters import gs_pass
from surgery.bundle import Bundle
from surgery.errors import SurgeryError
from surgery.instruments import DumpAfterPass, ProgressLog, TimePasses, VerifyEach
from surgery.io import load, load_model
from surgery.layout import Layout, LayoutOptions, get_layout, register_layout
from surgery.manager import Instrument, PassFailed, PassManager, Step
from surgery.pass_infra import BundlePass, BundlePassResult, ModelPass, PassContext, PassOptions
from surgery.recipe import Recipe, load_recipe, parse_recipe
from surgery.registry import all_passes, get_pass, register
from surgery.writer import save

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
