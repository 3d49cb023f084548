"""Checks of a checkpoint folder before any work: its config, the fields shapes come from, weights.

Both ``surgery export`` and ``surgery verify`` run them before torch or transformers touch the
folder, so a wrong folder or a malformed ``config.json`` is one line naming the file and key, not a
traceback from inside transformers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from surgery.errors import SurgeryError, hub_id_hint
from surgery.jsonfile import read_json_object

if TYPE_CHECKING:
    from surgery.export_weights import SafetensorsEntry

__all__ = ["SUPPORTED_ARCHITECTURES", "SUPPORTED_TEXT_MODELS", "check_checkpoint"]

SUPPORTED_ARCHITECTURES = ("PaliGemmaForConditionalGeneration",)
SUPPORTED_TEXT_MODELS = ("gemma", "gemma2")

#: Config fields the export builds shapes from: each must be a positive integer when present
#: (absent ones take transformers' defaults). transformers 5 rejects some wrong types itself, but
#: without saying which sub-config, and accepts zeros that divide by zero during tracing.
_SHAPE_FIELDS = {
    "text_config": (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "sliding_window",
    ),
    "vision_config": (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_channels",
        "image_size",
        "patch_size",
    ),
}


def _check_shape_fields(raw: dict[str, Any], path: Path) -> None:
    """Refuse config values the export cannot build a graph from, naming the file and key."""

    def positive_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    for section, keys in _SHAPE_FIELDS.items():
        config = raw.get(section) or {}
        for key in keys:
            value = config.get(key)
            if value is not None and not positive_int(value):
                raise SurgeryError(
                    f"{path}: {section}.{key}: expected a positive integer, got {value!r}; fix it"
                )
    text, vision = raw.get("text_config") or {}, raw.get("vision_config") or {}
    heads, kv_heads = text.get("num_attention_heads"), text.get("num_key_value_heads")
    if heads and kv_heads and heads % kv_heads:
        raise SurgeryError(
            f"{path}: text_config.num_attention_heads ({heads}) is not a multiple of "
            f"num_key_value_heads ({kv_heads}); fix one of them"
        )
    if vision.get("image_size") and vision.get("patch_size", 0) > vision["image_size"]:
        raise SurgeryError(
            f"{path}: vision_config.patch_size ({vision['patch_size']}) exceeds image_size "
            f"({vision['image_size']}): no image patch fits; fix one of them"
        )
    image_token = raw.get("image_token_index", raw.get("image_token_id"))
    if image_token is not None and (
        not isinstance(image_token, int) or isinstance(image_token, bool) or image_token < 0
    ):
        raise SurgeryError(
            f"{path}: image_token_index: expected a token id (an integer >= 0), got "
            f"{image_token!r}; fix it"
        )


def _read_config(checkpoint: Path) -> dict[str, Any]:
    """Validate the folder and its config.json; return the raw config."""
    if not checkpoint.exists():
        raise SurgeryError(
            f"{checkpoint}: checkpoint folder does not exist{hub_id_hint(checkpoint)}"
        )
    if not checkpoint.is_dir():
        raise SurgeryError(f"{checkpoint}: not a folder; pass a Hugging Face checkpoint folder")
    path = checkpoint / "config.json"
    if not path.is_file():
        raise SurgeryError(
            f"{checkpoint}: no config.json; pass a Hugging Face checkpoint folder (config + safetensors)"
        )
    raw = read_json_object(path, fix="fix or re-download it")
    architectures = raw.get("architectures") or [raw.get("model_type", "unknown")]
    for section in _SHAPE_FIELDS:
        if not isinstance(raw.get(section) or {}, dict):
            raise SurgeryError(
                f"{path}: {section}: expected a mapping, got {raw[section]!r}; fix it"
            )
    text_type = (raw.get("text_config") or {}).get("model_type", "gemma")
    supported = f"{', '.join(SUPPORTED_ARCHITECTURES)} with a {' or '.join(SUPPORTED_TEXT_MODELS)} text model"
    if architectures[0] not in SUPPORTED_ARCHITECTURES or raw.get("model_type") != "paligemma":
        what = (
            f"architecture {architectures[0]}"
            if architectures[0] not in SUPPORTED_ARCHITECTURES
            else f"model_type {raw.get('model_type')!r}"
        )
        raise SurgeryError(f"{path}: {what} is not supported; supported: {supported}")
    if text_type not in SUPPORTED_TEXT_MODELS:
        raise SurgeryError(
            f"{path}: {architectures[0]} with a {text_type} text model is not supported; supported: {supported}"
        )
    _check_shape_fields(raw, path)
    return raw


def check_checkpoint(
    checkpoint: str | os.PathLike[str],
) -> tuple[dict[str, Any], dict[str, SafetensorsEntry]]:
    """Check a checkpoint folder before any work: config, shape fields, weights files, headers.

    Returns:
        The raw ``config.json`` and the safetensors entries (checkpoint key to byte location).

    Raises:
        SurgeryError: Missing folder, an unsupported or malformed config, missing or corrupt
            safetensors files.
    """
    from surgery.export_weights import read_safetensors

    checkpoint = Path(checkpoint)
    raw = _read_config(checkpoint)
    return raw, read_safetensors(checkpoint)
