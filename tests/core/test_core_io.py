"""Loading and saving bundles: byte-identical round trips, atomic outputs, refused bad input."""

from __future__ import annotations

import builtins
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from _util import file_digests, run_onnx

from passes import RemoveUnused, TopologicalSort
from surgery import PassManager, SurgeryError, load, save
from surgery.cli import main


def _tensors(path: Path) -> dict[str, bytes]:
    model = onnx.load(path)  # reads external data with onnx's own loader, independently of ours
    return {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}


def test_noop_round_trip_keeps_every_tensor_byte_identical(
    model_path: Path, tmp_path: Path
) -> None:
    bundle = load(model_path)
    weight = bundle["m"].graph.initializers["layer0.weight"].const_value
    assert isinstance(weight, ir.ExternalTensor), "weights must stay on disk after load"
    assert PassManager([]).run(bundle) is False
    save(bundle, tmp_path / "out", progress=False)
    before, after = _tensors(model_path), _tensors(tmp_path / "out" / "m.onnx")
    assert before.keys() == after.keys()
    assert all(before[name] == after[name] for name in before)
    assert (tmp_path / "out" / "m.onnx.data").stat().st_size >= 3 * 32 * 32 * 4


def test_cleanup_round_trip_keeps_outputs(model_path: Path, tmp_path: Path) -> None:
    bundle = load(model_path)
    assert PassManager([RemoveUnused(), TopologicalSort()]).run(bundle) is True
    save(bundle, tmp_path / "out", progress=False)
    # Same inputs, same outputs: the cleanup only removed a dead branch; bitwise equality
    # holds because the surviving nodes and weights are untouched.
    np.testing.assert_array_equal(run_onnx(model_path), run_onnx(tmp_path / "out" / "m.onnx"))


def test_loads_from_another_working_directory(
    model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    bundle = load(Path("model") / "m.onnx")
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    save(bundle, tmp_path / "out", progress=False)
    assert _tensors(tmp_path / "out" / "m.onnx") == _tensors(model_path)


def test_existing_output_is_refused_without_force(
    model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["apply", "cleanup", str(model_path), "-o", str(out), "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"surgery: error: {out}: output already exists; pass --force to replace it"
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["apply", "cleanup", str(model_path), "-o", str(out), "-q", "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["m.onnx", "m.onnx.data"]


def test_failing_pass_leaves_no_output_and_inputs_untouched(
    model_path: Path, tmp_path: Path
) -> None:
    digests = file_digests(model_path.parent)
    bundle = load(model_path)

    class Boom(RemoveUnused):
        def call(self, model: ir.Model) -> ir.passes.PassResult:
            raise RuntimeError("boom")

    with pytest.raises(Exception, match="boom"):
        PassManager([RemoveUnused(), Boom()]).run(bundle)
    out = tmp_path / "out"

    def fail_midway(tensor: ir.TensorProtocol) -> None:
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C while weights were written

    bundle = load(model_path)
    with pytest.raises(KeyboardInterrupt):
        from surgery.atomic import atomic_dir
        from surgery.writer import save_model

        with atomic_dir(out) as tmp:
            save_model(bundle["m"], tmp / "m.onnx", progress=fail_midway)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "no temporary folder left"
    assert file_digests(model_path.parent) == digests


def _cli_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = main(args)
    err = capsys.readouterr().err
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got: {err}"
    assert "Traceback" not in err
    return lines[0]


def _set_location(model_file: Path, location: str) -> None:
    proto = onnx.load(model_file, load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(proto, model_file)


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _cli_error(["inspect", str(tmp_path / "nope.onnx")], capsys)
    assert line == f"surgery: error: {tmp_path / 'nope.onnx'}: no such file"


def test_not_onnx(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "notes.onnx"
    path.write_text("these are my notes, not a model\n")
    line = _cli_error(["inspect", str(path)], capsys)
    assert line.startswith(f"surgery: error: {path}: not ")


def test_truncated_protobuf(model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = model_path.read_bytes()
    model_path.write_bytes(data[: len(data) // 2])
    line = _cli_error(["inspect", str(model_path)], capsys)
    assert line.startswith(
        f"surgery: error: {model_path}: not a readable ONNX model (corrupt or truncated"
    )


def test_missing_external_data(model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (model_path.parent / "m.onnx.data").unlink()
    line = _cli_error(["inspect", str(model_path)], capsys)
    assert line == (
        f"surgery: error: {model_path}: initializer 'layer0.weight' needs external data file "
        f"'m.onnx.data', which does not exist in {model_path.parent.resolve()}; copy it beside the model"
    )


def test_short_external_data(model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = model_path.parent / "m.onnx.data"
    size = data.stat().st_size
    os.truncate(data, size - 10)
    line = _cli_error(
        ["apply", "cleanup", str(model_path), "-o", str(model_path.parent / "out")], capsys
    )
    assert line == (
        f"surgery: error: {model_path}: initializer 'layer2.weight' needs bytes up to {size} of "
        f"'m.onnx.data', but the file has only {size - 10}; the data file is truncated or "
        "belongs to another model"
    )
    assert not (model_path.parent / "out").exists()


@pytest.mark.parametrize(
    "location", ["../secret.data", "/tmp/secret.data", "sub/../../secret.data"]
)
def test_external_data_outside_the_folder_is_refused(
    model_path: Path,
    location: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Put readable bytes where the location points, so only the check can stop the read.
    target = (
        (model_path.parent / location).resolve() if not location.startswith("/") else Path(location)
    )
    shutil.copyfile(model_path.parent / "m.onnx.data", target)
    _set_location(model_path, location)
    opened: list[str] = []
    for module, name in ((os, "open"), (builtins, "open")):
        real = getattr(module, name)

        def spy(path: object, *args: object, _real: object = real, **kwargs: object) -> object:
            opened.append(str(path))
            return _real(path, *args, **kwargs)  # type: ignore[operator]

        monkeypatch.setattr(module, name, spy)
    try:
        line = _cli_error(["inspect", str(model_path)], capsys)
    finally:
        target.unlink()
    assert line == (
        f"surgery: error: {model_path}: initializer 'layer0.weight' points to external data "
        f"'{location}' outside the model's folder; refusing to read it (keep data files beside the model)"
    )
    assert not any("secret" in p for p in opened)


def test_inspect_prints_real_sizes(model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(model_path)]) == 0
    out = capsys.readouterr().out
    size = (model_path.parent / "m.onnx.data").stat().st_size
    assert f"m.onnx.data  12.0 KiB ({size:,} bytes on disk)" in out
    assert "x  f32 [batch_size, 32]" in out
    assert "parameters: 3,232 (12.6 KiB)" in out
    assert "ops (12 nodes): Add 4, MatMul 3, Relu 3, Mul 1, Neg 1" in out


def test_folder_loads_as_bundle(model_path: Path, tmp_path: Path) -> None:
    bundle = load(model_path)
    bundle["copy"] = load(model_path)["m"]
    save(bundle, tmp_path / "two", progress=False)
    assert load(tmp_path / "two").parts == ["copy", "m"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SurgeryError, match=r"folder has no \.onnx files"):
        load(empty)
