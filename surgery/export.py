"""``surgery export``: one ONNX graph of a whole PaliGemma / PaliGemma 2 checkpoint.

One ``torch.onnx.export(..., dynamo=True)`` of :class:`~surgery.export_wrapper.PaliGemmaExportWrapper`
(vision tower, projector, token embedding, image merge, Gemma / Gemma 2 decoder, ``lm_head``,
final softcap), written to ``OUTPUT`` + ``OUTPUT.data``.

Memory: the model is built with its parameters on the meta device (non-persistent buffers such as
rotary ``inv_freq`` and SigLIP ``position_ids`` are real: they are computed from the config and kept
aside), traced weight-free, and the checkpoint's safetensors bytes are attached afterwards as
external tensors that ``onnx_ir.save`` streams file to file (:mod:`surgery.export_weights`). Exporting
needs memory for the graph, not for the weights.

Reuses the dynamo exporter for tracing and ONNX translation, and onnxscript's optimizer (run by us
after the weights are attached: the exporter's built-in run would try to fold meta tensors). That
post-processing is a shipped recipe, ``recipes/export-post.yaml`` (fold transposes, optimize), run
by the :class:`~surgery.manager.PassManager` like any other, so instruments (``--time-passes``,
``--dump-dir``) see it. The exporter is an entry point, above the core: it may name passes.

Graph interface (see README "Exported graph"):

* inputs ``input_ids`` i64 ``[batch_size, sequence_length]``, ``pixel_values`` f32
  ``[batch_size, 3, H, W]``, ``attention_mask`` i64 ``[batch_size, total_sequence_length]``,
  ``position_ids`` i64 ``[batch_size, sequence_length]`` (1-indexed),
  ``past_key_values.{i}.key|value`` f32 ``[batch_size, kv_heads, past_sequence_length, head_dim]``;
* outputs ``logits`` f32 ``[batch_size, sequence_length, vocab]``, ``present.{i}.key|value``
  ``[batch_size, kv_heads, total_sequence_length, head_dim]``, and the boundary values
  ``image_features`` ``[batch_size, image_tokens, hidden]`` (projector output),
  ``token_embeddings`` ``[batch_size, sequence_length, hidden]`` (scaled Gemma embeddings before
  the merge) and ``inputs_embeds`` (the merged embeddings the decoder consumes).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from surgery.atomic import atomic_files, check_destination
from surgery.checkpoint_checks import (
    SUPPORTED_ARCHITECTURES,
    SUPPORTED_TEXT_MODELS,
    check_checkpoint,
)
from surgery.constants import CHECKPOINT_METADATA_KEY, KV_KINDS, PAST_NAME, PRESENT_NAME
from surgery.errors import SurgeryError
from surgery.hf_files import checkpoint_reference
from surgery.jsonfile import read_json_object
from surgery.progress import bar as progress_bar
from surgery.progress import spinner

if TYPE_CHECKING:
    from surgery.manager import Instrument

__all__ = [
    "ATTENTION_MASK",
    "BATCH",
    "IMAGE_FEATURES",
    "INPUTS_EMBEDS",
    "INPUT_IDS",
    "LOGITS",
    "PAST_SEQUENCE",
    "PIXEL_VALUES",
    "POSITION_IDS",
    "SEQUENCE",
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_TEXT_MODELS",
    "TOKEN_EMBEDDINGS",
    "TOTAL_SEQUENCE",
    "check_checkpoint",
    "export_checkpoint",
    "input_names",
    "output_names",
    "past_name",
    "present_name",
]

logger = logging.getLogger(__name__)

INPUT_IDS = "input_ids"
PIXEL_VALUES = "pixel_values"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
#: Projector output ``[batch, image_tokens, hidden]``: where the vision part ends.
IMAGE_FEATURES = "image_features"
#: Scaled token embeddings before the image merge: where the embedding part ends.
TOKEN_EMBEDDINGS = "token_embeddings"
#: Merged embeddings (image features over ``<image>`` positions): where the decoder starts.
INPUTS_EMBEDS = "inputs_embeds"

BATCH = "batch_size"
SEQUENCE = "sequence_length"
PAST_SEQUENCE = "past_sequence_length"
TOTAL_SEQUENCE = "total_sequence_length"

#: The shipped recipe run on the traced graph once the weights are attached.
POST_RECIPE = "export-post"

# Example sizes: >= 2 so torch.export keeps them dynamic, distinct so none is taken for another.
_EXAMPLE_BATCH, _EXAMPLE_SEQUENCE, _EXAMPLE_PAST = 2, 7, 5


def past_name(layer: int, kind: str) -> str:
    """Input name of one layer's past ``key`` or ``value``."""
    return PAST_NAME.format(layer=layer, kind=kind)


