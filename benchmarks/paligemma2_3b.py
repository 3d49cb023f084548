"""The whole path at the real PaliGemma 2 3B-pt-224 shapes, with random weights.

make-random (bf16, ~5.9 GB) → ``surgery export`` (one fp32 graph, ~12 GB of weights, the tied
embedding 2.37 GB) → ``surgery apply paligemma2`` (the Transformers.js folder: fp32, fp16, q8
``_quantized`` and q4f16, the embedding split into row blocks, chunks under 2 GB) → every part of
every dtype loaded in ONNX Runtime and run once on a small input (random weights: the outputs are
only checked to be finite). A part that fails to load or run is a row saying so, not the end.
Then the recipe's ``decoder_model_merged`` (fused: ``logits-to-keep`` + ``grouped-attention``) of
each dtype in ``--time`` (default fp32, q8, q4f16) is timed in ONNX Runtime CPU with 2 intra-op
threads, in a child process per dtype: prefill of 272 tokens (256 image + 16 text, empty past,
``num_logits_to_keep`` = 1 as Transformers.js's ``generate`` feeds it) and one decode step at past
272 (random past), every output fetched as Transformers.js does; the median of 3 (prefill) and 5
(decode) runs after a warm-up. Each feed's name, element type and shape are read from the session
(q4f16's inputs are float32: keep_io_types).

Each step runs in a child process whose wall time, peak RSS (mapped pages included) and peak
anonymous memory (``RssAnon``) are measured; the table also lists the bytes written, the largest
data chunk, and then every dtype's files and total bytes. Needs about 50 GB of free disk and 15 GB
of memory (ONNX Runtime holds a part's weights while it runs it).

Usage: python benchmarks/paligemma2_3b.py [--workdir DIR] [--keep] [--time DTYPE ...]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

from _harness import TJS_SUFFIXES, bytes_by_dtype, timed_peaks

from surgery.constants import DEFAULT_MAX_CHUNK_BYTES

GB = 1e9
#: Prompt (256 image + 16 text tokens) and the past of the timed decode step.
PREFILL = PAST = 272
PREFILL_RUNS, DECODE_RUNS = 3, 5
#: File suffix of each dtype the decoder timing can take (the shipped recipe's).
TIMED = {"fp32": "", "q8": "_quantized", "q4f16": "_q4f16"}

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

_TIME_DECODER = """
import json, statistics, sys, time, numpy as np, onnxruntime as ort
path, out, prefill, past, prefill_runs, decode_runs = sys.argv[1:7]
options = ort.SessionOptions()
options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}
def feeds(length, past):
    rng = np.random.default_rng(0)
    result = {}
    for i in session.get_inputs():
        dtype = types[i.type]
        if i.name == "num_logits_to_keep":
            result[i.name] = np.array(1, dtype)  # as Transformers.js's generate feeds it
        elif i.name == "attention_mask":
            result[i.name] = np.ones((1, past + length), dtype)
        elif i.name == "position_ids":
            result[i.name] = np.arange(past + 1, past + length + 1, dtype=dtype)[None]
        elif i.name == "inputs_embeds":
            result[i.name] = rng.standard_normal((1, length, i.shape[2])).astype(dtype)
        elif i.name.startswith("past_key_values."):
            shape = (1, i.shape[1], past, i.shape[3])
            result[i.name] = rng.standard_normal(shape).astype(dtype)
        else:
            raise SystemExit(f"{path}: unexpected input {i.name} {i.type} {i.shape}")
    return result
def median_ms(feeds, runs):
    times = []
    for run in range(runs + 1):  # the first is the warm-up
        start = time.perf_counter()
        logits = session.run(None, feeds)[0]
        times.append((time.perf_counter() - start) * 1000)
        assert np.isfinite(logits).all(), path
    return statistics.median(times[1:]), logits.shape
prefill_ms, prefill_shape = median_ms(feeds(int(prefill), 0), int(prefill_runs))
decode_ms, _ = median_ms(feeds(1, int(past)), int(decode_runs))
result = {"prefill_ms": prefill_ms, "decode_ms": decode_ms, "logits": list(prefill_shape)}
open(out, "w").write(json.dumps(result))
"""


def _bytes(folder: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern) if p.is_file())


def _listing(onnx_dir: Path) -> str:
    """Every dtype's files (name and bytes) and total, as Markdown."""
    files: dict[str, list[Path]] = {}
    for path in sorted(onnx_dir.iterdir()):
        stem = path.name.split(".onnx")[0]
        dtype = next((d for s, d in TJS_SUFFIXES.items() if stem.endswith(s)), "fp32")
        files.setdefault(dtype, []).append(path)
    lines = ["| dtype | files (bytes) | total GB |", "|---|---|---:|"]
    for dtype, paths in files.items():
        names = ", ".join(f"`{p.name}` ({p.stat().st_size:,})" for p in paths)
        lines.append(f"| {dtype} | {names} | {sum(p.stat().st_size for p in paths) / GB:.3f} |")
    return "\n".join(lines)


