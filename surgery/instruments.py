"""Instruments built on the pass manager's hooks; each backs one CLI flag.

* :class:`DumpAfterPass` — ``--dump-dir`` / ``--dump-changed`` (LLVM ``-print-after-all`` /
  ``-print-changed``, MLIR ``-mlir-print-ir-tree-dir``): ``DIR/NN-<pass>/<part>.onnx`` + its data file,
  each folder self-contained so Netron, ``onnx.load`` and ONNX Runtime open it at once (see
  :func:`surgery.io.save_model` for why the weights are copied, file to file).
* :class:`TimePasses` — ``--time-passes``: wall time, peak anonymous memory and the op histogram
  before and after, per pass and part.
* :class:`VerifyEach` — ``--verify-each``: ONNX checker with full shape inference after each pass,
  on a weight-free copy (``onnx_ir``'s ``CheckerPass`` strips large initializers around the C API).
* :class:`ProgressLog` — one line per pass as it starts, for long pipelines.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TextIO

import onnx_ir as ir
import onnx_ir.passes.common

from surgery.bundle import Bundle
from surgery.cloning import clone_model
from surgery.errors import SurgeryError
from surgery.manager import ALL_PARTS, Instrument, Step
from surgery.memory import PeakAnonSampler
from surgery.summary import op_histogram
from surgery.writer import save_model

__all__ = ["DumpAfterPass", "ProgressLog", "TimePasses", "VerifyEach"]

logger = logging.getLogger(__name__)

#: The folders :class:`DumpAfterPass` writes: ``00-input``, ``03-fp16``, ``04-fp16-failed-input``.
_DUMP_FOLDER = re.compile(r"^\d{2,}-")


class DumpAfterPass(Instrument):
    """Write every part after every pass (or only after passes that changed something).

    With ``on_failure`` (``--dump-on-failure``, on by default with ``--dump-dir``), the input of a
    pass that fails is written too, as ``NN-<pass>-failed-input/<part>.onnx``: each unit's parts
    are cloned before it runs (graphs only; tensors are shared, so weights stay on disk), since
    passes work in place and a failing one may have changed its input half-way. With ``replace``
    (``--force``), dump folders left by an earlier run (``NN-…``) are removed at the start.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        only_changed: bool = False,
        on_failure: bool = False,
        replace: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self.only_changed = only_changed
        self.on_failure = on_failure
        self.replace = replace
        self._bundle: Bundle | None = None
        self._inputs: dict[str, ir.Model] = {}

    def _dump(self, folder_name: str, parts: Mapping[str, ir.Model]) -> None:
        folder = self.directory / folder_name
        if folder.exists():
            raise SurgeryError(
                f"{folder}: dump folder already exists; use an empty --dump-dir, or --force to "
                "replace the dumps of an earlier run"
            )
        for part, model in parts.items():
            save_model(model, folder / f"{part}.onnx")

    def start(self, bundle: Bundle) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        earlier = sorted(p for p in self.directory.iterdir() if _DUMP_FOLDER.match(p.name))
        if earlier and self.replace:
            for folder in earlier:
                shutil.rmtree(folder)
        self._bundle = bundle
        self._dump("00-input", bundle)

    def before_unit(self, step: Step, label: str, models: Sequence[ir.Model]) -> None:
        if self.on_failure and self._bundle is not None:
            names = self._bundle.parts if label == ALL_PARTS else [label]
            try:
                self._inputs = {part: clone_model(self._bundle[part]) for part in names}
            except Exception:  # onnx_ir cannot clone a graph that an earlier pass broke
                logger.warning(
                    "--dump-on-failure: cannot copy the input of '%s' (an invalid graph); the "
                    "last dump before it holds that input",
                    step.name,
                )
                self._inputs = {}

    def after_unit(
        self, step: Step, label: str, models: Sequence[ir.Model], modified: bool
    ) -> None:
        self._inputs = {}

    def after_failure(
        self, step: Step, label: str, models: Sequence[ir.Model], error: BaseException
    ) -> None:
        inputs, self._inputs = self._inputs, {}
        if inputs:
            self._dump(f"{step.index + 1:02d}-{step.name}-failed-input", inputs)

    def after_pass(self, step: Step, bundle: Bundle, modified: bool) -> None:
        if modified or not self.only_changed:
            self._dump(f"{step.index + 1:02d}-{step.name}", bundle)


