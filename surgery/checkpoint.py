"""Random PaliGemma / PaliGemma 2 checkpoints for tests, demos and benchmarks (``surgery make-random``).

A generated folder looks like a Hugging Face checkpoint: ``config.json``, sharded
``model*.safetensors`` (+ ``model.safetensors.index.json`` when there are several shards),
``generation_config.json``, a small working Gemma-style ``tokenizer.json`` /
``tokenizer_config.json`` (with ``<image>``, ``<bos>``, ``<eos>``, ``<pad>`` and PaliGemma's
``<locNNNN>`` / ``<segNNN>`` tokens) and a ``preprocessor_config.json``, so that
``AutoProcessor.from_pretrained(dir)`` returns a ``PaliGemmaProcessor`` and
``PaliGemmaForConditionalGeneration.from_pretrained(dir)`` loads it.

Reuses ``transformers`` for the configuration and for the list of tensors (the model is built on
the meta device, so its ``state_dict`` gives names, shapes and ties without allocating weights), and
the ``tokenizers`` library for the tokenizer.

Departs from ``save_pretrained`` on purpose: the weights are generated and written one tensor at a
time (and large tensors in row blocks) straight into safetensors files whose header is known up
front, so even the real 3B shapes never need the whole model, or even a whole shard, in memory.
Random values are scaled per tensor (``1/sqrt(fan_in)`` for matrices, unit-RMS scaled embeddings,
norm weights near their identity) so tiny models give non-degenerate, varying greedy tokens; HF's
``initializer_range=0.02`` init gives near-constant logits on tiny shapes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from surgery.atomic import atomic_dir
from surgery.constants import DEFAULT_MAX_CHUNK_BYTES
from surgery.errors import SurgeryError, hub_id_hint
from surgery.jsonfile import read_json_object

if TYPE_CHECKING:
    import torch
    from transformers import PaliGemmaConfig

__all__ = ["PRESETS", "Preset", "make_random_checkpoint"]

logger = logging.getLogger(__name__)

#: Largest shard written; real checkpoints use a few GB, this keeps one shard under a 2 GiB chunk.
MAX_SHARD_BYTES = DEFAULT_MAX_CHUNK_BYTES
#: Rows generated at once for a large tensor (bounds the memory the generator needs).
_BLOCK_ELEMENTS = 16 * 1024 * 1024

_LOC_SEG_TOKENS = [f"<loc{i:0>4}>" for i in range(1024)] + [f"<seg{i:0>3}>" for i in range(128)]
_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
_BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]
_TEXT_TOKENS = ["▁", *[chr(c) for c in range(33, 127)]]


@dataclass(frozen=True)
class Preset:
    """A named PaliGemma configuration for :func:`make_random_checkpoint`.

    Attributes:
        description: One line for ``surgery make-random --help`` and the README.
        config: Keyword arguments for ``transformers.PaliGemmaConfig``.
        dtype: Storage dtype of the weights: ``float32``, ``bfloat16`` or ``float16``.
    """

    description: str
    config: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"


def _tiny(text_type: str, *, image_size: int = 32, sliding_window: int = 64) -> dict[str, Any]:
    """Config kwargs of a tiny PaliGemma (1 if ``text_type == "gemma"``, else 2)."""
    vocab = 1600  # 5 specials + 256 bytes + 95 text, 1152 loc/seg, <image> at vocab - 64
    text: dict[str, Any] = {
        "model_type": text_type,
        "vocab_size": vocab,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2 if text_type == "gemma" else 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 1 if text_type == "gemma" else 2,
        "head_dim": 16,
        "max_position_embeddings": 2048,
    }
    if text_type == "gemma2":
        text.update(
            sliding_window=sliding_window,
            query_pre_attn_scalar=16,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
        )
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": 8,
        "vision_use_head": False,
    }
    return {
        "text_config": text,
        "vision_config": vision,
        "image_token_index": vocab - 64,
        "projection_dim": 64,
        "hidden_size": 64,
        "vocab_size": vocab,
    }


def _so400m(image_size: int = 224, num_hidden_layers: int = 27) -> dict[str, Any]:
    return {
        "model_type": "siglip_vision_model",
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": 16,
        "image_size": image_size,
        "patch_size": 14,
        "vision_use_head": False,
    }


def _gemma2_2b(num_hidden_layers: int = 26) -> dict[str, Any]:
    return {
        "model_type": "gemma2",
        "vocab_size": 257216,
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "max_position_embeddings": 8192,
    }


def _real(text: dict[str, Any], vision: dict[str, Any]) -> dict[str, Any]:
    return {
        "text_config": text,
        "vision_config": vision,
        "image_token_index": 257152,
        "projection_dim": text["hidden_size"],
        "hidden_size": text["hidden_size"],
        "vocab_size": 257216,
    }


PRESETS: dict[str, Preset] = {
    "tiny-paligemma": Preset("PaliGemma 1 (Gemma), 32 px, 16 image tokens", _tiny("gemma")),
    "tiny-paligemma2": Preset("PaliGemma 2 (Gemma 2), 32 px, 16 image tokens", _tiny("gemma2")),
    "tiny-paligemma2-64px": Preset(
        "PaliGemma 2, 64 px, 64 image tokens (the 224 -> 448 step)", _tiny("gemma2", image_size=64)
    ),
    "tiny-paligemma2-window": Preset(
        "PaliGemma 2, sliding window 6: shorter than any prompt", _tiny("gemma2", sliding_window=6)
    ),
    "paligemma2-1b-bench": Preset(
        "about 1.3B parameters (SigLIP So400m + 4 Gemma 2 2B layers), fp32: export benchmark",
        _real(_gemma2_2b(num_hidden_layers=4), _so400m()),
    ),
    "paligemma2-3b-pt-224": Preset(
        "real PaliGemma 2 3B-pt-224 shapes (SigLIP So400m 27 layers, Gemma 2 2B 26 layers), bf16",
        _real(_gemma2_2b(), _so400m()),
        dtype="bfloat16",
    ),
}


def _load_config(preset_or_config: str | os.PathLike[str]) -> tuple[PaliGemmaConfig, str]:
    """Resolve a preset name or a ``config.json`` path to a config and a storage dtype."""
    from transformers import PaliGemmaConfig

    name = os.fspath(preset_or_config)
    if name in PRESETS:
        preset = PRESETS[name]
        return PaliGemmaConfig(**preset.config), preset.dtype
    path = Path(name)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise SurgeryError(
            f"{name}: neither a preset nor a config.json; presets: {', '.join(PRESETS)}"
            f"{hub_id_hint(name)}"
        )
    raw = read_json_object(path)
    if raw.get("model_type") != "paligemma":
        raise SurgeryError(
            f"{path}: model_type is {raw.get('model_type')!r}; make-random writes 'paligemma' only"
        )
    dtype = str(raw.get("dtype") or raw.get("torch_dtype") or "float32")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise SurgeryError(f"{path}: dtype {dtype!r} unsupported; use float32, bfloat16 or float16")
    return PaliGemmaConfig.from_dict(raw), dtype


def _tensor_specs(config: PaliGemmaConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the tensors a checkpoint stores, tied copies left out."""
    import torch
    from transformers import PaliGemmaForConditionalGeneration

    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration._from_config(config)
    seen: set[int] = set()
    specs = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        specs.append((name, tuple(tensor.shape)))
    return specs


