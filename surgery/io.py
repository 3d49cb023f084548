"""Load and save bundles with external data, streaming one tensor at a time.

Reuses ``onnx_ir``: ``onnx_ir.load`` memory-maps external data (nothing is read until a tensor's
bytes are needed) and ``onnx_ir.save`` streams tensors into the data file (``copy_file_range``
for tensors that are still external, one tensor's bytes at a time for computed ones). What this
module adds:

* validation before anything is read: a file that is not ONNX, a truncated protobuf, an
  external-data file that is missing, too short, or outside the model's folder (refused, never
  opened: ONNX Runtime and ``onnx.load`` refuse such models too, and reading them would let a
  model file read arbitrary files);
* atomic, non-overwriting output folders (:mod:`surgery.atomic`) with a byte-counting progress bar;
* layouts: ``plain`` writes ``<part>.onnx`` + ``<part>.onnx.data``; later layouts (Transformers.js)
  plug into :data:`LAYOUTS`;
* :func:`save_model`, shared by the writer and ``--dump-dir``. A dump gets its own copy of the
  weights: ``onnx``, ONNX Runtime and ``onnx_ir`` all refuse external data reached through
  ``../``, a symbolic link or a hard link, so a dump that loads with its weights cannot point
  at the original files. The copy is file to file (``copy_file_range``), which copy-on-write
  filesystems turn into shared extents.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx
import onnx_ir as ir
import tqdm
from google.protobuf.message import DecodeError

from surgery.atomic import atomic_dir
from surgery.bundle import Bundle
from surgery.errors import SurgeryError

__all__ = [
    "INLINE_LIMIT_BYTES",
    "LAYOUTS",
    "Layout",
    "PlainLayout",
    "iter_tensors",
    "load",
    "load_model",
    "save",
    "save_model",
]

logger = logging.getLogger(__name__)

#: Tensors at or under this size stay inside the protobuf. ONNX Runtime cannot run shape
#: inference on small shape constants stored as external data.
INLINE_LIMIT_BYTES = 1024
#: Offsets of large tensors in data files are aligned to this, for memory mapping.
ALIGNMENT_BYTES = 4096


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
        raise SurgeryError(f"{path}: is a folder; give an .onnx file (or use load() for a folder)")
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


class Layout:
    """Where each part and its weights go inside an output folder."""

    name = "layout"

    def model_file(self, part: str) -> str:
        """The part's model file, relative to the output folder."""
        raise NotImplementedError

    def data_file(self, part: str) -> str:
        """The part's external-data file, relative to the model file's folder."""
        return Path(self.model_file(part)).name + ".data"


class PlainLayout(Layout):
    """``<part>.onnx`` with its weights in ``<part>.onnx.data``."""

    name = "plain"

    def model_file(self, part: str) -> str:
        return f"{part}.onnx"


LAYOUTS: dict[str, type[Layout]] = {"plain": PlainLayout}


def _external_bytes(model: ir.Model) -> int:
    return sum(t.nbytes for _, t in iter_tensors(model) if t.nbytes > INLINE_LIMIT_BYTES)


def save(
    bundle: Bundle,
    out_dir: str | os.PathLike[str],
    *,
    layout: str | Layout = "plain",
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Write every part of ``bundle`` into ``out_dir``, atomically.

    Tensors are streamed one at a time into each part's data file. ``out_dir`` must not exist
    unless ``force``; on any failure nothing is left behind and an existing ``out_dir`` is kept.
    """
    if isinstance(layout, str):
        if layout not in LAYOUTS:
            raise SurgeryError(f"unknown layout '{layout}'; choose one of: {', '.join(LAYOUTS)}")
        layout = LAYOUTS[layout]()
    total = sum(_external_bytes(model) for model in bundle.values())
    with (
        atomic_dir(out_dir, force=force) as tmp,
        tqdm.tqdm(
            total=total, unit="B", unit_scale=True, desc="writing weights", disable=not progress
        ) as bar,
    ):
        for part, model in bundle.items():
            bar.set_postfix_str(part)
            save_model(
                model,
                tmp / layout.model_file(part),
                data_file=layout.data_file(part),
                callback=lambda tensor, _info: bar.update(tensor.nbytes),
            )
        return Path(out_dir)


def save_model(
    model: ir.Model,
    path: Path,
    *,
    data_file: str | None = None,
    callback: Callable[[ir.TensorProtocol, ir.external_data.CallbackInfo], None] | None = None,
) -> None:
    """Write one model and its weights (streamed) to ``path`` and ``data_file`` beside it.

    Tensors over :data:`INLINE_LIMIT_BYTES` go to ``data_file`` (default ``<name>.data``),
    aligned for memory mapping; tensors still on disk are copied file to file
    (``copy_file_range``) without passing through Python. No empty data file is left behind.
    The model in memory is unchanged.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    data_file = data_file or path.name + ".data"
    ir.save(
        model,
        path,
        external_data=data_file,
        size_threshold_bytes=INLINE_LIMIT_BYTES,
        alignment=ALIGNMENT_BYTES,
        callback=callback,
    )
    data_path = path.parent / data_file
    if data_path.exists() and data_path.stat().st_size == 0:
        data_path.unlink()
