"""The files of a Hugging Face PaliGemma checkpoint that layouts read, as plain JSON.

Departs from ``transformers.AutoConfig`` / ``AutoProcessor`` on purpose: importing transformers
(and torch, which it pulls in) took about 6 of the 7 seconds of ``surgery apply`` on a tiny
model, just to fill a few defaults. This module reads the JSON itself and fills, for the fields
the layouts and Transformers.js use, the defaults that transformers' config classes give when a
field is absent (``PaliGemmaConfig``, ``GemmaConfig``, ``Gemma2Config``, ``SiglipVisionConfig``;
the same values in transformers 4.50 to 5.x). Hub configs do leave them out: PaliGemma 2's
``config.json`` has no ``head_dim`` (256, not ``hidden_size / num_attention_heads`` = 288) and no
``vision_config.image_size``. ``tests/test_hf_files.py`` compares the result with ``AutoConfig``.

What ``save_pretrained`` writes differs across the supported transformers versions:

* image processor: ``preprocessor_config.json`` (hub checkpoints, transformers 4.x), or, from
  transformers 5, only ``processor_config.json`` with the image processor nested under
  ``image_processor`` (and ``processor_class`` beside it);
* tokenizer: ``tokenizer.json`` and ``tokenizer_config.json`` always (fast tokenizers);
  ``special_tokens_map.json`` in 4.x only; ``chat_template.jinja`` (or ``chat_template.json``)
  when the model has a chat template.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from surgery.errors import SurgeryError
from surgery.jsonfile import read_json_object

__all__ = [
    "OPTIONAL_TOKENIZER_FILES",
    "REQUIRED_TOKENIZER_FILES",
    "checkpoint_reference",
    "read_image_processor",
    "read_model_config",
    "tokenizer_files",
]

REQUIRED_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
OPTIONAL_TOKENIZER_FILES = ("special_tokens_map.json", "chat_template.jinja", "chat_template.json")

#: ``PaliGemmaConfig``'s text and vision configs when ``config.json`` has none at all.
_PALIGEMMA_TEXT = {
    "model_type": "gemma",
    "hidden_size": 2048,
    "num_hidden_layers": 18,
    "intermediate_size": 16384,
    "num_attention_heads": 8,
    "num_key_value_heads": 1,
    "vocab_size": 257152,
}
_PALIGEMMA_VISION = {
    "model_type": "siglip_vision_model",
    "intermediate_size": 4096,
    "hidden_size": 1152,
    "patch_size": 14,
    "image_size": 224,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "vision_use_head": False,
}
_PALIGEMMA_IMAGE_TOKEN = 256000
#: Class defaults of the fields used here, per text ``model_type`` (``gemma`` when absent).
_TEXT_DEFAULTS: dict[str, dict[str, int]] = {
    "gemma": {
        "vocab_size": 256000,
        "hidden_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "head_dim": 256,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
    },
    "gemma2": {
        "vocab_size": 256000,
        "hidden_size": 2304,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
    },
}
#: ``SiglipVisionConfig`` defaults of the fields used here.
_VISION_DEFAULTS = {"model_type": "siglip_vision_model", "image_size": 224, "patch_size": 16}
_POSITIVE = {
    "text_config": ("hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim"),
    "vision_config": ("image_size", "patch_size"),
}  # fmt: skip


def read_model_config(checkpoint: Path) -> dict[str, Any]:
    """``config.json`` with the fields Transformers.js needs made explicit, as transformers would.

    Filled when absent: ``text_config.{head_dim, num_key_value_heads, num_attention_heads,
    hidden_size, num_hidden_layers, vocab_size, bos/eos/pad_token_id}``,
    ``vision_config.{image_size, patch_size}``, and ``image_token_index`` with its alias
    ``image_token_id``. Every other key is kept as written.

    Raises:
        SurgeryError: missing or malformed file, not a PaliGemma config, a text model other than
            Gemma or Gemma 2, or a size that is not a positive integer.
    """
    path = checkpoint / "config.json"
    config = read_json_object(path, fix="the checkpoint folder is incomplete")
    if config.get("model_type") != "paligemma":
        raise SurgeryError(
            f"{path}: model_type is {config.get('model_type')!r}; only PaliGemma checkpoints "
            "('paligemma') are supported"
        )
    config["text_config"] = text = _sub_config(path, config, "text_config", _PALIGEMMA_TEXT)
    text.setdefault("model_type", "gemma")
    if text["model_type"] not in _TEXT_DEFAULTS:
        raise SurgeryError(
            f"{path}: text_config.model_type is {text['model_type']!r}; PaliGemma checkpoints "
            f"use one of: {', '.join(_TEXT_DEFAULTS)}"
        )
    for key, value in _TEXT_DEFAULTS[text["model_type"]].items():
        text.setdefault(key, value)
    config["vision_config"] = vision = _sub_config(path, config, "vision_config", _PALIGEMMA_VISION)
    for key, default in _VISION_DEFAULTS.items():
        vision.setdefault(key, default)
    for section, keys in _POSITIVE.items():
        for key in keys:
            _check_positive(path, f"{section}.{key}", config[section][key])
    image_token = config.get("image_token_index", config.get("image_token_id"))
    if image_token is None:
        image_token = _PALIGEMMA_IMAGE_TOKEN
    if type(image_token) is not int or image_token < 0:
        raise SurgeryError(
            f"{path}: image_token_index must be a token id (an integer >= 0), got "
            f"{image_token!r}; fix the config"
        )
    config["image_token_index"] = config["image_token_id"] = image_token
    return config


def _sub_config(
    path: Path, config: dict[str, Any], key: str, default: dict[str, Any]
) -> dict[str, Any]:
    value = config.get(key)
    if value is None:
        return copy.deepcopy(default)
    if not isinstance(value, dict):
        raise SurgeryError(f"{path}: {key} must be a JSON object, got {value!r}; fix the config")
    return value


def _check_positive(path: Path, where: str, value: Any) -> None:
    if type(value) is not int or value <= 0:
        raise SurgeryError(
            f"{path}: {where} must be a positive integer, got {value!r}; fix the config"
        )


def read_image_processor(checkpoint: Path) -> dict[str, Any]:
    """The image processor's settings: ``preprocessor_config.json``, else the nested ones.

    transformers 5 writes only ``processor_config.json``, with the image processor under
    ``image_processor``; its top-level ``processor_class`` is carried over, since
    Transformers.js picks the processor by that key.

    Raises:
        SurgeryError: neither file, a malformed one, or no ``image_processor`` object inside.
    """
    legacy = checkpoint / "preprocessor_config.json"
    if legacy.is_file():
        return read_json_object(legacy, fix="the checkpoint folder is incomplete")
    combined = checkpoint / "processor_config.json"
    if not combined.is_file():
        raise SurgeryError(
            f"{checkpoint}: no preprocessor_config.json or processor_config.json; the checkpoint "
            "folder is incomplete (save the processor there with its save_pretrained)"
        )
    processor = read_json_object(combined, fix="the checkpoint folder is incomplete")
    nested = processor.get("image_processor")
    if not isinstance(nested, dict):
        raise SurgeryError(
            f"{combined}: no 'image_processor' object, and no preprocessor_config.json beside it; "
            "the checkpoint folder is incomplete (save the processor there with its "
            "save_pretrained)"
        )
    settings = dict(nested)
    if "processor_class" in processor:
        settings.setdefault("processor_class", processor["processor_class"])
    return settings


def tokenizer_files(checkpoint: Path) -> list[str]:
    """The tokenizer files to copy: both required ones, checked readable, and optional ones present.

    Raises:
        SurgeryError: a required file is missing or not valid JSON.
    """
    for name in REQUIRED_TOKENIZER_FILES:
        path = checkpoint / name
        if not path.is_file():
            raise SurgeryError(
                f"{checkpoint}: no {name}; Transformers.js needs it (save a fast tokenizer there "
                "with its save_pretrained)"
            )
        try:
            with path.open("rb") as file:
                json.load(file)
        except (OSError, ValueError) as exc:
            raise SurgeryError(
                f"{path}: not valid JSON ({exc}); the checkpoint folder is incomplete"
            ) from None
    optional = [name for name in OPTIONAL_TOKENIZER_FILES if (checkpoint / name).is_file()]
    return [*REQUIRED_TOKENIZER_FILES, *optional]


def checkpoint_reference(checkpoint: Path, model_folder: Path) -> str:
    """The metadata value that records ``checkpoint`` for a model file kept in ``model_folder``.

    Relative (POSIX separators) when the checkpoint lies inside the model's folder, so both can
    move together; absolute otherwise, so the model alone can move.
    """
    checkpoint, model_folder = checkpoint.resolve(), model_folder.resolve()
    if checkpoint.is_relative_to(model_folder):
        return checkpoint.relative_to(model_folder).as_posix()
    return str(checkpoint)
