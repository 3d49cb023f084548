"""Timing a command the way every benchmark here does: cold cache in, data on disk out.

Each run starts with dirty pages flushed and, where permitted (root on Linux), the page cache
dropped, and ends with ``sync``, so it measures the disk rather than RAM. The child's peak
anonymous memory (``RssAnon``: memory-mapped weight pages are the page cache's, not counted) is
sampled from ``/proc/<pid>/status``; its peak RSS (mapped pages included) is the kernel's
high-water mark, from ``wait4``'s ``ru_maxrss``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path

from surgery.memory import PeakAnonSampler
from surgery.synthetic import write_synthetic_model

__all__ = [
    "TJS_SUFFIXES",
    "bytes_by_dtype",
    "cold_cache",
    "synthetic_model",
    "timed",
    "timed_peaks",
]

GIB = 2**30
#: File-name suffix of each Transformers.js dtype (no suffix: fp32).
TJS_SUFFIXES = {
    "_fp16": "fp16",
    "_quantized": "q8",
    "_int8": "int8",
    "_uint8": "uint8",
    "_q4f16": "q4f16",
    "_q4": "q4",
    "_bnb4": "bnb4",
}


def cold_cache() -> None:
    """Flush dirty pages and, where permitted, drop the page cache."""
    os.sync()
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(command: list[str]) -> tuple[float, int]:
    """Run ``command`` from a cold cache until its data is on disk; return wall s, peak anon bytes."""
    wall, _, anon = timed_peaks(command)
    return wall, anon


def timed_peaks(command: list[str]) -> tuple[float, int, int]:
    """Like :func:`timed`; return wall s, peak RSS bytes and peak anon bytes of the child."""
    cold_cache()
    start = time.perf_counter()
    proc = subprocess.Popen(command)
    with PeakAnonSampler(interval_s=0.01, status=Path(f"/proc/{proc.pid}/status")) as sampler:
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    os.sync()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        shown = " ".join(arg.strip().split("\n")[0][:40] for arg in command[:4])
        raise SystemExit(f"{shown} ... failed with exit code {proc.returncode}")
    return wall, usage.ru_maxrss * 1024, sampler.peak_bytes


def bytes_by_dtype(folder: Path) -> dict[str, int]:
    """Bytes of a Transformers.js ``onnx/`` folder's files (graphs and data chunks) per dtype."""
    totals: dict[str, int] = {}
    for path in folder.iterdir():
        stem = path.name.split(".onnx")[0]
        dtype = next((d for s, d in TJS_SUFFIXES.items() if stem.endswith(s)), "fp32")
        totals[dtype] = totals.get(dtype, 0) + path.stat().st_size
    return totals


def synthetic_model(workdir: Path, size_gib: float) -> tuple[Path, Path]:
    """Write a synthetic fp32 model of ``size_gib`` (64 MiB tensors) in a folder of its own under
    ``workdir``; return the model's path and its weights file's path."""
    folder = workdir / f"model-{size_gib:g}g"
    folder.mkdir()
    model = write_synthetic_model(
        folder / "model.onnx", width=4096, total_bytes=int(size_gib * GIB), progress=True
    )
    return model, folder / "model.onnx.data"
