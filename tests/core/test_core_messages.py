"""User-facing messages of the CLI (issue 9): each test pins the exact text and exit code.

User mistakes get one line and exit 1, never "internal error ... this is a bug". Missing optional
extras are simulated honestly: the CLI runs in a child process whose import system refuses the
module (a meta-path finder that raises ``ModuleNotFoundError``, as a missing package does);
nothing of ours is mocked.
"""

from __future__ import annotations

import json
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from surgery.cli import main

HUB_ID = "google/paligemma2-3b-pt-224"
HUB_HINT = (
    "it looks like a Hugging Face hub id, and surgery reads local folders only: download it "
    f"first (hf download {HUB_ID} --local-dir DIR) and pass DIR"
)

# Runs `surgery ARGS` with the modules named in argv[1] (comma-separated) made unimportable.
_BLOCKED_CLI = """
import sys
blocked = set(sys.argv[1].split(","))

class Blocker:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Blocker)
from surgery.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _run(*args: str | Path, blocked: str = "", cwd: Path | None = None) -> tuple[int, str, str]:
    command = [sys.executable, "-c", _BLOCKED_CLI, blocked, *map(str, args)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=cwd)
    return proc.returncode, proc.stdout, proc.stderr


def _error(capsys: pytest.CaptureFixture[str], *args: str | Path) -> str:
    """Run the CLI in process; assert exit 1 and one line on stderr; return the message."""
    assert main([str(a) for a in args]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0].removeprefix("surgery: error: ")


# --- item 5: user errors reported as bugs ---------------------------------------------------


@pytest.mark.parametrize(
    ("blocked", "args", "command", "module", "extra"),
    [
        ("torch", ("export", "ckpt", "-o", "m.onnx"), "export", "torch", "export"),
        ("transformers", ("export", "ckpt", "-o", "m.onnx"), "export", "transformers", "export"),
        ("torch", ("make-random", "tiny-paligemma2", "-o", "c"), "make-random", "torch", "export"),
        (
            "transformers",
            ("make-random", "tiny-paligemma2", "-o", "c"),
            "make-random",
            "transformers",
            "export",
        ),
        ("torch", ("verify", "out", "--checkpoint", "c"), "verify", "torch", "export"),
        ("netron", ("view", "m.onnx"), "view", "netron", "view"),
    ],
)
def test_missing_extra_names_it(
    tmp_path: Path, blocked: str, args: tuple[str, ...], command: str, module: str, extra: str
) -> None:
    code, out, err = _run(*args, blocked=blocked, cwd=tmp_path)
    assert (code, out, err) == (
        1,
        "",
        f"surgery: error: surgery {command} needs {module}, which is not installed; "
        f"install the '{extra}' extra: pip install 'onnx-surgery[{extra}]'\n",
    )
    assert list(tmp_path.iterdir()) == []


def test_view_port_in_use(model_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, out, err = _run("view", model_path, "--port", str(port))
    assert (code, out, err) == (
        1,
        "",
        f"surgery: error: --port {port}: cannot serve on 127.0.0.1:{port} (Address already in "
        "use); choose another port\n",
    )


@pytest.fixture
def checkpoint(paligemma2_checkpoint: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny PaliGemma 2 checkpoint, free to damage."""
    return Path(shutil.copytree(paligemma2_checkpoint, tmp_path / "ckpt"))


def _edit_config(folder: Path, **changes: object) -> Path:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for dotted, value in changes.items():
        section, _, key = dotted.rpartition("__")
        (config[section] if section else config)[key] = value
    path.write_text(json.dumps(config))
    return path


def test_verify_refuses_a_non_paligemma_checkpoint(
    capsys: pytest.CaptureFixture[str], checkpoint: Path, model_path: Path
) -> None:
    config = _edit_config(checkpoint, model_type="llama", architectures=["LlamaForCausalLM"])
    assert _error(capsys, "verify", model_path, "--checkpoint", checkpoint) == (
        f"{config}: architecture LlamaForCausalLM is not supported; supported: "
        "PaliGemmaForConditionalGeneration with a gemma or gemma2 text model"
    )


