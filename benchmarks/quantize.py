"""Quantization of the 1.32B bench model: the streamed ``quantize`` pass against the anchor route.

For each model scale, in one run, each row a child process timed by ``_harness.timed_peaks``
(cold cache in, data on disk out; wall time, peak RSS with mapped pages, peak ``RssAnon``):

* (c) ``cp`` of the export's fp32 weights file: what moving bytes costs on this disk, before and
  again after (a); the faster of the two is the reference;
* (a) ``surgery apply`` of a recipe made from ``recipes/paligemma2.yaml``: its split, rename,
  ``split-large-tensors``, cleanup and ``fold-transposes`` (the fp32 parts), with one
  ``copy-parts`` + ``quantize`` pair per dtype before ``fold-transposes`` instead of the shipped
  fp16 / q8 / q4f16 variants: q8 (``_quantized``), q4, q4f16 (with its ``fp16`` step) and bnb4.
  It writes the fp32 folder and all four dtypes from the exported monolithic graph;
* (b) the anchor, as Transformers.js's ``scripts/quantize.py`` does it, one child per mode over
  the fp32 files (a) wrote: per part ``onnx.load`` (external data read in), ONNX Runtime's
  quantizer, then the script's ``check_and_save_model`` (``onnx.checker``, then ``onnx.save``,
  with external data past 2 GB). q8: ``ONNXQuantizer`` IntegerOps, dynamic, ``MatMulConstBOnly``,
  QInt8 weights unless the part has a QUINT8 op; q4: ``MatMulNBitsQuantizer`` bits 4, block 32,
  symmetric; q4f16: that, then onnxconverter-common's ``convert_float_to_float16``
  (``keep_io_types``); bnb4: ``MatMulBnb4Quantizer`` NF4, block 64. Where this departs from the
  script: no ``onnxslim`` after fp16 (not installed here); and the script's ``model.ByteSize()``
  test (inline or external data) counts an ``EncodeError`` as "over 2 GB": with upb protobuf
  (7.36 here) ``ByteSize()`` raises past 2 GB, so the script as written fails on any part still
  over 2 GB after quantization (``embed_tokens``, 2.37 GB, at the full scale).

Scales: ``full`` is the preset ``paligemma2-1b-bench`` (SigLIP So400m 27 layers + 4 Gemma 2 2B
layers, vocabulary 257216: 4.91 GiB fp32; the tied 2.37 GB embedding is cut into two 1.19 GB row
blocks by ``split-large-tensors``). ``half`` halves every layer count and the vocabulary (2.45 GiB;
its 1.19 GB embedding is not cut), so both quantize the same largest block and a flat peak shows
memory does not grow with the model. Checkpoints and exports are cached under ``--work``; rows'
outputs are deleted once measured (``--scales tiny``: a quick check of the script). Disk: about 35 GB free for ``full``.

Usage: python benchmarks/quantize.py [--work DIR] [--scales half full] [--no-anchor]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import onnx
import yaml
from _harness import bytes_by_dtype, timed_peaks

from surgery.checkpoint import PRESETS
from surgery.recipe import find_recipe

__all__ = ["main"]

MIB, GIB = 2**20, 2**30
#: suffix -> quantize options of (a), in the order the anchor runs its modes.
VARIANTS: dict[str, dict[str, Any]] = {
    "_quantized": {"mode": "q8"},
    "_q4": {"mode": "q4"},
    "_q4f16": {"mode": "q4f16"},
    "_bnb4": {"mode": "bnb4"},
}
#: scale -> preset (``half``: a config made from the bench preset; ``tiny``: a quick smoke run).
SCALES = {"full": "paligemma2-1b-bench", "half": "", "tiny": "tiny-paligemma2"}
PARTS = ["vision_encoder", "embed_tokens", "decoder_model_merged"]
#: The parts the 4-bit modes quantize (embed_tokens has no MatMul; 8 bits take its Gather too).
MATMUL_PARTS = ["vision_encoder", "decoder_model_merged"]

_ANCHOR = """
import os, sys
from pathlib import Path
import onnx
from google.protobuf.message import EncodeError
from onnxruntime.quantization import QuantizationMode, QuantType
from onnxruntime.quantization.matmul_bnb4_quantizer import MatMulBnb4Quantizer
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer
from onnxruntime.quantization.registry import IntegerOpsRegistry
from onnxconverter_common.float16 import convert_float_to_float16

