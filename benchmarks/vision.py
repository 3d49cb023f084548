"""The SigLIP vision encoder with and without onnxscript's attention fusions, at 448 and 896 px.

A random PaliGemma 2 whose vision tower has SigLIP So400m's widths (hidden 1152, 16 heads,
intermediate 4304, patch 14) but ``--layers`` layers, and a tiny text model (only the vision
encoder is timed), is written by ``surgery make-random`` from a config this script writes per
image size, exported, and split by the paligemma2 recipe's ``split`` into ``vision_encoder.onnx``.
Rows:

* (a) ``unfused``: that ``vision_encoder.onnx``;
* (b) the recipe's ``fuse-vision-attention``: ``com.microsoft.MultiHeadAttention`` per layer
  (onnxscript 0.7's SDPA and MHA rules), the Q, K and V MatMuls kept separate;
* (c) (b) plus onnxscript's skip-LayerNorm rules (``SkipLayerNormalization`` for each residual
  Add + LayerNorm), which the pass leaves out;
* (d) onnxscript's whole ``optimize_for_ort``: ``com.microsoft.Attention`` (Q, K and V weights
  packed into one by a graph ``Concat``) and ``SkipLayerNormalization``.

Each run is a child process: load the model in ONNX Runtime CPU (2 intra-op threads, default
graph optimizations, as Transformers.js's Node runtime loads it), run one image as a warm-up, then
time one more. The parent samples the child's ``RssAnon`` (heap: the attention matrices live
there) every 10 ms and takes its ``VmHWM`` (peak RSS, weights included) from ``wait4``. Rows take
turns run by run, so a drifting load hits every row; the table gives the median time and the
largest peaks over ``--runs`` runs. Each fused row's output is compared with (a)'s.

Usage: flock /work/bench.lock python benchmarks/vision.py [--sizes 448 896] [--layers 2]
[--runs 3] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir
import yaml

from surgery.memory import PeakAnonSampler

THREADS = 2
MIB = 2**20
PATCH = 14

VISION = {
    "model_type": "siglip_vision_model",
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_attention_heads": 16,
    "patch_size": PATCH,
    "vision_use_head": False,
}
VOCAB = 1600
TEXT = {
    "model_type": "gemma2",
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "query_pre_attn_scalar": 16,
    "sliding_window": 64,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "max_position_embeddings": 2048,
}

#: The child: load, warm up, time one run; print ms and the output's checksum file.
_CHILD = f"""
import sys, time, numpy as np, onnxruntime as ort
path, size, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
options = ort.SessionOptions()
options.intra_op_num_threads = {THREADS}
options.inter_op_num_threads = 1
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
pixels = np.random.default_rng(0).uniform(-1, 1, (1, 3, size, size)).astype(np.float32)
session.run(None, {{"pixel_values": pixels}})
start = time.perf_counter()
(features,) = session.run(None, {{"pixel_values": pixels}})
print((time.perf_counter() - start) * 1000)
np.save(out, features)
"""


def _config(size: int, layers: int) -> dict[str, object]:
    return {
        "model_type": "paligemma",
        "text_config": TEXT,
        "vision_config": {**VISION, "image_size": size, "num_hidden_layers": layers},
        "image_token_index": VOCAB - 64,
        "projection_dim": TEXT["hidden_size"],
        "hidden_size": TEXT["hidden_size"],
        "vocab_size": VOCAB,
    }


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "surgery.cli", *args, "-q"], check=True)


def _split_recipe(work: Path) -> Path:
    """The paligemma2 recipe's ``split``, vision_encoder only, then dead-node removal."""
    from surgery.recipe import find_recipe

    recipe = yaml.safe_load(find_recipe("paligemma2").read_text())
    split = next(s for s in recipe["passes"] if isinstance(s, dict) and s["pass"] == "split")
    split["options"]["parts"] = {"vision_encoder": split["options"]["parts"]["vision_encoder"]}
    path = work / "split.yaml"
    path.write_text(
        yaml.safe_dump(
            {"name": "vision-split", "passes": [split, "remove-unused", "topological-sort"]},
            sort_keys=False,
        )
    )
    return path


def _shipped(model: ir.Model) -> None:
    """The recipe's ``fuse-vision-attention``: MultiHeadAttention, Q/K/V MatMuls separate."""
    from passes.fuse_vision_attention import FuseVisionAttention

    FuseVisionAttention()(model)


