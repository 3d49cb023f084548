"""Decoder speed with and without the fusions, on PaliGemma 2's real 2B text widths.

A random PaliGemma 2 whose text model has the real 2B widths and head geometry (hidden 2304,
8 query / 4 KV heads, head_dim 256, intermediate 9216, softcaps 50 / 30, window 4096) but 4
layers and a 32,000-token vocabulary, and a tiny vision tower (256 image tokens at 224 px; only
the decoder is timed), is written by ``surgery make-random`` from a config this script writes,
exported once, then turned into Transformers.js folders by two recipes:

* (a) ``unfused``: the paligemma2 recipe without ``logits-to-keep`` and ``grouped-attention``;
* (b) ``fused``: the paligemma2 recipe as shipped (the fp16 and quantized copies are left out
  of both: only the fp32 ``decoder_model_merged`` is timed).

Each row's decoder runs in ONNX Runtime CPU with 2 intra-op threads, all rows in this one run,
taking turns run by run within each cell, row (c) included (so a drifting load on a shared machine
hits every row), with :data:`SETTLE_S` idle before each timed step (so no row runs against the
previous row's spinning workers):
prefill of 272 and 1040 tokens (empty past; the fused decoder is fed ``num_logits_to_keep = 1``
as Transformers.js's ``generate`` does) and one decode step at past 272, 1040 and 4112 (random
past; the same inputs for every ONNX Runtime row); the median of ``--runs`` after one warm-up.
The floor is the decoder's weight bytes divided by the read bandwidth of this machine, measured in the same run by
summing a 1 GiB buffer on as many threads: a decode step cannot be faster than reading its
weights once.

Row (c), when ``onnxruntime-genai`` is installed: its model builder (``-p fp32 -e cpu``) on the
same text weights (a ``Gemma2ForCausalLM`` checkpoint saved from the language model), 2 threads,
driven by ``og.Generator`` with ``max_length`` 4200 (over the 4096 window): prefill is
``append_tokens`` of random ids on a fresh generator, decode one ``generate_next_token`` after a
prompt of the past's length (each run adds one token to that past).

Row (d): (b) plus ``fuse-projections`` (one MatMul for Q/K/V and one for gate/up), a fusion
the recipe leaves out unless this row shows it helps.

Then, with PaliGemma 2's real 257,216-token vocabulary (the same widths and layers, another
export): prefill of 272 tokens, (a) against (b); there the ``lm_head`` over every prompt position
is most of what ``logits-to-keep`` saves. The 32,000-vocabulary files are deleted first and each
folder's ``embed_tokens`` too (disk: the embedding is 2.4 GB).

Usage: python benchmarks/decode.py [--workdir DIR] [--runs N] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

THREADS = 2
#: Idle seconds before each timed step. ONNX Runtime's workers (ours and onnxruntime-genai's) spin
#: for a while after a run; with rows taking turns they took the cores from the next row's run
#: (measured: +15 to +25 ms per decode step at past 272 to 4112, on 2 cores).
SETTLE_S = 0.2
PREFILL = (272, 1040)
PAST = (272, 1040, 4112)
HIDDEN, KV_HEADS, HEAD_DIM, LAYERS, VOCAB = 2304, 4, 256, 4, 32000
#: PaliGemma 2's real vocabulary: the extra row's model, timed at prefill 272 only.
REAL_VOCAB = 257216
FUSIONS = ("logits-to-keep", "grouped-attention")
#: A fusion not in the recipe, timed as row (d): (b) plus this pass on the decoder.
CANDIDATE = "fuse-projections"

CONFIG = {
    "model_type": "paligemma",
    "text_config": {
        "model_type": "gemma2",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": 9216,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 8,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "max_position_embeddings": 8192,
    },
    "vision_config": {
        "model_type": "siglip_vision_model",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 224,
        "patch_size": 14,
        "vision_use_head": False,
    },
    "image_token_index": VOCAB - 64,
    "projection_dim": HIDDEN,
    "hidden_size": HIDDEN,
    "vocab_size": VOCAB,
}


def _config(vocab: int) -> dict[str, object]:
    """:data:`CONFIG` with another vocabulary (the image token stays near its end)."""
    config = json.loads(json.dumps(CONFIG))
    config["text_config"]["vocab_size"] = config["vocab_size"] = vocab
    config["image_token_index"] = vocab - 64
    return config


def _recipe(work: Path, name: str, fused: bool, extra: str | None = None) -> Path:
    """The shipped paligemma2 recipe, fp32 only, with or without the fusions, plus ``extra`` on
    the decoder after them."""
    from surgery.recipe import find_recipe

    recipe = yaml.safe_load(find_recipe("paligemma2").read_text())
    dropped = {"copy-parts", "fp16", "quantize"} | (set() if fused else set(FUSIONS))
    steps = []
    for step in recipe["passes"]:
        name_of = step if isinstance(step, str) else step["pass"]
        if name_of in dropped:
            continue
        steps.append(step)
        if extra is not None and name_of == FUSIONS[-1]:
            steps.append({"pass": extra, "parts": ["decoder_model_merged"]})
    recipe["passes"] = steps
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "surgery.cli", *args, "-q"], check=True)


def read_bandwidth(size: int = 2**30, threads: int = THREADS, repeats: int = 5) -> float:
    """Bytes per second of summing a ``size`` buffer split over ``threads`` (best of repeats)."""
    buffer = np.ones(size // 8, np.float64)
    chunks = np.array_split(buffer, threads)
    best = 0.0
    for _ in range(repeats):
        workers = [threading.Thread(target=np.sum, args=(chunk,)) for chunk in chunks]
        start = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        best = max(best, size / (time.perf_counter() - start))
    return best


def _feeds(session: object, length: int, past: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray] = {
        "inputs_embeds": rng.standard_normal((1, length, HIDDEN), dtype=np.float32),
        "attention_mask": np.ones((1, past + length), np.int64),
        "position_ids": np.arange(past + 1, past + length + 1, dtype=np.int64)[None],
    }
    for layer in range(LAYERS):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{layer}.{kind}"] = rng.standard_normal(
                (1, KV_HEADS, past, HEAD_DIM), dtype=np.float32
            )
    names = {i.name for i in session.get_inputs()}  # type: ignore[attr-defined]
    if "num_logits_to_keep" in names:
        feeds["num_logits_to_keep"] = np.array(1, np.int64)  # as generate() feeds it
    return feeds


#: A row of the table: (prompt length, past length) -> a function called before each timed run,
#: untimed, that returns the step to time.
Row = Callable[[int, int], Callable[[], Callable[[], object]]]


def _ort_rows(decoders: dict[str, Path]) -> dict[str, Row]:
    """One row per decoder: ONNX Runtime CPU, :data:`THREADS` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    rows: dict[str, Row] = {}
    for label, path in decoders.items():
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def row(
            length: int, past: int, session: Any = session
        ) -> Callable[[], Callable[[], object]]:
            feeds = _feeds(session, length, past)
            return lambda: lambda: session.run(["logits"], feeds)

        rows[label] = row
    return rows