def _time_decoder(decoder: Path, work: Path) -> tuple[str, float, int, int, str]:
    """A table row: ``decoder``'s median prefill and decode times, from a child process."""
    name = f"ORT time {decoder.name} (2 threads)"
    out = work / "timing.json"
    command = [sys.executable, "-c", _TIME_DECODER, str(decoder), str(out)]
    command += [str(n) for n in (PREFILL, PAST, PREFILL_RUNS, DECODE_RUNS)]
    try:
        wall, rss, anon = timed_peaks(command)
    except SystemExit as failure:
        return name, math.nan, 0, 0, f"FAILED: {failure}"
    result = json.loads(out.read_text())
    note = (
        f"prefill {PREFILL}: {result['prefill_ms']:.0f} ms (median of {PREFILL_RUNS}, logits "
        f"{result['logits']}); decode at past {PAST}: {result['decode_ms']:.1f} ms/token "
        f"(median of {DECODE_RUNS})"
    )
    print(name, note, file=sys.stderr)
    return name, wall, rss, anon, note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the files written")
    parser.add_argument(
        "--time",
        nargs="*",
        choices=sorted(TIMED),
        default=list(TIMED),
        help="dtypes whose decoder is timed (default: %(default)s)",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pg2-3b-", dir=args.workdir))
    cli = [sys.executable, "-m", "surgery.cli"]
    rows: list[tuple[str, float, int, int, str]] = []
    listing = ""
    try:
        checkpoint, model, out = work / "checkpoint", work / "model.onnx", work / "out"
        wall, rss, anon = timed_peaks(
            [*cli, "make-random", "paligemma2-3b-pt-224", "-o", str(checkpoint), "-q"]
        )
        rows.append(
            (
                "make-random (bf16)",
                wall,
                rss,
                anon,
                f"{_bytes(checkpoint, '*.safetensors') / GB:.2f} GB",
            )
        )
        wall, rss, anon = timed_peaks([*cli, "export", str(checkpoint), "-o", str(model), "-q"])
        rows.append(
            ("export (fp32)", wall, rss, anon, f"{_bytes(work, 'model.onnx*') / GB:.2f} GB")
        )
        wall, rss, anon = timed_peaks(
            [*cli, "apply", "paligemma2", str(model), "-o", str(out), "-q"]
        )
        if not args.keep:  # the export is read no more: free its 12 GB before the ORT runs
            for path in work.glob("model.onnx*"):
                path.unlink()
        onnx_dir = out / "onnx"
        chunks = sorted(onnx_dir.glob("*.onnx_data*"), key=lambda p: p.stat().st_size)
        largest = chunks[-1].stat().st_size
        under = "all < 2 GB" if largest < DEFAULT_MAX_CHUNK_BYTES else "NOT all < 2 GB"
        per_dtype = ", ".join(
            f"{d} {n / GB:.2f}" for d, n in sorted(bytes_by_dtype(onnx_dir).items())
        )
        rows.append(
            (
                "apply paligemma2 (fp32 + fp16 + q8 + q4f16)",
                wall,
                rss,
                anon,
                f"{_bytes(onnx_dir, '*') / GB:.2f} GB ({per_dtype}), {len(chunks)} chunks, "
                f"largest {largest / GB:.3f} GB ({under})",
            )
        )
        counts = json.loads((out / "config.json").read_text())["transformers.js_config"]
        print(json.dumps(counts, indent=1), file=sys.stderr)
        listing = _listing(onnx_dir)
        for part in sorted(onnx_dir.glob("*.onnx")):
            try:
                wall, rss, anon = timed_peaks([sys.executable, "-c", _RUN_PART, str(part)])
                rows.append((f"ORT load + run {part.name}", wall, rss, anon, "finite"))
            except SystemExit as failure:  # a part that does not load or run is a finding
                rows.append((f"ORT load + run {part.name}", math.nan, 0, 0, f"FAILED: {failure}"))
        for dtype in args.time:
            rows.append(_time_decoder(onnx_dir / f"decoder_model_merged{TIMED[dtype]}.onnx", work))
    except SystemExit as failure:  # a CLI step failed: the table shows what ran, then the failure
        rows.append((f"FAILED: {failure}", math.nan, 0, 0, ""))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\n| step | wall s | peak RSS GiB | peak anon GiB | output |\n|---|---:|---:|---:|---|")
    for name, wall, rss, anon, note in rows:
        print(f"| {name} | {wall:.1f} | {rss / 2**30:.2f} | {anon / 2**30:.2f} | {note} |")
    print(f"\n{listing}")


if __name__ == "__main__":
    main()
