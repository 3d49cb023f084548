"""Greedy-generation parity: ONNX Runtime, driven as Transformers.js drives it, against PyTorch.

The reference is ``PaliGemmaForConditionalGeneration.generate(**processor_outputs)``, greedy,
fed exactly what ``PaliGemmaProcessor`` returns. The ONNX side is either

* the Transformers.js folder (:class:`PartsRunner`): ``vision_encoder`` → ``image_features``;
  ``embed_tokens`` → ``inputs_embeds``; image features written over the ``<image>`` positions in
  float32 (row-major, as ``default_merge_input_ids_with_features`` does); 1-indexed
  ``position_ids`` from the attention mask (``cumsum_masked_fill`` with start index 1); an empty
  past of length 0 on the first step; presents fed back as pasts; or
* the monolithic exported graph (:class:`MonolithicRunner`), fed the same way.

Both sides stop rows at EOS and pad them afterwards, as ``generate`` does, so sequences compare
token for token. The attention mask grows by one 1 per step, as in PyTorch (Transformers.js 4.3
rebuilds it as all ones over the past, which only differs for left-padded batches).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from surgery.constants import KV_KINDS, PAST_NAME, PRESENT_NAME
from surgery.errors import SurgeryError
from surgery.progress import silence_transformers

__all__ = [
    "DEFAULT_PROMPTS",
    "FP16_SUFFIXES",
    "GreedyResult",
    "MonolithicRunner",
    "PartsRunner",
    "compare",
    "near_ties",
    "processor_inputs",
    "torch_greedy",
]

DEFAULT_PROMPTS = ("caption en", "answer en what is in this picture, in detail?")

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclasses.dataclass
class GreedyResult:
    """New tokens ``[batch, steps]`` and the logits that chose them, one ``[batch, vocab]`` a step."""

    tokens: np.ndarray
    logits: list[np.ndarray]


def random_images(size: int, count: int, seed: int = 0) -> list[Any]:
    """Deterministic random RGB images, already at the processor's size."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)
    ]


