"""Load → cleanup recipe → save through the CLI, against `cp` of the same data, in one run.

Builds a synthetic fp32 model of each requested size (never held in memory whole), then for each:

* ``cp`` of the weights file (the floor: what moving the bytes costs on this disk);
* ``surgery apply cleanup model.onnx -o out`` in a child process, whose peak anonymous memory
  (``RssAnon``; memory-mapped weight pages are not counted, they are the page cache's) is sampled
  from ``/proc/<pid>/status``.

Each step starts with the page cache flushed and dropped (where permitted: root on Linux) and
ends with ``sync``, so it is timed reading from and writing to the disk, not RAM; steps alternate
and repeat (``--repeat``), and the table shows medians, because a virtual disk is noisy. Prints
wall seconds, the ratio to ``cp``, and peak anonymous MiB. Targets: ratio ≤ 1.5, peak ≤ 512 MiB,
the same at every size.

Usage: python benchmarks/io_roundtrip.py [--sizes 1 4] [--repeat 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from _harness import synthetic_model, timed


def _measure(size_gib: float, workdir: Path, repeat: int) -> list[tuple[str, float, float, float]]:
    model, data = synthetic_model(workdir, size_gib)
    out, copy = workdir / "out", workdir / "copy.data"
    cli = [
        sys.executable,
        "-m",
        "surgery.cli",
        "apply",
        "cleanup",
        str(model),
        "-o",
        str(out),
        "-q",
    ]
    cp_runs, runs = [], []
    for _ in range(repeat):
        cp_runs.append(timed(["cp", str(data), str(copy)]))
        runs.append(timed(cli))
        assert (out / "model.onnx.data").stat().st_size >= data.stat().st_size - 4096
        shutil.rmtree(out)
        copy.unlink()
    shutil.rmtree(model.parent)
    cp_wall = statistics.median(w for w, _ in cp_runs)
    cp_peak = max(p for _, p in cp_runs)
    wall = statistics.median(w for w, _ in runs)
    peak = max(p for _, p in runs)
    size = f"{size_gib:g} GiB"
    return [
        (f"cp ({size})", cp_wall, 1.0, cp_peak / 2**20),
        (f"surgery apply cleanup ({size})", wall, wall / cp_wall, peak / 2**20),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 4], help="model sizes in GiB")
    parser.add_argument("--repeat", type=int, default=3, help="runs per step (median shown)")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for size in args.sizes:
            rows += _measure(size, Path(tmp), args.repeat)
    print(
        f"\n{'step (median of ' + str(args.repeat) + ')':<34} {'wall s':>8} {'× cp':>6} {'peak anon MiB':>14}"
    )
    for name, wall, ratio, peak in rows:
        print(f"{name:<34} {wall:>8.2f} {ratio:>6.2f} {peak:>14.0f}")


if __name__ == "__main__":
    main()
