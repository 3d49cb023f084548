"""Ctrl-C, SIGTERM and SIGKILL at seeded random points of a 1 GiB write.

Every case replaces an existing output (``--force``) with the 1 GiB one and is signalled when
the temporary data file has reached a seeded random fraction of its size, so the point is inside
the write whatever the machine's speed. Afterwards the destination is the complete old output or
the complete new one (digests), the input is unchanged, and no temporary folder is left (after
SIGKILL: after the next run). The 1 GiB input is built once for the module; about a minute in all.
"""

from __future__ import annotations

import functools
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from surgery.synthetic import write_synthetic_model
from tests.adversarial.conftest import digests, leftovers, run_cli

SEED = 20240610
GIB = 1 << 30
_random = random.Random(SEED)


def _relative(root: Path) -> dict[str, str]:
    return {str(Path(k).relative_to(root)): v for k, v in digests(root).items()}


class _World:
    """The module's inputs and the digests of the outputs a run may leave."""

    def __init__(self, root: Path) -> None:
        (root / "big").mkdir()
        (root / "small").mkdir()
        (root / "other").mkdir()
        self.big = write_synthetic_model(root / "big" / "m.onnx", width=4096, total_bytes=GIB)
        self.data_bytes = (root / "big" / "m.onnx.data").stat().st_size
        self.small = write_synthetic_model(root / "small" / "m.onnx", seed=1)
        self.other = write_synthetic_model(root / "other" / "m.onnx", seed=2)
        self.old = root / "old"
        assert run_cli("apply", "cleanup", self.small, "-o", self.old, "-q").code == 0
        self.old_digests = _relative(self.old)
        self.root = root

    @functools.cached_property
    def new_digests(self) -> dict[str, str]:
        """What a complete 1 GiB run writes (computed only if a case finished)."""
        ref = self.root / "reference"
        assert run_cli("apply", "cleanup", self.big, "-o", ref, "-q").code == 0
        found = _relative(ref)
        shutil.rmtree(ref)
        return found

    def input_state(self) -> list[tuple[int, int, int]]:
        return [
            (s.st_ino, s.st_size, s.st_mtime_ns)
            for s in (p.stat() for p in sorted(self.big.parent.iterdir()))
        ]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> _World:
    return _World(tmp_path_factory.mktemp("signals"))


def _start(*args: str | Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "surgery.cli", *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_until(proc: subprocess.Popen[str], ready: Callable[[], bool]) -> bool:
    """Poll ``ready`` until it holds (True) or the process ends (False)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if ready():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    raise TimeoutError("the run neither reached the point nor ended")


def _written(dest: Path) -> int:
    """Bytes in the data file of the run's temporary folder so far."""
    sizes = [p.stat().st_size for p in dest.parent.glob(f".{dest.name}.tmp-*/m.onnx.data")]
    return max(sizes, default=0)


def _handlers_installed(proc: subprocess.Popen[str]) -> bool:
    """The CLI's main() has run its first line: SIGTERM is caught (/proc/PID/status)."""
    status = Path(f"/proc/{proc.pid}/status").read_text()
    caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:"))[7:], 16)
    return bool(caught & (1 << (signal.SIGTERM - 1)))


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err.strip()


def _old_output(world: _World, tmp_path: Path) -> Path:
    dest = tmp_path / "out"
    shutil.copytree(world.old, dest)
    return dest


_EXITS = {
    signal.SIGINT: (130, "surgery: interrupted"),
    signal.SIGTERM: (143, "surgery: terminated"),
}


@pytest.mark.parametrize(
    ("sig", "fraction"),
    [
        (signal.SIGINT, _random.uniform(0.05, 0.95)),
        (signal.SIGTERM, _random.uniform(0.05, 0.95)),
        (signal.SIGTERM, 1.0),  # every byte written: the signal lands in fsync or the final move
    ],
    ids=["sigint-mid-write", "sigterm-mid-write", "sigterm-at-the-end"],
)
def test_signal_during_the_write(
    world: _World, tmp_path: Path, sig: signal.Signals, fraction: float
) -> None:
    dest = _old_output(world, tmp_path)
    before = world.input_state()
    proc = _start("apply", "cleanup", world.big, "-o", dest, "--force", "-q")
    reached = _wait_until(proc, lambda: _written(dest) >= fraction * world.data_bytes)
    if reached:
        proc.send_signal(sig)
    code, err = _finish(proc)
    if code == 0:
        assert fraction == 1.0, "finished before the signal at a point inside the write"
        assert _relative(dest) == world.new_digests
    else:
        assert reached
        assert (code, err) == _EXITS[sig]
        assert _relative(dest) == world.old_digests
    assert leftovers(dest) == []
    assert world.input_state() == before


def test_ctrl_c_during_start_up_is_one_line(world: _World, tmp_path: Path) -> None:
    """Within the first fraction of a second (imports): exit 130, no traceback."""
    dest = _old_output(world, tmp_path)
    proc = _start("apply", "cleanup", world.big, "-o", dest, "--force", "-q")
    assert _wait_until(proc, lambda: _handlers_installed(proc))
    time.sleep(_random.uniform(0.0, 0.3))
    proc.send_signal(signal.SIGINT)
    assert _finish(proc) == (130, "surgery: interrupted")
    assert _relative(dest) == world.old_digests
    assert leftovers(dest) == []


def test_sigkill_then_a_rerun_cleans_up(world: _World, tmp_path: Path) -> None:
    """SIGKILL cannot be handled: the temporary folder stays until the next run into ``dest``."""
    dest = _old_output(world, tmp_path)
    fraction = _random.uniform(0.05, 0.95)
    proc = _start("apply", "cleanup", world.big, "-o", dest, "--force", "-q")
    assert _wait_until(proc, lambda: _written(dest) >= fraction * world.data_bytes)
    proc.kill()
    assert _finish(proc)[0] == -signal.SIGKILL
    assert _relative(dest) == world.old_digests
    (stale,) = leftovers(dest)
    assert stale.startswith(".out.tmp-")

    assert run_cli("apply", "cleanup", world.other, "-o", dest, "--force", "-q").code == 0
    assert leftovers(dest) == []
    assert run_cli("inspect", dest).code == 0
    reference = tmp_path / "reference"
    assert run_cli("apply", "cleanup", world.other, "-o", reference, "-q").code == 0
    assert _relative(dest) == _relative(reference) != world.old_digests