def _init_std_mean(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """Standard deviation and mean of the random values of one tensor (see module docstring)."""
    if name.endswith("embed_tokens.weight"):
        return 1.0 / math.sqrt(shape[-1]), 0.0  # times sqrt(hidden) in the model: unit RMS
    if len(shape) >= 2:
        fan_in = math.prod(shape[1:]) if len(shape) > 2 else shape[-1]
        if name.endswith("position_embedding.weight"):
            return 0.1, 0.0
        return 1.0 / math.sqrt(fan_in), 0.0
    if name.endswith(".bias"):
        return 0.02, 0.0
    if "language_model" in name:
        return 0.1, 0.0  # Gemma RMSNorm stores (scale - 1)
    return 0.1, 1.0  # LayerNorm scale


def _random_blocks(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int
) -> Iterator[bytes]:
    """Yield the bytes of one random tensor, a block of rows at a time."""
    import torch

    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    std, mean = _init_std_mean(name, shape)
    rows = shape[0] if shape else 1
    row_elements = math.prod(shape[1:]) if len(shape) > 1 else 1
    step = max(1, _BLOCK_ELEMENTS // max(1, row_elements))
    for start in range(0, rows, step):
        count = min(step, rows - start)
        block = torch.randn((count * row_elements,), generator=generator) * std + mean
        block = block.to(dtype)
        if dtype == torch.bfloat16:
            block = block.view(torch.int16)
        yield block.numpy().tobytes()


_ST_DTYPES = {"float32": ("F32", 4), "bfloat16": ("BF16", 2), "float16": ("F16", 2)}


def _plan_shards(
    specs: list[tuple[str, tuple[int, ...]]], itemsize: int
) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in specs:
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def _write_safetensors(
    path: Path,
    specs: list[tuple[str, tuple[int, ...]]],
    dtype_name: str,
    seed: int,
    bar: Any,
) -> None:
    """Write one safetensors file, header first, then each tensor streamed in row blocks."""
    import torch

    st_dtype, itemsize = _ST_DTYPES[dtype_name]
    torch_dtype = getattr(torch, dtype_name)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in specs:
        nbytes = math.prod(shape) * itemsize
        header[name] = {
            "dtype": st_dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape in specs:
            for chunk in _random_blocks(name, shape, torch_dtype, seed):
                f.write(chunk)
                bar.update(len(chunk))


def _build_tokenizer(vocab_size: int, image_token_index: int) -> Any:
    """A Gemma-style BPE tokenizer (byte fallback, ``▁`` for spaces) with PaliGemma's tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    head = _SPECIAL_TOKENS + _BYTE_TOKENS + _TEXT_TOKENS
    loc_start = image_token_index - len(_LOC_SEG_TOKENS)
    if loc_start < len(head) or image_token_index >= vocab_size:
        raise SurgeryError(
            f"image_token_index {image_token_index} leaves no room for the tokenizer's "
            f"{len(head) + len(_LOC_SEG_TOKENS)} tokens below it in a vocabulary of {vocab_size}; "
            "raise it"
        )
    unused = loc_start - len(head)
    tokens = [*head, *(f"<unused{i}>" for i in range(unused)), *_LOC_SEG_TOKENS, "<image>"]
    tokens += [f"<unused{i}>" for i in range(unused, unused + vocab_size - len(tokens))]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(
        BPE(vocab=vocab, merges=[], unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    )
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tokenizer.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t in [*_SPECIAL_TOKENS, "<image>"]]
    )
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in _LOC_SEG_TOKENS])
    return tokenizer


def _write_side_files(out: Path, config: Any, dtype: str) -> None:
    """config.json, generation, tokenizer and processor files."""
    from transformers import GenerationConfig

    config.dtype = dtype
    config.architectures = ["PaliGemmaForConditionalGeneration"]
    config.save_pretrained(out)
    GenerationConfig(
        bos_token_id=2, eos_token_id=1, pad_token_id=0, max_length=None
    ).save_pretrained(out)

    _build_tokenizer(config.text_config.vocab_size, config.image_token_index).save(
        str(out / "tokenizer.json")
    )
    tokenizer_config = {
        "tokenizer_class": "GemmaTokenizer",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
        "add_bos_token": False,
        "add_eos_token": False,
        "padding_side": "left",
        "processor_class": "PaliGemmaProcessor",
        "model_max_length": 1_000_000,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    vision = config.vision_config
    side = vision.image_size
    preprocessor = {
        "image_processor_type": "SiglipImageProcessor",
        "processor_class": "PaliGemmaProcessor",
        "image_seq_length": (side // vision.patch_size) ** 2,
        "do_resize": True,
        "size": {"height": side, "width": side},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_convert_rgb": True,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")


def make_random_checkpoint(
    preset_or_config: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Write a random PaliGemma checkpoint folder, streaming weights shard by shard.

    Args:
        preset_or_config: A name in :data:`PRESETS`, or a path to a PaliGemma ``config.json``
            (or a folder holding one).
        out_dir: Folder to create; replaced atomically.
        seed: Seed of the random weights; the same seed gives the same bytes.
        force: Replace an existing ``out_dir``.
        progress: Show a progress bar (stderr) while weights are written.

    Returns:
        The checkpoint folder.

    Raises:
        SurgeryError: Unknown preset, unreadable config, or an existing output without ``force``.
    """
    from surgery.progress import bar as progress_bar

    config, dtype = _load_config(preset_or_config)
    specs = _tensor_specs(config)
    itemsize = _ST_DTYPES[dtype][1]
    total = sum(math.prod(shape) for _, shape in specs)
    logger.info(
        "%s: %d tensors, %.3fB parameters, %s", preset_or_config, len(specs), total / 1e9, dtype
    )
    shards = _plan_shards(specs, itemsize)
    dest = Path(out_dir)
    preset = os.fspath(preset_or_config) in PRESETS
    with atomic_dir(dest, force=force, inputs=[] if preset else [preset_or_config]) as tmp:
        _write_side_files(tmp, config, dtype)
        names = (
            ["model.safetensors"]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        with progress_bar(total=total * itemsize, desc="writing weights", enabled=progress) as bar:
            for name, shard in zip(names, shards, strict=True):
                _write_safetensors(tmp / name, shard, dtype, seed, bar)
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": total * itemsize},
                "weight_map": {
                    t: n for n, shard in zip(names, shards, strict=True) for t, _ in shard
                },
            }
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return dest
