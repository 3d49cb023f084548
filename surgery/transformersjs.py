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
``surgery export``) unless given explicitly (``surgery apply --checkpoint``). A checkpoint inside
the model's folder is recorded relative to that folder, so the two can move together (the demo
builds both in a temporary folder that is renamed at the end); a relative value is resolved
against the folder the model was loaded from (:data:`surgery.io.SOURCE_DIR`), and an absolute one
is used as is. Everything the layout reads from the checkpoint is read and checked by
:meth:`TransformersJsLayout.prepare`, before the first pass runs (see :mod:`surgery.hf_files`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pydantic

from surgery.bundle import Bundle
from surgery.constants import CHECKPOINT_METADATA_KEY, DEFAULT_MAX_CHUNK_BYTES
from surgery.errors import SurgeryError, hub_id_hint
from surgery.hf_files import read_image_processor, read_model_config, tokenizer_files
from surgery.io import SOURCE_DIR
from surgery.jsonfile import read_json_object
from surgery.layout import Layout, LayoutOptions, register_layout

__all__ = ["TransformersJsLayout"]

#: Transformers.js picks PaliGemma's processor by this key of ``preprocessor_config.json``.
_PROCESSOR_CLASS = "PaliGemmaProcessor"


class _Options(LayoutOptions):
    max_chunk_bytes: int = pydantic.Field(
        default=DEFAULT_MAX_CHUNK_BYTES, gt=0, description="size limit of one external-data chunk"
    )


@dataclasses.dataclass(frozen=True)
class _Sources:
    """What the layout copies from the checkpoint, read and checked by ``prepare``."""

    checkpoint: Path
    config: dict[str, Any]
    preprocessor: dict[str, Any]
    generation: dict[str, Any] | None
    tokenizer_files: list[str]


@register_layout
class TransformersJsLayout(Layout):
    """``onnx/<part>.onnx`` with ``<part>.onnx_data[_N]`` chunks, plus config files."""

    name = "transformers.js"
    Options = _Options

    def __init__(self, options: LayoutOptions | None = None, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        #: The Hugging Face checkpoint folder; None: read from the models' metadata.
        self.checkpoint: Path | None = None
        self._prepared: tuple[Bundle, _Sources] | None = None

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
            if not found.is_dir():
                hint = hub_id_hint(found) or (
                    "; give the Hugging Face checkpoint folder the model was exported from"
                )
                raise SurgeryError(f"{found}: --checkpoint folder does not exist{hint}")
        else:
            recorded = _recorded_checkpoints(bundle)
            if not recorded:
                raise SurgeryError(
                    "transformers.js layout: the models do not say which checkpoint they came "
                    "from; pass --checkpoint DIR (the Hugging Face folder)"
                )
            value, resolved = recorded[0]
            found = Path(resolved)
            if not found.is_dir():
                where = "" if value == resolved else f" (resolved to {found})"
                raise SurgeryError(
                    f"transformers.js layout: the model records its checkpoint folder as "
                    f"'{value}'{where}, which does not exist; pass --checkpoint DIR (the Hugging "
                    "Face folder the model was exported from)"
                )
        if not (found / "config.json").is_file():
            raise SurgeryError(
                f"{found}: no config.json in the checkpoint folder the transformers.js layout "
                "needs; pass --checkpoint DIR"
            )
        return found

    def prepare(self, bundle: Bundle) -> None:
        """Find the checkpoint and read, check and keep everything ``finish`` copies from it.

        Call it on the bundle as loaded (``surgery apply`` does, before the first pass), so a
        relative checkpoint path resolves against the model's folder; again on the same bundle
        object it does nothing.
        """
        if self._prepared is not None and self._prepared[0] is bundle:
            return
        checkpoint = self._find_checkpoint(bundle)
        generation = checkpoint / "generation_config.json"
        sources = _Sources(
            checkpoint=checkpoint,
            config=read_model_config(checkpoint),
            preprocessor=read_image_processor(checkpoint),
            generation=read_json_object(generation) if generation.is_file() else None,
            tokenizer_files=tokenizer_files(checkpoint),
        )
        self._prepared = (bundle, sources)

    def finish(self, out_dir: Path, bundle: Bundle, chunks: dict[str, list[str]]) -> None:
        self.prepare(bundle)
        assert self._prepared is not None
        sources = self._prepared[1]
        config = copy.deepcopy(sources.config)
        config["transformers.js_config"] = {
            "use_external_data_format": {
                Path(self.model_file(part)).name: len(files)
                for part, files in chunks.items()
                if files
            },
        }
        _write_json(out_dir / "config.json", config)
        preprocessor = dict(sources.preprocessor)
        preprocessor.setdefault("image_seq_length", _image_tokens(config))
        preprocessor.setdefault("processor_class", _PROCESSOR_CLASS)
        _write_json(out_dir / "preprocessor_config.json", preprocessor)
        generation = sources.generation
        if generation is None:
            text = config["text_config"]
            generation = {k: text[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        _write_json(out_dir / "generation_config.json", generation)
        for name in sources.tokenizer_files:
            shutil.copyfile(sources.checkpoint / name, out_dir / name)


def _recorded_checkpoints(bundle: Bundle) -> list[tuple[str, str]]:
    """Each distinct (recorded value, resolved path) of the parts' checkpoint metadata, sorted.

    A relative value is resolved against the folder its part was loaded from (relative to the
    working folder for a part built in memory).
    """
    found = set()
    for model in bundle.values():
        value = model.metadata_props.get(CHECKPOINT_METADATA_KEY)
        if value is not None:
            resolved = os.path.normpath(os.path.join(model.meta.get(SOURCE_DIR, ""), value))
            found.add((value, resolved))
    return sorted(found)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _image_tokens(config: dict[str, Any]) -> int:
    vision = config["vision_config"]
    return int((vision["image_size"] // vision["patch_size"]) ** 2)
