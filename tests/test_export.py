"""``surgery export``: parity with PyTorch, interface, portability and bad input.

The reference is ``PaliGemmaForConditionalGeneration`` (eager attention) fed exactly what
``PaliGemmaProcessor`` returns (``token_type_ids`` included) with the position ids ``generate``
computes; the ONNX graph is fed the way Transformers.js feeds a PaliGemma decoder: no
``token_type_ids``, 1-indexed ``position_ids``, a left-padded batch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from surgery.errors import SurgeryError

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

from surgery.export import (  # noqa: E402
    IMAGE_FEATURES,
    INPUTS_EMBEDS,
    LOGITS,
    TOKEN_EMBEDDINGS,
    export_checkpoint,
    input_names,
    output_names,
)

# Both sides compute in float32 on the same weights; only the order of floating-point operations
# differs (ONNX Runtime's MatMul blocking, Softmax and Tanh kernels vs PyTorch's). That gives
# relative errors around 1e-6 on values bounded by Gemma 2's softcaps (30 for logits) or, for
# keys and values, of order 1-10 on these tiny models, so 1e-4 absolute leaves about 10x headroom
# while any semantic slip (mask, window, position offset, scale, merge) moves values by 1e-2 or
# more.
ATOL = 1e-4

MODELS = ["paligemma", "paligemma2", "paligemma2_64px", "paligemma2_window"]
PROMPTS = ["caption en", "answer en what is in this picture, in detail?"]


def _images(size: int, count: int, seed: int = 0) -> list[Any]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)
    ]


def _generate_position_ids(attention_mask: Any) -> Any:
    """Position ids as ``generate`` builds them for PaliGemma: cumsum over the mask, 1-indexed."""
    return (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0) + 1


class _Case:
    """One tiny model: HF model, processor inputs, ONNX session."""

    def __init__(self, checkpoint: Path, onnx_path: Path) -> None:
        from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

        self.processor = AutoProcessor.from_pretrained(checkpoint)
        self.model = PaliGemmaForConditionalGeneration.from_pretrained(
            checkpoint, attn_implementation="eager"
        ).eval()
        text = self.model.config.text_config
        self.layers = text.num_hidden_layers
        self.kv_heads = text.num_key_value_heads
        self.head_dim = text.head_dim
        size = self.model.config.vision_config.image_size
        self.inputs = self.processor(
            images=_images(size, 2), text=PROMPTS, return_tensors="pt", padding="longest"
        )
        self.session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])

    def run(
        self, input_ids: Any, attention_mask: Any, position_ids: Any, past: list[Any]
    ) -> dict[str, Any]:
        feeds = {
            "input_ids": input_ids.numpy(),
            "pixel_values": self.inputs["pixel_values"].numpy(),
            "attention_mask": attention_mask.numpy(),
            "position_ids": position_ids.numpy(),
        }
        feeds.update(zip(input_names(self.layers)[4:], (p.numpy() for p in past), strict=True))
        names = output_names(self.layers)
        return dict(zip(names, self.session.run(names, feeds), strict=True))

    def empty_past(self) -> list[Any]:
        batch = self.inputs["input_ids"].shape[0]
        return [torch.zeros(batch, self.kv_heads, 0, self.head_dim)] * (2 * self.layers)


@pytest.fixture(scope="module", params=MODELS)
def case(request: pytest.FixtureRequest) -> _Case:
    return _Case(
        request.getfixturevalue(f"{request.param}_checkpoint"),
        request.getfixturevalue(f"{request.param}_onnx"),
    )


def _max_diff(actual: Any, expected: Any) -> float:
    return float(np.max(np.abs(np.asarray(actual) - expected.detach().numpy())))


def _presents(cache: Any, layers: int) -> list[Any]:
    return [t for i in range(layers) for t in (cache.layers[i].keys, cache.layers[i].values)]


def _hf_prefill(case: _Case) -> tuple[Any, Any]:
    from transformers import DynamicCache

    inputs = case.inputs
    position_ids = _generate_position_ids(inputs["attention_mask"])
    with torch.no_grad():
        # A config-less DynamicCache keeps every layer's whole past, as the graph does; HF
        # applies the sliding window through the mask either way.
        out = case.model(**inputs, position_ids=position_ids, cache=DynamicCache(), use_cache=True)
    return out, position_ids


def test_prefill_parity(case: _Case) -> None:
    """(a) prefill with an image, padded batch of 2: logits, presents and boundary values."""
    inputs = case.inputs
    assert bool((inputs["attention_mask"] == 0).any()), "the batch must be left-padded"
    ref, position_ids = _hf_prefill(case)
    got = case.run(inputs["input_ids"], inputs["attention_mask"], position_ids, case.empty_past())

    assert _max_diff(got[LOGITS], ref.logits) <= ATOL
    names = output_names(case.layers)[1 : 1 + 2 * case.layers]
    for name, expected in zip(names, _presents(ref.cache, case.layers), strict=True):
        assert _max_diff(got[name], expected) <= ATOL, name

    paligemma = case.model.model
    with torch.no_grad():
        features = paligemma.get_image_features(inputs["pixel_values"]).pooler_output
        embeddings = paligemma.get_input_embeddings()(inputs["input_ids"])
        is_image = inputs["input_ids"] == case.model.config.image_token_id
        merged = embeddings.masked_scatter(is_image[..., None], features)
    assert _max_diff(got[IMAGE_FEATURES], features) <= ATOL
    assert _max_diff(got[TOKEN_EMBEDDINGS], embeddings) <= ATOL
    assert _max_diff(got[INPUTS_EMBEDS], merged) <= ATOL


def test_decode_parity(case: _Case) -> None:
    """(b) a decode step with a non-empty past: logits and presents."""
    ref, position_ids = _hf_prefill(case)
    past = [t.clone() for t in _presents(ref.cache, case.layers)]
    next_ids = ref.logits[:, -1:].argmax(-1)
    mask = torch.cat([case.inputs["attention_mask"], torch.ones_like(next_ids)], dim=-1)
    next_positions = position_ids[:, -1:] + 1
    with torch.no_grad():
        ref2 = case.model(
            input_ids=next_ids,
            attention_mask=mask,
            position_ids=next_positions,
            token_type_ids=torch.ones_like(next_ids),
            cache=ref.cache,
            use_cache=True,
        )
    got = case.run(next_ids, mask, next_positions, past)
    assert _max_diff(got[LOGITS], ref2.logits) <= ATOL
    names = output_names(case.layers)[1 : 1 + 2 * case.layers]
    for name, expected in zip(names, _presents(ref2.cache, case.layers), strict=True):
        assert got[name].shape[2] == past[0].shape[2] + 1
        assert _max_diff(got[name], expected) <= ATOL, name


def test_greedy_matches_generate(case: _Case) -> None:
    """The graph driven like Transformers.js gives generate()'s tokens and per-step logits."""
    steps = 5
    with torch.no_grad():
        ref = case.model.generate(
            **case.inputs,
            max_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    ids, mask = case.inputs["input_ids"], case.inputs["attention_mask"]
    positions = _generate_position_ids(mask)
    past = case.empty_past()
    tokens = []
    for step in range(steps):
        got = case.run(ids, mask, positions, past)
        logits = got[LOGITS][:, -1]
        assert float(np.max(np.abs(logits - ref.logits[step].numpy()))) <= ATOL, step
        ids = torch.from_numpy(logits.argmax(-1)[:, None])
        tokens.append(ids)
        past = [
            torch.from_numpy(got[n]) for n in output_names(case.layers)[1 : 1 + 2 * case.layers]
        ]
        mask = torch.cat([mask, torch.ones_like(ids)], dim=-1)
        positions = positions[:, -1:] + 1
    prompt_length = case.inputs["input_ids"].shape[1]
    assert torch.equal(torch.cat(tokens, dim=-1), ref.sequences[:, prompt_length:])


def test_interface(paligemma2_onnx: Path) -> None:
    """Names, dynamic axes and static kv shapes; no small tensor stored externally."""
    import onnx

    proto = onnx.load(str(paligemma2_onnx), load_external_data=False)
    layers = sum(1 for i in proto.graph.input if i.name.startswith("past_key_values.")) // 2
    assert [i.name for i in proto.graph.input] == input_names(layers)
    assert [o.name for o in proto.graph.output] == output_names(layers)

    def dims(value: Any) -> list[Any]:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    values = {v.name: v for v in [*proto.graph.input, *proto.graph.output]}
    assert dims(values["input_ids"]) == ["batch_size", "sequence_length"]
    assert dims(values["attention_mask"]) == ["batch_size", "total_sequence_length"]
    assert dims(values["position_ids"]) == ["batch_size", "sequence_length"]
    assert dims(values["pixel_values"]) == ["batch_size", 3, 32, 32]
    assert dims(values["past_key_values.0.key"]) == ["batch_size", 2, "past_sequence_length", 16]
    assert dims(values["present.0.value"]) == ["batch_size", 2, "total_sequence_length", 16]
    assert dims(values["logits"])[:2] == ["batch_size", "sequence_length"]
    assert dims(values[IMAGE_FEATURES]) == ["batch_size", 16, 64]
    assert dims(values[INPUTS_EMBEDS]) == ["batch_size", "sequence_length", 64]

    for tensor in proto.graph.initializer:
        stored = {e.key: e.value for e in tensor.external_data}
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            assert stored["location"] == "model.onnx.data"
            assert int(stored["length"]) > 1024, tensor.name
    onnx.checker.check_model(str(paligemma2_onnx))


def test_loads_from_another_directory(
    paligemma2_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """External data is found relative to the model file, not the working directory."""
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for name in ("model.onnx", "model.onnx.data"):
        shutil.copy(paligemma2_onnx.parent / name, moved / name)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    session = ort.InferenceSession(str(moved / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_outputs()[0].name == "logits"


def test_existing_output_refused(paligemma2_checkpoint: Path, paligemma2_onnx: Path) -> None:
    before = paligemma2_onnx.stat().st_mtime_ns
    with pytest.raises(SurgeryError, match="already exists"):
        export_checkpoint(paligemma2_checkpoint, paligemma2_onnx, progress=False)
    assert paligemma2_onnx.stat().st_mtime_ns == before


def test_post_processing_is_instrumented(
    paligemma2_checkpoint: Path,
    paligemma2_onnx: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The export's own passes run as a recipe: --time-passes and --dump-dir see each of them,
    and instrumenting them changes nothing in what is written."""
    from surgery.cli import main

    out = tmp_path / "model.onnx"
    dumps = tmp_path / "dumps"
    args = ["export", str(paligemma2_checkpoint), "-o", str(out), "--quiet"]
    assert main([*args, "--time-passes", "--dump-dir", str(dumps)]) == 0
    rows = [line.split()[:2] for line in capsys.readouterr().err.splitlines()]
    assert ["fold-transposes", "model"] in rows
    assert ["optimize", "model"] in rows
    assert sorted(p.name for p in dumps.iterdir()) == [
        "00-input",
        "01-fold-transposes",
        "02-optimize",
    ]
    assert (dumps / "02-optimize" / "model.onnx").is_file()
    assert out.read_bytes() == paligemma2_onnx.read_bytes()
    assert (tmp_path / "model.onnx.data").read_bytes() == (
        paligemma2_onnx.parent / "model.onnx.data"
    ).read_bytes()


# --- bad input: one clear line, exit 1, nothing written ---------------------------------------


def _unsupported(tmp_path: Path) -> Path:
    folder = tmp_path / "llama"
    folder.mkdir()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _no_config(tmp_path: Path) -> Path:
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


def _corrupt_copy(checkpoint: Path, tmp_path: Path, damage: str) -> Path:
    folder = tmp_path / f"corrupt-{damage}"
    shutil.copytree(checkpoint, folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    if damage == "header":
        weights.write_bytes(b"\xff" * 8 + data[8:])
    else:  # truncated tensor data
        weights.write_bytes(data[: len(data) // 2])
    return folder


BAD_INPUTS = {
    "missing folder": (lambda tmp, ck: tmp / "does-not-exist", "checkpoint folder does not exist"),
    "no config.json": (lambda tmp, ck: _no_config(tmp), "no config.json"),
    "unsupported architecture": (
        lambda tmp, ck: _unsupported(tmp),
        "architecture LlamaForCausalLM is not supported; supported: PaliGemmaForConditionalGeneration",
    ),
    "corrupt safetensors header": (
        lambda tmp, ck: _corrupt_copy(ck, tmp, "header"),
        "corrupt safetensors file",
    ),
    "truncated safetensors": (
        lambda tmp, ck: _corrupt_copy(ck, tmp, "truncated"),
        "corrupt safetensors file",
    ),
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_raises(kind: str, paligemma2_checkpoint: Path, tmp_path: Path) -> None:
    make, message = BAD_INPUTS[kind]
    checkpoint = make(tmp_path, paligemma2_checkpoint)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(SurgeryError, match=re.escape(message)) as info:
        export_checkpoint(checkpoint, out_dir / "model.onnx", progress=False)
    assert "\n" not in str(info.value)
    assert str(checkpoint) in str(info.value)
    assert os.listdir(out_dir) == []


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_cli(
    kind: str, paligemma2_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from surgery.cli import main

    make, message = BAD_INPUTS[kind]
    checkpoint = make(tmp_path, paligemma2_checkpoint)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code = main(["export", str(checkpoint), "-o", str(out_dir / "model.onnx"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert len(err.strip().splitlines()) == 1, err
    assert message in err
    assert os.listdir(out_dir) == []


def test_bfloat16_checkpoint(paligemma2_checkpoint: Path, tmp_path: Path) -> None:
    """bf16 weights are cast to float32 while written; the graph matches HF upcast to float32."""
    from transformers import PaliGemmaForConditionalGeneration

    from surgery.checkpoint import make_random_checkpoint

    config = json.loads((paligemma2_checkpoint / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps(config))
    checkpoint = make_random_checkpoint(tmp_path / "config.json", tmp_path / "bf16", progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        shutil.copy(paligemma2_checkpoint / name, checkpoint / name)
    onnx_path = export_checkpoint(checkpoint, tmp_path / "model.onnx", progress=False)

    case = _Case(checkpoint, onnx_path)
    case.model = PaliGemmaForConditionalGeneration.from_pretrained(
        checkpoint, attn_implementation="eager", dtype=torch.float32
    ).eval()
    ref, position_ids = _hf_prefill(case)
    got = case.run(
        case.inputs["input_ids"], case.inputs["attention_mask"], position_ids, case.empty_past()
    )
    assert _max_diff(got[LOGITS], ref.logits) <= ATOL