def present_name(layer: int, kind: str) -> str:
    """Output name of one layer's present ``key`` or ``value``."""
    return PRESENT_NAME.format(layer=layer, kind=kind)


def input_names(num_layers: int) -> list[str]:
    """Graph input names, in order."""
    past = [past_name(i, k) for i in range(num_layers) for k in KV_KINDS]
    return [INPUT_IDS, PIXEL_VALUES, ATTENTION_MASK, POSITION_IDS, *past]


def output_names(num_layers: int) -> list[str]:
    """Graph output names, in order."""
    present = [present_name(i, k) for i in range(num_layers) for k in KV_KINDS]
    return [LOGITS, *present, IMAGE_FEATURES, TOKEN_EMBEDDINGS, INPUTS_EMBEDS]


class _Stages:
    """Prints the export's stages with their durations on stderr (when ``enabled``)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.start = time.perf_counter()

    def _line(self, message: str) -> str:
        return f"[{time.perf_counter() - self.start:6.1f}s] {message}"

    def __call__(self, message: str) -> None:
        logger.info("%s", message)
        if self.enabled:
            print(self._line(message), file=sys.stderr, flush=True)

    def running(self, message: str) -> contextlib.AbstractContextManager[None]:
        """A stage that is silent for long: a spinner on a terminal, else one stage line."""
        logger.info("%s", message)
        return spinner(self._line(message), enabled=self.enabled)


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create parameters on the meta device, buffers for real (as accelerate's init_empty_weights).

    Buffers are small and some are non-persistent (not in the checkpoint), so their values must
    come from the constructors.
    """
    import torch

    register = torch.nn.Module.register_parameter

    def register_on_meta(
        module: torch.nn.Module, name: str, param: torch.nn.Parameter | None
    ) -> None:
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=False)
        register(module, name, param)

    torch.nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register  # type: ignore[method-assign]


def _build_model(checkpoint: Path) -> tuple[Any, dict[str, Any]]:
    """The HF model with meta parameters, and its buffers' real values keyed by module path."""
    import torch
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    config = PaliGemmaConfig.from_pretrained(checkpoint)
    config.dtype = torch.float32
    with _parameters_on_meta():
        model = PaliGemmaForConditionalGeneration._from_config(
            config, attn_implementation="eager", dtype=torch.float32
        )
    buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    return model.to("meta").eval(), buffers