QUINT8_OPS = ("Conv", "GroupQueryAttention", "MultiHeadAttention")
mode, src, dst = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])


def operators(graph, found):
    for node in graph.node:
        found.add(node.op_type)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                operators(attr.g, found)
    return found


def small(model):  # upb protobuf raises EncodeError from ByteSize() past 2 GB: that is "big"
    try:
        return model.ByteSize() < onnx.checker.MAXIMUM_PROTOBUF
    except EncodeError:
        return False


def check_and_save_model(model, path):  # Transformers.js's scripts/utils.py
    if small(model):
        try:
            onnx.checker.check_model(model)
        except Exception as e:
            if "No Op registered for" not in str(e):
                raise
        onnx.save(model, path)
    else:
        onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                  location=os.path.basename(path) + "_data")
        try:
            onnx.checker.check_model(path)
        except Exception as e:
            if "No Op registered for" not in str(e):
                raise


dst.mkdir(parents=True)
for path in sorted(src.glob("*.onnx")):
    model = onnx.load(path)
    if mode in ("q4", "q4f16"):
        quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=32, is_symmetric=True,
                                         accuracy_level=None)
        quantizer.process()
        model = quantizer.model.model
        if mode == "q4f16":
            model = convert_float_to_float16(model, keep_io_types=True,
                                             disable_shape_infer=not small(model))
    elif mode == "bnb4":
        quantizer = MatMulBnb4Quantizer(model, quant_type=MatMulBnb4Quantizer.NF4, block_size=64)
        quantizer.process()
        model = quantizer.model.model
    else:
        unsigned = bool(operators(model.graph, set()) & set(QUINT8_OPS))
        quantizer = ONNXQuantizer(
            model, False, False, mode=QuantizationMode.IntegerOps, static=False,
            weight_qType=QuantType.QUInt8 if unsigned else QuantType.QInt8,
            activation_qType=QuantType.QUInt8, tensors_range=None, nodes_to_quantize=[],
            nodes_to_exclude=[], op_types_to_quantize=set(IntegerOpsRegistry),
            extra_options={"EnableSubgraph": True, "MatMulConstBOnly": True},
        )
        quantizer.quantize_model()
        model = quantizer.model.model
    suffix = "quantized" if mode == "q8" else mode
    check_and_save_model(model, str(dst / f"{path.stem}_{suffix}.onnx"))
    del model, quantizer
"""

_MAKE_RANDOM = (
    "import sys; from surgery.checkpoint import make_random_checkpoint; "
    "make_random_checkpoint(sys.argv[1], sys.argv[2], force=True, progress=False)"
)


def _half_config(path: Path) -> Path:
    """A ``config.json`` of the bench preset with every layer count and the vocabulary halved."""
    from transformers import PaliGemmaConfig

    config = json.loads(json.dumps(PRESETS["paligemma2-1b-bench"].config))
    vocab = config["vocab_size"] // 2
    config["text_config"]["num_hidden_layers"] //= 2
    config["vision_config"]["num_hidden_layers"] //= 2
    config["text_config"]["vocab_size"] = config["vocab_size"] = vocab
    config["image_token_index"] = vocab - 64
    path.write_text(json.dumps({**PaliGemmaConfig(**config).to_dict(), "dtype": "float32"}))
    return path


def _model(folder: Path, scale: str) -> tuple[Path, list[tuple[str, float, int, int, int]]]:
    """The scale's exported model, made (and its rows timed) unless cached in ``folder``."""
    checkpoint, model = folder / "checkpoint", folder / "model.onnx"
    rows: list[tuple[str, float, int, int, int]] = []
    if model.is_file() and model.with_name("model.onnx.data").is_file():
        return model, rows
    folder.mkdir(parents=True, exist_ok=True)
    preset = str(_half_config(folder / "half.json")) if scale == "half" else SCALES[scale]
    wall, peak_rss, peak_anon = timed_peaks(
        [sys.executable, "-c", _MAKE_RANDOM, preset, str(checkpoint)]
    )
    size = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    _row(rows, scale, "make-random (setup)", wall, peak_rss, peak_anon, size)
    cli = [sys.executable, "-m", "surgery.cli"]
    wall, peak_rss, peak_anon = timed_peaks(
        [*cli, "export", str(checkpoint), "-o", str(model), "-q"]
    )
    size = model.with_name("model.onnx.data").stat().st_size
    _row(rows, scale, "export (setup)", wall, peak_rss, peak_anon, size)
    return model, rows


