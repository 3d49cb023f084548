"""fp16 conversion of weights, streamed, against onnxconverter-common and ``cp``, in one run.

Builds a synthetic fp32 model of each requested size (:mod:`surgery.synthetic`, 64 MiB tensors,
never held in memory whole), then for each size runs, each in a child process whose peak
anonymous memory (``RssAnon``; memory-mapped weight pages are the page cache's, not counted) is
sampled from ``/proc/<pid>/status``:

* ``cp`` of the weights file (the floor: what moving the bytes costs on this disk);
* ``surgery`` fp16: ``load`` (memory-mapped) → pass ``fp16`` → ``save`` (each fp16 tensor computed
  when the writer reaches it);
* onnxconverter-common: ``onnx.load`` (external data read in) → ``convert_float_to_float16``
  (``keep_io_types=True``) → ``onnx.save`` with external data.

Each step starts with dirty pages flushed (and the page cache dropped where permitted) and ends
with ``sync``. Prints wall seconds, the ratio to ``cp``, peak anonymous MiB and the size of the
written data. Targets: surgery ≤ 1.5× ``cp``, ≥ 10× faster than onnxconverter-common, peak
≤ 512 MiB + the largest tensor, the same at every size.

Usage: python benchmarks/weights.py [--sizes 4 8] [--skip-occ-above 8] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from _harness import synthetic_model, timed

MIB = 2**20

_SURGERY = """
import sys
from passes.fp16 import Fp16
from surgery import load, save
bundle = load(sys.argv[1])
Fp16()(bundle["model"])
save(bundle, sys.argv[2], progress=False)
"""

_ONNXCONVERTER = """
import sys, onnx
from pathlib import Path
from onnxconverter_common.float16 import convert_float_to_float16
model = onnx.load(sys.argv[1])
model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
out = Path(sys.argv[2])
out.mkdir()
onnx.save(model, out / "model.onnx", save_as_external_data=True, location="model.onnx.data")
"""


def _measure(size_gib: float, workdir: Path, occ: bool) -> list[tuple[str, float, int, int]]:
    """Rows ``(step, wall s, peak anon bytes, data bytes written)`` for one model size."""
    model, data = synthetic_model(workdir, size_gib)
    size = f"{size_gib:g} GiB"
    rows = []
    copy = workdir / "copy.data"
    wall, peak = timed(["cp", str(data), str(copy)])
    rows.append((f"cp ({size})", wall, peak, copy.stat().st_size))
    copy.unlink()
    steps = [("surgery fp16 + write", _SURGERY)]
    if occ:
        steps.append(("onnxconverter-common + onnx.save", _ONNXCONVERTER))
    for name, script in steps:
        out = workdir / "out"
        wall, peak = timed([sys.executable, "-c", script, str(model), str(out)])
        rows.append((f"{name} ({size})", wall, peak, (out / "model.onnx.data").stat().st_size))
        shutil.rmtree(out)
    shutil.rmtree(model.parent)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[4, 8], help="sizes in GiB")
    parser.add_argument(
        "--skip-occ-above",
        type=float,
        default=4,
        help="run onnxconverter-common only up to this size (it holds the whole model in memory)",
    )
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for size in args.sizes:
            rows += _measure(size, Path(tmp), size <= args.skip_occ_above)
    print(f"\n{'step':<44} {'wall s':>8} {'× cp':>6} {'peak anon MiB':>14} {'data MiB':>9}")
    cp_wall = 1.0
    for name, wall, peak, written in rows:
        if name.startswith("cp "):
            cp_wall = wall
        print(
            f"{name:<44} {wall:>8.2f} {wall / cp_wall:>6.2f} {peak / MIB:>14.0f} {written / MIB:>9.0f}"
        )
    print(f"largest tensor: {4096 * 4096 * 4 / MIB:.0f} MiB (fp32)")


if __name__ == "__main__":
    main()
