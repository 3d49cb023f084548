"""The parity harness of the fusion tests: a fused exported graph against the exported one.

Both graphs run in ONNX Runtime on the same inputs: prefill with an image and a left-padded row
(batch 2), then decode steps fed the unfused graph's presents and greedy tokens, so a prompt longer
than a sliding window is covered too. :func:`step_deltas` gives max |Δ| over the logits and every
present, per step.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

__all__ = ["prefill_feeds", "step_deltas"]


def prefill_feeds(checkpoint: Path, session: ort.InferenceSession) -> dict[str, np.ndarray]:
    """Prefill: image tokens then 5 text tokens, batch 2, the second row left-padded by 3."""
    config = json.loads((checkpoint / "config.json").read_text())
    vision = config["vision_config"]
    image_tokens = (vision["image_size"] // vision["patch_size"]) ** 2
    image_token = int(config["image_token_index"])
    rng = np.random.default_rng(0)
    batch = 2
    text = rng.integers(3, 300, (batch, 5))
    ids = np.concatenate([np.full((batch, image_tokens), image_token), text], 1).astype(np.int64)
    ids[1, :3] = 0
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    feeds: dict[str, np.ndarray] = {
        "input_ids": ids,
        "pixel_values": rng.standard_normal(
            (batch, 3, vision["image_size"], vision["image_size"]), dtype=np.float32
        ),
        "attention_mask": mask,
        "position_ids": np.where(mask == 0, 1, np.cumsum(mask, -1)).astype(np.int64),
    }
    for value in session.get_inputs():
        if value.name.startswith("past_key_values."):
            feeds[value.name] = np.zeros((batch, value.shape[1], 0, value.shape[3]), np.float32)
    return feeds


def step_deltas(
    exported: Path, fused: Path, checkpoint: Path, steps: int = 4
) -> list[tuple[int, float]]:
    """(total length, max |Δ| over logits and presents) of prefill then ``steps - 1`` decodes."""
    unfused_session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    fused_session = ort.InferenceSession(str(fused), providers=["CPUExecutionProvider"])
    names = [o.name for o in unfused_session.get_outputs()]
    assert [o.name for o in fused_session.get_outputs()] == names
    feeds = prefill_feeds(checkpoint, unfused_session)
    deltas = []
    for _ in range(steps):
        expected = dict(zip(names, unfused_session.run(None, feeds), strict=True))
        got = dict(zip(names, fused_session.run(None, feeds), strict=True))
        compared = ["logits", *(n for n in names if n.startswith("present."))]
        delta = max(float(np.abs(got[n] - expected[n]).max()) for n in compared)
        deltas.append((feeds["attention_mask"].shape[1], delta))
        next_ids = expected["logits"][:, -1].argmax(-1)[:, None].astype(np.int64)
        feeds["input_ids"] = next_ids
        feeds["attention_mask"] = np.concatenate(
            [feeds["attention_mask"], np.ones_like(next_ids)], 1
        )
        feeds["position_ids"] = feeds["position_ids"][:, -1:] + 1
        for name in list(feeds):
            if name.startswith("past_key_values."):
                feeds[name] = expected[name.replace("past_key_values.", "present.")]
    return deltas
