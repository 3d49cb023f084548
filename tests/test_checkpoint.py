"""``surgery make-random``: generated checkpoints load in transformers and behave like PaliGemma."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from surgery.errors import SurgeryError

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from surgery import checkpoint as checkpoint_module  # noqa: E402
from surgery.checkpoint import PRESETS, make_random_checkpoint  # noqa: E402


def test_loads_in_transformers(paligemma2_checkpoint: Path) -> None:
    """Every stored tensor is used, none is missing; the processor is PaliGemma's."""
    from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

    model, info = PaliGemmaForConditionalGeneration.from_pretrained(
        paligemma2_checkpoint, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight

    processor = AutoProcessor.from_pretrained(paligemma2_checkpoint)
    assert type(processor).__name__ == "PaliGemmaProcessor"
    tokenizer = processor.tokenizer
    assert tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<bos>",
        "<eos>",
        "<pad>",
    )
    assert (
        tokenizer.decode(tokenizer("hi there\n", add_special_tokens=False)["input_ids"])
        == "hi there\n"
    )
    config = json.loads((paligemma2_checkpoint / "preprocessor_config.json").read_text())
    assert config["image_seq_length"] == 16


def test_generation_is_not_degenerate(paligemma2_checkpoint: Path) -> None:
    """Greedy tokens vary between prompts and steps: the random scale is usable for parity."""
    from PIL import Image
    from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(paligemma2_checkpoint)
    model = PaliGemmaForConditionalGeneration.from_pretrained(paligemma2_checkpoint).eval()
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    inputs = processor(
        images=images,
        text=["caption en", "what is it?", "ocr"],
        return_tensors="pt",
        padding="longest",
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :]
    assert len(set(new.flatten().tolist())) >= 3, new


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a = make_random_checkpoint("tiny-paligemma", tmp_path / "a", seed=3, progress=False)
    b = make_random_checkpoint("tiny-paligemma", tmp_path / "b", seed=3, progress=False)
    c = make_random_checkpoint("tiny-paligemma", tmp_path / "c", seed=4, progress=False)
    weights = [(p / "model.safetensors").read_bytes() for p in (a, b, c)]
    assert weights[0] == weights[1] != weights[2]


def test_config_path_and_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A config.json is accepted; small shards give an index that transformers follows."""
    from safetensors import safe_open
    from transformers import PaliGemmaForConditionalGeneration

    first = make_random_checkpoint("tiny-paligemma2-window", tmp_path / "first", progress=False)
    monkeypatch.setattr(checkpoint_module, "MAX_SHARD_BYTES", 200_000)
    second = make_random_checkpoint(first / "config.json", tmp_path / "second", progress=False)
    index = json.loads((second / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    model, info = PaliGemmaForConditionalGeneration.from_pretrained(
        second, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.text_config.sliding_window == 6
    # Same seed, same tensors, whatever the sharding.
    name = "model.language_model.layers.0.mlp.up_proj.weight"
    with safe_open(first / "model.safetensors", "pt") as f:
        expected = f.get_tensor(name)
    with safe_open(second / index["weight_map"][name], "pt") as f:
        assert torch.equal(f.get_tensor(name), expected)


def test_bfloat16_checkpoint(tmp_path: Path) -> None:
    """A config asking for bfloat16 gives bf16 weights that transformers loads."""
    from transformers import PaliGemmaForConditionalGeneration

    first = make_random_checkpoint("tiny-paligemma", tmp_path / "first", progress=False)
    config = json.loads((first / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (tmp_path / "bf16.json").write_text(json.dumps(config))
    second = make_random_checkpoint(tmp_path / "bf16.json", tmp_path / "second", progress=False)
    model = PaliGemmaForConditionalGeneration.from_pretrained(second, dtype="auto")
    assert model.model.language_model.embed_tokens.weight.dtype == torch.bfloat16


def test_real_preset_shapes() -> None:
    """The 3B preset has PaliGemma 2 3B-pt-224's shapes (counted without writing anything)."""
    from transformers import PaliGemmaConfig

    preset = PRESETS["paligemma2-3b-pt-224"]
    config = PaliGemmaConfig(**preset.config)
    specs = checkpoint_module._tensor_specs(config)
    params = sum(math.prod(shape) for _, shape in specs)
    assert 2.9e9 < params < 3.1e9
    shapes = dict(specs)
    assert shapes["model.language_model.embed_tokens.weight"] == (257216, 2304)
    assert config.vision_config.num_hidden_layers == 27
    assert config.text_config.num_hidden_layers == 26
    assert config.text_config.num_image_tokens == 256
    bench = checkpoint_module._tensor_specs(
        PaliGemmaConfig(**PRESETS["paligemma2-1b-bench"].config)
    )
    assert sum(math.prod(shape) for _, shape in bench) > 1e9


def test_progress_bar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No bar redraws into a captured (non-terminal) stderr, even with progress on; the terminal
    case is in tests/core/test_core_progress.py."""
    make_random_checkpoint("tiny-paligemma", tmp_path / "ck", progress=True)
    assert "\r" not in capsys.readouterr().err
    make_random_checkpoint("tiny-paligemma", tmp_path / "ck2", progress=False)
    assert capsys.readouterr().err == ""


def test_bad_preset(tmp_path: Path) -> None:
    with pytest.raises(
        SurgeryError, match=r"neither a preset nor a config\.json; presets: tiny-paligemma"
    ):
        make_random_checkpoint("no-such-preset", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_existing_output_refused(paligemma_checkpoint: Path) -> None:
    with pytest.raises(SurgeryError, match="already exists"):
        make_random_checkpoint("tiny-paligemma", paligemma_checkpoint, progress=False)