def _rows(
    rows: dict[str, Row], runs: int, cells_of: list[tuple[int, int]] | None = None
) -> dict[str, list[float]]:
    """Median ms of each (length, past) cell (default: the table's columns) for each row.

    The rows take turns, run by run, within each cell: on a shared machine the load drifts over
    minutes, and timing one row after the other would put that drift between the rows.
    """
    medians: dict[str, list[float]] = {label: [] for label in rows}
    for length, past in cells_of or [(n, 0) for n in PREFILL] + [(1, p) for p in PAST]:
        prepared = {label: row(length, past) for label, row in rows.items()}
        times: dict[str, list[float]] = {label: [] for label in rows}
        for run in range(runs + 1):  # the first is the warm-up
            for label, prepare in prepared.items():
                step = prepare()
                time.sleep(SETTLE_S)  # the previous row's spinning workers go to sleep first
                start = time.perf_counter()
                step()
                if run:
                    times[label].append((time.perf_counter() - start) * 1000)
        for label in rows:
            medians[label].append(statistics.median(times[label]))
    return medians


def _genai_row(checkpoint: Path, work: Path) -> Row:
    """Row (c): onnxruntime-genai's builder on the language model of ``checkpoint``."""
    import onnxruntime_genai as og
    import torch
    from transformers import AutoTokenizer, Gemma2ForCausalLM, PaliGemmaForConditionalGeneration

    hf, built = work / "gemma2", work / "genai"
    paligemma = PaliGemmaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    language = Gemma2ForCausalLM(paligemma.config.text_config)
    language.model.load_state_dict(paligemma.model.language_model.state_dict())
    language.lm_head.weight = language.model.embed_tokens.weight  # tied, as in PaliGemma
    language.save_pretrained(hf)
    AutoTokenizer.from_pretrained(checkpoint).save_pretrained(hf)
    del paligemma, language
    subprocess.run(
        [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o",
         str(built), "-p", "fp32", "-e", "cpu", "-c", str(work / "genai-cache")],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    config_path = built / "genai_config.json"
    config = json.loads(config_path.read_text())
    options = config["model"]["decoder"]["session_options"]
    options.update(intra_op_num_threads=THREADS, inter_op_num_threads=1)
    config_path.write_text(json.dumps(config, indent=2))
    model = og.Model(str(built))
    rng = np.random.default_rng(0)

    def generator() -> og.Generator:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=4200, do_sample=False)
        return og.Generator(model, params)

    def ids(n: int) -> np.ndarray:
        return rng.integers(300, VOCAB - 2000, n).astype(np.int32)

    def row(length: int, past: int) -> Callable[[], Callable[[], object]]:
        if not past:  # prefill: a fresh generator per run
            prompt = ids(length)

            def fresh() -> Callable[[], object]:
                gen = generator()
                return lambda: gen.append_tokens(prompt)

            return fresh
        gen = generator()
        gen.append_tokens(ids(past))
        return lambda: gen.generate_next_token

    return row


