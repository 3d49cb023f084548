"""Reading a recipe's YAML within bounds, before anything in it is trusted.

PyYAML's safe loader, extended to bound the recipe while it is composed into nodes (size,
nesting, values with aliases expanded, integer width), so that a hostile recipe is refused in
milliseconds instead of exhausting memory; the nodes also give line numbers. Apart from
:mod:`surgery.recipe`, which gives the data its meaning (passes, options, layout).
"""

from __future__ import annotations

import typing
from typing import Any

import yaml

from surgery.errors import SurgeryError, clip, show

__all__ = ["MAX_RECIPE_BYTES", "MAX_RECIPE_DEPTH", "MAX_RECIPE_VALUES"]

#: Bounds on a recipe. A recipe lists a few passes and their options (the flagship: 1.6 kB, 81
#: values, 8 levels deep), so these are far above any real one and far below what takes
#: noticeable time or memory.
MAX_RECIPE_BYTES = 256 * 1024
MAX_RECIPE_VALUES = 10_000  # scalars, lists and mappings, counted with every alias expanded
MAX_RECIPE_DEPTH = 32
_MAX_INT_BITS = 64
_MAX_INT_CHARS = 100  # longer integer text is refused before it is converted


class _Refused(yaml.MarkedYAMLError):
    """A recipe over one of the bounds (raised while composing; its syntax is not at fault)."""

    def __init__(self, problem: str, mark: Any) -> None:
        super().__init__(problem=problem, problem_mark=mark)


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing while it composes a recipe too deep or too large.

    PyYAML composes an alias as a second reference to the anchored node, so a few hundred bytes
    of aliases of aliases ("billion laughs") stand for billions of values once anything walks
    them (validation, an error message's ``repr``). This loader counts each node as often as
    aliases repeat it, and the nesting depth, and stops at the first node over a bound: before
    any Python object is built, and without recursing deeper than the bound.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._values = 0
        self._depth = 0
        self._expanded: dict[int, int] = {}  # id(anchored node) -> the values it stands for

    def _count(self, values: int, mark: Any) -> None:
        self._values += values
        if self._values > MAX_RECIPE_VALUES:
            raise _Refused(
                f"more than {MAX_RECIPE_VALUES} values once aliases are expanded; "
                "a recipe lists passes and their options, not data",
                mark,
            )

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            anchored = self.anchors.get(event.anchor)
            if anchored is not None:  # an undefined alias is PyYAML's error
                if id(anchored) not in self._expanded:
                    raise _Refused(
                        f"alias *{clip(str(event.anchor))} refers to a value that "
                        "contains it; a recipe cannot be recursive",
                        event.start_mark,
                    )
                self._count(self._expanded[id(anchored)], event.start_mark)
            return typing.cast(yaml.Node, super().compose_node(parent, index))
        if self._depth == MAX_RECIPE_DEPTH:
            raise _Refused(
                f"nested deeper than {MAX_RECIPE_DEPTH} levels",
                event.start_mark,
            )
        start = self._values
        self._count(1, event.start_mark)
        self._depth += 1
        node = typing.cast(yaml.Node, super().compose_node(parent, index))
        self._depth -= 1
        if getattr(event, "anchor", None) is not None:
            self._expanded[id(node)] = self._values - start
        return node

    def fetch_flow_collection_start(self, token_class: Any) -> None:
        # The scanner keeps a possible key per open bracket and rescans them all at each token:
        # refuse deep brackets here already, before that costs time.
        if self.flow_level == MAX_RECIPE_DEPTH:
            raise _Refused(f"nested deeper than {MAX_RECIPE_DEPTH} levels", self.get_mark())
        super().fetch_flow_collection_start(token_class)

    def construct_bounded_int(self, node: yaml.ScalarNode) -> int:
        """An integer of at most 64 bits (longer text is refused before it is converted)."""
        value = None
        if len(node.value) <= _MAX_INT_CHARS:
            value = self.construct_yaml_int(node)
        if value is None or abs(value).bit_length() > _MAX_INT_BITS:
            raise _Refused(
                f"integer out of range: a recipe takes integers of at most "
                f"{_MAX_INT_BITS} bits, got {show(node.value)}",
                node.start_mark,
            )
        return int(value)


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_bounded_int)


def _too_large(source: str) -> SurgeryError:
    return SurgeryError(
        f"{source}: recipe is over {MAX_RECIPE_BYTES} bytes; a recipe lists passes and their "
        "options, not data"
    )


def _compose(text: str, source: str) -> tuple[yaml.Node | None, Any]:
    """The recipe's root node (for line numbers) and its data, within the bounds."""
    if len(text) > MAX_RECIPE_BYTES or len(text.encode(errors="surrogatepass")) > MAX_RECIPE_BYTES:
        raise _too_large(source)
    loader = _BoundedLoader(text)
    try:
        root = loader.get_single_node()
        return root, loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = clip(getattr(exc, "problem", None) or str(exc), 200)
        kind = "recipe refused" if isinstance(exc, _Refused) else "not valid YAML"
        raise SurgeryError(f"{where}: {kind}: {problem}") from None
    finally:
        loader.dispose()
