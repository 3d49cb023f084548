"""Outputs that would destroy an input, outputs that appear meanwhile, and runs that died.

Each refusal checks the harness's three promises: exit 1 with one pinned line, inputs
byte-identical, nothing left beside the destination. The no-replace move is exercised with
``renameat2`` and with its fallback (``mkdir`` / ``link``), as on kernels or file systems without
it; crashes are real ``SIGKILL`` s at the exact point, and interrupted runs are left by real
processes that are then gone.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import onnx
import pytest

from surgery import atomic
from surgery.atomic import atomic_dir, atomic_files
from surgery.constants import CHECKPOINT_METADATA_KEY
from surgery.errors import SurgeryError
from tests.adversarial.conftest import assert_refused, digests, leftovers, run_cli


def _dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(params=["renameat2", "fallback"])
def rename_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with Linux's renameat2, and again with the fallback used where it is missing."""
    if request.param == "fallback":
        monkeypatch.setattr(atomic, "_renameat2_func", None)
    elif atomic._renameat2_func is None:
        pytest.skip("renameat2 is not available here")
    return str(request.param)


# -- item 2: --force never replaces an input -------------------------------------------------------


def _refused_and_intact(args: list[str | Path], inputs: list[Path], dest: Path, line: str) -> None:
    before = digests(*inputs)
    outcome = run_cli(*args)
    assert assert_refused(outcome) == line
    assert digests(*inputs) == before
    assert leftovers(dest) == []


def test_force_onto_the_input_data_file_is_refused(model_path: Path) -> None:
    data = model_path.parent / "m.onnx.data"
    _refused_and_intact(
        ["apply", "cleanup", model_path, "-o", data, "--force", "-q"],
        [model_path.parent],
        data,
        f"surgery: error: {data}: the output is {data}, which this run reads; choose another "
        "output location (--force never replaces an input)",
    )


def test_force_onto_the_model_folder_is_refused(model_path: Path) -> None:
    folder = model_path.parent
    _refused_and_intact(
        ["apply", "cleanup", model_path, "-o", folder, "--force", "-q"],
        [folder],
        folder,
        f"surgery: error: {folder}: the output holds {model_path}, which this run reads; choose "
        "another output location (--force never replaces an input)",
    )


def test_output_inside_an_input_folder_is_refused(model_path: Path) -> None:
    folder = model_path.parent
    dest = folder / "out"
    _refused_and_intact(
        ["apply", "cleanup", folder, "-o", dest, "-q"],
        [folder],
        dest,
        f"surgery: error: {dest}: the output is inside {folder}, which this run reads; choose "
        "another output location (--force never replaces an input)",
    )
    assert not dest.exists()


def test_a_symlink_to_the_model_folder_is_resolved(model_path: Path, tmp_path: Path) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(model_path.parent, target_is_directory=True)
    _refused_and_intact(
        ["apply", "cleanup", model_path, "-o", alias, "--force", "-q"],
        [model_path.parent],
        alias,
        f"surgery: error: {alias}: the output holds {model_path}, which this run reads; choose "
        "another output location (--force never replaces an input)",
    )
    assert alias.is_symlink()


def test_force_onto_the_recipe_file_is_refused(model_path: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("passes:\n  - remove-unused\n")
    _refused_and_intact(
        ["apply", recipe, model_path, "-o", recipe, "--force", "-q"],
        [recipe, model_path.parent],
        recipe,
        f"surgery: error: {recipe}: the output is {recipe}, which this run reads; choose "
        "another output location (--force never replaces an input)",
    )


def _fake_checkpoint(folder: Path) -> Path:
    """A folder with the files a checkpoint has; the guard refuses before reading any."""
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "paligemma"}\n')
    (folder / "model.safetensors").write_bytes(os.urandom(4096))
    return folder


def test_force_onto_the_checkpoint_option_is_refused(model_path: Path, tmp_path: Path) -> None:
    checkpoint = _fake_checkpoint(tmp_path / "ckpt")
    recipe = tmp_path / "tjs.yaml"
    recipe.write_text("layout: transformers.js\npasses:\n  - remove-unused\n")
    _refused_and_intact(
        ["apply", recipe, model_path, "-o", checkpoint, "--checkpoint", checkpoint, "--force"],
        [checkpoint, model_path.parent, recipe],
        checkpoint,
        f"surgery: error: {checkpoint}: the output is {checkpoint}, which this run reads; choose "
        "another output location (--force never replaces an input)",
    )