def _recipe(path: Path) -> Path:
    """The shipped recipe's fp32 steps plus a copy-parts + quantize pair per dtype of (a)."""
    recipe = yaml.safe_load(find_recipe("paligemma2").read_text())
    passes = [
        p
        for p in recipe["passes"]
        if not (isinstance(p, dict) and p.get("pass") in ("copy-parts", "fp16", "quantize"))
    ]
    fold = passes.index("fold-transposes")
    extra: list[Any] = []
    for suffix, options in VARIANTS.items():
        extra.append({"pass": "copy-parts", "parts": list(PARTS), "options": {"suffix": suffix}})
        extra.append(
            {
                "pass": "quantize",
                "parts": [p + suffix for p in (PARTS if options["mode"] == "q8" else MATMUL_PARTS)],
                "options": options,
            }
        )
        if options["mode"] == "q4f16":
            extra.append({"pass": "fp16", "parts": [p + suffix for p in PARTS]})
    recipe["name"] = "paligemma2-quantize-bench"
    recipe["passes"] = passes[:fold] + extra + passes[fold:]
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _largest_tensor(model: Path) -> int:
    """Bytes of the model's largest initializer (graph read without its weights)."""
    proto = onnx.load(model, load_external_data=False)
    return max(
        math.prod(t.dims) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        for t in proto.graph.initializer
    )


def _row(rows: list[Any], scale: str, *row: Any) -> None:
    """Keep a row and print it now (a long run's rows are not lost if a later step fails)."""
    rows.append(row)
    print(f"ROW {scale}: {row}", flush=True)


def _copy(rows: list[Any], summary: dict[str, Any], scale: str, data: Path, step: str) -> None:
    """Time ``cp`` of the fp32 data; ``summary["cp"]`` keeps the fastest run (the stricter
    reference: this virtual disk's speed changes by 2x between minutes)."""
    copy = data.with_name("copy.data")
    wall, peak_rss, peak_anon = timed_peaks(["cp", str(data), str(copy)])
    _row(rows, scale, step, wall, peak_rss, peak_anon, copy.stat().st_size)
    summary["cp"] = min(summary.get("cp", (math.inf, 0)), (wall, copy.stat().st_size))
    copy.unlink()


