"""The Transformers.js layout: ``onnx/<part>.onnx`` + chunked data, and the configs beside them.

What Transformers.js 4.x reads, from its sources (``utils/model-loader.js``, ``configs.js``):

* ``onnx/<name><suffix>.onnx`` per session; part names carry the suffix (``decoder_model_merged_fp16``);
* external data chunks ``<file>.onnx_data``, ``<file>.onnx_data_1``, … (at most 100), counted per
  file in ``config.json["transformers.js_config"]["use_external_data_format"]``; browsers cap an
  ArrayBuffer near 2 GiB, so each chunk stays under the limit (default 2,000,000,000 bytes);
* ``config.json`` (``model_type``, ``image_token_index``, ``text_config`` with explicit
  ``head_dim``, ``num_key_value_heads``, ``num_hidden_layers``), ``preprocessor_config.json``
  (with ``image_seq_length``), ``generation_config.json``, ``tokenizer.json`` and
  ``tokenizer_config.json`` from the checkpoint.

The checkpoint folder is found in the models' metadata (``onnx_surgery.checkpoint``, written by
``surgery export``) unless given explicitly (``surgery apply --checkpoint``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pydantic

from surgery.bundle import Bundle
from surgery.constants import CHECKPOINT_METADATA_KEY, DEFAULT_MAX_CHUNK_BYTES
from surgery.errors import SurgeryError
from surgery.jsonfile import read_json_object
from surgery.layout import Layout, LayoutOptions, register_layout

__all__ = ["TransformersJsLayout"]

_COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class _Options(LayoutOptions):
    max_chunk_bytes: int = pydantic.Field(
        default=DEFAULT_MAX_CHUNK_BYTES, gt=0, description="size limit of one external-data chunk"
    )


@register_layout
class TransformersJsLayout(Layout):
    """``onnx/<part>.onnx`` with ``<part>.onnx_data[_N]`` chunks, plus config files."""

    name = "transformers.js"
    Options = _Options

    def __init__(self, options: LayoutOptions | None = None, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        #: The Hugging Face checkpoint folder; None: read from the models' metadata.
        self.checkpoint: Path | None = None

    @property
    def max_chunk_bytes(self) -> int | None:
        assert isinstance(self.options, _Options)
        return self.options.max_chunk_bytes

    def model_file(self, part: str) -> str:
        return f"onnx/{part}.onnx"

    def data_file(self, part: str, chunk: int) -> str:
        return f"{part}.onnx_data" + (f"_{chunk}" if chunk else "")

    def _find_checkpoint(self, bundle: Bundle) -> Path:
        if self.checkpoint is not None:
            found = self.checkpoint
        else:
            recorded = sorted(
                {
                    m.metadata_props[CHECKPOINT_METADATA_KEY]
                    for m in bundle.values()
                    if CHECKPOINT_METADATA_KEY in m.metadata_props
                }
            )
            if not recorded:
                raise SurgeryError(
                    "transformers.js layout: the models do not say which checkpoint they came "
                    "from; pass --checkpoint DIR (the Hugging Face folder)"
                )
            found = Path(recorded[0])
        if not (found / "config.json").is_file():
            raise SurgeryError(
                f"{found}: no config.json in the checkpoint folder the transformers.js layout "
                "needs; pass --checkpoint DIR"
            )
        return found

    def finish(self, out_dir: Path, bundle: Bundle, chunks: dict[str, list[str]]) -> None:
        checkpoint = self._find_checkpoint(bundle)
        config = _model_config(checkpoint)
        config["transformers.js_config"] = {
            "use_external_data_format": {
                Path(self.model_file(part)).name: len(files)
                for part, files in chunks.items()
                if files
            },
        }
        _write_json(out_dir / "config.json", config)
        preprocessor = read_json_object(
            checkpoint / "preprocessor_config.json", fix="the checkpoint folder is incomplete"
        )
        preprocessor.setdefault("image_seq_length", _image_tokens(config))
        _write_json(out_dir / "preprocessor_config.json", preprocessor)
        _write_json(out_dir / "generation_config.json", _generation_config(checkpoint, config))
        for name in _COPIED:
            if (checkpoint / name).is_file():
                shutil.copyfile(checkpoint / name, out_dir / name)
            elif name != "special_tokens_map.json":
                raise SurgeryError(f"{checkpoint}: no {name}; Transformers.js needs it")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _model_config(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's config with the fields Transformers.js needs made explicit."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoint).to_dict()
    text = config["text_config"]
    text.setdefault("head_dim", text["hidden_size"] // text["num_attention_heads"])
    text.setdefault("num_key_value_heads", text["num_attention_heads"])
    image_token = config.get("image_token_index", config.get("image_token_id"))
    config["image_token_index"] = config["image_token_id"] = image_token
    return config


def _image_tokens(config: dict[str, Any]) -> int:
    vision = config["vision_config"]
    return int((vision["image_size"] // vision["patch_size"]) ** 2)


def _generation_config(checkpoint: Path, config: dict[str, Any]) -> dict[str, Any]:
    path = checkpoint / "generation_config.json"
    if path.is_file():
        return read_json_object(path)
    text = config["text_config"]
    return {
        key: text[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if key in text
    }