def test_force_onto_the_recorded_checkpoint_is_refused(model_path: Path, tmp_path: Path) -> None:
    """No --checkpoint: the folder recorded in the model's metadata is an input too."""
    checkpoint = _fake_checkpoint(tmp_path / "ckpt")
    proto = onnx.load(model_path, load_external_data=False)
    onnx.helper.set_model_props(proto, {CHECKPOINT_METADATA_KEY: str(checkpoint)})
    onnx.save(proto, model_path)
    _refused_and_intact(
        ["apply", "cleanup", model_path, "-o", checkpoint, "--force", "-q"],
        [checkpoint, model_path.parent],
        checkpoint,
        f"surgery: error: {checkpoint}: the output is {checkpoint}, which this run reads; choose "
        "another output location (--force never replaces an input)",
    )


def test_export_into_its_checkpoint_is_refused(paligemma2_checkpoint: Path, tmp_path: Path) -> None:
    checkpoint = shutil.copytree(paligemma2_checkpoint, tmp_path / "ckpt")
    dest = checkpoint / "model.safetensors"
    _refused_and_intact(
        ["export", checkpoint, "-o", dest, "--force", "-q"],
        [checkpoint],
        dest,
        f"surgery: error: {dest}: the output is inside {checkpoint}, which this run reads; choose "
        "another output location (--force never replaces an input)",
    )


def test_make_random_onto_its_config_folder_is_refused(
    paligemma2_checkpoint: Path, tmp_path: Path
) -> None:
    checkpoint = shutil.copytree(paligemma2_checkpoint, tmp_path / "ckpt")
    _refused_and_intact(
        ["make-random", checkpoint, "-o", checkpoint, "--force", "-q"],
        [checkpoint],
        checkpoint,
        f"surgery: error: {checkpoint}: the output is {checkpoint}, which this run reads; choose "
        "another output location (--force never replaces an input)",
    )


def test_force_onto_the_working_folder_is_refused(model_path: Path, tmp_path: Path) -> None:
    before = digests(tmp_path)
    outcome = run_cli("apply", "cleanup", model_path, "-o", ".", "--force", "-q", cwd=tmp_path)
    assert assert_refused(outcome) == (
        "surgery: error: .: the output holds the current folder; choose another output location"
    )
    assert digests(tmp_path) == before


def test_missing_parent_names_the_missing_folder(model_path: Path, tmp_path: Path) -> None:
    """Issue 9 item 7: the message named the parent as if it were the output."""
    dest = tmp_path / "nope" / "deeper" / "out"
    outcome = run_cli("apply", "cleanup", model_path, "-o", dest, "-q")
    assert assert_refused(outcome) == (
        f"surgery: error: {dest}: the output's folder {dest.parent} does not exist; create it first"
    )
    assert not (tmp_path / "nope").exists()


# -- item 6: the final move never replaces what appeared meanwhile ---------------------------------


@pytest.mark.parametrize("appears", ["empty folder", "folder", "file"])
def test_destination_that_appears_meanwhile_is_kept(
    tmp_path: Path, rename_mode: str, appears: str
) -> None:
    dest = tmp_path / "out"
    with pytest.raises(SurgeryError) as raised, atomic_dir(dest) as tmp:
        (tmp / "ours.txt").write_text("ours")
        if appears == "file":
            dest.write_text("theirs")
        else:
            dest.mkdir()
            if appears == "folder":
                (dest / "theirs.txt").write_text("theirs")
    assert str(raised.value) == (
        f"{dest}: appeared while this run was writing (another run?); it was kept; "
        "pass --force to replace it"
    )
    if appears == "file":
        assert dest.read_text() == "theirs"
    else:
        assert [p.name for p in dest.iterdir()] == (
            [] if appears == "empty folder" else ["theirs.txt"]
        )
    assert leftovers(dest) == []


def test_force_replaces_what_appeared_meanwhile(tmp_path: Path, rename_mode: str) -> None:
    dest = tmp_path / "out"
    with atomic_dir(dest, force=True) as tmp:
        (tmp / "ours.txt").write_text("ours")
        dest.mkdir()
        (dest / "theirs.txt").write_text("theirs")
    assert [p.name for p in dest.iterdir()] == ["ours.txt"]
    assert leftovers(dest) == []


