"""Attach a checkpoint's safetensors weights to a weight-free exported graph, without reading them.

``surgery export`` traces the model with its parameters on the meta device, so the graph's
initializers have shapes but no data. This module reads only the safetensors *headers* (an 8-byte
little-endian length, a JSON table of dtype / shape / byte range, then raw bytes) and gives each
initializer an ``onnx_ir.ExternalTensor`` pointing into the checkpoint file: ``onnx_ir.save`` then
copies the bytes file-to-file (``copy_file_range``) when it writes the model's external data, so
the weights never pass through anonymous memory. bf16 / fp16 tensors need a cast to the graph's
float32: :class:`CastingTensor` is an ``onnx_ir.LazyTensor`` whose ``tofile`` converts a block of
rows at a time from a memory map.

Reuses ``transformers``' own checkpoint key renaming (``get_model_conversion_mapping`` /
``rename_source_key``) so legacy PaliGemma layouts (``language_model.model.*``) map like
``from_pretrained`` maps them; departs from ``safetensors.safe_open`` because that library copies
a tensor into memory to hand it out, and we only need byte ranges.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from surgery.constants import CAST_BLOCK_ELEMENTS, INLINE_LIMIT_BYTES
from surgery.errors import SurgeryError

__all__ = ["CastingTensor", "SafetensorsEntry", "attach_weights", "read_safetensors"]

logger = logging.getLogger(__name__)

_DTYPES: dict[str, tuple[ir.DataType, int]] = {
    "F32": (ir.DataType.FLOAT, 4),
    "F16": (ir.DataType.FLOAT16, 2),
    "BF16": (ir.DataType.BFLOAT16, 2),
    "F64": (ir.DataType.DOUBLE, 8),
    "I64": (ir.DataType.INT64, 8),
    "I32": (ir.DataType.INT32, 4),
    "I8": (ir.DataType.INT8, 1),
    "U8": (ir.DataType.UINT8, 1),
    "BOOL": (ir.DataType.BOOL, 1),
}


@dataclass(frozen=True)
class SafetensorsEntry:
    """Where one tensor's bytes live in a safetensors file."""

    path: Path
    offset: int
    length: int
    dtype: str
    shape: tuple[int, ...]


def _read_header(path: Path) -> dict[str, SafetensorsEntry]:
    """Parse and validate one safetensors header; raise :class:`SurgeryError` if corrupt."""
    fix = "re-download or regenerate the checkpoint"
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SurgeryError(
                    f"{path}: corrupt safetensors file (shorter than 8 bytes); {fix}"
                )
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8 or header_len > 100_000_000:
                raise SurgeryError(
                    f"{path}: corrupt safetensors file (header length {header_len} exceeds the "
                    f"file's {size} bytes); {fix}"
                )
            header = json.loads(f.read(header_len))
    except OSError as err:
        raise SurgeryError(f"{path}: cannot read ({err.strerror}); check the file") from err
    except (ValueError, UnicodeDecodeError) as err:
        raise SurgeryError(f"{path}: corrupt safetensors file (header is not JSON); {fix}") from err
    if not isinstance(header, dict):
        raise SurgeryError(f"{path}: corrupt safetensors file (header is not a table); {fix}")
    data_start = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            itemsize = _DTYPES[dtype][1]
        except (KeyError, TypeError, ValueError) as err:
            raise SurgeryError(
                f"{path}: corrupt safetensors file (bad entry for {name!r}); {fix}"
            ) from err
        if (
            not (0 <= begin <= end <= size - data_start)
            or end - begin != math.prod(shape) * itemsize
        ):
            raise SurgeryError(
                f"{path}: corrupt safetensors file ({name!r} points outside the file or has the "
                f"wrong size); {fix}"
            )
        entries[name] = SafetensorsEntry(path, data_start + begin, end - begin, dtype, shape)
    return entries


