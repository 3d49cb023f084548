"""Checkpoint files read as JSON: the same config values as ``AutoConfig``, both processor layouts.

The model configs are compared with what ``transformers.AutoConfig`` (the reader this module
replaced on the ``surgery apply`` path) gives for the same ``config.json``: on the tiny PaliGemma 1
and 2 checkpoints as written, with the defaulted fields removed, and on the sparse configs the
hub's PaliGemma checkpoints ship.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from surgery.errors import SurgeryError
from surgery.hf_files import read_image_processor, read_model_config, tokenizer_files

#: What Transformers.js and the layout read from config.json.
MATTERS = {
    "": ("model_type", "image_token_index", "image_token_id"),
    "text_config": (
        "model_type",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    ),
    "vision_config": ("model_type", "image_size", "patch_size"),
}
#: Fields hub configs leave out, which the config classes fill.
DEFAULTED = {
    "text_config": ("head_dim", "num_key_value_heads", "bos_token_id", "eos_token_id"),
    "vision_config": ("image_size", "patch_size"),
}

#: As the hub's google/paligemma-3b-pt-224 and google/paligemma2-3b-pt-224 write them.
HUB_PALIGEMMA = {
    "architectures": ["PaliGemmaForConditionalGeneration"],
    "bos_token_id": 2,
    "eos_token_id": 1,
    "hidden_size": 2048,
    "image_token_index": 257152,
    "model_type": "paligemma",
    "pad_token_id": 0,
    "projection_dim": 2048,
    "text_config": {
        "hidden_size": 2048,
        "intermediate_size": 16384,
        "model_type": "gemma",
        "num_attention_heads": 8,
        "num_hidden_layers": 18,
        "num_image_tokens": 256,
        "num_key_value_heads": 1,
        "torch_dtype": "float32",
        "vocab_size": 257216,
    },
    "torch_dtype": "float32",
    "vision_config": {
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "model_type": "siglip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "num_image_tokens": 256,
        "patch_size": 14,
        "projection_dim": 2048,
        "vision_use_head": False,
    },
}
HUB_PALIGEMMA2 = {
    "architectures": ["PaliGemmaForConditionalGeneration"],
    "bos_token_id": 2,
    "eos_token_id": 1,
    "hidden_size": 2048,
    "image_token_index": 257152,
    "model_type": "paligemma",
    "num_hidden_layers": 26,
    "pad_token_id": 0,
    "projection_dim": 2304,
    "text_config": {
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "model_type": "gemma2",
        "num_attention_heads": 8,
        "num_hidden_layers": 26,
        "num_image_tokens": 256,
        "num_key_value_heads": 4,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "torch_dtype": "bfloat16",
        "vocab_size": 257216,
    },
    "torch_dtype": "bfloat16",
    "vision_config": {
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "model_type": "siglip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "num_image_tokens": 256,
        "num_positions": 256,
        "patch_size": 14,
        "projection_dim": 2304,
        "torch_dtype": "bfloat16",
        "vision_use_head": False,
    },
}


def _auto_config(folder: Path) -> dict[str, Any]:
    """What the layout wrote before, from ``AutoConfig`` (its former ``_model_config``)."""
    transformers = pytest.importorskip("transformers")
    config: dict[str, Any] = transformers.AutoConfig.from_pretrained(folder).to_dict()
    text = config["text_config"]
    text.setdefault("head_dim", text["hidden_size"] // text["num_attention_heads"])
    text.setdefault("num_key_value_heads", text["num_attention_heads"])
    image_token = config.get("image_token_index", config.get("image_token_id"))
    config["image_token_index"] = config["image_token_id"] = image_token
    return config


def _matters(config: dict[str, Any]) -> dict[str, Any]:
    return {
        f"{section}.{key}" if section else key: (config[section] if section else config).get(key)
        for section, keys in MATTERS.items()
        for key in keys
    }


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _sparse(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` without the fields the config classes default (hub configs leave them out)."""
    config = json.loads(json.dumps(config))
    for section, keys in DEFAULTED.items():
        for key in keys:
            config[section].pop(key, None)
    config.pop("image_token_id", None)
    return config


