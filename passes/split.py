"""Split one part into several, each the closed subgraph between declared input and output values.

```yaml
- pass: split
  options:
    source: model              # optional; default: the only part
    parts:
      vision_encoder: {inputs: [pixel_values], outputs: [image_features]}
      embed_tokens: {inputs: [input_ids], outputs: [token_embeddings]}
      decoder_model_merged:
        inputs: [inputs_embeds, attention_mask, position_ids, "past_key_values.*"]
        outputs: [logits, "present.*"]
```

A part is what its outputs need, walking back from them and stopping at its declared inputs. A
declared input may be an intermediate value of the source (it becomes a graph input of the part,
with the value's type and shape) and a declared output may be an intermediate value (it becomes a
graph output). Names may be ``fnmatch`` globs; a glob in ``inputs`` matches the source's graph
inputs and a glob in ``outputs`` its graph outputs, in graph order (plain names may be any value).

Reused: the subgraph itself is built by ``onnx_ir.convenience.extract`` (a ``GraphView`` of the
nodes between the boundaries, cloned by onnx_ir's cloner: nodes and values are new objects, weight
tensors are *shared*, so no byte is copied and each written file later gets its own copy on disk);
unused functions are dropped by onnx_ir's ``RemoveUnusedFunctionsPass``; each part then gets its
own type and shape objects (``surgery.cloning.unshare``: onnx_ir's cloner shares them, and a pass
retyping one part must not retype another). Where this departs:
before extracting, the boundaries are checked with our own walk (the same walk ``extract`` does),
because ``extract`` only says a subgraph is "not properly bounded"; ours names the part, the value
that reaches outside, the declared output it is reached from and what to do, suggests the nearest
names for a typo, and catches declared inputs that nothing needs. onnx-graphsurgeon's idiom
(set ``graph.inputs`` / ``graph.outputs``, then ``cleanup()``) would edit one graph in place; we
need several parts out of one source, which is what a bounded copy does.

Decisions:

* A part that reads an undeclared graph input only through ``Shape`` nodes is not refused when a
  declared input carries the same dims (same symbolic names, same static sizes, contiguous): the
  ``Shape`` nodes are pointed at that input (``start``/``end`` adjusted). ONNX gives one
  ``dim_param`` name one size across a model, and the dynamo exporter reads a shared dim from
  whichever input has it first: PaliGemma's decoder takes ``sequence_length`` from ``input_ids``,
  which the decoder part must not need (it gets ``inputs_embeds``).
* A declared input that the part's outputs do not need is an error (a misspelt boundary usually
  shows up this way); set ``allow_unused_inputs: true`` to keep such inputs as graph inputs (a
  runtime that feeds a fixed interface).
* Each part keeps the source's opset imports, model metadata, IR version and producer, and the
  functions it calls (cloned, so later passes on one part never touch another); its graph is named
  after the part.
* The source part is removed and the new parts take its place in the bundle's order, unless
  ``keep_source: true``.
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
from collections.abc import Sequence

import onnx_ir as ir
import onnx_ir.passes.common
import pydantic

from surgery.bundle import Bundle
from surgery.cloning import unshare
from surgery.errors import SurgeryError
from surgery.pass_infra import BundlePass, BundlePassResult, PassOptions
from surgery.registry import register

__all__ = ["Split", "SplitPart"]

logger = logging.getLogger(__name__)

_GLOB_CHARS = frozenset("*?[")


class SplitPart(PassOptions):
    """One part of a split: the values where it starts and where it ends."""

    inputs: list[str] = pydantic.Field(
        description="values the part starts from (names or globs over the source's graph inputs)"
    )
    outputs: list[str] = pydantic.Field(
        min_length=1,
        description="values the part computes (names or globs over the source's graph outputs)",
    )


class _SplitOptions(PassOptions):
    source: str | None = pydantic.Field(
        default=None, description="the part to split; default: the only part"
    )
    parts: dict[str, SplitPart] = pydantic.Field(
        min_length=1, description="new part name -> {inputs: [...], outputs: [...]}"
    )
    keep_source: bool = pydantic.Field(
        default=False, description="keep the source part in the bundle beside the new parts"
    )
    allow_unused_inputs: bool = pydantic.Field(
        default=False,
        description="keep declared inputs that no output needs as graph inputs (default: error)",
    )


def _is_glob(pattern: str) -> bool:
    return any(c in _GLOB_CHARS for c in pattern)


def _quoted(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class _Boundary:
    """Resolves declared names and globs of one part to values of the source graph."""

    def __init__(self, model: ir.Model, source: str) -> None:
        self.graph = model.graph
        self.source = source
        self.values = ir.convenience.create_value_mapping(self.graph, include_subgraphs=False)

    def resolve(self, part: str, key: str, patterns: Sequence[str]) -> list[ir.Value]:
        """The values named by ``patterns`` (``key`` is ``inputs`` or ``outputs``), deduplicated."""
        candidates = self.graph.inputs if key == "inputs" else self.graph.outputs
        kind = "graph input" if key == "inputs" else "graph output"
        found: dict[ir.Value, None] = {}
        for pattern in patterns:
            if _is_glob(pattern):
                matched = [v for v in candidates if v.name and fnmatch.fnmatchcase(v.name, pattern)]
                if not matched:
                    names = [v.name or "" for v in candidates]
                    raise SurgeryError(
                        f"part '{part}': {key}: '{pattern}' matches no {kind} of "
                        f"'{self.source}'; {kind}s: {_quoted(names)}"
                    )
                found.update(dict.fromkeys(matched))
            elif pattern in self.values:
                found[self.values[pattern]] = None
            else:
                nearest = difflib.get_close_matches(pattern, self.values, n=3)
                hint = f"; nearest: {_quoted(nearest)}" if nearest else ""
                raise SurgeryError(
                    f"part '{part}': {key}: no value named '{pattern}' in '{self.source}'{hint}"
                )
        return list(found)


class _Walk:
    """Walk back from a part's outputs, stopping at its inputs (as ``extract`` does).

    Attributes:
        reached: The declared inputs the outputs need.
        outside: Graph inputs of the source that are needed but not declared, each mapped to the
            first declared output it is reached from.
        nodes: The nodes of the part (top level).
    """

    def __init__(self, graph: ir.Graph, inputs: list[ir.Value], outputs: list[ir.Value]) -> None:
        declared = set(inputs)
        self.reached: set[ir.Value] = set()
        self.outside: dict[ir.Value, ir.Value] = {}
        self.nodes: set[ir.Node] = set()
        seen: set[ir.Value] = set()
        for output in outputs:
            stack = [output]
            while stack:
                value = stack.pop()
                if value in seen:
                    continue
                seen.add(value)
                if value in declared:
                    self.reached.add(value)
                    continue
                node = value.producer()
                if node is None:
                    if not value.is_initializer():
                        self.outside.setdefault(value, output)
                    continue
                self.nodes.add(node)
                stack.extend(v for v in node.inputs if v is not None)
                for attr in node.attributes.values():
                    if attr.type == ir.AttributeType.GRAPH:
                        stack.extend(_outer_values(graph, [attr.as_graph()]))
                    elif attr.type == ir.AttributeType.GRAPHS:
                        stack.extend(_outer_values(graph, attr.as_graphs()))


def _shape_slice(node: ir.Node, rank: int) -> tuple[int, int]:
    """The ``[start, end)`` dims a ``Shape`` node returns for an input of rank ``rank``."""
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", rank)
    start, end = (d + rank if d < 0 else d for d in (start, end))
    return max(0, min(start, rank)), max(0, min(end, rank))


def _locate(dims: Sequence[int | ir.SymbolicDim], shape: ir.Shape | None) -> int | None:
    """Where ``dims`` appear contiguously in ``shape``, compared by symbolic name or size."""

    def same(a: int | ir.SymbolicDim, b: int | ir.SymbolicDim) -> bool:
        if isinstance(a, ir.SymbolicDim) and isinstance(b, ir.SymbolicDim):
            return a.value is not None and a.value == b.value
        return isinstance(a, int) and isinstance(b, int) and a == b

    if shape is None:
        return None
    for at in range(len(shape) - len(dims) + 1):
        if all(same(d, shape[at + i]) for i, d in enumerate(dims)):
            return at
    return None


def _shape_source(
    graph: ir.Graph, value: ir.Value, walk: _Walk, inputs: list[ir.Value]
) -> ir.Value | None:
    """A declared input whose shape holds every dim the part reads of ``value``, if any.

    Only when the part reads ``value`` through ``Shape`` nodes alone (a dynamo export takes a
    shared dim such as ``sequence_length`` from whichever input has it first).
    """
    readers = [u.node for u in value.uses() if u.node in walk.nodes or u.node.graph is not graph]
    if value.shape is None or not all(
        n.op_type == "Shape" and n.domain == "" and n.graph is graph for n in readers
    ):
        return None
    rank = len(value.shape)
    wanted = [value.shape[slice(*_shape_slice(n, rank))] for n in readers]
    return next(
        (u for u in inputs if all(_locate(dims, u.shape) is not None for dims in wanted)), None
    )


def _read_shapes_from(part: ir.Graph, sources: dict[str, str]) -> None:
    """In ``part``, make the Shape nodes that read input ``v`` read ``sources[v]``; drop ``v``."""
    values = ir.convenience.create_value_mapping(part, include_subgraphs=False)
    for name, source_name in sources.items():
        value, source = values[name], values[source_name]
        assert value.shape is not None
        for use in list(value.uses()):
            node = use.node
            start, end = _shape_slice(node, len(value.shape))
            at = _locate(value.shape[start:end], source.shape)
            assert at is not None
            node.replace_input_with(0, source)
            node.attributes["start"] = ir.AttrInt64("start", at)
            node.attributes["end"] = ir.AttrInt64("end", at + end - start)
        part.inputs.remove(value)


def _not_closed(part: str, source: str, graph: ir.Graph, outside: dict[ir.Value, ir.Value]) -> str:
    order = {v: i for i, v in enumerate(graph.inputs)}
    missing = sorted(outside, key=lambda v: order.get(v, len(order)))
    first = missing[0]
    also = f", and also {_quoted([v.name or '' for v in missing[1:]])}" if missing[1:] else ""
    return (
        f"part '{part}' is not closed: it needs '{first.name}' (a graph input of '{source}' "
        f"not in its inputs), reached from '{outside[first].name}'{also}; "
        f"add {'them' if also else 'it'} to inputs or cut earlier"
    )


def _outer_values(graph: ir.Graph, subgraphs: Sequence[ir.Graph]) -> list[ir.Value]:
    """Values of ``graph`` that nodes inside ``subgraphs`` (If/Loop/Scan bodies) read."""
    return [
        v
        for sub in subgraphs
        for node in ir.traversal.RecursiveGraphIterator(sub)
        for v in node.inputs
        if v is not None and v.graph is graph
    ]


def _initializers_in_order_of(part: ir.Graph, source: ir.Graph) -> None:
    """Declare ``part``'s initializers in ``source``'s order. ``extract`` declares them in the
    order of a set of values (memory addresses): the same split gave differently ordered weights,
    so different data files, from one run to the next."""
    order = {name: index for index, name in enumerate(source.initializers)}
    values = sorted(part.initializers.values(), key=lambda v: order.get(v.name or "", len(order)))
    for value in values:
        part.initializers.pop(value.name or "")
    for value in values:
        part.register_initializer(value)


def _make_part(model: ir.Model, graph: ir.Graph, name: str) -> ir.Model:
    """A model around ``graph`` with the source's IR version, producer, metadata and functions."""
    graph.name = name
    part = ir.Model(
        graph,
        ir_version=model.ir_version,
        producer_name=model.producer_name,
        producer_version=model.producer_version,
        domain=model.domain,
        model_version=model.model_version,
        doc_string=model.doc_string,
        functions=[f.clone() for f in model.functions.values()],
    )
    part.metadata_props.update(model.metadata_props)
    part.meta.update(model.meta)  # in-memory facts, e.g. the folder the model was loaded from
    ir.passes.common.RemoveUnusedFunctionsPass()(part)
    return unshare(part)


