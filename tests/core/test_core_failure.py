"""What happens when a pass fails: the ``after_failure`` hook, dumps of the failing pass's input,
reruns into an old dump folder, and bundle passes called like model passes (requires/ensures)."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from _util import run_onnx

from passes import RemoveUnused
from passes.split import Split
from surgery import (
    Bundle,
    BundlePass,
    BundlePassResult,
    ModelPass,
    PassFailed,
    PassManager,
    SurgeryError,
    load,
)
from surgery.cli import main
from surgery.instruments import DumpAfterPass, TimePasses, VerifyEach
from surgery.manager import Instrument, Step

_MISTAKE = (
    "from surgery import ModelPass, SurgeryError\n"
    "class Mistake(ModelPass):\n"
    "    '''Fails with a user error after changing its input.'''\n"
    "    name = 'mistake'\n"
    "    summary = 'fails'\n"
    "    def call(self, model):\n"
    "        model.graph.remove(model.graph.node(len(model.graph) - 1), safe=False)\n"
    "        raise SurgeryError('option x does not fit this model')\n"
)


class _Explode(ModelPass):
    """Fails on purpose."""

    name = "explode"
    summary = "fails"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        model.graph.remove(model.graph.node(len(model.graph) - 1), safe=False)  # half-done work
        raise ValueError("kaboom")


def _samplers() -> int:
    return sum(t.name == "peak-anon-sampler" for t in threading.enumerate())


def test_failing_runs_leak_no_sampler_thread(model_path: Path) -> None:
    """Three failing pipelines (the pass, and an instrument refusing its result) under
    --time-passes leave no ``peak-anon-sampler`` thread behind."""
    before = _samplers()
    for _ in range(3):
        with pytest.raises(PassFailed):
            PassManager([RemoveUnused(), _Explode()], [TimePasses(io.StringIO())]).run(
                load(model_path)
            )
    with pytest.raises(SurgeryError, match="--verify-each"):
        PassManager([_BreakGraph()], [VerifyEach(), TimePasses(io.StringIO())]).run(
            load(model_path)
        )
    assert _samplers() == before


class _BreakGraph(ModelPass):
    """Drops the node that produces the graph output: an invalid model."""

    name = "break-graph"
    summary = "breaks the graph"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        node = model.graph.outputs[0].producer()
        assert node is not None
        model.graph.remove(node, safe=False)
        return ir.passes.PassResult(model, True)


class _Record(Instrument):
    def __init__(self) -> None:
        self.failures: list[tuple[str, str, str]] = []

    def after_failure(self, step: Step, label: str, models: object, error: BaseException) -> None:
        self.failures.append((step.name, label, str(error)))


def test_after_failure_sees_the_pass_part_and_error(model_path: Path) -> None:
    record = _Record()
    with pytest.raises(PassFailed):
        PassManager([RemoveUnused(), _Explode()], [record]).run(load(model_path))
    assert record.failures == [
        (
            "explode",
            "m",
            "passes[1] (explode): pass 'explode' failed on part 'm', after remove-unused: kaboom",
        )
    ]


def test_dump_on_failure_writes_the_failing_pass_input(model_path: Path, tmp_path: Path) -> None:
    dumps = tmp_path / "dumps"
    with pytest.raises(PassFailed):
        PassManager(
            [RemoveUnused(), RemoveUnused(), _Explode()],
            [DumpAfterPass(dumps, only_changed=True, on_failure=True)],
        ).run(load(model_path))
    assert sorted(p.name for p in dumps.iterdir()) == [
        "00-input",
        "01-remove-unused",
        "03-explode-failed-input",
    ]
    failed = load(dumps / "03-explode-failed-input")
    assert list(failed) == ["m"]
    assert len(failed["m"].graph) == len(load(dumps / "01-remove-unused")["m"].graph)
    np.testing.assert_array_equal(
        run_onnx(dumps / "03-explode-failed-input" / "m.onnx"), run_onnx(model_path)
    )


def test_a_rerun_into_the_same_dump_dir_needs_force(
    model_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A failed run leaves its dumps (with the failing pass's input, unchanged by the pass's
    half-done work); a rerun is refused in one line, and --force replaces the old dumps."""
    (tmp_path / "mistake.py").write_text(_MISTAKE)
    monkeypatch.syspath_prepend(str(tmp_path))
    failing = tmp_path / "failing.yaml"
    failing.write_text("passes:\n  - remove-unused\n  - use: mistake:Mistake\n")
    out, dumps = tmp_path / "out", tmp_path / "dumps"
    args = ["apply", str(failing), str(model_path), "-o", str(out), "--dump-dir", str(dumps), "-q"]
    args.append("--allow-imports")  # the recipe's `use:` runs the test's own module
    assert main(args) == 1
    assert sorted(p.name for p in dumps.iterdir()) == [
        "00-input",
        "01-remove-unused",
        "02-mistake-failed-input",
    ]
    np.testing.assert_array_equal(
        run_onnx(dumps / "02-mistake-failed-input" / "m.onnx"), run_onnx(model_path)
    )
    capsys.readouterr()
    assert main(["apply", "cleanup", *args[2:]]) == 1
    assert capsys.readouterr().err == (
        f"surgery: error: {dumps / '00-input'}: dump folder already exists; use an empty "
        "--dump-dir, or --force to replace the dumps of an earlier run\n"
    )
    assert main(["apply", "cleanup", *args[2:], "--force"]) == 0
    assert sorted(p.name for p in dumps.iterdir()) == [
        "00-input",
        "01-remove-unused",
        "02-dedup-initializers",
        "03-topological-sort",
    ]
    assert main([*args, "--force", "--no-dump-on-failure"]) == 1
    assert not (dumps / "02-mistake-failed-input").exists()


