"""The quick start's install provides every module the code imports.

`pip install -e '.[export]'` and then `surgery demo` must not stop on a missing module: every
third-party module imported anywhere in ``surgery/`` and ``passes/`` comes from the base
dependencies or the ``export`` extra, or from what they require in turn. The one exception is
``surgery view``'s Netron, which its own ``view`` extra provides.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import re
import sys

import pytest
from _util import ROOT, absolute_imports
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")

FIRST_PARTY = {"surgery", "passes", "recipes"}
#: Modules imported only by commands outside the quick start, and the extra that provides each.
OTHER_EXTRAS = {"netron": "view"}


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(requirements: list[str]) -> set[str]:
    """Names of these distributions and of everything they require (no extras), installed ones."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = _normalize(req.name)
        if name in seen or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        # A distribution not installed here cannot provide any module we import.
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            todo += [Requirement(r) for r in importlib.metadata.requires(req.name) or []]
    return seen


def _imported_modules() -> dict[str, str]:
    """Third-party top-level modules imported by the package, each with one file importing it."""
    found: dict[str, str] = {}
    for path, name in absolute_imports():
        top = name.split(".")[0]
        if top not in sys.stdlib_module_names and top not in FIRST_PARTY:
            found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def test_quick_start_install_provides_every_imported_module() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    quick_start = _closure(project["dependencies"] + extras["export"])
    providers = importlib.metadata.packages_distributions()
    missing = []
    for module, where in _imported_modules().items():
        dists = {_normalize(d) for d in providers.get(module, [])}
        assert dists, f"{module} (imported in {where}) is not installed here"
        extra = OTHER_EXTRAS.get(module)
        allowed = _closure(extras[extra]) if extra else quick_start
        if not dists & allowed:
            missing.append(f"{module} ({where}; from {', '.join(sorted(dists))})")
    assert not missing, "not installed by pip install -e '.[export]': " + "; ".join(missing)
