"""Load bundles with external data, memory-mapped, after checking the data is safe to read.

Reuses ``onnx_ir``: its deserializer turns external data into ``ExternalTensor`` objects that
memory-map their bytes only when asked, so loading reads no weight. What this module adds:

* validation before anything is read: a file that is not ONNX, a truncated protobuf, an
  external-data file that is missing, too short, or outside the model's folder (refused, never
  opened: ONNX Runtime and ``onnx.load`` refuse such models too, and reading them would let a
  model file read arbitrary files);
* parts: a file loads as a one-part bundle; a folder of ``.onnx`` files as one part each.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from surgery.bundle import Bundle
from surgery.errors import SurgeryError

__all__ = ["SOURCE_DIR", "iter_tensors", "load", "load_model"]

logger = logging.getLogger(__name__)

#: Key in ``model.meta`` (not saved): the absolute folder the model was loaded from, against
#: which paths recorded relative to the model file resolve.
SOURCE_DIR = "surgery.source_dir"


def iter_tensors(model: ir.Model) -> Iterator[tuple[str, ir.TensorProtocol]]:
    """Yield ``(where, tensor)`` for every initializer and tensor attribute, subgraphs included."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield f"initializer '{value.name}'", value.const_value
        for node in graph:
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.TENSOR:
                    yield f"node '{node.name}' attribute '{attr.name}'", attr.as_tensor()


def _check_external_data(model: ir.Model, path: Path) -> None:
    """Refuse external data that is outside the model's folder, missing or too short."""
    folder = path.parent.resolve()
    sizes: dict[Path, int] = {}
    for where, tensor in iter_tensors(model):
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        location = str(tensor.location)
        target = (folder / location).resolve()
        if os.path.isabs(location) or not target.is_relative_to(folder):
            raise SurgeryError(
                f"{path}: {where} points to external data '{location}' outside the model's "
                "folder; refusing to read it (keep data files beside the model)"
            )
        if target not in sizes:
            if not target.is_file():
                raise SurgeryError(
                    f"{path}: {where} needs external data file '{location}', which does not "
                    f"exist in {folder}; copy it beside the model"
                )
            sizes[target] = target.stat().st_size
        end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
        if end > sizes[target]:
            raise SurgeryError(
                f"{path}: {where} needs bytes up to {end} of '{location}', but the file has only "
                f"{sizes[target]}; the data file is truncated or belongs to another model"
            )


def load_model(path: str | os.PathLike[str]) -> ir.Model:
    """Load one ONNX file; external data is validated and memory-mapped, not read."""
    path = Path(path)
    if not path.exists():
        raise SurgeryError(f"{path}: no such file")
    if path.is_dir():
        files = sorted(path.rglob("*.onnx"))
        example = f", e.g. {files[0]}" if files else "; this folder has none"
        raise SurgeryError(f"{path}: is a folder; give one .onnx file{example}")
    try:
        proto = onnx.load(path, load_external_data=False)
    except (DecodeError, RuntimeError) as exc:
        raise SurgeryError(
            f"{path}: not a readable ONNX model (corrupt or truncated protobuf: {exc})"
        ) from None
    if not proto.HasField("graph") or proto.ir_version == 0:
        raise SurgeryError(f"{path}: not an ONNX model (no graph or IR version found)")
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:
        raise SurgeryError(f"{path}: ONNX model is malformed and cannot be read: {exc}") from None
    del proto
    ir.external_data.set_base_dir(model.graph, path.parent.absolute())
    _check_external_data(model, path)
    model.meta[SOURCE_DIR] = str(path.parent.absolute())
    return model


def load(path: str | os.PathLike[str]) -> Bundle:
    """Load a model file as a one-part bundle, or a folder of ``.onnx`` files as a bundle.

    Parts are named after the file stem (``model.onnx`` → part ``model``).
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.onnx"))
        if not files:
            raise SurgeryError(f"{path}: folder has no .onnx files")
        stems = [f.stem for f in files]
        duplicate = next((s for s in stems if stems.count(s) > 1), None)
        if duplicate:
            raise SurgeryError(f"{path}: two files are named '{duplicate}.onnx'; load them apart")
        return Bundle({f.stem: load_model(f) for f in files})
    return Bundle({path.stem: load_model(path)})
