"""Load bundles with external data, memory-mapped, after checking every tensor is safe to read.

Reuses ``onnx_ir``: its deserializer turns external data into ``ExternalTensor`` objects that
memory-map their bytes only when asked, so loading reads no weight. What this module adds:

* validation before anything is read (:mod:`surgery.model_checks`): a file that is not ONNX, a truncated protobuf, names that
  are not UTF-8, a graph that reads values nothing defines or has a cycle, and every tensor the
  model holds (:func:`surgery.tensors.tensor_slots`, the one walker: the main graph, model-local functions,
  every nested subgraph, initializers, ``TENSOR`` and ``TENSORS`` attributes). External data
  must be a regular file inside the model's folder, with one hard link, long enough, and
  declare the length its shape and dtype imply; inline data must hold exactly that many bytes
  or elements. Anything else is refused, never opened: ONNX Runtime and
  ``onnx.load`` refuse such models too, reading them would let a model file read arbitrary files
  (or block on a FIFO), and writing them would give an output that no tool reads back;
* where onnx_ir falls short: it sets the base folder of external data only for the main graph
  (tensors in functions would resolve against the working directory), drops sparse initializers
  silently on load (they are refused here, since nothing downstream could keep them), and fails
  with an empty ``AssertionError`` on a zero-size external tensor (one becomes an empty in-memory
  tensor at load: it holds no bytes to read);
* parts: a file loads as a one-part bundle; a folder of ``.onnx`` files as one part each.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from surgery.bundle import Bundle
from surgery.errors import SurgeryError
from surgery.model_checks import (
    check_graph,
    check_tensors,
    held_warnings,
    refuse_bad_text,
    refuse_sparse,
)
from surgery.tensors import short

__all__ = ["SOURCE_DIR", "load", "load_model"]

logger = logging.getLogger(__name__)

#: Key in ``model.meta`` (not saved): the absolute folder the model was loaded from, against
#: which paths recorded relative to the model file resolve.
SOURCE_DIR = "surgery.source_dir"


def load_model(path: str | os.PathLike[str]) -> ir.Model:
    """Load one ONNX file; every tensor is validated and external data memory-mapped, not read."""
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
    refuse_bad_text(proto, path)
    refuse_sparse(proto, path)
    try:
        with held_warnings() as held:
            model = ir.serde.deserialize_model(proto)
    except Exception as exc:
        detail = short(" ".join(f"{type(exc).__name__}: {exc}".split()))
        raise SurgeryError(
            f"{path}: ONNX model is malformed and cannot be read: {detail}"
        ) from None
    del proto
    check_tensors(model, path)
    check_graph(model.graph, "", path)
    for function in model.functions.values():
        check_graph(function, f"function '{short(function.name)}' ", path)
    for message in held:
        logger.warning("%s: %s", path, message)
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
