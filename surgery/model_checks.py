"""Checks that a model is safe and whole before any of it is read: every tensor, every graph.

What :func:`surgery.io.load_model` refuses, and why (see its module docstring): text that is not
UTF-8, sparse tensors (onnx_ir drops or cannot read them), tensors whose data does not fill their
shape, external data that is outside the model's folder, not a regular file, hard-linked or too
short, graphs that read undefined values or have a cycle. Nothing here opens a data file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from surgery.errors import SurgeryError
from surgery.tensors import short, tensor_slots

__all__ = ["check_graph", "check_tensors", "held_warnings", "refuse_bad_text", "refuse_sparse"]


def refuse_sparse(proto: onnx.ModelProto, path: Path) -> None:
    """Refuse sparse tensors, which onnx_ir drops (initializers) or cannot read (attributes)."""

    def graph(g: onnx.GraphProto, scope: str) -> None:
        if g.sparse_initializer:
            name = short(g.sparse_initializer[0].values.name)
            raise SurgeryError(
                f"{path}: {scope}graph '{short(g.name)}' has a sparse initializer ('{name}'); "
                "onnx-surgery cannot keep sparse tensors: store it as a dense initializer"
            )
        nodes(g.node, scope)

    def nodes(node_protos: Iterator[onnx.NodeProto] | list[onnx.NodeProto], scope: str) -> None:
        for node in node_protos:
            where = f"{scope}node '{short(node.name or node.op_type)}'"
            for attr in node.attribute:
                if attr.type in (
                    onnx.AttributeProto.SPARSE_TENSOR,
                    onnx.AttributeProto.SPARSE_TENSORS,
                ):
                    raise SurgeryError(
                        f"{path}: {where} attribute '{short(attr.name)}' is a sparse tensor; "
                        "onnx-surgery cannot keep sparse tensors: use a dense one"
                    )
                if attr.type == onnx.AttributeProto.GRAPH:
                    graph(attr.g, f"{where} > ")
                for subgraph in attr.graphs:
                    graph(subgraph, f"{where} > ")

    graph(proto.graph, "")
    for function in proto.functions:
        nodes(function.node, f"function '{short(function.domain)}::{short(function.name)}' ")


def refuse_bad_text(proto: onnx.ModelProto, path: Path) -> None:
    """Refuse a string field that is not UTF-8 (protobuf hands it over as bytes, onnx_ir keeps
    those as names, and writing them back fails): every name, type, domain and doc string."""
    # Where each message sits is kept as (parent, field, index) links, spelt out only on error.
    stack: list[tuple[Message, tuple[object, ...] | None]] = [(proto, None)]
    while stack:
        message, where = stack.pop()
        if isinstance(message, onnx.TensorProto):  # skip the data: listing it copies it
            by_name = message.DESCRIPTOR.fields_by_name
            fields = [(by_name[name], getattr(message, name)) for name in _TENSOR_TEXT]
        else:
            fields = message.ListFields()
        for field, value in fields:
            if field.type == FieldDescriptor.TYPE_STRING:
                for i, text in enumerate(value if field.is_repeated else [value]):
                    if isinstance(text, bytes):
                        spelt = _spell((where, field.name, i if field.is_repeated else None))
                        raise SurgeryError(
                            f"{path}: {spelt} is not valid UTF-8 ({short(text)!r}); the model "
                            "is corrupt"
                        )
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                if field.is_repeated:
                    stack.extend((item, (where, field.name, i)) for i, item in enumerate(value))
                else:
                    stack.append((value, (where, field.name, None)))


def _spell(where: tuple[object, ...] | None) -> str:
    """``(((None, 'graph', None), 'node', 3), 'input', 0)`` → ``model.graph.node[3].input[0]``."""
    parts: list[str] = []
    while where is not None:
        parent, name, index = where
        parts.append(f".{name}" + (f"[{index}]" if index is not None else ""))
        where = parent  # type: ignore[assignment]
    return "model" + "".join(reversed(parts))


#: The text fields of a TensorProto (its data is never text).
_TENSOR_TEXT = ("name", "doc_string", "external_data", "metadata_props")


def _expected_bytes(tensor: ir.TensorProtocol) -> int | None:
    """Bytes the tensor's shape and dtype imply; None for strings (variable length)."""
    if tensor.dtype == ir.DataType.STRING:
        return None
    return (tensor.size * tensor.dtype.bitwidth + 7) // 8


#: The TensorProto field that holds each dtype's inline values when ``raw_data`` is absent.
_FIELD_BY_DTYPE = {
    ir.DataType.FLOAT: "float_data",
    ir.DataType.COMPLEX64: "float_data",
    ir.DataType.DOUBLE: "double_data",
    ir.DataType.COMPLEX128: "double_data",
    ir.DataType.INT64: "int64_data",
    ir.DataType.UINT32: "uint64_data",
    ir.DataType.UINT64: "uint64_data",
    ir.DataType.STRING: "string_data",
}


