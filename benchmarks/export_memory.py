"""Peak anonymous memory of ``surgery export`` on a generated checkpoint of over 1B parameters.

Generates a random checkpoint (``surgery.checkpoint.make_random_checkpoint``, preset
``paligemma2-1b-bench`` by default: SigLIP So400m + 4 Gemma 2 2B layers, about 1.3B parameters in
float32), then runs the export in a child process (``_harness.timed``: cold cache in, data on disk out)
while this process samples the child's ``RssAnon`` from ``/proc/<pid>/status``. ``RssAnon`` and not RSS: memory-mapped
checkpoint pages are file-backed and can be dropped by the kernel at any time; anonymous memory is
what a copy of the weights would cost. Prints a Markdown table: weight bytes, wall time, peak
anonymous memory and its ratio to the weight bytes (target < 1.0, moonshot <= 0.25).

Usage::

    python benchmarks/export_memory.py [--preset NAME] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
import tempfile
from pathlib import Path

from _harness import timed

from surgery.export_weights import read_safetensors

__all__ = ["main"]

logger = logging.getLogger(__name__)

_CHILD = """
import sys
from surgery.export import export_checkpoint
export_checkpoint(sys.argv[1], sys.argv[2], progress=False)
"""


def _sizes(checkpoint: Path) -> tuple[int, int]:
    """The checkpoint's weight bytes and parameter count, from its safetensors headers."""
    entries = read_safetensors(checkpoint).values()
    return sum(e.length for e in entries), sum(math.prod(e.shape) for e in entries)


def main(argv: list[str] | None = None) -> int:
    """Generate, export, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paligemma2-1b-bench")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and the export")
    args = parser.parse_args(argv)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="export-memory-"))
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint, output = workdir / "checkpoint", workdir / "model.onnx"
    try:
        gen_args = [
            sys.executable,
            "-c",
            "import sys; from surgery.checkpoint import make_random_checkpoint; "
            "make_random_checkpoint(sys.argv[1], sys.argv[2], force=True, progress=False)",
            args.preset,
            str(checkpoint),
        ]
        gen_wall, gen_peak = timed(gen_args)
        weights, params = _sizes(checkpoint)
        for stale in (output, output.with_name(output.name + ".data")):
            stale.unlink(missing_ok=True)
        wall, peak = timed([sys.executable, "-c", _CHILD, str(checkpoint), str(output)])
        written = output.with_name(output.name + ".data").stat().st_size

        gib = 1024**3
        print(
            f"\npreset {args.preset}: {params / 1e9:.2f}B parameters, weights {weights / gib:.2f} GiB\n"
        )
        print("| step | wall (s) | peak RssAnon (GiB) | peak / weight bytes |")
        print("|---|---:|---:|---:|")
        print(f"| make-random | {gen_wall:.1f} | {gen_peak / gib:.2f} | {gen_peak / weights:.3f} |")
        print(f"| export | {wall:.1f} | {peak / gib:.2f} | {peak / weights:.3f} |")
        print(f"\nexported data file: {written / gib:.2f} GiB")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