def read_safetensors(checkpoint: Path) -> dict[str, SafetensorsEntry]:
    """Read every safetensors header of a checkpoint folder.

    Args:
        checkpoint: The folder; ``model.safetensors.index.json`` is followed when present,
            otherwise every ``*.safetensors`` file is read.

    Returns:
        Checkpoint key to byte location.

    Raises:
        SurgeryError: No weights, a missing shard, or a corrupt file.
    """
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({checkpoint / name for name in weight_map.values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise SurgeryError(f"{index}: not a valid safetensors index; regenerate it") from err
        for file in files:
            if not file.is_file():
                raise SurgeryError(
                    f"{file}: listed in {index.name} but missing; complete the download"
                )
    else:
        files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        raise SurgeryError(
            f"{checkpoint}: no *.safetensors weights; give a Hugging Face checkpoint folder "
            "(config.json + model*.safetensors)"
        )
    entries: dict[str, SafetensorsEntry] = {}
    for file in files:
        entries.update(_read_header(file))
    return entries


class CastingTensor(ir.LazyTensor):
    """A safetensors float tensor read as float32, converted block by block when written.

    Args:
        entry: Where the bytes are.
        name: Name of the tensor in the graph.
    """

    __slots__ = ("_entry",)

    def __init__(self, entry: SafetensorsEntry, name: str) -> None:
        super().__init__(
            self._materialize, dtype=ir.DataType.FLOAT, shape=ir.Shape(entry.shape), name=name
        )
        self._entry = entry

    def _blocks(self) -> Any:
        entry = self._entry
        count = math.prod(entry.shape)
        raw = np.memmap(entry.path, dtype=np.uint16, mode="r", offset=entry.offset, shape=(count,))
        for start in range(0, count, CAST_BLOCK_ELEMENTS):
            block = np.asarray(raw[start : start + CAST_BLOCK_ELEMENTS])
            if entry.dtype == "BF16":
                yield (block.astype(np.uint32) << 16).view(np.float32)
            else:
                yield block.view(np.float16).astype(np.float32)

    def _materialize(self) -> ir.TensorProtocol:
        data = (
            np.concatenate(list(self._blocks()))
            if math.prod(self._entry.shape)
            else np.zeros(0, np.float32)
        )
        return ir.tensor(data.reshape(self._entry.shape), name=self.name)

    def tofile(self, file: Any) -> None:
        """Write float32 bytes a block at a time, never the whole tensor in memory."""
        for block in self._blocks():
            file.write(block.tobytes())


def _tensor_for(entry: SafetensorsEntry, name: str, want: ir.DataType) -> ir.TensorProtocol:
    dtype = _DTYPES[entry.dtype][0]
    if (
        entry.length <= INLINE_LIMIT_BYTES
    ):  # small: inline, so ONNX Runtime can read shape constants
        if dtype == want:
            with entry.path.open("rb") as f:
                f.seek(entry.offset)
                array = np.frombuffer(f.read(entry.length), dtype=dtype.numpy())
            return ir.tensor(array.reshape(entry.shape), name=name)
        if want == ir.DataType.FLOAT and dtype in (ir.DataType.BFLOAT16, ir.DataType.FLOAT16):
            return ir.tensor(CastingTensor(entry, name).numpy(), name=name)
    if dtype == want:
        return ir.ExternalTensor(
            entry.path.name,
            entry.offset,
            entry.length,
            dtype,
            shape=ir.Shape(entry.shape),
            name=name,
            base_dir=entry.path.parent,
        )
    if want == ir.DataType.FLOAT and dtype in (ir.DataType.BFLOAT16, ir.DataType.FLOAT16):
        return CastingTensor(entry, name)
    raise SurgeryError(
        f"{entry.path}: tensor {name!r} is {entry.dtype}, the graph needs {want.name}; "
        "convert the checkpoint to float32, bfloat16 or float16"
    )


def attach_weights(
    model: ir.Model,
    entries: dict[str, SafetensorsEntry],
    key_for: dict[str, str],
    buffers: dict[str, np.ndarray],
) -> None:
    """Give every initializer of ``model`` its data.

    Args:
        model: The exported graph, initializers named by module path.
        entries: Checkpoint key to byte location (:func:`read_safetensors`).
        key_for: Initializer name to checkpoint key (renamings and ties resolved).
        buffers: Initializer name to value for tensors the checkpoint does not hold
            (non-persistent buffers such as rotary ``inv_freq``), computed from the config.

    Raises:
        SurgeryError: The checkpoint lacks a tensor the model needs, or its shape differs.
    """
    for name, value in model.graph.initializers.items():
        if name in buffers:
            value.const_value = ir.tensor(buffers[name], name=name)
            continue
        key = key_for.get(name)
        entry = entries.get(key) if key is not None else None
        if key is None or entry is None:
            raise SurgeryError(
                f"{next(iter(entries.values())).path.parent}: checkpoint has no tensor for "
                f"{key or name!r}; is it a complete PaliGemma checkpoint?"
            )
        expected = tuple(value.shape.numpy()) if value.shape is not None else None
        if expected != entry.shape:
            raise SurgeryError(
                f"{entry.path}: {key!r} has shape {list(entry.shape)} but config.json implies "
                f"{list(expected or ())}; the weights do not match the config"
            )
        assert value.dtype is not None
        value.const_value = _tensor_for(entry, name, value.dtype)
