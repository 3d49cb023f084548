"""onnx-surgery: export Hugging Face vision-language models once, then reshape the graph with passes.

The public API for composing passes in Python::

    from surgery import PassManager, load, save
    from passes import RemoveUnused, TopologicalSort

    bundle = load("model.onnx")
    PassManager([RemoveUnused(), TopologicalSort()]).run(bundle)
    save(bundle, "out")
"""

from surgery.adapters import gs_pass
from surgery.bundle import Bundle
from surgery.errors import SurgeryError
from surgery.io import load, load_model
from surgery.manager import Instrument, PassFailed, PassManager, Step
from surgery.pass_infra import BundlePass, BundlePassResult, ModelPass, PassContext, PassOptions
from surgery.recipe import Recipe, load_recipe, parse_recipe
from surgery.registry import all_passes, get_pass, register
from surgery.writer import save

__all__ = [
    "Bundle",
    "BundlePass",
    "BundlePassResult",
    "Instrument",
    "ModelPass",
    "PassContext",
    "PassFailed",
    "PassManager",
    "PassOptions",
    "Recipe",
    "Step",
    "SurgeryError",
    "all_passes",
    "get_pass",
    "gs_pass",
    "load",
    "load_model",
    "load_recipe",
    "parse_recipe",
    "register",
    "save",
]
