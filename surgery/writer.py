"""Write bundles to disk: one tensor at a time, into named data chunks, atomically.

Departs from ``onnx_ir.save`` (which the rest of the project uses for reading and for its
tensor classes) in chunk naming, and for speed in the two ways said last. ``onnx_ir`` names shards
``name-00001-of-00003.data``; Transformers.js loads exactly ``<file>.onnx_data``,
``<file>.onnx_data_1``, … and counts them in ``config.json``. So the writer here plans the chunks
itself (declaration order, each at or under the layout's limit, large tensors aligned for memory
mapping), streams each tensor with the tensor's own ``tofile`` (``copy_file_range`` for tensors
still on disk, one computed tensor at a time for lazy ones), then serializes the graph with the
tensors pointing at their chunks. Within one save, a tensor whose bytes an earlier part already
wrote (the same quantization of the same weight in two variants:
:func:`surgery.lazy.reuse_written`) is copied from that part's chunk, ``copy_file_range`` again,
instead of being computed a second time. A finished chunk is handed to the disk at once and left
out of the page cache once written (``POSIX_FADV_DONTNEED``): writing several dtypes reads the
source weights once per dtype, and the written chunks otherwise push them out of the cache
(measured on the 1.32B bench model, 18 GiB written from 4.9 GiB: 80.2 and 75.0 s without, 64.8 and
63.8 s with, alternating runs).

:func:`save` writes :data:`PARALLEL_PARTS` parts at once, so a part that only copies bytes (the
fp32 folder: ``copy_file_range``, one core waiting on the kernel) runs beside one that quantizes;
a part whose bytes may be copied from another's (:func:`surgery.lazy.reuse_key`) starts after it.
The parts share one window for tensors computed ahead (:class:`AheadBudget`), so memory stays
that of one part: the window plus one tensor. Measured on the half-size bench model writing
fp32, q8, q4, q4f16 and bnb4 (``benchmarks/quantize.py``): 24.4 s one part at a time, 17.6 s two;
three parts were no faster at full size (40.6 against 39.8 s), and starting the parts that read
the most first changed nothing beyond noise (41.0 and 43.1 s against 42.0 and 44.2).

Layouts decide where parts and chunks go (:mod:`surgery.layout`; the Transformers.js layout is in
:mod:`surgery.transformersjs`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import os
import threading
import typing
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import Any

import onnx_ir as ir

from surgery.atomic import atomic_dir
from surgery.bundle import Bundle
from surgery.constants import INLINE_LIMIT_BYTES
from surgery.errors import SurgeryError
from surgery.layout import Layout, get_layout
from surgery.lazy import (
    computed_whole_when_written,
    content_key,
    holds_source_whole_when_written,
    read_locked,
    reuse_key,
    reuse_written,
)
from surgery.progress import bar as progress_bar
from surgery.summary import format_bytes
from surgery.tensors import tensor_slots

__all__ = [
    "external_bytes",
    "save",
    "save_model",
    "write_model",
]

#: Tensors larger than this start at a multiple of :data:`LARGE_ALIGNMENT` (the Windows
#: allocation granularity, which is also a multiple of every page size), so runtimes can
#: memory-map them; smaller ones are packed at :data:`SMALL_ALIGNMENT`.
LARGE_TENSOR_BYTES = 1024 * 1024
LARGE_ALIGNMENT = 65536
SMALL_ALIGNMENT = 64

#: Lazy tensors computed ahead of the writer: at most this many bytes (plus one tensor) across
#: the parts written at once, by this many threads per part.
AHEAD_BYTES = 256 * 1024 * 1024
AHEAD_WORKERS = 2

#: Parts written at once by :func:`save`: a part that only copies bytes (the fp32 folder) leaves a
#: core idle that another part's quantization can use.
PARALLEL_PARTS = 2

#: Called after each tensor is written; its return value is ignored (``tqdm.update`` returns one).
ProgressCallback = Callable[[ir.TensorProtocol], object]


def _external_values(model: ir.Model) -> Iterator[ir.Value]:
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None and value.const_value.nbytes > INLINE_LIMIT_BYTES:
                yield value


def _tensor(value: ir.Value) -> ir.TensorProtocol:
    assert value.const_value is not None
    return value.const_value


def external_bytes(model: ir.Model) -> int:
    """Bytes the model's data files will hold (tensors above the inline limit)."""
    return sum(_tensor(v).nbytes for v in _external_values(model))


