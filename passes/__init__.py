"""Built-in passes, one module per job; importing this package registers them all.

Every module in this package is imported here and the names in its ``__all__`` are re-exported,
so ``from passes import RemoveUnused`` works and a new pass module needs no edit of this file.
"""

import importlib
import pkgutil

__all__: list[str] = []

for _module_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    _module = importlib.import_module(f"{__name__}.{_module_info.name}")
    for _name in getattr(_module, "__all__", ()):
        globals()[_name] = getattr(_module, _name)
        __all__.append(_name)