def _measure(work: Path, scale: str, anchor: bool) -> tuple[list[Any], dict[str, Any]]:
    """Rows ``(step, wall s, peak RSS, peak anon, bytes written)`` and the targets of one scale."""
    folder = work / scale
    model, rows = _model(folder, scale)
    data = model.with_name("model.onnx.data")
    summary: dict[str, Any] = {"weights": data.stat().st_size, "largest": _largest_tensor(model)}

    _copy(rows, summary, scale, data, "(c) cp fp32 data")

    out = folder / "out"
    shutil.rmtree(out, ignore_errors=True)
    recipe = _recipe(folder / "quantize.yaml")
    cli = [sys.executable, "-m", "surgery.cli"]
    step = "(a) surgery apply: fp32 + q8 + q4 + q4f16 + bnb4"
    try:
        wall, peak_rss, peak_anon = timed_peaks(
            [*cli, "apply", str(recipe), str(model), "-o", str(out), "-q"]
        )
    except SystemExit as failure:  # the anchor reads (a)'s fp32 files: nothing more to run
        _row(rows, scale, f"{step}: FAILED ({failure})", math.nan, 0, 0, 0)
        return rows, summary
    dtypes = bytes_by_dtype(out / "onnx")
    written = sum(dtypes.values())
    _row(rows, scale, step, wall, peak_rss, peak_anon, written)
    for dtype, size in sorted(dtypes.items()):
        _row(rows, scale, f"    of which {dtype}", math.nan, 0, 0, size)
    summary["a"] = (wall, peak_anon, written)
    _copy(rows, summary, scale, data, "(c) cp fp32 data, again after (a)")
    for path in (out / "onnx").iterdir():  # keep the fp32 parts: the anchor's input
        if any(path.name.split(".onnx")[0].endswith(s) for s in VARIANTS):
            path.unlink()

    if anchor:
        total = 0.0
        for options in VARIANTS.values():
            mode = options["mode"]
            dst = folder / f"anchor-{mode}"
            shutil.rmtree(dst, ignore_errors=True)
            step = f"(b) anchor {mode}: onnx.load + ORT + onnx.save"
            try:
                wall, peak_rss, peak_anon = timed_peaks(
                    [sys.executable, "-c", _ANCHOR, mode, str(out / "onnx"), str(dst)]
                )
            except SystemExit as failure:  # e.g. killed for memory: a finding, not a crash
                _row(rows, scale, f"{step}: FAILED ({failure})", math.nan, 0, 0, 0)
                total = math.nan
                continue
            written = sum(p.stat().st_size for p in dst.iterdir())
            _row(rows, scale, step, wall, peak_rss, peak_anon, written)
            total += wall
            shutil.rmtree(dst)
        summary["b"] = total
    shutil.rmtree(out)
    return rows, summary


def main(argv: list[str] | None = None) -> int:
    """Measure every scale, print the table and the targets."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--work", type=Path, help="cache of checkpoints and exports (default: temporary)"
    )
    parser.add_argument("--scales", nargs="+", choices=list(SCALES), default=["half", "full"])
    parser.add_argument("--no-anchor", action="store_true", help="skip the anchor rows (b)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="quantize-bench-"))
    results = []
    try:
        for scale in args.scales:
            results.append((scale, *_measure(work, scale, not args.no_anchor)))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    print("\n| scale | step | wall s | peak RSS GiB | peak RssAnon GiB | written GiB |")
    print("|---|---|---:|---:|---:|---:|")
    for scale, rows, _ in results:
        for name, wall, rss, anon, written in rows:
            if math.isnan(wall):
                print(f"| {scale} | {name} | | | | {written / GIB:.2f} |")
            else:
                print(
                    f"| {scale} | {name} | {wall:.1f} | {rss / GIB:.2f} | {anon / GIB:.2f} | {written / GIB:.2f} |"
                )
    print()
    for scale, _, s in results:
        if "a" not in s:
            print(f"{scale}: (a) failed; no targets")
            continue
        a_wall, a_anon, a_written = s["a"]
        cp_wall, cp_bytes = s["cp"]
        bound = 512 * MIB + s["largest"]
        print(
            f"{scale}: weights {s['weights'] / GIB:.2f} GiB, largest tensor {s['largest'] / GIB:.2f} GiB; "
            f"(a) peak RssAnon {a_anon / GIB:.2f} GiB vs 512 MiB + largest = {bound / GIB:.2f} GiB; "
            f"(a) s/GiB over cp s/GiB = {(a_wall / a_written) / (cp_wall / cp_bytes):.2f} (target <= 2)"
            + (f"; sum (b) / (a) = {s['b'] / a_wall:.1f} (target >= 5)" if "b" in s else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