def _align(offset: int, nbytes: int) -> int:
    step = LARGE_ALIGNMENT if nbytes > LARGE_TENSOR_BYTES else SMALL_ALIGNMENT
    return -(-offset // step) * step


#: Content key → an external tensor holding those bytes, written earlier in the same save.
Written = dict[Hashable, ir.ExternalTensor]


@dataclasses.dataclass
class _Placement:
    value: ir.Value
    tensor: ir.TensorProtocol  # the value's tensor
    chunk: int
    offset: int
    source: ir.TensorProtocol  # what gives its bytes: the tensor, or bytes already written


def _plan(values: list[ir.Value], max_chunk_bytes: int | None, where: str) -> list[_Placement]:
    placements: list[_Placement] = []
    chunk, end = 0, 0
    for value in values:
        tensor = _tensor(value)
        if max_chunk_bytes is not None and tensor.nbytes > max_chunk_bytes:
            raise SurgeryError(
                f"{where}: tensor '{value.name}' ({format_bytes(tensor.nbytes)}) is larger than "
                f"the chunk limit ({format_bytes(max_chunk_bytes)}); split it in the graph first "
                "(pass split-large-tensors) or raise the limit"
            )
        offset = _align(end, tensor.nbytes)
        if max_chunk_bytes is not None and offset + tensor.nbytes > max_chunk_bytes and end > 0:
            chunk, offset = chunk + 1, 0
        placements.append(_Placement(value, tensor, chunk, offset, tensor))
        end = offset + tensor.nbytes
    return placements


def _write_tensor(tensor: ir.TensorProtocol, file: typing.BinaryIO) -> None:
    """Write a tensor's bytes at the file's position: file to file when the tensor is on disk."""
    if hasattr(
        tensor, "tofile"
    ):  # onnx_ir tensors; other TensorProtocol implementations may lack it
        tensor.tofile(file)  # ExternalTensor: copy_file_range; in memory: no extra copy
    else:
        file.write(tensor.tobytes())


def _write_back(file: typing.BinaryIO) -> None:
    """Start writing a finished chunk to disk and let the page cache drop it once written
    (``POSIX_FADV_DONTNEED``; where the platform has it). Writing every dtype rereads the source
    weights once per variant; without this, the written chunks crowd them out of the page cache."""
    if hasattr(os, "posix_fadvise"):
        file.flush()
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


class AheadBudget:
    """Bytes of lazy tensors computed ahead and not yet written, shared by the parts one
    :func:`save` writes at once: below :data:`AHEAD_BYTES` another may be computed, so at most
    :data:`AHEAD_BYTES` plus one tensor are held, computed or being written, whichever part they
    belong to."""

    def __init__(self) -> None:
        self.held = 0
        self._changed = threading.Condition()

    def take(self, nbytes: int, *, wait: bool) -> bool:
        """Count ``nbytes`` in if under the limit (waiting until it is, if ``wait``)."""
        with self._changed:
            if wait:
                self._changed.wait_for(lambda: self.held < AHEAD_BYTES)
            elif self.held >= AHEAD_BYTES:
                return False
            self.held += nbytes
            return True

    def give(self, nbytes: int) -> None:
        """Count ``nbytes`` out (their tensor is written, or will not be)."""
        with self._changed:
            self.held -= nbytes
            self._changed.notify_all()


def _computed_ahead(
    placements: list[_Placement], budget: AheadBudget
) -> Iterator[tuple[_Placement, ir.TensorProtocol | None]]:
    """Yield placements in order, with lazy tensors already computed by worker threads.

    A lazy tensor that writing would compute whole (an fp16 conversion, say: see
    :func:`surgery.lazy.computed_whole_when_written`) is computed in a thread while
    earlier tensors are written: numpy releases the GIL, so computing and writing overlap.
    Computing waits for room in ``budget`` (a larger tensor still goes, alone, when this part
    waits for nothing else). A tensor that streams itself from a source it computes whole
    (:func:`surgery.lazy.holds_source_whole_when_written`) is counted in the same way, from its
    turn in the queue until written. Other tensors (still on disk, in memory, or streaming
    themselves) pass through.
    """

    def compute(tensor: ir.TensorProtocol) -> ir.TensorProtocol:
        return ir.Tensor(tensor.numpy(), name=tensor.name)

    #: Placement, its computation (None: written as it is), and whether it is counted in budget.
    waiting: collections.deque[
        tuple[_Placement, concurrent.futures.Future[ir.TensorProtocol] | None, bool]
    ] = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(max_workers=AHEAD_WORKERS) as pool:
        try:
            upcoming = 0
            while waiting or upcoming < len(placements):
                while upcoming < len(placements):
                    placement = placements[upcoming]
                    whole = computed_whole_when_written(placement.source)
                    counted = whole or holds_source_whole_when_written(placement.source)
                    if counted and not budget.take(placement.tensor.nbytes, wait=not waiting):
                        break
                    future = pool.submit(compute, placement.source) if whole else None
                    waiting.append((placement, future, counted))
                    upcoming += 1
                placement, future, counted = waiting[0]
                computed = future.result() if future is not None else None
                del future  # it holds the result too
                yield placement, computed
                del computed  # freed before the next tensor is computed (the caller lets go too)
                waiting.popleft()
                if counted:
                    budget.give(placement.tensor.nbytes)  # written: counted until now
        finally:  # an error, here or in the caller: what was counted in and not written goes
            for placement, future, counted in waiting:
                if future is not None:
                    future.cancel()
                if counted:
                    budget.give(placement.tensor.nbytes)


def _external(
    placement: _Placement, data_name: Callable[[int], str], folder: Path
) -> ir.ExternalTensor:
    """The placed tensor as written: an external tensor in its chunk file."""
    return ir.ExternalTensor(
        data_name(placement.chunk),
        placement.offset,
        placement.tensor.nbytes,
        placement.tensor.dtype,
        shape=typing.cast(ir.Shape, placement.tensor.shape),
        name=placement.value.name or "",
        base_dir=folder,
    )


def write_model(
    model: ir.Model,
    path: Path,
    data_name: Callable[[int], str],
    *,
    max_chunk_bytes: int | None = None,
    progress: ProgressCallback | None = None,
    written: Written | None = None,
    budget: AheadBudget | None = None,
) -> list[str]:
    """Write ``model`` to ``path`` with its large tensors in chunk files beside it.

    Args:
        model: The model; unchanged afterwards.
        path: The ``.onnx`` file to write.
        data_name: Chunk index → chunk file name (relative to ``path``'s folder).
        max_chunk_bytes: Each chunk file stays at or under this size (None: one chunk).
        progress: Called after each tensor is written.
        written: Bytes written before in the same save, by content
            (:func:`surgery.lazy.reuse_written`): tensors of the same content are copied from
            there instead of computed; this model's tensors of known content are added once its
            files are closed.
        budget: Room for lazy tensors computed ahead, shared with parts written at the same
            time (default: this model's own).

    Returns:
        The chunk file names written, in order (empty if every tensor is inline).
    """
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    placements = _plan(list(_external_values(model)), max_chunk_bytes, str(path.name))
    if written is not None:
        for placement in placements:
            placement.source = reuse_written(placement.tensor, written)
    chunks = sorted({p.chunk for p in placements})
    replaced: list[tuple[Callable[[ir.TensorProtocol], None], ir.TensorProtocol]] = []
    try:
        files: dict[int, typing.BinaryIO] = {}
        try:
            for placement, computed in _computed_ahead(placements, budget or AheadBudget()):
                if placement.chunk not in files:
                    files[placement.chunk] = open(folder / data_name(placement.chunk), "wb")  # noqa: SIM115
                data = files[placement.chunk]
                data.seek(placement.offset)
                _write_tensor(computed if computed is not None else placement.source, data)
                del computed  # or it stays alive while the next one is computed
                if data.tell() - placement.offset != placement.tensor.nbytes:  # last guard
                    raise SurgeryError(
                        f"{path.name}: tensor '{placement.value.name}' gave "
                        f"{data.tell() - placement.offset} bytes, but its shape and dtype "
                        f"need {placement.tensor.nbytes}; refusing to write a broken model"
                    )
                if progress is not None:
                    progress(placement.tensor)
        finally:
            for data in files.values():
                _write_back(data)
                data.close()
        if written is not None:
            for placement in placements:
                key = content_key(placement.tensor)
                if key is not None and key not in written:
                    written[key] = _external(placement, data_name, folder)
        # Other external tensors (small initializers, attributes) become inline, as on any
        # save: the output's data files hold only the placed ones.
        placed = {id(p.tensor) for p in placements}
        for slot in list(tensor_slots(model)):
            if isinstance(slot.tensor, ir.ExternalTensor) and id(slot.tensor) not in placed:
                replaced.append((slot.replace, slot.tensor))
                slot.replace(ir.Tensor(read_locked(slot.tensor), name=slot.tensor.name))
        for placement in placements:
            replaced.append(
                (functools.partial(setattr, placement.value, "const_value"), placement.tensor)
            )
            placement.value.const_value = _external(placement, data_name, folder)
        ir.save(model, path)
    finally:
        for replace, tensor in reversed(replaced):
            replace(tensor)
    return [data_name(chunk) for chunk in chunks]


def save_model(model: ir.Model, path: Path, *, progress: ProgressCallback | None = None) -> None:
    """Write one model to ``path`` with all its large tensors in ``<name>.data`` beside it."""
    write_model(model, path, lambda _: f"{path.name}.data", progress=progress)


def _waits_for(bundle: Bundle) -> dict[str, set[str]]:
    """Part → the earlier parts it must wait for: those whose written bytes it may reuse
    (:func:`surgery.lazy.reuse_written`; q4f16's weights are q4's)."""
    keys = {
        part: {reuse_key(_tensor(v)) for v in _external_values(model)} - {None}
        for part, model in bundle.items()
    }
    parts = list(bundle)
    return {
        part: {earlier for earlier in parts[:index] if keys[earlier] & keys[part]}
        for index, part in enumerate(parts)
    }


def save(
    bundle: Bundle,
    out_dir: str | os.PathLike[str],
    *,
    layout: str | dict[str, Any] | Layout = "plain",
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Write every part of ``bundle`` into ``out_dir``, atomically.

    Tensors are streamed one at a time. ``out_dir`` must not exist unless ``force``; on any
    failure nothing is left behind and an existing ``out_dir`` is kept. :data:`PARALLEL_PARTS`
    parts are written at once, in bundle order, a part that reuses another's bytes after it.
    """
    layout = get_layout(layout)
    layout.prepare(bundle)
    total = sum(external_bytes(m) for m in bundle.values())
    waits_for = _waits_for(bundle)
    with (
        atomic_dir(out_dir, force=force) as tmp,
        progress_bar(total=total, desc="writing weights", enabled=progress) as bar,
        concurrent.futures.ThreadPoolExecutor(max_workers=PARALLEL_PARTS) as pool,
    ):
        chunks: dict[str, list[str]] = {}
        written: Written = {}
        budget = AheadBudget()

        def write_part(part: str) -> list[str]:
            return write_model(
                bundle[part],
                tmp / layout.model_file(part),
                lambda chunk: layout.data_file(part, chunk),
                max_chunk_bytes=layout.max_chunk_bytes,
                progress=lambda tensor: bar.update(tensor.nbytes),
                written=written,
                budget=budget,
            )

        pending = list(bundle)
        running: dict[concurrent.futures.Future[list[str]], str] = {}
        while pending or running:
            ready = [p for p in pending if waits_for[p] <= chunks.keys()]
            for part in ready[: PARALLEL_PARTS - len(running)]:
                pending.remove(part)
                running[pool.submit(write_part, part)] = part
            bar.set_postfix_str(", ".join(running.values()))
            finished, _ = concurrent.futures.wait(
                running, return_when=concurrent.futures.FIRST_COMPLETED
            )
            for future in finished:
                chunks[running.pop(future)] = future.result()
        layout.finish(tmp, bundle, {part: chunks[part] for part in bundle})
    return Path(out_dir)