def test_verify_refuses_a_folder_with_only_config_json(
    capsys: pytest.CaptureFixture[str],
    paligemma2_checkpoint: Path,
    model_path: Path,
    tmp_path: Path,
) -> None:
    only = tmp_path / "only-config"
    only.mkdir()
    shutil.copy(paligemma2_checkpoint / "config.json", only)
    assert _error(capsys, "verify", model_path, "--checkpoint", only) == (
        f"{only}: no *.safetensors weights; give a Hugging Face checkpoint folder "
        "(config.json + model*.safetensors)"
    )


def test_verify_refuses_a_missing_shard(
    capsys: pytest.CaptureFixture[str], checkpoint: Path, model_path: Path
) -> None:
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    (checkpoint / "model.safetensors").rename(checkpoint / first)
    header_len = struct.unpack("<Q", (checkpoint / first).read_bytes()[:8])[0]
    header = json.loads((checkpoint / first).read_bytes()[8 : 8 + header_len])
    keys = [k for k in header if k != "__metadata__"]
    weight_map = {k: first for k in keys[:-1]} | {keys[-1]: second}  # second never downloaded
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert _error(capsys, "verify", model_path, "--checkpoint", checkpoint) == (
        f"{checkpoint / second}: listed in model.safetensors.index.json but missing; "
        "complete the download"
    )


def test_verify_refuses_a_truncated_shard(
    capsys: pytest.CaptureFixture[str], checkpoint: Path, model_path: Path
) -> None:
    weights = checkpoint / "model.safetensors"
    data = weights.read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + header_len])
    cut = len(data) // 2
    weights.write_bytes(data[:cut])
    first_cut = next(
        name
        for name, info in header.items()
        if name != "__metadata__" and 8 + header_len + info["data_offsets"][1] > cut
    )
    assert _error(capsys, "verify", model_path, "--checkpoint", checkpoint) == (
        f"{weights}: corrupt safetensors file ({first_cut!r} points outside the file or has the "
        "wrong size); re-download or regenerate the checkpoint"
    )


@pytest.mark.parametrize(
    ("change", "key", "shown"),
    [
        ({"text_config__num_attention_heads": 4.0}, "text_config.num_attention_heads", "4.0"),
        ({"text_config__hidden_size": "64"}, "text_config.hidden_size", "'64'"),
        ({"vision_config__patch_size": 0}, "vision_config.patch_size", "0"),
    ],
)
def test_export_refuses_malformed_config_values(
    capsys: pytest.CaptureFixture[str],
    checkpoint: Path,
    tmp_path: Path,
    change: dict[str, object],
    key: str,
    shown: str,
) -> None:
    config = _edit_config(checkpoint, **change)
    out = tmp_path / "model.onnx"
    assert _error(capsys, "export", checkpoint, "-o", out) == (
        f"{config}: {key}: expected a positive integer, got {shown}; fix it"
    )
    assert not out.exists()


# --- item 7: messages that mislead ------------------------------------------------------------


