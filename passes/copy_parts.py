"""Pass ``copy-parts``: add a copy of parts under a suffixed name, to build variants side by side.

The Transformers.js layout holds several variants of each part (``decoder_model_merged.onnx``,
``decoder_model_merged_fp16.onnx``, …). A recipe makes them by copying the parts
(``copy-parts`` with ``suffix: _fp16``), then running the variant's passes on the copies only.
Copies come from :func:`surgery.cloning.clone_model` (``onnx_ir.Model.clone`` with unshared value
types): new graph objects, the same tensor objects, so no weight is duplicated in memory (each
written file still gets its own bytes on disk).
"""

from __future__ import annotations

import logging

import pydantic

from surgery.bundle import Bundle
from surgery.cloning import clone_model
from surgery.errors import SurgeryError
from surgery.pass_infra import BundlePass, BundlePassResult, PassOptions
from surgery.registry import register

__all__ = ["CopyParts"]

logger = logging.getLogger(__name__)


class _Options(PassOptions):
    suffix: str = pydantic.Field(
        min_length=1,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="appended to each copied part's name",
    )


@register
class CopyParts(BundlePass[_Options]):
    """Copy the selected parts (default: all) to ``<part><suffix>``, sharing their weights.

    Run the variant's passes on the copies by naming them in ``parts:``, e.g.
    ``[vision_encoder_fp16, embed_tokens_fp16, decoder_model_merged_fp16]``.
    """

    name = "copy-parts"
    summary = "copy parts under a suffixed name (variants such as _fp16), sharing weights"
    Options = _Options

    def _selected(self, parts: list[str]) -> list[str]:
        return list(self.parts) if self.parts is not None else list(parts)

    def output_parts(self, parts: list[str] | None) -> list[str] | None:
        if parts is None:
            return None
        return parts + [p + self.options.suffix for p in self._selected(parts)]

    def call_bundle(self, bundle: Bundle) -> BundlePassResult:
        selected = self._selected(bundle.parts)
        for part in selected:
            copy = part + self.options.suffix
            if copy in bundle:
                raise SurgeryError(
                    f"copy-parts: part '{copy}' already exists; choose another suffix"
                )
            bundle[copy] = clone_model(bundle[part])
            logger.debug("copied part %s to %s", part, copy)
        return BundlePassResult(bundle, modified=bool(selected))
