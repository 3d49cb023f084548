"""A bounded, seeded fuzz test: mutated models are refused cleanly or handled, never crash.

Each case copies a small valid model with external data, mutates it (bytes of the ``.onnx``
file or of its data file, or its structure: dims, dtypes, locations, offsets, lengths, dropped or
duplicated initializers, nodes pointed at missing values, cycles), then runs ``inspect`` and
``apply cleanup``. A case fails if either exits with anything but 0 or 1 (3 is a bug; a signal
or a hang shows as a timeout), if an input changed, if something is left beside the
destination, or if an output written with exit 0 does not read back with ``inspect``.

Cases run in-process through :func:`surgery.cli.main` (a child process per case would spend a
second on imports); a few run as real child processes too, and must agree.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import random
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import onnx
import pytest
from onnx import TensorProto, helper

from surgery.cli import main
from surgery.synthetic import write_synthetic_model
from tests.adversarial.conftest import digests, leftovers, run_cli
from tests.adversarial.hostile import external

#: Seeded cases per run; CI runs the default. Each takes about 0.1 s.
CASES = int(os.environ.get("SURGERY_FUZZ_CASES", "300"))
#: Seconds one command of one case may take before it counts as a hang.
CASE_TIMEOUT_S = 20
#: Seeds also run as child processes (real exits and signals), compared with in-process runs.
SUBPROCESS_SEEDS = (0, 1, 2, 3)

_INT64_MAX = 2**63 - 1


class _Hang(BaseException):
    """Raised by the alarm; a BaseException so the CLI's bug handler does not swallow it."""


@contextlib.contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    def fire(signum: int, frame: FrameType | None) -> None:
        raise _Hang

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _cli(*args: str | Path) -> tuple[int, str]:
    """Run the CLI in-process: exit code (-1 for a hang) and stderr."""
    err = io.StringIO()
    try:
        with (
            _deadline(CASE_TIMEOUT_S),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(err),
        ):
            code = main([str(a) for a in args])
    except _Hang:
        return -1, f"hang: no result after {CASE_TIMEOUT_S} s"
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 1
    return code, err.getvalue()


# --- mutations ------------------------------------------------------------------------------


def _bytes(rng: random.Random, path: Path) -> str:
    data = bytearray(path.read_bytes())
    kind = rng.choice(["flip", "truncate", "extend", "zero-run"])
    if kind == "flip" and data:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del data[rng.randrange(len(data) + 1) :]
    elif kind == "extend":
        data += rng.randbytes(rng.randint(1, 256))
    elif data:
        start = rng.randrange(len(data))
        data[start : start + rng.randint(1, 64)] = bytes(min(64, len(data) - start))
    path.write_bytes(bytes(data))
    return f"{kind} {path.name}"


def _dim(rng: random.Random) -> int:
    return rng.choice([0, 1, 2, 3, 32, 33, 1024, 2**31, 2**40, _INT64_MAX, -1, -32])


def _tensor_fields(rng: random.Random, model: onnx.ModelProto) -> str:
    tensor = rng.choice(list(model.graph.initializer))
    kind = rng.choice(["dims", "dtype", "location", "offset", "length", "data_location"])
    if kind == "dims":
        dims = [_dim(rng) for _ in range(rng.randint(0, 4))]
        del tensor.dims[:]
        tensor.dims.extend(dims)
        return f"dims of {tensor.name} = {dims}"
    if kind == "dtype":
        tensor.data_type = rng.choice([0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 16, 17, 22, 23, 99])
        return f"dtype of {tensor.name} = {tensor.data_type}"
    if kind == "data_location":
        tensor.data_location = 1 - tensor.data_location
        return f"data_location of {tensor.name} flipped"
    value = {
        "location": rng.choice(
            [
                "",
                ".",
                "..",
                "m.onnx",
                "missing.bin",
                "../m.onnx.data",
                "/etc/passwd",
                "m.onnx.data/",
                "sub/../m.onnx.data",
                "m.onnx.data\x00x",
                "M.ONNX.DATA",
            ]
        ),
        "offset": rng.choice(["0", "1", "64", "4096", "12287", "-1", str(_INT64_MAX), "x"]),
        "length": rng.choice(["0", "1", "100", "4096", "4097", "-5", str(2**70), "1e3"]),
    }[kind]
    entry = next((e for e in tensor.external_data if e.key == kind), None)
    if entry is None:
        entry = tensor.external_data.add()
        entry.key = kind
    entry.value = value
    return f"{kind} of {tensor.name} = {value!r}"


