"""The bundle: an ordered mapping from part name to ``onnx_ir.Model``.

Export gives a bundle with one part; ``split`` turns it into several. Parts may share weight
tensors in memory; each written file gets its own copy on disk.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping

import onnx_ir as ir

__all__ = ["Bundle"]


class Bundle(MutableMapping[str, ir.Model]):
    """An ordered set of named ONNX models (parts) that passes transform together."""

    def __init__(self, parts: Mapping[str, ir.Model] | None = None) -> None:
        self._parts: dict[str, ir.Model] = dict(parts or {})

    def __getitem__(self, name: str) -> ir.Model:
        return self._parts[name]

    def __setitem__(self, name: str, model: ir.Model) -> None:
        self._parts[name] = model

    def __delitem__(self, name: str) -> None:
        del self._parts[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._parts)

    def __len__(self) -> int:
        return len(self._parts)

    def __repr__(self) -> str:
        return f"Bundle({list(self._parts)})"

    @property
    def parts(self) -> list[str]:
        """Part names, in order."""
        return list(self._parts)
