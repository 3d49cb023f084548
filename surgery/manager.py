"""The pass manager: runs passes over a bundle, with instrumentation hooks around every step.

Modelled on LLVM's ``PassInstrumentation``: the manager only runs passes and calls hooks; the
user-facing flags are instruments built on those hooks (:mod:`surgery.instruments`). Compared
with ``onnx_ir.passes.PassManager``, it adds parts (a model pass runs on each selected part),
bundle passes, recipe positions in errors, and hooks.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import onnx_ir as ir

from surgery.bundle import Bundle
from surgery.errors import SurgeryError
from surgery.pass_infra import BundlePass, ModelPass, PassContext, SurgeryPass

__all__ = ["Instrument", "PassFailed", "PassManager", "Step"]

logger = logging.getLogger(__name__)

#: Label used for work that spans the whole bundle (bundle passes).
ALL_PARTS = "(all parts)"


class PassFailed(RuntimeError):
    """A pass raised something that is not a user error: a bug, reported with its context."""


@dataclasses.dataclass(frozen=True)
class Step:
    """A pass at a position in a pipeline.

    Attributes:
        index: Position in the pipeline (0-based).
        pass_: The pass.
        origin: Where it was declared, e.g. ``recipes/x.yaml:7: passes[2] (fp16)``.
    """

    index: int
    pass_: SurgeryPass
    origin: str

    @property
    def name(self) -> str:
        return self.pass_.name


class Instrument:
    """Hooks called by :class:`PassManager`. Override what you need; all default to no-ops.

    A *unit* is one pass on one part (``label`` is the part name, ``models`` one model), or a
    bundle pass on the whole bundle (``label`` is :data:`ALL_PARTS`, ``models`` every part).
    """

    def start(self, bundle: Bundle) -> None:
        """Before the first pass."""

    def before_unit(self, step: Step, label: str, models: Sequence[ir.Model]) -> None:
        """Before a pass runs on a part (or on the whole bundle)."""

    def after_unit(
        self, step: Step, label: str, models: Sequence[ir.Model], modified: bool
    ) -> None:
        """After a pass ran on a part (or on the whole bundle)."""

    def after_failure(
        self, step: Step, label: str, models: Sequence[ir.Model], error: BaseException
    ) -> None:
        """After a pass failed on a part (or on the whole bundle), or an instrument's
        ``after_unit`` refused its result; ``models`` are as the failure left them. MLIR's
        ``runAfterPassFailed``: release what ``before_unit`` took, write what helps debugging.
        The error is re-raised after every instrument has seen it."""

    def after_pass(self, step: Step, bundle: Bundle, modified: bool) -> None:
        """After a pass ran on every selected part."""

    def finish(self, bundle: Bundle) -> None:
        """After the last pass, when every pass succeeded."""


class PassManager:
    """Run a sequence of passes over a bundle.

    Example:
        >>> PassManager([RemoveUnused(), TopologicalSort()]).run(bundle)
    """

    def __init__(
        self,
        passes: Sequence[SurgeryPass | Step],
        instruments: Sequence[Instrument] = (),
        context: PassContext | None = None,
    ) -> None:
        self.steps = [
            p if isinstance(p, Step) else Step(i, p, f"passes[{i}] ({p.name})")
            for i, p in enumerate(passes)
        ]
        self.instruments = list(instruments)
        #: What every pass is told about where the result goes (a recipe's layout).
        self.context = context if context is not None else PassContext()

    def check_parts(self, parts: Sequence[str] | None) -> None:
        """Check, before any work, that every pass names parts that will exist when it runs.

        ``parts`` may be None when the input is not known yet (``surgery validate``): names are
        then checked only after a pass that decides the parts (such as a split).
        """
        current = list(parts) if parts is not None else None
        for step in self.steps:
            wanted = step.pass_.parts
            missing = [p for p in wanted or () if current is not None and p not in current]
            if missing:
                assert current is not None
                raise SurgeryError(
                    f"{step.origin}: parts: no part named '{missing[0]}' at this point; "
                    f"parts then: {', '.join(current)}"
                )
            current = step.pass_.output_parts(current)
        for position, step in enumerate(self.steps):
            # A pass may need a later one (quantize's q4f16 needs fp16): it says what is missing.
            check = getattr(step.pass_, "check_following", None)
            problem = check([s.pass_ for s in self.steps[position + 1 :]]) if check else None
            if problem:
                raise SurgeryError(f"{step.origin}: {problem}")

    def check_context(self) -> None:
        """Check, before any work, that every pass agrees with the context (the chunk limit)."""
        for step in self.steps:
            try:
                step.pass_.check_context(self.context)
            except SurgeryError as exc:
                raise SurgeryError(f"{step.origin}: {exc}") from None

    def run(self, bundle: Bundle) -> bool:
        """Run every pass in order; return whether any pass modified the bundle."""
        self.check_parts(bundle.parts)
        self.check_context()
        for step in self.steps:
            step.pass_.context = self.context
        for instrument in self.instruments:
            instrument.start(bundle)
        modified_any = False
        for step in self.steps:
            modified = self._run_step(step, bundle)
            for instrument in self.instruments:
                instrument.after_pass(step, bundle, modified)
            modified_any |= modified
        for instrument in self.instruments:
            instrument.finish(bundle)
        return modified_any

    def _run_step(self, step: Step, bundle: Bundle) -> bool:
        pass_ = step.pass_
        if isinstance(pass_, BundlePass):
            return self._run_unit(step, ALL_PARTS, bundle, pass_)
        if not isinstance(pass_, ModelPass):
            raise TypeError(f"{step.origin}: {pass_!r} is neither a ModelPass nor a BundlePass")
        modified = False
        for part in pass_.parts if pass_.parts is not None else bundle.parts:
            modified |= self._run_unit(step, part, bundle, pass_)
        return modified

    def _run_unit(self, step: Step, label: str, bundle: Bundle, pass_: SurgeryPass) -> bool:
        models = list(bundle.values()) if label == ALL_PARTS else [bundle[label]]
        for instrument in self.instruments:
            instrument.before_unit(step, label, models)
        try:
            try:
                modified = self._call(pass_, label, bundle)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:
                raise self._failure(step, label, exc) from exc
            models = list(bundle.values()) if label == ALL_PARTS else [bundle[label]]
            for instrument in self.instruments:
                instrument.after_unit(step, label, models, modified)
        except BaseException as exc:
            models = list(bundle.values()) if label == ALL_PARTS else [bundle[label]]
            for instrument in self.instruments:
                try:
                    instrument.after_failure(step, label, models, exc)
                except Exception:  # the pass's error is the one to report
                    logger.exception("%s.after_failure failed", type(instrument).__name__)
            raise
        return modified

    @staticmethod
    def _call(pass_: SurgeryPass, label: str, bundle: Bundle) -> bool:
        """Run one unit through the pass's ``__call__`` (requires, call, ensures)."""
        if isinstance(pass_, BundlePass):
            bundle_result = pass_(bundle)
            if bundle_result.bundle is not bundle:
                parts = dict(bundle_result.bundle)
                bundle.clear()
                bundle.update(parts)
            return bundle_result.modified
        assert isinstance(pass_, ModelPass)
        result = pass_(bundle[label])
        bundle[label] = result.model
        return result.modified

    def _failure(self, step: Step, label: str, exc: Exception) -> Exception:
        before = [s.name for s in self.steps[: step.index]]
        after = f"after {', '.join(before)}" if before else "as the first pass"
        where = "the bundle" if label == ALL_PARTS else f"part '{label}'"
        detail = f"{exc}: {exc.__cause__}" if exc.__cause__ is not None else str(exc)
        message = f"{step.origin}: pass '{step.name}' failed on {where}, {after}: {detail}"
        user_error = isinstance(exc, SurgeryError | ir.passes.PreconditionError) or isinstance(
            exc.__cause__, SurgeryError
        )
        return SurgeryError(message) if user_error else PassFailed(message)