def _graph(rng: random.Random, model: onnx.ModelProto) -> str:
    graph = model.graph
    kind = rng.choice(
        [
            "drop-initializer",
            "duplicate-initializer",
            "missing-input",
            "cycle",
            "duplicate-output",
            "drop-node",
            "external-constant",
            "missing-graph-output",
        ]
    )
    if kind == "drop-initializer":
        victim = graph.initializer[rng.randrange(len(graph.initializer))]
        graph.initializer.remove(victim)
        return f"{kind} {victim.name}"
    if kind == "duplicate-initializer":
        graph.initializer.append(rng.choice(list(graph.initializer)))
        return kind
    node = rng.choice(list(graph.node))
    if kind == "missing-input" and node.input:
        node.input[rng.randrange(len(node.input))] = "no_such_value"
    elif kind == "cycle" and node.input:
        node.input[rng.randrange(len(node.input))] = rng.choice(list(graph.node)).output[0]
    elif kind == "duplicate-output":
        node.output[0] = rng.choice(list(graph.node)).output[0]
    elif kind == "drop-node":
        graph.node.remove(node)
    elif kind == "external-constant":
        constant = external(
            "c",
            rng.choice(["m.onnx.data", "/etc/passwd", "../m.onnx.data", "missing.bin"]),
            [_dim(rng) for _ in range(rng.randint(0, 2))],
            offset=rng.choice([None, 0, 64, 12280]),
            length=rng.choice([None, 0, 16, 128]),
        )
        graph.node.append(helper.make_node("Constant", [], ["cst"], name="cst", value=constant))
        graph.output.append(helper.make_tensor_value_info("cst", TensorProto.FLOAT, None))
    elif kind == "missing-graph-output":
        graph.output[0].name = "no_such_output"
    return f"{kind} at {node.name}"


def _structure(rng: random.Random, path: Path) -> str:
    model = onnx.load(path, load_external_data=False)
    done = [
        rng.choice([_tensor_fields, _tensor_fields, _graph])(rng, model)
        for _ in range(rng.randint(1, 3))
    ]
    path.write_bytes(model.SerializeToString())
    return "; ".join(done)


def _mutate(seed: int, folder: Path) -> str:
    rng = random.Random(seed)
    target = rng.choice(["onnx-bytes", "data-bytes", "structure", "structure", "both"])
    if target == "onnx-bytes":
        return _bytes(rng, folder / "m.onnx")
    if target == "data-bytes":
        return _bytes(rng, folder / "m.onnx.data")
    if target == "structure":
        return _structure(rng, folder / "m.onnx")
    return _structure(rng, folder / "m.onnx") + "; " + _bytes(rng, folder / "m.onnx.data")


# --- the cases ------------------------------------------------------------------------------


@dataclasses.dataclass
class _Result:
    seed: int
    mutation: str
    inspect: int
    apply: int
    problem: str | None


def _run_case(
    seed: int, base: Path, work: Path, cli: Callable[..., tuple[int, str]] = _cli
) -> _Result:
    folder = work / f"case{seed}"
    shutil.copytree(base, folder)
    mutation = _mutate(seed, folder)
    before = digests(folder)
    model, dest = folder / "m.onnx", work / f"out{seed}"
    inspect, inspect_err = cli("inspect", model)
    apply, apply_err = cli("apply", "cleanup", model, "-o", dest, "-q")
    problem = None
    for name, code, err in (("inspect", inspect, inspect_err), ("apply", apply, apply_err)):
        if code not in (0, 1):
            problem = f"{name} exited {code}: {err.strip()[-600:]}"
        elif code == 1 and len(err.strip().splitlines()) != 1:
            problem = f"{name} refused with more than one line: {err.strip()[-600:]}"
    if problem is None and apply == 0:
        again, err = cli("inspect", dest / "m.onnx")
        if again != 0:
            problem = f"the output does not read back: {err.strip()[-600:]}"
    if problem is None and digests(folder) != before:
        problem = "an input changed"
    if problem is None and leftovers(dest):
        problem = f"left beside the destination: {leftovers(dest)}"
    if problem is None and apply != 0 and dest.exists():
        problem = "a refused run left its destination"
    shutil.rmtree(folder)
    shutil.rmtree(dest, ignore_errors=True)
    return _Result(seed, mutation, inspect, apply, problem)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz-base")
    write_synthetic_model(folder / "m.onnx")
    return folder


def test_fuzz_cases_exit_0_or_1_and_outputs_read_back(
    base_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    start = time.perf_counter()
    results = [_run_case(seed, base_model, tmp_path) for seed in range(CASES)]
    elapsed = time.perf_counter() - start
    failures = [r for r in results if r.problem]
    ok = sum(r.apply == 0 for r in results)
    with capsys.disabled():
        print(
            f"\nfuzz: {len(results)} cases in {elapsed:.1f} s: apply exit 0 {ok}, exit 1 "
            f"{len(results) - ok - len(failures)}, failures {len(failures)}"
        )
    assert not failures, "\n".join(
        f"seed {r.seed} ({r.mutation}): {r.problem}" for r in failures[:20]
    )
    assert 0 < ok < len(results), "the mutations should both break and spare the model"


def _subprocess_cli(*args: str | Path) -> tuple[int, str]:
    outcome = run_cli(*args, timeout=60)
    return outcome.code, outcome.stderr


@pytest.mark.parametrize("seed", SUBPROCESS_SEEDS)
def test_fuzz_case_in_a_child_process_agrees(base_model: Path, tmp_path: Path, seed: int) -> None:
    """Real exits and signals: the child process ends as the in-process run does."""
    inner = _run_case(seed, base_model, tmp_path / "in")
    child = _run_case(seed, base_model, tmp_path / "child", _subprocess_cli)
    assert child.problem is None, child.problem
    assert (child.inspect, child.apply) == (inner.inspect, inner.apply)