@dataclasses.dataclass
class _Timing:
    pass_name: str
    label: str
    wall_s: float
    peak_anon_bytes: int
    nodes_before: int
    nodes_after: int
    op_changes: str


class TimePasses(Instrument):
    """Measure each pass on each part and print a table at the end."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self.rows: list[_Timing] = []
        self._before: collections.Counter[str] = collections.Counter()
        self._sampler: PeakAnonSampler | None = None
        self._start = 0.0

    def before_unit(self, step: Step, label: str, models: Sequence[ir.Model]) -> None:
        self._before = op_histogram(models)
        self._sampler = PeakAnonSampler().__enter__()
        self._start = time.perf_counter()

    def after_unit(
        self, step: Step, label: str, models: Sequence[ir.Model], modified: bool
    ) -> None:
        wall = time.perf_counter() - self._start
        sampler, self._sampler = self._sampler, None
        assert sampler is not None
        sampler.__exit__(None, None, None)
        after = op_histogram(models)
        changes = [
            f"{op} {after[op] - self._before[op]:+d}"
            for op in sorted(set(after) | set(self._before))
            if after[op] != self._before[op]
        ]
        self.rows.append(
            _Timing(
                step.name,
                label,
                wall,
                sampler.peak_bytes,
                sum(self._before.values()),
                sum(after.values()),
                "; ".join(filter(None, [", ".join(changes) or "-", _statistics(step.pass_)])),
            )
        )

    def after_failure(
        self, step: Step, label: str, models: Sequence[ir.Model], error: BaseException
    ) -> None:
        """Stop the failing unit's sampler thread (no row: the unit has no result)."""
        sampler, self._sampler = self._sampler, None
        if sampler is not None:
            sampler.__exit__(type(error), error, error.__traceback__)

    def table(self) -> str:
        """The measurements as an aligned text table."""
        header = ("pass", "part", "wall s", "peak anon MiB", "nodes", "ops changed")
        body = [
            (
                r.pass_name,
                r.label,
                f"{r.wall_s:.3f}",
                f"{r.peak_anon_bytes / 2**20:.0f}",
                f"{r.nodes_before} → {r.nodes_after}",
                r.op_changes,
            )
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header) - 1)]
        lines = []
        for row in [header, *body]:
            cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=False)]
            lines.append("  ".join([*cells, row[-1]]))
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join(lines)

    def finish(self, bundle: Bundle) -> None:
        print(self.table(), file=self.stream or sys.stderr)


def _statistics(pass_: object) -> str:
    """A pass's counts from its last call (rules fired…), for the table."""
    statistics: dict[str, int] = getattr(pass_, "statistics", None) or {}
    return ", ".join(f"{key} {value}" for key, value in statistics.items())


class VerifyEach(Instrument):
    """Run the ONNX checker with full shape inference on each part after each pass."""

    def after_unit(
        self, step: Step, label: str, models: Sequence[ir.Model], modified: bool
    ) -> None:
        if not modified:
            return
        checker = ir.passes.common.CheckerPass(full_check=True)
        for model in models:
            try:
                checker(model)
            except Exception as exc:
                where = "the bundle" if label == ALL_PARTS else f"part '{label}'"
                raise SurgeryError(
                    f"{step.origin}: --verify-each: pass '{step.name}' left an invalid model "
                    f"in {where}: {exc}"
                ) from exc


class ProgressLog(Instrument):
    """Print one line per pass as it starts."""

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total = total
        self.stream = stream

    def before_unit(self, step: Step, label: str, models: Sequence[ir.Model]) -> None:
        print(
            f"[{step.index + 1}/{self.total}] {step.name} on {label}",
            file=self.stream or sys.stderr,
        )