def _expected_values(tensor: ir.TensorProtocol) -> int:
    """Entries of the typed TensorProto field that the shape and dtype imply."""
    if tensor.dtype in (ir.DataType.COMPLEX64, ir.DataType.COMPLEX128):
        return 2 * tensor.size
    per_entry = {4: 2, 2: 4}.get(tensor.dtype.bitwidth, 1)  # packed in int32_data
    return -(-tensor.size // per_entry)


_FIELDS = ("float_data", "double_data", "int32_data", "int64_data", "uint64_data", "string_data")


def _check_inline(tensor: ir.TensorProtocol, where: str, path: Path) -> None:
    """Refuse an inline tensor whose data does not fill its shape exactly."""
    if isinstance(tensor, ir.StringTensor):
        count, expected = len(tensor.string_data()), tensor.size
        unit = "strings"
    elif isinstance(tensor, ir.serde.TensorProtoTensor):
        proto = tensor.raw
        if proto.HasField("raw_data"):
            count, expected, unit = len(proto.raw_data), _expected_bytes(tensor) or 0, "bytes"
        else:
            field = _FIELD_BY_DTYPE.get(tensor.dtype, "int32_data")
            present = [f for f in _FIELDS if len(getattr(proto, f))]
            if present and present != [field]:
                raise SurgeryError(
                    f"{path}: {where} is {tensor.dtype.name} but stores its values in "
                    f"{', '.join(present)} (expected {field}); the model is corrupt"
                )
            count = len(getattr(proto, field))
            expected = _expected_values(tensor)
            unit = f"values in {field}"
    else:
        return
    if count != expected:
        raise SurgeryError(
            f"{path}: {where} ({tensor.dtype.name} {list(tensor.shape)}) needs {expected} "
            f"{unit} but holds {count}; the model is corrupt"
        )


def _check_shape(tensor: ir.TensorProtocol, where: str, path: Path) -> None:
    """Refuse negative dimensions and data types that have no size."""
    if any(not isinstance(d, int) or d < 0 for d in tensor.shape):
        raise SurgeryError(
            f"{path}: {where} has a negative or unknown dimension {list(tensor.shape)}; "
            "the model is corrupt"
        )
    if tensor.dtype != ir.DataType.STRING:
        try:
            tensor.dtype.bitwidth  # noqa: B018  (raises for UNDEFINED and unknown types)
        except TypeError:
            raise SurgeryError(
                f"{path}: {where} has no valid data type ({tensor.dtype.name}); the model is "
                "corrupt"
            ) from None


def _data_file_size(location: str, where: str, path: Path) -> tuple[Path, int]:
    """The resolved data file of an external tensor and its size, or a refusal; never opens it."""
    folder = path.parent.resolve()
    if "\x00" in location:
        raise SurgeryError(
            f"{path}: {where} has an external data location with a NUL byte "
            f"({short(repr(location))}); the model is corrupt or hostile"
        )
    # The path exactly as readers open it (``a/`` or ``missing/../a`` do not name ``a``).
    literal = os.path.join(path.parent.absolute(), location)
    target = Path(os.path.realpath(literal))
    if os.path.isabs(location) or not target.is_relative_to(folder):
        raise SurgeryError(
            f"{path}: {where} points to external data '{short(location)}' outside the model's "
            "folder; refusing to read it (keep data files beside the model)"
        )
    try:
        info = os.stat(literal)
    except OSError:
        raise SurgeryError(
            f"{path}: {where} needs external data file '{short(location)}', which does not "
            f"exist in {folder}; copy it beside the model"
        ) from None
    if not stat.S_ISREG(info.st_mode):
        raise SurgeryError(
            f"{path}: {where} points to external data '{short(location)}', which is not a "
            "regular file (a folder, FIFO, socket or device); refusing to open it"
        )
    if info.st_nlink > 1:
        raise SurgeryError(
            f"{path}: external data file '{short(location)}' has {info.st_nlink} hard links; "
            "onnx-ir refuses hard-linked data (a link can expose a file from outside the folder): "
            f"give the model its own copy, e.g. cp '{location}' tmp && mv tmp '{location}'"
        )
    return target, info.st_size


def _check_external(
    tensor: ir.ExternalTensor, where: str, path: Path, sizes: dict[str, tuple[Path, int]]
) -> None:
    location = str(tensor.location)
    if location not in sizes:
        sizes[location] = _data_file_size(location, where, path)
    _, size = sizes[location]
    expected = _expected_bytes(tensor)
    if expected is None:
        raise SurgeryError(f"{path}: {where} is a string tensor in external data; not supported")
    offset = tensor.offset or 0
    if offset < 0 or (tensor.length is not None and tensor.length < 0):
        raise SurgeryError(
            f"{path}: {where} has a negative offset or length in '{short(location)}'; the "
            "model is corrupt"
        )
    if tensor.length is not None and tensor.length != expected:
        raise SurgeryError(
            f"{path}: {where} declares {tensor.length} bytes in '{short(location)}' but its "
            f"shape and dtype ({tensor.dtype.name} {list(tensor.shape)}) need {expected}; "
            "the model is corrupt"
        )
    if offset + expected > size:
        raise SurgeryError(
            f"{path}: {where} needs bytes up to {offset + expected} of '{short(location)}', "
            f"but the file has only {size}; the data file is truncated or belongs to another "
            "model"
        )


def check_tensors(model: ir.Model, path: Path) -> None:
    """Validate every tensor before any is read; point external data at the model's folder."""
    sizes: dict[str, tuple[Path, int]] = {}
    for slot in list(tensor_slots(model)):
        tensor = slot.tensor
        _check_shape(tensor, slot.where, path)
        if isinstance(tensor, ir.ExternalTensor):
            _check_external(tensor, slot.where, path, sizes)
            tensor.base_dir = path.parent.absolute()
            if tensor.size == 0:  # nothing to read; onnx_ir cannot read zero bytes anyway
                slot.replace(
                    ir.Tensor(
                        np.empty(tensor.shape.numpy(), dtype=tensor.dtype.numpy()),
                        dtype=tensor.dtype,
                        name=tensor.name,
                    )
                )
        else:
            _check_inline(tensor, slot.where, path)


def check_graph(graph: ir.Graph | ir.Function, scope: str, path: Path) -> None:
    """Refuse a graph that reads values nothing defines, or whose nodes depend on each other
    in a cycle (values a subgraph captures count); subgraphs are checked too."""
    nodes = list(graph)
    members = {id(n) for n in nodes}
    label = f"{scope}graph '{short(graph.name or '')}'"
    for user, values in [*((n.name or n.op_type, n.inputs) for n in nodes), (None, graph.outputs)]:
        for value in values:
            if value is None or value.producer() is not None:
                continue
            if value.is_graph_input() or value.is_initializer():
                continue
            name = short(value.name or "")
            what = (
                f"node '{short(user)}' reads '{name}', which is" if user else f"output '{name}' is"
            )
            raise SurgeryError(
                f"{path}: {label}: {what} defined by no node, input or initializer; the model "
                "is corrupt"
            )

    def deps(node: ir.Node) -> Iterator[ir.Node]:
        values = list(node.inputs)
        for subgraph in _subgraphs(node):
            for inner in ir.traversal.RecursiveGraphIterator(subgraph):
                values.extend(inner.inputs)
        for value in values:
            producer = value.producer() if value is not None else None
            if producer is not None and id(producer) in members:
                yield producer

    state: dict[int, int] = {}  # 1: on the current path, 2: done
    for start in nodes:
        if id(start) in state:
            continue
        stack = [(start, iter(list(deps(start))))]
        state[id(start)] = 1
        while stack:
            node, pending = stack[-1]
            nxt = next(pending, None)
            if nxt is None:
                state[id(node)] = 2
                stack.pop()
            elif state.get(id(nxt)) == 1:
                path_nodes = [n for n, _ in stack]
                cycle = [*path_nodes[path_nodes.index(nxt) :], nxt]
                names = [short(n.name or n.op_type) for n in cycle]
                shown = " → ".join(names[:6]) + (" → …" if len(names) > 6 else "")
                raise SurgeryError(
                    f"{path}: {label} has a cycle ({shown}); an ONNX graph must be acyclic"
                )
            elif nxt is not None and id(nxt) not in state:
                state[id(nxt)] = 1
                stack.append((nxt, iter(list(deps(nxt)))))
    for node in nodes:
        for subgraph in _subgraphs(node):
            check_graph(subgraph, f"{scope}node '{short(node.name or node.op_type)}' > ", path)


def _subgraphs(node: ir.Node) -> Iterator[ir.Graph]:
    """The graphs held by ``node``'s GRAPH and GRAPHS attributes (references skipped)."""
    for attr in node.attributes.values():
        if attr.is_ref():
            continue
        if attr.type == ir.AttributeType.GRAPH:
            yield attr.as_graph()
        elif attr.type == ir.AttributeType.GRAPHS:
            yield from attr.as_graphs()


@contextlib.contextmanager
def held_warnings() -> Iterator[list[str]]:
    """Hold onnx_ir's warnings (Python warnings and log records) while it deserializes.

    A model the checks then refuse gets one error line, not the deserializer's notes first;
    a model that loads gets the notes afterwards, as warnings of this module.
    """
    held: list[str] = []

    class _Hold(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            held.append(record.getMessage())

    source = logging.getLogger("onnx_ir")
    handler, propagate = _Hold(), source.propagate
    source.addHandler(handler)
    source.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield held
        held.extend(str(w.message) for w in caught)
    finally:
        source.removeHandler(handler)
        source.propagate = propagate
