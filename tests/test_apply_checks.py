"""``surgery apply`` checks what it can before the first pass, and finds checkpoints wherever saved.

* Every mistake checkable from names, files and configs (the layout's checkpoint and its files,
  the output location, the dump folder) is refused before any pass runs: the only line on
  stderr is the error, so no pass's progress line (``[1/N] ...``) was printed.
* A checkpoint saved by the installed transformers' ``PaliGemmaProcessor.save_pretrained``
  (transformers 5: ``processor_config.json`` only) goes through export, apply and verify.
* An export folder holding its checkpoint can be moved: the checkpoint is recorded relative to
  the model's folder.
* Nothing on the ``apply`` path imports torch or transformers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from surgery.cli import main
from surgery.synthetic import write_synthetic_model

REPO = Path(__file__).resolve().parents[1]


def _refusal(capsys: pytest.CaptureFixture[str], *args: str | Path) -> str:
    """Run ``surgery apply ARGS`` (progress on); return its one stderr line, after exit 1."""
    code = main(["apply", *map(str, args)])
    err = capsys.readouterr().err
    assert code == 1, err
    lines = err.splitlines()
    assert len(lines) == 1, err  # the error alone: no pass started ("[1/N] split on model")
    assert lines[0].startswith("surgery: error: ")
    return lines[0].removeprefix("surgery: error: ")


@pytest.fixture
def synthetic(tmp_path: Path) -> Path:
    """A model that records no checkpoint (any size fails the same way: nothing is read)."""
    (tmp_path / "model").mkdir()
    return write_synthetic_model(tmp_path / "model" / "m.onnx")


def _checkpoint_folder(tmp_path: Path, without: str = "") -> Path:
    """A checkpoint folder with every file the transformers.js layout reads, but ``without``."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    files = {
        "config.json": {"model_type": "paligemma"},
        "processor_config.json": {"image_processor": {"image_processor_type": "X"}},
        "tokenizer.json": {},
        "tokenizer_config.json": {},
    }
    for name, content in files.items():
        if name != without:
            (folder / name).write_text(json.dumps(content))
    return folder