def _folders(
    work: Path, vocab: int, rows: dict[str, tuple[bool, str | None]], *, lean: bool = False
) -> dict[str, Path]:
    """Export a model with ``vocab`` once; the decoder of each row's recipe applied to it.

    ``lean``: delete each folder's ``embed_tokens`` files once written, and the checkpoint and
    export once every row is applied (at the real vocabulary each holds a 2.4 GB embedding).
    """
    work.mkdir()
    config = work / "config.json"
    config.write_text(json.dumps(_config(vocab), indent=2))
    checkpoint, model = work / "checkpoint", work / "model.onnx"
    _cli("make-random", str(config), "-o", str(checkpoint))
    _cli("export", str(checkpoint), "-o", str(model))
    decoders = {}
    for label, (fused, extra) in rows.items():
        name = label.split()[0].strip("()")
        out = work / name
        _cli("apply", str(_recipe(work, name, fused, extra)), str(model), "-o", str(out))
        decoders[label] = out / "onnx" / "decoder_model_merged.onnx"
        if lean:
            for path in (out / "onnx").glob("embed_tokens*"):
                path.unlink()
    if lean:
        shutil.rmtree(checkpoint)
        for path in work.glob("model.onnx*"):
            path.unlink()
    return decoders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per cell (median)")
    parser.add_argument("--keep", action="store_true", help="keep the files written")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="decode-bench-", dir=args.workdir))
    try:
        decoders = _folders(
            work / f"vocab{VOCAB}",
            VOCAB,
            {
                "(a) unfused": (False, None),
                "(b) fused": (True, None),
                f"(d) (b) + {CANDIDATE}": (True, CANDIDATE),
            },
        )
        checkpoint = work / f"vocab{VOCAB}" / "checkpoint"
        weight_bytes = sum(
            p.stat().st_size
            for p in decoders["(a) unfused"].parent.glob("decoder_model_merged.onnx_data*")
        )
        bandwidth = read_bandwidth()
        timed = _ort_rows(decoders)
        try:
            import onnxruntime_genai  # noqa: F401
        except ImportError:
            print("(c) skipped: onnxruntime-genai is not installed")
        else:
            timed["(c) onnxruntime-genai builder"] = _genai_row(checkpoint, work)
        rows = _rows(timed, args.runs)
        del timed  # the sessions and generators
        floor_ms = weight_bytes / bandwidth * 1000
        head = [f"prefill {n}" for n in PREFILL] + [f"decode, past {p}" for p in PAST]
        print(
            f"\nONNX Runtime CPU, {THREADS} threads, median of {args.runs} after a warm-up "
            f"(ms; decode: ms/token)"
        )
        print("| | " + " | ".join(head) + " |")
        print("|---|" + "---:|" * len(head))
        for label, cells in sorted(rows.items()):
            print(f"| {label} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
        base, fused = rows["(a) unfused"], rows["(b) fused"]
        print(
            "| (a) / (b) | "
            + " | ".join(f"{a / b:.2f}x" for a, b in zip(base, fused, strict=True))
            + " |"
        )
        genai = rows.get("(c) onnxruntime-genai builder")
        if genai is not None:
            print(
                "| (c) / (b) | "
                + " | ".join(f"{c / b:.2f}x" for c, b in zip(genai, fused, strict=True))
                + " |"
            )
        candidate = rows[f"(d) (b) + {CANDIDATE}"]
        print(
            "| (b) / (d) | "
            + " | ".join(f"{b / d:.2f}x" for b, d in zip(fused, candidate, strict=True))
            + " |"
        )
        print(
            f"\nfloor: {weight_bytes / 1e9:.2f} GB of decoder weights / "
            f"{bandwidth / 1e9:.1f} GB/s read ({THREADS} threads) = {floor_ms:.1f} ms/token; "
            "(b) decode / floor: "
            + ", ".join(
                f"{c / floor_ms:.2f}x at past {p}" for c, p in zip(fused[2:], PAST, strict=True)
            )
        )
        sys.stdout.flush()
        if not args.keep:  # disk: the real vocabulary's files are larger
            shutil.rmtree(work / f"vocab{VOCAB}")
            shutil.rmtree(work / "genai", ignore_errors=True)
            shutil.rmtree(work / "gemma2", ignore_errors=True)
            shutil.rmtree(work / "genai-cache", ignore_errors=True)
        real = _folders(
            work / f"vocab{REAL_VOCAB}",
            REAL_VOCAB,
            {"(a) unfused": (False, None), "(b) fused": (True, None)},
            lean=True,
        )
        real_rows = {
            label: cells[0]
            for label, cells in _rows(_ort_rows(real), args.runs, [(PREFILL[0], 0)]).items()
        }
        a_real, b_real = real_rows["(a) unfused"], real_rows["(b) fused"]
        print(
            f"\nvocabulary {REAL_VOCAB:,}, prefill {PREFILL[0]}: (a) unfused {a_real:.1f} ms, "
            f"(b) fused {b_real:.1f} ms, (a) / (b) {a_real / b_real:.2f}x"
        )
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