class _Rebuild(BundlePass):
    """Returns a new bundle; its contract is checked around the call."""

    name = "rebuild"
    summary = "rebuilds the bundle"

    def __init__(self, *, needs: str = "m", promise: bool = True) -> None:
        super().__init__()
        self.needs, self.promise = needs, promise

    def requires(self, bundle: Bundle) -> None:
        if self.needs not in bundle:
            raise ir.passes.PreconditionError(f"rebuild: no part '{self.needs}'")

    def ensures(self, bundle: Bundle) -> None:
        if not self.promise:
            raise ValueError("the copy is missing")

    def call_bundle(self, bundle: Bundle) -> BundlePassResult:
        return BundlePassResult(Bundle({"m": bundle["m"], "copy": bundle["m"]}), modified=True)


def test_bundle_passes_check_requires_and_ensures_and_keep_their_result(
    model_path: Path,
) -> None:
    bundle = load(model_path)
    assert PassManager([_Rebuild()]).run(bundle) is True
    assert bundle.parts == ["m", "copy"]
    with pytest.raises(SurgeryError) as user:
        PassManager([_Rebuild(needs="vision")]).run(load(model_path))
    assert str(user.value) == (
        "passes[0] (rebuild): pass 'rebuild' failed on the bundle, as the first pass: "
        "rebuild: no part 'vision'"
    )
    with pytest.raises(PassFailed) as bug:
        PassManager([_Rebuild(promise=False)]).run(load(model_path))
    assert str(bug.value) == (
        "passes[0] (rebuild): pass 'rebuild' failed on the bundle, as the first pass: "
        "Post-condition for pass '_Rebuild' failed: the copy is missing"
    )


def test_split_ensures_no_dangling_inputs(model_path: Path) -> None:
    split = Split(
        Split.Options.model_validate({"parts": {"a": {"inputs": ["x"], "outputs": ["y"]}}})
    )
    bundle = load(model_path)
    split.ensures(Bundle({"a": bundle["m"]}))
    node = bundle["m"].graph.outputs[0].producer()
    assert node is not None
    bundle["m"].graph.remove(node, safe=False)
    with pytest.raises(ir.passes.PostconditionError) as info:
        split.ensures(Bundle({"a": bundle["m"]}))
    assert str(info.value) == "split: part 'a' reads 'y', which nothing in it defines"
