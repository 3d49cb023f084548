"""Optional extras: import what a command needs, or say which extra to install.

``pyproject.toml`` keeps torch, transformers and Netron out of the core install (extras ``export``
and ``view``). A command that needs them checks here first, so a missing package is a user
error (one line naming the extra, exit 1) rather than a ``ModuleNotFoundError`` reported as a bug
halfway through the work. Importing, rather than only finding the module, also catches a package
that is installed but broken (a torch wheel missing its shared libraries).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from surgery.errors import SurgeryError

__all__ = ["EXTRAS", "import_optional", "require_extra"]

#: Extra name -> the modules it provides that the commands import, in import order.
EXTRAS: dict[str, tuple[str, ...]] = {
    "export": ("torch", "transformers", "safetensors", "tokenizers"),
    "view": ("netron",),
}


def import_optional(module: str, extra: str, user: str = "this") -> ModuleType:
    """Import ``module`` from the optional ``extra``, or raise :class:`SurgeryError` naming it.

    Args:
        module: The module to import, e.g. ``netron``.
        extra: The extra of ``onnx-surgery`` that installs it, e.g. ``view``.
        user: What needs it, for the message (e.g. ``surgery view``).

    Raises:
        SurgeryError: The module (or one it needs) cannot be imported.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        problem = "is not installed" if exc.name == module else f"cannot be imported ({exc})"
        raise SurgeryError(
            f"{user} needs {module}, which {problem}; "
            f"install the '{extra}' extra: pip install 'onnx-surgery[{extra}]'"
        ) from None


def require_extra(extra: str, user: str = "this") -> None:
    """Import every module of ``extra`` (see :data:`EXTRAS`), or raise naming the extra."""
    for module in EXTRAS[extra]:
        import_optional(module, extra, user)
