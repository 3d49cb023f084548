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
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import onnx_ir as ir
import onnx_ir.passes.common

from surgery.bundle import Bundle
from surgery.errors import SurgeryError
from surgery.manager import ALL_PARTS, Instrument, Step
from surgery.memory import PeakAnonSampler
from surgery.summary import op_histogram
from surgery.writer import save_model

__all__ = ["DumpAfterPass", "ProgressLog", "TimePasses", "VerifyEach"]


class DumpAfterPass(Instrument):
    """Write every part after every pass (or only after passes that changed something)."""

    def __init__(self, directory: str | Path, *, only_changed: bool = False) -> None:
        self.directory = Path(directory)
        self.only_changed = only_changed

    def _dump(self, folder_name: str, bundle: Bundle) -> None:
        folder = self.directory / folder_name
        if folder.exists():
            raise SurgeryError(f"{folder}: dump folder already exists; use an empty --dump-dir")
        for part, model in bundle.items():
            save_model(model, folder / f"{part}.onnx")

    def start(self, bundle: Bundle) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._dump("00-input", bundle)

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
        assert self._sampler is not None
        self._sampler.__exit__(None, None, None)
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
                self._sampler.peak_bytes,
                sum(self._before.values()),
                sum(after.values()),
                ", ".join(changes) or "-",
            )
        )

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
