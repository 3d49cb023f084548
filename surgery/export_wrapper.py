"""The flat-signature PyTorch module that ``surgery export`` hands to ``torch.onnx.export``.

:class:`PaliGemmaExportWrapper` runs the whole ``PaliGemmaForConditionalGeneration`` (vision tower,
projector, token embedding, image merge, decoder, ``lm_head``, final softcap) with plain tensors in
and out, so the exported graph has the inputs a runtime feeds and named boundary values where a
later split cuts.

Reuses HF's modules as they are: ``get_image_features`` (vision tower + projector), the scaled token
embedding, the language model's decoder layers (called through ``language_model.forward`` with a
prepared mask, the path HF's own ``generate`` takes) and an HF ``DynamicCache`` built *without* a
config, so every layer keeps its whole past.

Departs from HF in two places, on purpose:

* **The mask is built here from tensors only**, because the graph has no ``token_type_ids``: at
  prefill (past length 0) every non-padded prompt token sees every other one, on full *and*
  sliding layers (what HF computes from the processor's ``token_type_ids``, zeros over the prompt:
  its block overlay is OR-ed over the sliding causal mask); with a past, attention is causal and on
  sliding layers limited to keys whose cache index is above ``query index - window`` (HF's
  index-based ``sliding_window_overlay``). Padded keys are always masked. Whether the past is empty
  is read from the shapes as a tensor, so ``torch.export`` does not specialise on it.
* **The image merge is a gather, not** ``masked_scatter``: the i-th ``<image>`` token in row-major
  order takes the i-th image feature row, exactly what ``masked_scatter`` does, but as plain
  ``CumSum``/``Gather``/``Where`` ops that export cleanly and split cleanly.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import DynamicCache

__all__ = ["PaliGemmaExportWrapper"]

logger = logging.getLogger(__name__)


class PaliGemmaExportWrapper(torch.nn.Module):
    """``PaliGemmaForConditionalGeneration`` with a flat tensor signature.

    Args:
        model: The HF model, built with ``attn_implementation="eager"`` (HF's sdpa path drops
            Gemma 2's attention softcap).
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        config = model.config
        text = config.get_text_config()
        self.image_token_id = int(config.image_token_id)
        self.vocab_size = int(text.vocab_size)
        self.num_layers = int(text.num_hidden_layers)
        layer_types = getattr(text, "layer_types", None)
        self.sliding_window: int | None = getattr(text, "sliding_window", None)
        self.layer_types: list[str] | None = (
            list(layer_types)
            if layer_types is not None and self.sliding_window is not None
            else None
        )
        self.final_logit_softcapping: float | None = getattr(text, "final_logit_softcapping", None)

    def _merge(
        self, input_ids: torch.Tensor, token_embeddings: torch.Tensor, image_features: torch.Tensor
    ) -> torch.Tensor:
        """Write the image features over the ``<image>`` positions, in row-major order."""
        hidden = token_embeddings.shape[-1]
        is_image = (input_ids == self.image_token_id).reshape(-1)
        index = (torch.cumsum(is_image.to(torch.int64), dim=0) - 1).clamp(min=0)
        rows = image_features.reshape(-1, hidden).to(token_embeddings.dtype)[index]
        merged = torch.where(is_image[:, None], rows, token_embeddings.reshape(-1, hidden))
        return merged.reshape(token_embeddings.shape)

    def _bias(
        self,
        attention_mask: torch.Tensor,
        query_length: int,
        past_length: int,
        sliding_window: int | None,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """Additive attention bias ``[batch, 1, query, key]``: 0 where allowed, dtype min elsewhere."""
        device = attention_mask.device
        query_index = torch.arange(query_length, device=device) + past_length
        key_index = torch.arange(attention_mask.shape[-1], device=device)
        allowed = key_index[None, :] <= query_index[:, None]
        if sliding_window is not None:
            allowed = allowed & (key_index[None, :] > query_index[:, None] - sliding_window)
        prefill = query_index[:1] == 0  # the past is empty: the whole prompt is one block
        allowed = allowed | prefill[:, None]
        allowed = allowed[None, None] & attention_mask[:, None, None, :].to(torch.bool)
        zero = torch.zeros((), dtype=dtype, device=device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values: list[torch.Tensor],
    ) -> tuple[torch.Tensor, ...]:
        """Run the model.

        Args:
            input_ids: ``[batch, seq]`` int64, ``<image>`` tokens included.
            pixel_values: ``[batch, 3, H, W]`` float32.
            attention_mask: ``[batch, past + seq]`` int64, 0 on padding.
            position_ids: ``[batch, seq]`` int64, 1-indexed as PaliGemma and Transformers.js use.
            past_key_values: ``2 * layers`` tensors ``[batch, kv_heads, past, head_dim]``: layer 0
                key, layer 0 value, layer 1 key, …

        Returns:
            ``logits``, then ``present`` key and value per layer, then the boundary values
            ``image_features``, ``token_embeddings`` and the merged ``inputs_embeds``.
        """
        paligemma = self.model.model
        image_features = paligemma.get_image_features(pixel_values).pooler_output
        llm_ids = input_ids
        if (
            self.image_token_id >= self.vocab_size
        ):  # as HF: an out-of-vocabulary <image> reads row 0
            llm_ids = torch.where(input_ids == self.image_token_id, 0, input_ids)
        token_embeddings = paligemma.get_input_embeddings()(llm_ids)
        inputs_embeds = self._merge(input_ids, token_embeddings, image_features)

        cache = DynamicCache()
        for layer in range(self.num_layers):
            cache.update(past_key_values[2 * layer], past_key_values[2 * layer + 1], layer)
        past_length = past_key_values[0].shape[2]
        query_length = input_ids.shape[1]
        dtype = inputs_embeds.dtype
        mask: torch.Tensor | dict[str, torch.Tensor]
        full = self._bias(attention_mask, query_length, past_length, None, dtype)
        if self.layer_types is None:
            mask = full
        else:
            sliding = self._bias(
                attention_mask, query_length, past_length, self.sliding_window, dtype
            )
            mask = {"full_attention": full, "sliding_attention": sliding}

        outputs = paligemma.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        logits = self.model.lm_head(outputs.last_hidden_state)
        if self.final_logit_softcapping is not None:
            logits = (
                torch.tanh(logits / self.final_logit_softcapping) * self.final_logit_softcapping
            )
        presents = []
        for layer in range(self.num_layers):
            cached: Any = cache.layers[layer]
            presents += [cached.keys, cached.values]
        return (logits, *presents, image_features, token_embeddings, inputs_embeds)