def test_verify_names_a_missing_target(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    target = tmp_path / "out"
    assert _error(capsys, "verify", target, "--checkpoint", tmp_path / "ckpt") == (
        f"{target}: does not exist; give a Transformers.js folder (surgery apply ... -o DIR) "
        "or an exported .onnx file"
    )


def test_view_on_a_folder_names_a_file_to_give(
    capsys: pytest.CaptureFixture[str], model_path: Path
) -> None:
    folder = model_path.parent
    assert _error(capsys, "view", folder) == (
        f"{folder}: is a folder; give one .onnx file, e.g. {model_path}"
    )


def test_hub_id_gets_a_download_hint(
    capsys: pytest.CaptureFixture[str],
    model_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    missing = f"{HUB_ID}: checkpoint folder does not exist; {HUB_HINT}"
    assert _error(capsys, "export", HUB_ID, "-o", "m.onnx") == missing
    assert _error(capsys, "verify", model_path, "--checkpoint", HUB_ID) == missing
    recipe = tmp_path / "tjs.yaml"
    recipe.write_text("layout: transformers.js\npasses: []\n")
    assert _error(
        capsys, "apply", recipe, model_path, "-o", "out", "-q", "--checkpoint", HUB_ID
    ) == missing.replace(": checkpoint", ": --checkpoint")
    assert _error(capsys, "make-random", HUB_ID, "-o", "c").endswith(
        f"neither a preset nor a config.json; presets: tiny-paligemma, tiny-paligemma2, "
        "tiny-paligemma2-64px, tiny-paligemma2-window, paligemma2-1b-bench, "
        f"paligemma2-3b-pt-224; {HUB_HINT}"
    )
    # A local-looking path gets no hint.
    assert _error(capsys, "export", "./nope", "-o", "m.onnx") == (
        "nope: checkpoint folder does not exist"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "tjs.yaml"]


def test_misspelt_recipe_name_suggests_the_nearest(capsys: pytest.CaptureFixture[str]) -> None:
    assert _error(capsys, "validate", "paligema2") == (
        "paligema2: no such recipe file; did you mean 'paligemma2'? "
        "shipped recipes: cleanup, export-post, paligemma2"
    )
    assert _error(capsys, "validate", "zzz") == (
        "zzz: no such recipe file; shipped recipes: cleanup, export-post, paligemma2"
    )


def test_bare_surgery_prints_help_and_exits_0() -> None:
    bare = subprocess.run([sys.executable, "-m", "surgery.cli"], capture_output=True, text=True)
    help_ = subprocess.run(
        [sys.executable, "-m", "surgery.cli", "--help"], capture_output=True, text=True
    )
    assert (bare.returncode, bare.stderr) == (0, "")
    assert bare.stdout == help_.stdout
    assert bare.stdout.startswith("usage: surgery ")


def test_export_names_a_missing_tensor_by_its_checkpoint_key(
    capsys: pytest.CaptureFixture[str], checkpoint: Path, tmp_path: Path
) -> None:
    from safetensors.numpy import load_file, save_file

    weights = checkpoint / "model.safetensors"
    tensors = load_file(weights)
    # The legacy layout of hub checkpoints: transformers renames these keys when loading.
    legacy = {
        k.replace("model.language_model.", "language_model.model.").replace(
            "model.vision_tower.", "vision_tower.vision_model."
        ): v
        for k, v in tensors.items()
    }
    gone = "language_model.model.layers.1.mlp.up_proj.weight"
    del legacy[gone]
    save_file(legacy, weights, metadata={"format": "pt"})
    out = tmp_path / "model.onnx"
    assert _error(capsys, "export", checkpoint, "-o", out, "-q") == (
        f"{checkpoint}: no safetensors file holds {gone!r} (searched model.safetensors); "
        "is it a complete PaliGemma checkpoint?"
    )
    assert not out.exists()


# --- item 8: `surgery passes` and `validate --print` ------------------------------------------


def test_passes_help_shows_factory_defaults_and_literal_values(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["passes", "rename-io"]) == 0
    out = capsys.readouterr().out
    assert "PydanticUndefined" not in out
    assert "  values (dict[str, str], default {})\n" in out
    assert "  scope ('io' | 'all', default 'io')\n" in out
    assert main(["passes", "fp16"]) == 0
    out = capsys.readouterr().out
    assert "PydanticUndefined" not in out
    assert (
        "  fp32_islands (list['rmsnorm' | 'softcap' | 'softmax'], "
        "default ['rmsnorm', 'softcap', 'softmax'])\n"
    ) in out
    assert "  node_block_list (list[str], default [])\n" in out


def test_validate_print_keeps_explicit_defaults_and_counts_in_words(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    written = "layout: plain\npasses:\n- pass: optimize\n  options:\n    iterations: 2\n    inline: true\n"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(written)
    assert main(["validate", "--print", str(recipe)]) == 0
    assert capsys.readouterr().out == f"{written}{recipe}: ok, 1 pass\n"
    recipe.write_text("passes: [remove-unused, topological-sort]\n")
    assert main(["validate", "--print", str(recipe)]) == 0
    assert capsys.readouterr().out == (
        f"layout: plain\npasses:\n- pass: remove-unused\n- pass: topological-sort\n"
        f"{recipe}: ok, 2 passes\n"
    )