def _checkpoint_keys(model: Any, checkpoint_keys: list[str]) -> dict[str, str]:
    """Map the model's parameter names to checkpoint keys, as ``from_pretrained`` renames them."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters: list[Any] = [t for t in transforms if not isinstance(t, WeightRenaming)]
    meta_state = model.state_dict()
    key_for = {}
    for key in checkpoint_keys:
        renamed, _ = rename_source_key(
            key, renamings, converters, model.base_model_prefix, meta_state
        )
        key_for[renamed] = key
    # Tied parameters (lm_head <-> embed_tokens) are stored once under one of their names.
    seen: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        first = seen.setdefault(id(param), name)
        if name not in key_for and first in key_for:
            key_for[name] = key_for[first]
        elif first not in key_for and name in key_for:
            key_for[first] = key_for[name]
    return key_for


def _checkpoint_name(name: str, key_for: dict[str, str]) -> str:
    """The key a parameter would have in this checkpoint, inferred from the keys it does have.

    ``from_pretrained`` renames checkpoint keys by prefix (legacy ``language_model.model.*`` ->
    ``model.language_model.*``); the prefixes are read off the pairs that did match, and the most
    specific one that fits ``name`` is undone. With no rename in play the name is the key.
    """
    prefixes: dict[str, str] = {}
    for renamed, key in key_for.items():
        ours, theirs = renamed.split("."), key.split(".")
        common = 0
        while common < min(len(ours), len(theirs)) and ours[-1 - common] == theirs[-1 - common]:
            common += 1
        model_prefix = ".".join(ours[: len(ours) - common])
        prefixes.setdefault(model_prefix, ".".join(theirs[: len(theirs) - common]))
    fitting = [p for p in prefixes if p and (name == p or name.startswith(p + "."))]
    if not fitting:
        return name
    best = max(fitting, key=len)
    rest = name[len(best) :].lstrip(".")
    return ".".join(part for part in (prefixes[best], rest) if part)


def _check_weights_present(model: Any, key_for: dict[str, str], checkpoint: Path) -> None:
    """Refuse, before tracing, a checkpoint that lacks a parameter; name it as the checkpoint would."""
    for name, _ in model.named_parameters():
        if name in key_for:
            continue
        key = _checkpoint_name(name, key_for)
        index = checkpoint / "model.safetensors.index.json"
        listed = read_json_object(index).get("weight_map", {}).get(key) if index.is_file() else None
        if isinstance(listed, str):
            raise SurgeryError(
                f"{checkpoint / listed}: has no tensor {key!r}, which {index.name} lists in it; "
                "the shard is incomplete or from another model: re-download it"
            )
        files = ", ".join(sorted(p.name for p in checkpoint.glob("*.safetensors")))
        raise SurgeryError(
            f"{checkpoint}: no safetensors file holds {key!r} (searched {files}); "
            "is it a complete PaliGemma checkpoint?"
        )


def _example_inputs(model: Any) -> tuple[Any, ...]:
    import torch

    config = model.config
    text, vision = config.text_config, config.vision_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    batch, seq, past = _EXAMPLE_BATCH, _EXAMPLE_SEQUENCE, _EXAMPLE_PAST
    meta = torch.device("meta")
    kv = [
        torch.zeros(batch, text.num_key_value_heads, past, head_dim, device=meta)
        for _ in range(2 * text.num_hidden_layers)
    ]
    return (
        torch.zeros(batch, seq, dtype=torch.int64, device=meta),
        torch.zeros(batch, vision.num_channels, vision.image_size, vision.image_size, device=meta),
        torch.ones(batch, past + seq, dtype=torch.int64, device=meta),
        torch.ones(batch, seq, dtype=torch.int64, device=meta),
        kv,
    )


def _dynamic_shapes(num_layers: int) -> tuple[Any, ...]:
    kv = {0: BATCH, 2: PAST_SEQUENCE}
    return (
        {0: BATCH, 1: SEQUENCE},
        {0: BATCH},
        {0: BATCH, 1: TOTAL_SEQUENCE},
        {0: BATCH, 1: SEQUENCE},
        [kv] * (2 * num_layers),
    )


def _trace(model: Any) -> Any:
    """``torch.onnx.export`` of the weight-free wrapper; returns the ``onnx_ir`` model."""
    import torch

    from surgery.export_wrapper import PaliGemmaExportWrapper

    num_layers = model.config.text_config.num_hidden_layers
    # The exporter logs a warning per torchvision op it cannot register; PaliGemma uses none.
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                PaliGemmaExportWrapper(model),
                _example_inputs(model),
                dynamo=True,
                input_names=input_names(num_layers),
                output_names=output_names(num_layers),
                dynamic_shapes=_dynamic_shapes(num_layers),
                optimize=False,  # run after the weights are attached: it folds small constants
                verbose=False,
            )
    finally:
        registration.setLevel(level)
    assert program is not None
    return program.model


def _tidy_interface(model: Any, num_layers: int, checkpoint: Path, output: Path) -> None:
    """Name the presents' length axis ``total_sequence_length`` (the exporter writes a sum), and
    record the checkpoint folder for layouts that copy its configs and tokenizer (relative to
    the final ``output``'s folder when it lies inside it, see :func:`checkpoint_reference`)."""
    import onnx_ir as ir

    presents = {present_name(i, kind) for i in range(num_layers) for kind in KV_KINDS}
    for value in model.graph.outputs:
        if value.name in presents and value.shape is not None:
            dims = list(value.shape)
            dims[2] = TOTAL_SEQUENCE
            value.shape = ir.Shape(dims)
    model.producer_name = "onnx-surgery"
    model.metadata_props["onnx_surgery.num_layers"] = str(num_layers)
    model.metadata_props[CHECKPOINT_METADATA_KEY] = checkpoint_reference(checkpoint, output.parent)


def _save(model: Any, path: Path, progress: bool) -> None:
    """Write ``path`` and ``path.name + '.data'``, with a byte progress bar."""
    from surgery.writer import external_bytes, save_model

    with progress_bar(total=external_bytes(model), desc="writing weights", enabled=progress) as bar:
        save_model(model, path, progress=lambda tensor: bar.update(tensor.nbytes))


def export_checkpoint(
    checkpoint: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    force: bool = False,
    progress: bool = True,
    instruments: Sequence[Instrument] = (),
) -> Path:
    """Export a local PaliGemma / PaliGemma 2 checkpoint to one ONNX graph with external data.

    Args:
        checkpoint: Hugging Face checkpoint folder (``config.json`` + safetensors).
        output: The ``.onnx`` file to write; its weights go to ``<output>.data`` beside it.
        force: Replace existing output files.
        progress: Print the stages and a progress bar on stderr.
        instruments: Pass-manager instruments around the post-processing recipe
            (:data:`POST_RECIPE`), e.g. :class:`~surgery.instruments.TimePasses`.

    Returns:
        The written model path.

    Raises:
        SurgeryError: Missing folder or config, unsupported architecture, a malformed config
            value, corrupt or incomplete safetensors (a missing tensor named by its checkpoint
            key), or existing output without ``force``. Raised before tracing; nothing is written.
    """
    import surgery.builtins  # noqa: F401  (the post-processing recipe names built-in passes)
    from surgery.bundle import Bundle
    from surgery.export_weights import attach_weights
    from surgery.recipe import load_recipe

    stage = _Stages(progress)
    checkpoint = Path(checkpoint)
    raw, entries = check_checkpoint(checkpoint)
    output = check_destination(output, force=force, inputs=[checkpoint])
    stage(
        f"checkpoint {checkpoint}: {raw['architectures'][0]} ({raw['text_config']['model_type']}), "
        f"{len(entries)} tensors"
    )

    model, buffers = _build_model(checkpoint)
    num_layers = model.config.text_config.num_hidden_layers
    model_keys = _checkpoint_keys(model, list(entries))
    _check_weights_present(model, model_keys, checkpoint)
    key_for = {f"model.{name}": key for name, key in model_keys.items()}
    with stage.running("tracing with torch.onnx.export(dynamo=True), weights on the meta device"):
        onnx_model = _trace(model)
    stage(
        f"traced: {sum(1 for _ in onnx_model.graph)} nodes, "
        f"{len(onnx_model.graph.initializers)} initializers"
    )

    attach_weights(
        onnx_model,
        entries,
        key_for,
        {f"model.{name}": buffer.numpy() for name, buffer in buffers.items()},
    )
    stage("attached checkpoint weights (memory-mapped); optimizing the graph")
    # Linear layers trace as MatMul(x, Transpose(W)): fold those lazily (a transposed copy per
    # weight, computed when written), and keep the optimizer's constant folding off every large
    # weight, which it would otherwise materialize in memory (~10 GB for a 3B model).
    bundle = Bundle({output.stem: onnx_model})
    load_recipe(POST_RECIPE).manager(instruments).run(bundle)
    onnx_model = bundle[output.stem]
    _tidy_interface(onnx_model, num_layers, checkpoint, output)
    stage(f"optimized: {sum(1 for _ in onnx_model.graph)} nodes; writing {output}")
    with atomic_files(output, force=force, inputs=[checkpoint]) as tmp:
        _save(onnx_model, tmp / output.name, progress)
    stage(f"done: {output} + {output.name}.data")
    return output