def _with_skip_layer_norm(model: ir.Model) -> None:
    """(b), then onnxscript's skip-LayerNorm rules (residual Add + LayerNorm)."""
    from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_layer_normalization

    _shipped(model)
    fuse_skip_layer_normalization(model)


def _optimize_for_ort(model: ir.Model) -> None:
    """onnxscript's whole ``optimize_for_ort`` (packed com.microsoft.Attention)."""
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    optimize_for_ort(model)


ROWS: dict[str, Callable[[ir.Model], None] | None] = {
    "(a) unfused": None,
    "(b) `fuse-vision-attention` (MultiHeadAttention)": _shipped,
    "(c) (b) + SkipLayerNormalization": _with_skip_layer_norm,
    "(d) `optimize_for_ort` (Attention, packed QKV, + SkipLayerNormalization)": _optimize_for_ort,
}


def _variants(source: Path, folder: Path) -> dict[str, Path]:
    """Write each row's model; print each one's ops."""
    paths = {}
    for index, (label, fuse) in enumerate(ROWS.items()):
        model = ir.load(source)
        if fuse is not None:
            fuse(model)
        path = folder / f"vision_encoder_{index}.onnx"
        ir.save(model, path, external_data=f"{path.name}.data")
        ops = collections.Counter(
            f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in model.graph
        )
        print(f"  {label}: {sum(ops.values())} nodes: {dict(sorted(ops.items()))}")
        paths[label] = path
    return paths


def _run(path: Path, size: int, out: Path) -> tuple[float, int, int]:
    """One child run: (ms, peak RssAnon bytes, peak RSS bytes)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path), str(size), str(out)], stdout=subprocess.PIPE
    )
    with PeakAnonSampler(interval_s=0.01, status=Path(f"/proc/{proc.pid}/status")) as sampler:
        _, status, usage = os.wait4(proc.pid, 0)
    assert proc.stdout is not None
    ms = float(proc.stdout.read().decode().split()[-1])
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{path} failed")
    return ms, sampler.peak_bytes, usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[448, 896])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vision-bench-", dir=args.workdir))
    print(f"load average at start: {os.getloadavg()}")
    table = []
    try:
        for size in args.sizes:
            folder = work / str(size)
            folder.mkdir()
            (folder / "config.json").write_text(json.dumps(_config(size, args.layers)))
            _cli("make-random", str(folder / "config.json"), "-o", str(folder / "ckpt"))
            (folder / "export").mkdir()
            _cli("export", str(folder / "ckpt"), "-o", str(folder / "export" / "model.onnx"))
            _cli(
                "apply",
                str(_split_recipe(work)),
                str(folder / "export" / "model.onnx"),
                "-o",
                str(folder / "split"),
            )
            shutil.rmtree(folder / "ckpt")
            shutil.rmtree(folder / "export")
            tokens = (size // PATCH) ** 2
            print(f"{size} px ({tokens} tokens), {args.layers} layers:")
            paths = _variants(folder / "split" / "vision_encoder.onnx", folder)
            results: dict[str, list[tuple[float, int, int]]] = {label: [] for label in paths}
            for _ in range(args.runs):
                for index, (label, path) in enumerate(paths.items()):
                    results[label].append(_run(path, size, folder / f"out_{index}.npy"))
            reference = np.load(folder / "out_0.npy")
            for index, (label, rows) in enumerate(results.items()):
                delta = float(np.abs(np.load(folder / f"out_{index}.npy") - reference).max())
                table.append(
                    (
                        f"{size} px, {label}",
                        statistics.median(r[0] for r in rows),
                        max(r[1] for r in rows) / MIB,
                        max(r[2] for r in rows) / MIB,
                        delta,
                        [round(r[0]) for r in rows],
                    )
                )
            shutil.rmtree(folder)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"load average at end: {os.getloadavg()}")
    print()
    print("| | ms (median) | peak RssAnon MiB | peak RSS MiB | max abs diff vs (a) | runs ms |")
    print("|---|---:|---:|---:|---:|---|")
    for label, ms, anon, rss, delta, runs in table:
        print(f"| {label} | {ms:.0f} | {anon:.0f} | {rss:.0f} | {delta:.2e} | {runs} |")


if __name__ == "__main__":
    main()
