"""Constants shared by several layers, in one neutral module that imports nothing of ours.

Each value here was once spelled in one module and imported (or re-spelled) by others, which
made passes depend on the writer and the exporter on a layout. Keeping them here lets every
layer import them without importing each other.
"""

from __future__ import annotations

__all__ = [
    "CAST_BLOCK_ELEMENTS",
    "CHECKPOINT_METADATA_KEY",
    "DEFAULT_MAX_CHUNK_BYTES",
    "FP16_BLOCK_ELEMENTS",
    "INLINE_LIMIT_BYTES",
    "KV_KINDS",
    "PAST_NAME",
    "PRESENT_NAME",
]

#: Tensors at or under this size stay inside the protobuf. ONNX Runtime cannot run shape
#: inference on small shape constants stored as external data.
INLINE_LIMIT_BYTES = 1024

#: Default size limit of one external-data chunk (and of one checkpoint shard we write):
#: browsers cap an ArrayBuffer near 2 GiB. A layout's ``max_chunk_bytes`` is the one limit a
#: pipeline uses; this is only its default.
DEFAULT_MAX_CHUNK_BYTES = 2_000_000_000

#: Model metadata key under which ``surgery export`` records the checkpoint folder, read by
#: layouts that copy its configs and tokenizer.
CHECKPOINT_METADATA_KEY = "onnx_surgery.checkpoint"

#: Elements converted at once from a safetensors bfloat16/float16 tensor to float32 when it is
#: written (64 MiB of float32).
CAST_BLOCK_ELEMENTS = 16 * 1024 * 1024
#: Elements converted at once by the fp16 pass (bounds one tensor's temporary memory).
FP16_BLOCK_ELEMENTS = 1 << 22

#: KV-cache value names, as the exporter writes them and Transformers.js feeds them:
#: ``PAST_NAME.format(layer=i, kind=k)`` with ``k`` one of :data:`KV_KINDS`.
PAST_NAME = "past_key_values.{layer}.{kind}"
PRESENT_NAME = "present.{layer}.{kind}"
KV_KINDS = ("key", "value")