def test_companion_that_appears_meanwhile_is_kept(tmp_path: Path, rename_mode: str) -> None:
    """atomic_files: the data file is taken; nothing of this run stays, theirs is intact."""
    dest = tmp_path / "model.onnx"
    with pytest.raises(SurgeryError) as raised, atomic_files(dest) as tmp:
        (tmp / "model.onnx").write_text("ours")
        (tmp / "model.onnx.data").write_text("ours")
        (tmp / "model.onnx.data2").write_text("ours")
        (tmp_path / "model.onnx.data2").write_text("theirs")
    assert str(raised.value).startswith(f"{tmp_path / 'model.onnx.data2'}: appeared while")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx.data2"]
    assert (tmp_path / "model.onnx.data2").read_text() == "theirs"


def test_atomic_files_force_replaces_every_file(tmp_path: Path, rename_mode: str) -> None:
    dest = tmp_path / "model.onnx"
    dest.write_text("old")
    (tmp_path / "model.onnx.data").write_text("old")
    with atomic_files(dest, force=True) as tmp:
        (tmp / "model.onnx").write_text("new")
        (tmp / "model.onnx.data").write_text("new")
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {
        "model.onnx": "new",
        "model.onnx.data": "new",
    }


def test_two_runs_into_one_output_one_wins(model_path: Path, tmp_path: Path) -> None:
    """Real processes started together: one writes the output, the other is refused."""
    dest = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "surgery.cli",
        "apply",
        "cleanup",
        str(model_path),
        "-o",
        str(dest),
    ]
    procs = [subprocess.Popen([*cmd, "-q"], stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read().strip()) for p in procs]  # type: ignore[union-attr]
    assert sorted(code for code, _ in results) == [0, 1], results
    (message,) = [err for code, err in results if code == 1]
    assert message in (
        f"surgery: error: {dest}: output already exists; pass --force to replace it",
        f"surgery: error: {dest}: appeared while this run was writing (another run?); it was "
        "kept; pass --force to replace it",
    )
    assert run_cli("inspect", dest).code == 0
    assert leftovers(dest) == []


# -- items 7 and 9: what dead runs left is cleaned up by the next run ------------------------------


