"""The flagship recipe end to end: exported PaliGemma → Transformers.js folder → same tokens as PyTorch.

Every tiny model of the export fixtures goes through ``surgery apply paligemma2``; the result must
follow the Transformers.js contract, pass the ONNX checker by path, and generate, driven the way
Transformers.js drives it, exactly the greedy tokens of ``generate(**processor_outputs)``: batch 1
and a left-padded batch of 2, 20 new tokens, fp32 files. The fp16 files are judged teacher-forced
along PyTorch's path (every differing top-1 a near-tie, logits close; ``surgery.verify.near_ties``):
random tiny weights make near-ties that fp16 rounding legitimately flips. The real client
(Transformers.js under Node) runs one model too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from _js_client import image_at_processor_size, node_generate, require_transformers_js

from surgery.cli import main
from surgery.recipe import find_recipe
from surgery.verify import processor_inputs, torch_greedy, verify

MODELS = ["paligemma", "paligemma2", "paligemma2_64px", "paligemma2_window"]
PARTS = ["vision_encoder", "embed_tokens", "decoder_model_merged"]
SUFFIXES = ["", "_fp16"]  # fp32: PyTorch's tokens exactly; fp16: its tokens or near-ties of them
#: Every dtype the recipe writes: Transformers.js's defaults (fp32, fp16, q8 on wasm, q4f16).
DTYPE_SUFFIXES = [*SUFFIXES, "_quantized", "_q4f16"]


def _apply(model: Path, out: Path, *extra: str, recipe: str | Path = "paligemma2") -> Path:
    assert main(["apply", str(recipe), str(model), "-o", str(out), "-q", *extra]) == 0
    return out


@pytest.fixture(scope="module", params=MODELS)
def applied(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """(Transformers.js folder, checkpoint) for one tiny model."""
    model = request.getfixturevalue(f"{request.param}_onnx")
    checkpoint = request.getfixturevalue(f"{request.param}_checkpoint")
    return _apply(model, tmp_path_factory.mktemp(request.param) / "out"), checkpoint


def _dims(value: onnx.ValueInfoProto) -> list[str | int]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_layout_follows_the_transformersjs_contract(applied: tuple[Path, Path]) -> None:
    out, checkpoint = applied
    config = json.loads((out / "config.json").read_text())
    text = config["text_config"]
    assert config["model_type"] == "paligemma"
    assert isinstance(config["image_token_index"], int)
    for key in ("head_dim", "num_key_value_heads", "num_hidden_layers"):
        assert isinstance(text[key], int), key
    chunks = config["transformers.js_config"]["use_external_data_format"]
    for part in PARTS:
        for suffix in DTYPE_SUFFIXES:
            name = f"{part}{suffix}.onnx"
            assert (out / "onnx" / name).is_file()
            on_disk = sorted(p.name for p in (out / "onnx").glob(f"{name}_data*"))
            expected = [f"{name}_data"] + [
                f"{name}_data_{i}" for i in range(1, chunks.get(name, 0))
            ]
            assert on_disk == (expected if chunks.get(name) else []), name
    preprocessor = json.loads((out / "preprocessor_config.json").read_text())
    vision = config["vision_config"]
    assert preprocessor["image_seq_length"] == (vision["image_size"] // vision["patch_size"]) ** 2
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).is_file(), name
    assert (out / "tokenizer.json").read_bytes() == (checkpoint / "tokenizer.json").read_bytes()

    kv, head_dim, hidden = text["num_key_value_heads"], text["head_dim"], text["hidden_size"]
    for suffix in DTYPE_SUFFIXES:
        decoder = onnx.load(
            out / "onnx" / f"decoder_model_merged{suffix}.onnx", load_external_data=False
        )
        inputs = {i.name: i for i in decoder.graph.input}
        outputs = {o.name: o for o in decoder.graph.output}
        layers = text["num_hidden_layers"]
        cache = [f"{i}.{k}" for i in range(layers) for k in ("key", "value")]
        assert list(inputs) == ["inputs_embeds", "attention_mask", "position_ids"] + [
            f"past_key_values.{c}" for c in cache
        ] + ["num_logits_to_keep"]
        keep = inputs["num_logits_to_keep"].type.tensor_type
        assert (
            keep.elem_type == onnx.TensorProto.INT64 and _dims(inputs["num_logits_to_keep"]) == []
        )
        assert list(outputs) == ["logits"] + [f"present.{c}" for c in cache]
        assert _dims(inputs["inputs_embeds"]) == ["batch_size", "sequence_length", hidden]
        assert _dims(inputs["attention_mask"]) == ["batch_size", "total_sequence_length"]
        assert _dims(inputs["position_ids"]) == ["batch_size", "sequence_length"]
        assert _dims(inputs["past_key_values.0.key"]) == [
            "batch_size",
            kv,
            "past_sequence_length",
            head_dim,
        ]
        assert _dims(outputs["present.0.value"]) == [
            "batch_size",
            kv,
            "total_sequence_length",
            head_dim,
        ]
        float32 = onnx.TensorProto.FLOAT
        assert inputs["past_key_values.0.key"].type.tensor_type.elem_type == float32
        assert outputs["logits"].type.tensor_type.elem_type == float32
        embed = onnx.load(out / "onnx" / f"embed_tokens{suffix}.onnx", load_external_data=False)
        assert [i.name for i in embed.graph.input] == ["input_ids"]
        assert [o.name for o in embed.graph.output] == ["inputs_embeds"]
        vision_model = onnx.load(
            out / "onnx" / f"vision_encoder{suffix}.onnx", load_external_data=False
        )
        assert [i.name for i in vision_model.graph.input] == ["pixel_values"]
        assert [o.name for o in vision_model.graph.output] == ["image_features"]


def test_every_part_passes_the_checker_by_path_and_loads(applied: tuple[Path, Path]) -> None:
    out, _ = applied
    files = sorted((out / "onnx").glob("*.onnx"))
    assert len(files) == len(PARTS) * len(DTYPE_SUFFIXES)
    for path in files:
        onnx.checker.check_model(str(path), full_check=True)
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_greedy_tokens_match_pytorch(applied: tuple[Path, Path], suffix: str) -> None:
    out, checkpoint = applied
    ok, report = verify(out, checkpoint, max_new_tokens=20, suffix=suffix)
    print(report)
    assert ok, report
    if suffix == "_fp16":  # teacher-forced: near-ties flip under fp16 rounding (surgery.verify)
        assert report.count("teacher-forced along PyTorch's greedy path") == 2, report
    else:
        assert report.count("identical: 20 tokens per row") == 2, report  # batch 1, padded 2


def test_dump_dir_has_one_openable_folder_per_pass(paligemma2_onnx: Path, tmp_path: Path) -> None:
    dumps = tmp_path / "dumps"
    _apply(paligemma2_onnx, tmp_path / "out", "--dump-dir", str(dumps))
    steps = len(yaml.safe_load(find_recipe("paligemma2").read_text())["passes"])
    folders = sorted(p.name for p in dumps.iterdir())
    assert folders[0] == "00-input" and len(folders) == steps + 1
    assert folders[1] == "01-split"
    for part in PARTS:
        graph_only = onnx.load(dumps / "01-split" / f"{part}.onnx", load_external_data=False)
        assert graph_only.ByteSize() < 2_000_000, "graph files stay small: weights are external"
        ort.InferenceSession(
            str(dumps / "01-split" / f"{part}.onnx"), providers=["CPUExecutionProvider"]
        )
    assert (dumps / folders[-1] / "decoder_model_merged_fp16.onnx").is_file()


def _small_chunk_recipe(tmp_path: Path, limit: int) -> Path:
    """The flagship recipe with a small chunk limit: split-large-tensors reads it from the layout."""
    recipe = yaml.safe_load(find_recipe("paligemma2").read_text())
    recipe["layout"] = {"name": "transformers.js", "max_chunk_bytes": limit}
    path = tmp_path / "small-chunks.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_small_chunks_stay_under_the_limit_and_keep_parity(
    paligemma2_onnx: Path, paligemma2_checkpoint: Path, tmp_path: Path
) -> None:
    limit = 150_000  # below the tied 1600 x 64 fp32 embedding (409,600 bytes): it is split too
    out = _apply(paligemma2_onnx, tmp_path / "out", recipe=_small_chunk_recipe(tmp_path, limit))
    chunks = json.loads((out / "config.json").read_text())["transformers.js_config"][
        "use_external_data_format"
    ]
    assert chunks["decoder_model_merged.onnx"] >= 2
    assert chunks["embed_tokens.onnx"] >= 2, "the embedding table was split into blocks"
    for data in (out / "onnx").glob("*.onnx_data*"):
        assert data.stat().st_size <= limit, data.name
    ok, report = verify(out, paligemma2_checkpoint, max_new_tokens=20)
    assert ok, report


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_transformersjs_in_node_generates_the_same_tokens(
    paligemma2_onnx: Path, paligemma2_checkpoint: Path, tmp_path: Path, dtype: str
) -> None:
    require_transformers_js()
    # Chunked weights too: the client must find and load every chunk.
    out = _apply(paligemma2_onnx, tmp_path / "out", recipe=_small_chunk_recipe(tmp_path, 150_000))
    image = image_at_processor_size(out, tmp_path)
    prompt, steps = "caption en", 20
    got = node_generate(out, image, prompt, steps, dtype)
    inputs = processor_inputs(paligemma2_checkpoint, [prompt], [image])
    np.testing.assert_array_equal(np.asarray(got["input_ids"]), inputs["input_ids"])
    reference = torch_greedy(paligemma2_checkpoint, inputs, steps)
    prompt_length = inputs["input_ids"].shape[1]
    new_tokens = np.asarray(got["sequences"])[:, prompt_length:]
    np.testing.assert_array_equal(new_tokens, reference.tokens)
