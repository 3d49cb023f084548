"""Timing a command the way every benchmark here does: cold cache in, data on disk out.

Each run starts with dirty pages flushed and, where permitted (root on Linux), the page cache
dropped, and ends with ``sync``, so it measures the disk rather than RAM. The child's peak
anonymous memory (``RssAnon``: memory-mapped weight pages are the page cache's, not counted) is
sampled from ``/proc/<pid>/status``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path

from surgery.memory import PeakAnonSampler
from surgery.synthetic import write_synthetic_model

__all__ = ["cold_cache", "synthetic_model", "timed"]

GIB = 2**30


def cold_cache() -> None:
    """Flush dirty pages and, where permitted, drop the page cache."""
    os.sync()
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(command: list[str]) -> tuple[float, int]:
    """Run ``command`` from a cold cache until its data is on disk; return wall s, peak anon bytes."""
    cold_cache()
    start = time.perf_counter()
    proc = subprocess.Popen(command)
    with PeakAnonSampler(interval_s=0.01, status=Path(f"/proc/{proc.pid}/status")) as sampler:
        code = proc.wait()
    os.sync()
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"{' '.join(command[:4])} failed with exit code {code}")
    return wall, sampler.peak_bytes


def synthetic_model(workdir: Path, size_gib: float) -> tuple[Path, Path]:
    """Write a synthetic fp32 model of ``size_gib`` (64 MiB tensors) in a folder of its own under
    ``workdir``; return the model's path and its weights file's path."""
    folder = workdir / f"model-{size_gib:g}g"
    folder.mkdir()
    model = write_synthetic_model(
        folder / "model.onnx", width=4096, total_bytes=int(size_gib * GIB), progress=True
    )
    return model, folder / "model.onnx.data"
