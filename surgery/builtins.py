"""The passes and layouts that ship with onnx-surgery: importing this module registers them.

The registries (:mod:`surgery.registry`, :mod:`surgery.layout`) are core and know nothing of what
fills them; this module is the one list of the built-ins, above the core. The entry points (the
CLI, the exporter, the demo) import it, and so does a program that names built-in passes or
layouts in a recipe. The ``passes`` package registers every pass module it holds.
"""

import passes  # noqa: F401  (each pass module registers its pass)
import surgery.transformersjs  # noqa: F401  (registers the transformers.js layout)

__all__: list[str] = []