def _dangling(model: ir.Model) -> list[str]:
    """Names of values that ``model``'s nodes or outputs read but nothing in ``model`` defines."""
    defined: set[ir.Value] = set()
    for graph in model.graphs():
        defined.update(graph.inputs, graph.initializers.values())
        for node in graph:
            defined.update(node.outputs)
    read = [v for node in model.graph.all_nodes() for v in node.inputs if v is not None]
    return sorted({v.name or "" for v in [*read, *model.graph.outputs] if v not in defined})


@register
class Split(BundlePass[_SplitOptions]):
    """Split one part into several, each the closed subgraph between its inputs and outputs.

    Declare each part by the values where it starts (``inputs``) and ends (``outputs``); names may
    be intermediate values of the source, or ``fnmatch`` globs (``past_key_values.*``) that match
    the source's graph inputs (in ``inputs``) or graph outputs (in ``outputs``); a glob that
    matches nothing is an error. A part that needs a graph input it does not declare is refused,
    naming the value and the output that needs it, unless the part reads that input only through
    ``Shape`` nodes and a declared input carries the same named dims (a dynamo export takes
    ``sequence_length`` from ``input_ids``): those nodes then read the declared input. Parts share weight tensors in memory (no copy;
    each written file gets its own copy), and keep the source's opsets, metadata and the functions
    they call. The source part is replaced by the new parts (unless ``keep_source``).
    """

    name = "split"
    summary = "split a part into parts bounded by named input and output values"
    Options = _SplitOptions

    def output_parts(self, parts: list[str] | None) -> list[str] | None:
        """The new parts in place of the source (None when the source's neighbours are unknown)."""
        new = list(self.options.parts)
        source = self.options.source
        if parts is None:
            return new if source is None and not self.options.keep_source else None
        if source is None:
            if len(parts) != 1:
                return parts
            source = parts[0]
        if source not in parts:
            return parts
        at = parts.index(source)
        kept = [source] if self.options.keep_source else []
        return [*parts[:at], *kept, *new, *parts[at + 1 :]]

    def _source(self, bundle: Bundle) -> str:
        source = self.options.source
        if source is None:
            if len(bundle) != 1:
                raise SurgeryError(
                    f"the bundle has {len(bundle)} parts ({', '.join(bundle.parts)}); "
                    "say which one to split with the 'source' option"
                )
            return bundle.parts[0]
        if source not in bundle:
            raise SurgeryError(
                f"source: no part named '{source}'; parts: {', '.join(bundle.parts)}"
            )
        return source

    def ensures(self, bundle: Bundle) -> None:
        """Every new part is closed: each value it reads is an input, a weight or produced in it."""
        for name in self.options.parts:
            dangling = _dangling(bundle[name])
            if dangling:
                raise ir.passes.PostconditionError(
                    f"split: part '{name}' reads {_quoted(dangling)}, which nothing in it defines"
                )

    def call_bundle(self, bundle: Bundle) -> BundlePassResult:
        """Replace the source part by the declared parts."""
        source = self._source(bundle)
        model = bundle[source]
        for name in self.options.parts:
            if name in bundle and name != source:
                raise SurgeryError(
                    f"part '{name}' already exists in the bundle; choose another name"
                )
        if self.options.keep_source and source in self.options.parts:
            raise SurgeryError(
                f"part '{source}' is the source and keep_source is set; give the new part "
                "another name"
            )
        boundary = _Boundary(model, source)
        new: dict[str, ir.Model] = {}
        for name, spec in self.options.parts.items():
            inputs = boundary.resolve(name, "inputs", spec.inputs)
            outputs = boundary.resolve(name, "outputs", spec.outputs)
            walk = _Walk(model.graph, inputs, outputs)
            sources = {v: _shape_source(model.graph, v, walk, inputs) for v in walk.outside}
            outside = {v: o for v, o in walk.outside.items() if sources[v] is None}
            if outside:
                raise SurgeryError(_not_closed(name, source, model.graph, outside))
            shape_sources = {v: u for v, u in sources.items() if u is not None}
            reached = walk.reached | set(shape_sources.values())
            unused = [v.name or "" for v in inputs if v not in reached]
            if unused and not self.options.allow_unused_inputs:
                one = len(unused) == 1
                raise SurgeryError(
                    f"part '{name}': {_quoted(unused)} {'is' if one else 'are'} not needed by "
                    f"its outputs; remove {'it' if one else 'them'} from inputs, or set "
                    "allow_unused_inputs: true to keep unused inputs"
                )
            untyped = [v.name or "" for v in inputs if v.type is None]
            if untyped:
                raise SurgeryError(
                    f"part '{name}': inputs {_quoted(untyped)} have no type in '{source}'; "
                    "run shape-inference before split"
                )
            graph = ir.convenience.extract(model.graph, [*inputs, *shape_sources], outputs)
            _initializers_in_order_of(graph, model.graph)
            _read_shapes_from(graph, {v.name or "": u.name or "" for v, u in shape_sources.items()})
            for v, u in shape_sources.items():
                logger.info(
                    "split: part '%s' reads the shape of '%s' from '%s' (same named dims)",
                    name,
                    v.name,
                    u.name,
                )
            new[name] = _make_part(model, graph, name)
            logger.info(
                "split: part '%s': %d inputs, %d outputs, %d nodes",
                name,
                len(graph.inputs),
                len(graph.outputs),
                len(graph),
            )
        order = self.output_parts(bundle.parts) or []
        everything = {name: bundle[name] for name in bundle.parts} | new
        bundle.clear()
        for name in order:
            bundle[name] = everything[name]
        return BundlePassResult(bundle, modified=True)