def _folder(tmp_path: Path, name: str, config: dict[str, Any]) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("name", ["paligemma_checkpoint", "paligemma2_checkpoint"])
def test_tiny_checkpoint_configs_equal_autoconfig(
    name: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    checkpoint: Path = request.getfixturevalue(name)
    old, new = _auto_config(checkpoint), read_model_config(checkpoint)
    assert _matters(new) == _matters(old)
    # Every value the JSON reader writes is the value AutoConfig wrote (it drops only the
    # PretrainedConfig bookkeeping such as id2label and return_dict).
    flat_old = _flatten(old)
    flat_new = _flatten(new)
    assert flat_new == {k: flat_old.get(k, "(absent)") for k in flat_new}
    sparse = _folder(
        tmp_path, "sparse", _sparse(json.loads((checkpoint / "config.json").read_text()))
    )
    assert _matters(read_model_config(sparse)) == _matters(_auto_config(sparse))


@pytest.mark.parametrize(
    "config",
    [
        HUB_PALIGEMMA,
        HUB_PALIGEMMA2,
        {"model_type": "paligemma"},  # every sub-config from PaliGemmaConfig's own defaults
        {"model_type": "paligemma", "image_token_id": 7, "text_config": {"model_type": "gemma2"}},
    ],
    ids=["hub-paligemma", "hub-paligemma2", "empty", "alias-only"],
)
def test_hub_configs_get_the_defaults_autoconfig_gives(
    config: dict[str, Any], tmp_path: Path
) -> None:
    folder = _folder(tmp_path, "ckpt", config)
    new = read_model_config(folder)
    assert _matters(new) == _matters(_auto_config(folder))
    if config is HUB_PALIGEMMA2:
        # Not hidden_size / num_attention_heads (288): the class default.
        assert new["text_config"]["head_dim"] == 256
        assert new["vision_config"]["image_size"] == 224


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"model_type": "llava"},
            "model_type is 'llava'; only PaliGemma checkpoints ('paligemma') are supported",
        ),
        (
            {"model_type": "paligemma", "text_config": {"model_type": "gemma3"}},
            "text_config.model_type is 'gemma3'; PaliGemma checkpoints use one of: gemma, gemma2",
        ),
        (
            {"model_type": "paligemma", "text_config": {"head_dim": 16.0}},
            "text_config.head_dim must be a positive integer, got 16.0; fix the config",
        ),
        (
            {"model_type": "paligemma", "vision_config": {"patch_size": 0}},
            "vision_config.patch_size must be a positive integer, got 0; fix the config",
        ),
        (
            {"model_type": "paligemma", "vision_config": [1]},
            "vision_config must be a JSON object, got [1]; fix the config",
        ),
        (
            {"model_type": "paligemma", "image_token_index": "7"},
            "image_token_index must be a token id (an integer >= 0), got '7'; fix the config",
        ),
    ],
)
def test_config_values_the_layout_cannot_use_are_refused(
    config: dict[str, Any], message: str, tmp_path: Path
) -> None:
    folder = _folder(tmp_path, "ckpt", config)
    with pytest.raises(SurgeryError) as info:
        read_model_config(folder)
    assert str(info.value) == f"{folder / 'config.json'}: {message}"


IMAGE_PROCESSOR = {"image_processor_type": "SiglipImageProcessor", "size": {"height": 32}}


def test_image_processor_is_read_from_either_file(tmp_path: Path) -> None:
    legacy = _folder(tmp_path, "legacy", {})
    (legacy / "preprocessor_config.json").write_text(
        json.dumps({**IMAGE_PROCESSOR, "processor_class": "PaliGemmaProcessor"})
    )
    combined = _folder(tmp_path, "combined", {})
    (combined / "processor_config.json").write_text(
        json.dumps({"image_processor": IMAGE_PROCESSOR, "processor_class": "PaliGemmaProcessor"})
    )
    assert read_image_processor(legacy) == read_image_processor(combined)
    assert read_image_processor(combined) == {
        **IMAGE_PROCESSOR,
        "processor_class": "PaliGemmaProcessor",
    }


def test_missing_image_processor_is_refused_with_both_names(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "ckpt", {})
    with pytest.raises(SurgeryError) as info:
        read_image_processor(folder)
    assert str(info.value) == (
        f"{folder}: no preprocessor_config.json or processor_config.json; the checkpoint folder "
        "is incomplete (save the processor there with its save_pretrained)"
    )
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": "X"}))
    with pytest.raises(SurgeryError) as info:
        read_image_processor(folder)
    assert str(info.value) == (
        f"{folder / 'processor_config.json'}: no 'image_processor' object, and no "
        "preprocessor_config.json beside it; the checkpoint folder is incomplete (save the "
        "processor there with its save_pretrained)"
    )


def test_tokenizer_files_required_and_optional(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "ckpt", {})
    (folder / "tokenizer_config.json").write_text("{}")
    with pytest.raises(SurgeryError) as info:
        tokenizer_files(folder)
    assert str(info.value) == (
        f"{folder}: no tokenizer.json; Transformers.js needs it (save a fast tokenizer there "
        "with its save_pretrained)"
    )
    (folder / "tokenizer.json").write_text('{"model": ')  # truncated
    with pytest.raises(SurgeryError, match=r"tokenizer\.json: not valid JSON \("):
        tokenizer_files(folder)
    (folder / "tokenizer.json").write_text("{}")
    assert tokenizer_files(folder) == ["tokenizer.json", "tokenizer_config.json"]
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    (folder / "special_tokens_map.json").write_text("{}")
    assert tokenizer_files(folder) == [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    ]


def test_processor_saved_by_installed_transformers_is_read(
    paligemma2_checkpoint: Path, tmp_path: Path
) -> None:
    """Whatever ``PaliGemmaProcessor.save_pretrained`` writes here, the same settings come back."""
    from transformers import AutoProcessor

    resaved = tmp_path / "resaved"
    shutil.copytree(paligemma2_checkpoint, resaved)
    for name in ("preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"):
        (resaved / name).unlink()
    AutoProcessor.from_pretrained(paligemma2_checkpoint).save_pretrained(resaved)
    settings = read_image_processor(resaved)
    original = read_image_processor(paligemma2_checkpoint)
    assert settings == original
    assert set(tokenizer_files(resaved)) >= {"tokenizer.json", "tokenizer_config.json"}