def test_layout_without_a_checkpoint_fails_before_the_first_pass(
    synthetic: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    message = _refusal(capsys, "paligemma2", synthetic, "-o", tmp_path / "out")
    assert message == (
        "transformers.js layout: the models do not say which checkpoint they came from; "
        "pass --checkpoint DIR (the Hugging Face folder)"
    )
    assert not (tmp_path / "out").exists()


def test_recorded_absolute_checkpoint_that_is_gone_fails_before_the_first_pass(
    synthetic: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from surgery.io import load_model
    from surgery.writer import save_model

    model = load_model(synthetic)
    gone = tmp_path / "gone" / "checkpoint"
    model.metadata_props["onnx_surgery.checkpoint"] = str(gone)
    save_model(model, tmp_path / "recorded.onnx")
    got = _refusal(capsys, "paligemma2", tmp_path / "recorded.onnx", "-o", tmp_path / "out")
    assert got == (
        f"transformers.js layout: the model records its checkpoint folder as '{gone}', which "
        "does not exist; pass --checkpoint DIR (the Hugging Face folder the model was exported "
        "from)"
    )


@pytest.mark.parametrize(
    ("without", "message"),
    [
        ("folder", "{ckpt}: --checkpoint folder does not exist; give the Hugging Face checkpoint "
         "folder the model was exported from"),
        ("config.json", "{ckpt}: no config.json in the checkpoint folder the transformers.js "
         "layout needs; pass --checkpoint DIR"),
        ("processor_config.json", "{ckpt}: no preprocessor_config.json or processor_config.json; "
         "the checkpoint folder is incomplete (save the processor there with its save_pretrained)"),
        ("tokenizer.json", "{ckpt}: no tokenizer.json; Transformers.js needs it (save a fast "
         "tokenizer there with its save_pretrained)"),
        ("tokenizer_config.json", "{ckpt}: no tokenizer_config.json; Transformers.js needs it "
         "(save a fast tokenizer there with its save_pretrained)"),
    ],
)  # fmt: skip
def test_checkpoint_missing_what_the_layout_needs_fails_before_the_first_pass(
    synthetic: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    without: str,
    message: str,
) -> None:
    ckpt = tmp_path / "nowhere" if without == "folder" else _checkpoint_folder(tmp_path, without)
    got = _refusal(capsys, "paligemma2", synthetic, "-o", tmp_path / "out", "--checkpoint", ckpt)
    assert got == message.format(ckpt=ckpt)


def test_malformed_checkpoint_config_fails_before_the_first_pass(
    synthetic: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = _checkpoint_folder(tmp_path)
    (ckpt / "config.json").write_text(json.dumps({"model_type": "paligemma", "text_config": 3}))
    got = _refusal(capsys, "paligemma2", synthetic, "-o", tmp_path / "out", "--checkpoint", ckpt)
    assert (
        got == f"{ckpt / 'config.json'}: text_config must be a JSON object, got 3; fix the config"
    )


def test_existing_output_fails_before_the_first_pass(
    synthetic: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "out").mkdir()
    got = _refusal(capsys, "cleanup", synthetic, "-o", tmp_path / "out")
    assert got == f"{tmp_path / 'out'}: output already exists; pass --force to replace it"


def test_dump_dir_that_is_a_file_fails_before_the_first_pass(
    synthetic: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dumps = tmp_path / "dumps"
    dumps.write_text("not a folder")
    got = _refusal(capsys, "cleanup", synthetic, "-o", tmp_path / "out", "--dump-dir", dumps)
    assert got == f"{dumps}: --dump-dir is a file, not a folder; give a folder"
    nested = dumps / "run1"
    got = _refusal(capsys, "cleanup", synthetic, "-o", tmp_path / "out", "--dump-dir", nested)
    assert got == f"{nested}: cannot create --dump-dir: {dumps} is a file, not a folder"


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere"
)
def test_dump_dir_that_cannot_be_created_fails_before_the_first_pass(
    synthetic: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        dumps = locked / "dumps"
        got = _refusal(capsys, "cleanup", synthetic, "-o", tmp_path / "out", "--dump-dir", dumps)
        assert got == f"{dumps}: cannot write --dump-dir: {locked} is not writable"
    finally:
        locked.chmod(0o700)


def _resaved_checkpoint(source: Path, dest: Path) -> Path:
    """``source`` with its processor saved again by the installed transformers."""
    from transformers import AutoProcessor

    shutil.copytree(source, dest)
    for name in ("preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"):
        (dest / name).unlink()
    AutoProcessor.from_pretrained(source).save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def moved_export(paligemma2_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``model.onnx`` exported beside its ``checkpoint/`` (processor saved by the installed
    transformers), then the folder renamed."""
    from surgery.export import export_checkpoint

    first = tmp_path_factory.mktemp("export") / "first"
    first.mkdir()
    checkpoint = _resaved_checkpoint(paligemma2_checkpoint, first / "checkpoint")
    export_checkpoint(checkpoint, first / "model.onnx", progress=False)
    moved = first.parent / "moved"
    first.rename(moved)
    return moved


def test_checkpoint_saved_by_installed_transformers_exports_applies_and_verifies(
    moved_export: Path,
    paligemma2_checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import transformers

    checkpoint = moved_export / "checkpoint"
    if int(transformers.__version__.split(".")[0]) >= 5:  # what 4.x writes is the hub's layout
        assert (checkpoint / "processor_config.json").is_file()
        assert not (checkpoint / "preprocessor_config.json").exists()
    out = tmp_path / "out"
    argv = ["apply", "paligemma2", str(moved_export / "model.onnx"), "-o", str(out), "-q"]
    assert main([*argv, "--checkpoint", str(checkpoint)]) == 0
    written = json.loads((out / "preprocessor_config.json").read_text())
    original = json.loads((paligemma2_checkpoint / "preprocessor_config.json").read_text())
    assert written == original  # the same settings, image_seq_length and processor_class included
    capsys.readouterr()
    assert main(["verify", str(out), "--checkpoint", str(checkpoint)]) == 0
    assert capsys.readouterr().out.count("identical: 20 tokens per row") == 2


def test_moved_export_folder_finds_its_checkpoint(
    moved_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert (
        main(["apply", "paligemma2", str(moved_export / "model.onnx"), "-o", str(out), "-q"]) == 0
    )
    checkpoint = moved_export / "checkpoint"
    assert (out / "tokenizer.json").read_bytes() == (checkpoint / "tokenizer.json").read_bytes()
    # The model alone, away from its checkpoint: the message names what it recorded.
    alone = tmp_path / "alone"
    alone.mkdir()
    for name in ("model.onnx", "model.onnx.data"):
        shutil.copyfile(moved_export / name, alone / name)
    got = _refusal(capsys, "paligemma2", alone / "model.onnx", "-o", tmp_path / "out2")
    assert got == (
        "transformers.js layout: the model records its checkpoint folder as 'checkpoint' "
        f"(resolved to {alone / 'checkpoint'}), which does not exist; pass --checkpoint DIR "
        "(the Hugging Face folder the model was exported from)"
    )


def test_apply_imports_neither_torch_nor_transformers(
    paligemma2_onnx: Path, tmp_path: Path
) -> None:
    child = (
        "import sys\n"
        "from surgery.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "print('heavy:', sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers'}))\n"
        "sys.exit(code)\n"
    )
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            child,
            "apply",
            "paligemma2",
            str(paligemma2_onnx),
            "-o",
            str(out),
            "-q",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "heavy: []" in proc.stdout, proc.stdout
    assert (out / "config.json").is_file()
