"""The whole path at the real PaliGemma 2 3B-pt-224 shapes, with random weights.

make-random (bf16, ~5.9 GB) → ``surgery export`` (one fp32 graph, ~12 GB of weights, the tied
embedding 2.37 GB) → ``surgery apply paligemma2`` (the Transformers.js folder, fp32 and fp16, the
embedding split into row blocks, chunks under 2 GB) → every part loaded in ONNX Runtime and run once
on a small input (random weights: the outputs are only checked to be finite).

Each CLI step runs in a child process whose wall time and peak anonymous memory (``RssAnon``) are
measured; the table also lists the bytes written and the largest data chunk. Needs about 40 GB of
free disk and 15 GB of memory (ONNX Runtime holds a part's weights while it runs it).

Usage: python benchmarks/paligemma2_3b.py [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from _harness import timed

GB = 1e9

_RUN_PART = """
import sys, numpy as np, onnxruntime as ort
path = sys.argv[1]
session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
feeds = {}
for i in session.get_inputs():
    shape = [d if isinstance(d, int) else (0 if "past" in str(d) else 2) for d in i.shape]
    if i.type == "tensor(int64)":
        feeds[i.name] = np.ones(shape, np.int64)
    else:
        dtype = np.float16 if i.type == "tensor(float16)" else np.float32
        feeds[i.name] = np.random.default_rng(0).standard_normal(shape).astype(dtype)
outputs = session.run(None, feeds)
assert all(np.isfinite(o).all() for o in outputs), path
"""


def _bytes(folder: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern) if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the files written")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pg2-3b-", dir=args.workdir))
    cli = [sys.executable, "-m", "surgery.cli"]
    rows: list[tuple[str, float, int, str]] = []
    try:
        checkpoint, model, out = work / "checkpoint", work / "model.onnx", work / "out"
        wall, peak = timed(
            [*cli, "make-random", "paligemma2-3b-pt-224", "-o", str(checkpoint), "-q"]
        )
        rows.append(
            ("make-random (bf16)", wall, peak, f"{_bytes(checkpoint, '*.safetensors') / GB:.2f} GB")
        )
        wall, peak = timed([*cli, "export", str(checkpoint), "-o", str(model), "-q"])
        rows.append(("export (fp32)", wall, peak, f"{_bytes(work, 'model.onnx*') / GB:.2f} GB"))
        wall, peak = timed([*cli, "apply", "paligemma2", str(model), "-o", str(out), "-q"])
        chunks = sorted((out / "onnx").glob("*.onnx_data*"), key=lambda p: p.stat().st_size)
        rows.append(
            (
                "apply paligemma2 (fp32 + fp16)",
                wall,
                peak,
                f"{_bytes(out / 'onnx', '*') / GB:.2f} GB, {len(chunks)} chunks, largest {chunks[-1].stat().st_size / GB:.2f} GB",
            )
        )
        counts = json.loads((out / "config.json").read_text())["transformers.js_config"]
        print(json.dumps(counts, indent=1), file=sys.stderr)
        for part in sorted((out / "onnx").glob("*.onnx")):
            wall, peak = timed([sys.executable, "-c", _RUN_PART, str(part)])
            rows.append((f"ORT load + run {part.name}", wall, peak, "finite"))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'step':<48} {'wall s':>8} {'peak anon GiB':>14}  output")
    for name, wall, peak, note in rows:
        print(f"{name:<48} {wall:>8.1f} {peak / 2**30:>14.2f}  {note}")


if __name__ == "__main__":
    main()