def test_stale_temp_folder_of_a_dead_run_is_removed(model_path: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    stale = tmp_path / f".out.tmp-{_dead_pid()}-abcd1234"
    stale.mkdir()
    (stale / "m.onnx.data").write_bytes(b"\0" * 4096)
    assert run_cli("apply", "cleanup", model_path, "-o", dest, "-q").code == 0
    assert leftovers(dest) == []


def test_temp_folder_of_a_live_run_is_kept(model_path: Path, tmp_path: Path) -> None:
    """Alive by PID (not locked yet), or locked (a PID from another namespace): both kept."""
    dest = tmp_path / "out"
    unlocked = tmp_path / f".out.tmp-{os.getpid()}-notlockd"
    locked = tmp_path / f".out.tmp-{_dead_pid()}-lockedxx"
    unlocked.mkdir()
    locked.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""\
                import fcntl, os, sys
                fd = os.open({str(locked)!r}, os.O_RDONLY)
                fcntl.flock(fd, fcntl.LOCK_EX)
                print("locked", flush=True)
                sys.stdin.read()
            """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        assert run_cli("apply", "cleanup", model_path, "-o", dest, "-q").code == 0
        assert leftovers(dest) == sorted([locked.name, unlocked.name])
    finally:
        holder.communicate("")


@pytest.fixture
def old_output(model_path: Path, tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    """A complete output ``out`` and its digests (relative names)."""
    dest = tmp_path / "out"
    assert run_cli("apply", "cleanup", model_path, "-o", dest, "-q").code == 0
    yield dest, _relative(digests(dest), dest)


def _relative(found: dict[str, str], root: Path) -> dict[str, str]:
    return {str(Path(k).relative_to(root)): v for k, v in found.items()}


def test_orphaned_old_output_is_restored(
    model_path: Path, old_output: tuple[Path, dict[str, str]]
) -> None:
    """Killed between the two renames of --force: the next run puts the old output back."""
    dest, before = old_output
    old = dest.parent / f".out.old-{_dead_pid()}-abcd1234"
    dest.rename(old)
    outcome = run_cli("apply", "cleanup", model_path, "-o", dest, "-q")
    assert outcome.code == 1
    assert outcome.stderr.splitlines() == [
        f"WARNING surgery.atomic: restoring {dest} from {old} (a run was interrupted)",
        f"surgery: error: {dest}: output already exists; pass --force to replace it",
    ]
    assert _relative(digests(dest), dest) == before
    assert leftovers(dest) == []


def test_orphaned_old_output_beside_a_complete_one_is_removed(
    model_path: Path, old_output: tuple[Path, dict[str, str]]
) -> None:
    dest, before = old_output
    old = dest.parent / f".out.old-{_dead_pid()}-abcd1234"
    shutil.copytree(dest, old)
    assert run_cli("apply", "cleanup", model_path, "-o", dest, "-q", "--force").code == 0
    assert _relative(digests(dest), dest) == before
    assert leftovers(dest) == []


_KILL_BETWEEN_RENAMES = """\
import os, signal, sys
from surgery import atomic, cli
atomic._renameat2_func = None  # the two-rename fallback, with its window
real_rename = os.rename
def rename(src, dst):
    real_rename(src, dst)
    if ".old-" in os.fspath(dst):
        os.kill(os.getpid(), signal.SIGKILL)
os.rename = rename
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigkill_between_the_renames_of_force_then_rerun(
    model_path: Path, old_output: tuple[Path, dict[str, str]]
) -> None:
    """A real SIGKILL in the window; the next run puts the old output back."""
    dest, before = old_output
    cmd = [sys.executable, "-c", _KILL_BETWEEN_RENAMES, "apply", "cleanup", str(model_path)]
    killed = subprocess.run([*cmd, "-o", str(dest), "--force", "-q"], capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    assert not dest.exists()
    assert [name.split("-")[0] for name in leftovers(dest)] == [".out.old", ".out.tmp"]
    outcome = run_cli("apply", "cleanup", model_path, "-o", dest, "-q")
    assert outcome.code == 1
    assert outcome.stderr.splitlines()[-1] == (
        f"surgery: error: {dest}: output already exists; pass --force to replace it"
    )
    assert _relative(digests(dest), dest) == before
    assert leftovers(dest) == []


# -- item 8: disk full, read-only, permission denied -----------------------------------------------


@pytest.fixture
def small_mount(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (root only; elsewhere skipped with the reason)."""
    where = tmp_path / "mnt"
    where.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mount.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def _big_model(folder: Path) -> Path:
    from surgery.synthetic import write_synthetic_model

    folder.mkdir()
    return write_synthetic_model(folder / "m.onnx", width=256, layers=8)  # 2 MiB of weights


def test_disk_full(tmp_path: Path, small_mount: Path) -> None:
    model = _big_model(tmp_path / "big")
    dest = small_mount / "out"
    _refused_and_intact(
        ["apply", "cleanup", model, "-o", dest, "-q"],
        [model.parent],
        dest,
        f"surgery: error: {dest}: cannot write the output: no space left on the device; free "
        "some space or write elsewhere",
    )
    assert list(small_mount.iterdir()) == []


def test_read_only_destination(model_path: Path, small_mount: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(small_mount)], check=True)
    dest = small_mount / "out"
    _refused_and_intact(
        ["apply", "cleanup", model_path, "-o", dest, "-q"],
        [model_path.parent],
        dest,
        f"surgery: error: {dest}: cannot write the output: the file system is read-only; "
        "write elsewhere",
    )


def test_permission_denied(model_path: Path, tmp_path: Path) -> None:
    """A folder without write permission. Root ignores permissions, so as root the run drops
    the capabilities that let it (setpriv); without setpriv the test is skipped."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    dest = locked / "out"
    cmd = [
        sys.executable,
        "-m",
        "surgery.cli",
        "apply",
        "cleanup",
        str(model_path),
        "-o",
        str(dest),
    ]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root and setpriv is missing: cannot make EACCES happen")
        drop = "-dac_override,-dac_read_search,-fowner"
        cmd = ["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}", *cmd]
    before = digests(model_path.parent)
    proc = subprocess.run([*cmd, "-q"], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip() == (
        f"surgery: error: {dest}: cannot write the output: permission denied; check its "
        "permissions or use another location"
    )
    assert digests(model_path.parent) == before
    assert list(locked.iterdir()) == []


def test_environment_error_elsewhere_names_the_path_the_system_names() -> None:
    """Outside an output (a dump folder, an unreadable input) the OS error's path is named."""
    error = atomic.environment_error(PermissionError(13, "Permission denied", "/data/ckpt/x"))
    assert str(error) == (
        "/data/ckpt/x: permission denied; check its permissions or use another location"
    )
    assert atomic.environment_error(FileNotFoundError(2, "No such file", "x")) is None