def processor_inputs(
    checkpoint: Path, prompts: list[str], image_paths: list[Path] | None = None
) -> dict[str, np.ndarray]:
    """What ``PaliGemmaProcessor`` returns for these prompts and images, as numpy arrays."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint)
    size = processor.image_processor.size["height"]
    if image_paths:
        if len(image_paths) not in (1, len(prompts)):
            raise SurgeryError(
                f"give one image or one per prompt; got {len(image_paths)} for {len(prompts)} prompts"
            )
        images = [Image.open(p).convert("RGB") for p in image_paths] * (
            len(prompts) // len(image_paths)
        )
    else:
        images = random_images(size, len(prompts))
    # One <image> marker per prompt, as the processor recommends; it expands it to the image tokens.
    text = [p if "<image>" in p else f"<image>{p}" for p in prompts]
    batch = processor(images=images, text=text, return_tensors="np", padding="longest")
    return {k: np.asarray(v) for k, v in batch.items()}


@functools.cache
def _torch_model(checkpoint: Path) -> Any:
    from transformers import PaliGemmaForConditionalGeneration

    silence_transformers()  # its "Loading weights" bar would land in the middle of our report
    return PaliGemmaForConditionalGeneration.from_pretrained(
        checkpoint, attn_implementation="eager"
    ).eval()


def torch_greedy(checkpoint: Path, inputs: dict[str, np.ndarray], steps: int) -> GreedyResult:
    """``generate(**processor_outputs)`` in PyTorch, greedy, with the logits of each step."""
    import torch

    model = _torch_model(checkpoint.resolve())
    with torch.no_grad():
        out = model.generate(
            **{k: torch.from_numpy(v) for k, v in inputs.items()},
            max_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    prompt_length = inputs["input_ids"].shape[1]
    return GreedyResult(
        out.sequences[:, prompt_length:].numpy(), [step.numpy() for step in out.logits]
    )


def _position_ids(attention_mask: np.ndarray) -> np.ndarray:
    """Transformers.js ``cumsum_masked_fill`` with start index 1 (PaliGemma is 1-indexed)."""
    return np.where(attention_mask == 0, 1, np.cumsum(attention_mask, -1)).astype(np.int64)


def _session(path: Path) -> ort.InferenceSession:
    if not path.is_file():
        raise SurgeryError(f"{path}: missing; expected a model file there")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


class _Runner:
    """Greedy loop shared by both runners; subclasses compute one step's logits and presents."""

    def __init__(self, config: dict[str, Any], decoder: ort.InferenceSession) -> None:
        text = config["text_config"]
        self.layers = int(text["num_hidden_layers"])
        self.kv_heads = int(text["num_key_value_heads"])
        self.head_dim = int(text["head_dim"])
        self.image_token = int(config.get("image_token_index") or config["image_token_id"])
        first_past = PAST_NAME.format(layer=0, kind=KV_KINDS[0])
        past = next(i for i in decoder.get_inputs() if i.name == first_past)
        self.past_dtype = _ORT_TYPES[past.type]
        self.decoder = decoder
        # Transformers.js feeds 1 during generate when the decoder declares it (logits-to-keep),
        # 0 in a plain forward; with q8 files the two differ slightly (the lm_head's activations
        # are quantized over the kept positions).
        self.keep_logits = any(i.name == "num_logits_to_keep" for i in decoder.get_inputs())
        self.logits_kept = 1
        self.present_names = [
            PRESENT_NAME.format(layer=i, kind=k) for i in range(self.layers) for k in KV_KINDS
        ]

    def token_feeds(self, inputs: dict[str, np.ndarray], ids: np.ndarray) -> dict[str, np.ndarray]:
        """The decoder's feeds that carry the new tokens (ids or their embeddings)."""
        raise NotImplementedError

    def step(
        self,
        inputs: dict[str, np.ndarray],
        ids: np.ndarray,
        mask: np.ndarray,
        positions: np.ndarray,
        past: list[np.ndarray],
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One decoder run: the logits and the presents."""
        names = [PAST_NAME.format(layer=i, kind=k) for i in range(self.layers) for k in KV_KINDS]
        feeds = {
            **self.token_feeds(inputs, ids),
            "attention_mask": mask,
            "position_ids": positions,
            **dict(zip(names, past, strict=True)),
        }
        if self.keep_logits:
            feeds["num_logits_to_keep"] = np.array(self.logits_kept, np.int64)
        outputs = self.decoder.run(["logits", *self.present_names], feeds)
        return outputs[0], outputs[1:]

    def greedy(
        self,
        inputs: dict[str, np.ndarray],
        steps: int,
        eos: set[int],
        pad: int,
        forced: np.ndarray | None = None,
    ) -> GreedyResult:
        """Greedy tokens and logits; with ``forced`` ([batch, steps]), teacher-forced: those
        tokens are fed instead of the argmax (the logits are still this model's)."""
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        batch = ids.shape[0]
        positions = _position_ids(mask)
        past = [np.zeros((batch, self.kv_heads, 0, self.head_dim), self.past_dtype)] * (
            2 * self.layers
        )
        unfinished = np.ones(batch, dtype=bool)
        tokens, all_logits = [], []
        for index in range(steps if forced is None else forced.shape[1]):
            logits, past = self.step(inputs, ids, mask, positions, past)
            last = logits[:, -1].astype(np.float32)
            chosen = (
                np.where(unfinished, last.argmax(-1), pad) if forced is None else forced[:, index]
            )
            tokens.append(chosen)
            all_logits.append(last)
            unfinished &= ~np.isin(chosen, list(eos))
            if not unfinished.any():
                break
            ids = chosen[:, None].astype(np.int64)
            mask = np.concatenate([mask, np.ones_like(ids)], axis=-1)
            positions = positions[:, -1:] + 1
        return GreedyResult(np.stack(tokens, axis=1), all_logits)


class PartsRunner(_Runner):
    """The Transformers.js folder: three sessions, merged in float32 between them."""

    def __init__(self, folder: Path, suffix: str = "") -> None:
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise SurgeryError(
                f"{folder}: no config.json; is this a Transformers.js output folder?"
            )
        config = json.loads(config_path.read_text(encoding="utf-8"))
        onnx = folder / "onnx"
        self.vision = _session(onnx / f"vision_encoder{suffix}.onnx")
        self.embed = _session(onnx / f"embed_tokens{suffix}.onnx")
        super().__init__(config, _session(onnx / f"decoder_model_merged{suffix}.onnx"))

    def token_feeds(self, inputs: dict[str, np.ndarray], ids: np.ndarray) -> dict[str, np.ndarray]:
        embeds = self.embed.run(None, {"input_ids": ids})[0].astype(np.float32)
        if ids.shape[1] != 1:  # Transformers.js encodes the image only for a multi-token input
            features = self.vision.run(None, {"pixel_values": inputs["pixel_values"]})[0]
            is_image = ids == self.image_token
            rows = features.reshape(-1, features.shape[-1]).astype(np.float32)
            embeds[is_image] = rows[: int(is_image.sum())]
        return {"inputs_embeds": embeds}


class MonolithicRunner(_Runner):
    """The exported graph before any split: one session per step, image always given."""

    def __init__(self, model: Path, checkpoint: Path) -> None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(checkpoint).to_dict()
        super().__init__(config, _session(model))

    def token_feeds(self, inputs: dict[str, np.ndarray], ids: np.ndarray) -> dict[str, np.ndarray]:
        return {"input_ids": ids, "pixel_values": inputs["pixel_values"]}


def _top5(logits: np.ndarray) -> str:
    order = np.argsort(-logits)[:5]
    return ", ".join(f"{int(i)}:{logits[i]:.4f}" for i in order)


def compare(reference: GreedyResult, got: GreedyResult, label: str) -> tuple[bool, str]:
    """Token-for-token comparison; the report has a row per step and the first divergence."""
    lines = [f"{label}", f"  {'step':>4}  {'PyTorch':<24} {'ONNX':<24} {'max |Δ logits|':>14}"]
    steps = max(reference.tokens.shape[1], got.tokens.shape[1])
    divergence = None
    for step in range(steps):
        ref = reference.tokens[:, step] if step < reference.tokens.shape[1] else None
        out = got.tokens[:, step] if step < got.tokens.shape[1] else None
        delta = (
            float(np.abs(reference.logits[step] - got.logits[step]).max())
            if step < min(len(reference.logits), len(got.logits))
            else float("nan")
        )
        same = ref is not None and out is not None and np.array_equal(ref, out)
        lines.append(
            f"  {step:>4}  {None if ref is None else ref.tolist()!s:<24} "
            f"{None if out is None else out.tolist()!s:<24} {delta:>14.2e}{'' if same else '  ✗'}"
        )
        if not same and divergence is None:
            divergence = step
    if divergence is None:
        lines.append(f"  identical: {steps} tokens per row")
        return True, "\n".join(lines)
    lines.append(f"  first divergence at step {divergence}:")
    if divergence < min(len(reference.logits), len(got.logits)):
        for row in range(reference.tokens.shape[0]):
            lines.append(f"    row {row} PyTorch top-5: {_top5(reference.logits[divergence][row])}")
            lines.append(f"    row {row} ONNX    top-5: {_top5(got.logits[divergence][row])}")
    return False, "\n".join(lines)


#: Suffixes of quantized files. Their greedy tokens legitimately flip at near-ties (random tiny
#: weights have many), so they are compared with the fp32 files teacher-forced instead.
QUANTIZED_SUFFIXES = ("_quantized", "_int8", "_uint8", "_q4", "_q4f16", "_bnb4")


def teacher_forced(reference: GreedyResult, got: GreedyResult, label: str) -> str:
    """Top-1 agreement and logits cosine of ``got`` (run teacher-forced along ``reference``'s
    tokens) against ``reference``, over every row and step."""
    agree, cosines = [], []
    for step, want in enumerate(reference.logits):
        have = got.logits[step]
        agree.extend((have.argmax(-1) == reference.tokens[:, step]).tolist())
        norms = np.linalg.norm(have, axis=-1) * np.linalg.norm(want, axis=-1)
        cosines.extend(((have * want).sum(-1) / np.maximum(norms, 1e-30)).tolist())
    return (
        f"{label}\n  teacher-forced along the fp32 greedy path: top-1 agreement "
        f"{sum(agree)}/{len(agree)} ({100 * sum(agree) / len(agree):.1f}%), logits cosine "
        f"min {min(cosines):.6f} mean {float(np.mean(cosines)):.6f}"
    )


#: Suffixes of fp16 files: judged teacher-forced along PyTorch's greedy path (:func:`near_ties`).
#: fp16 rounds these logits by about 1e-2, so a token whose fp32 lead is smaller legitimately flips
#: (random tiny weights make such near-ties), after which free-running tokens differ for good.
FP16_SUFFIXES = ("_fp16",)
#: An fp16 top-1 may differ from PyTorch's only where PyTorch's top-1 leads it by less than this.
NEAR_TIE = 0.02
#: The least logits cosine to PyTorch's, at any step and row, of an fp16 file.
MIN_COSINE = 0.9999


def near_ties(
    reference: GreedyResult, got: GreedyResult, label: str, reference_name: str = "PyTorch"
) -> tuple[bool, str]:
    """Whether ``got``, run teacher-forced along ``reference``'s tokens, picks ``reference``'s
    top-1 at every step or a near-tie of it (its lead under :data:`NEAR_TIE`), with logits cosine
    at least :data:`MIN_COSINE`; and the report, one line per differing top-1, which names the
    reference ``reference_name``."""
    flips, cosines, total = [], [], 0
    for step, want in enumerate(reference.logits):
        have = got.logits[step]
        norms = np.linalg.norm(have, axis=-1) * np.linalg.norm(want, axis=-1)
        cosines.extend(((have * want).sum(-1) / np.maximum(norms, 1e-30)).tolist())
        for row, chosen in enumerate(have.argmax(-1)):
            total += 1
            token = int(reference.tokens[row, step])
            if int(chosen) != token:
                lead = float(want[row, token] - want[row, chosen])
                flips.append((step, row, int(chosen), token, lead))
    ok = all(lead < NEAR_TIE for *_, lead in flips) and min(cosines) >= MIN_COSINE
    lines = [
        label,
        f"  teacher-forced along {reference_name}'s greedy path: top-1 agreement "
        f"{total - len(flips)}/{total}, logits cosine min {min(cosines):.6f} (at least "
        f"{MIN_COSINE})",
    ]
    for step, row, chosen, token, lead in flips:
        kind = "a near-tie" if lead < NEAR_TIE else "NOT a near-tie"
        lines.append(
            f"  step {step} row {row}: {chosen} instead of {token}, which {reference_name} ranks "
            f"{lead:.2e} higher: {kind} (< {NEAR_TIE})"
        )
    if ok:
        lines.append(f"  every top-1 is {reference_name}'s or a near-tie of it")
    return ok, "\n".join(lines)


def _special_tokens(checkpoint: Path) -> tuple[set[int], int]:
    from transformers import GenerationConfig

    generation = GenerationConfig.from_pretrained(checkpoint)
    eos = generation.eos_token_id
    eos_ids = set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())
    pad = generation.pad_token_id if generation.pad_token_id is not None else 0
    return eos_ids, int(pad)


def verify(
    target: Path,
    checkpoint: Path,
    *,
    prompts: list[str] | None = None,
    images: list[Path] | None = None,
    max_new_tokens: int = 20,
    suffix: str = "",
) -> tuple[bool, str]:
    """Compare greedy tokens of ``target`` (a Transformers.js folder or an ``.onnx``) with PyTorch.

    Cases: the first prompt alone (batch 1), then every prompt together (a left-padded batch)
    when there are several. Returns whether all cases match, and the report. Quantized files
    (:data:`QUANTIZED_SUFFIXES`) are instead run teacher-forced along the fp32 files' greedy
    path; the report gives top-1 agreement and logits cosine, and the result is True. fp16
    files (:data:`FP16_SUFFIXES`) are run teacher-forced along PyTorch's greedy path, and match
    when :func:`near_ties` says every differing top-1 is a near-tie.
    """
    from surgery.checkpoint_checks import check_checkpoint

    target, checkpoint = Path(target), Path(checkpoint)
    if not target.exists():
        raise SurgeryError(
            f"{target}: does not exist; give a Transformers.js folder (surgery apply ... -o DIR) "
            "or an exported .onnx file"
        )
    check_checkpoint(checkpoint)  # before PyTorch loads it: a clear line, not a traceback
    runner: _Runner = (
        MonolithicRunner(target, checkpoint)
        if target.suffix == ".onnx"
        else PartsRunner(target, suffix)
    )
    quantized = suffix in QUANTIZED_SUFFIXES and isinstance(runner, PartsRunner)
    fp32 = PartsRunner(target) if quantized else None
    prompts = list(prompts or DEFAULT_PROMPTS)
    cases = [("batch 1", prompts[:1], images[:1] if images else None)]
    if len(prompts) > 1:
        cases.append((f"batch {len(prompts)}, left-padded", prompts, images))
    eos, pad = _special_tokens(checkpoint)
    ok, reports = True, []
    for label, case_prompts, case_images in cases:
        inputs = processor_inputs(checkpoint, case_prompts, case_images)
        if fp32 is not None:
            reference = fp32.greedy(inputs, max_new_tokens, eos, pad)
            forced = runner.greedy(inputs, max_new_tokens, eos, pad, forced=reference.tokens)
            reports.append(teacher_forced(reference, forced, f"{label}: {case_prompts}"))
            continue
        reference = torch_greedy(checkpoint, inputs, max_new_tokens)
        if suffix in FP16_SUFFIXES and isinstance(runner, PartsRunner):
            forced = runner.greedy(inputs, max_new_tokens, eos, pad, forced=reference.tokens)
            same, report = near_ties(reference, forced, f"{label}: {case_prompts}")
            ok &= same
            reports.append(report)
            continue
        got = runner.greedy(inputs, max_new_tokens, eos, pad)
        same, report = compare(reference, got, f"{label}: {case_prompts}")
        ok &= same
        reports.append(report)
    return ok, "\n\n".join(reports)
