"""Pattern-rule passes: a :class:`ModelPass` that runs onnxscript rewrite rules and counts them.

Reused, not rewritten: onnxscript's rewriter (``onnxscript.rewriter.pattern``) does the matching
(commutativity, use counts, dead-node cleanup, subgraphs and model functions) and the
replacement. What :class:`RewritePass` adds around ``RewriteRuleSet.apply_to_model``:

* **match counts per rule**, as :attr:`~surgery.pass_infra.SurgeryPass.statistics` (the rule set
  itself only returns a total): each rule is wrapped in a counter that sees every application, so
  ``--time-passes`` prints them and ``modified`` is exactly "some rule fired";
* **expected counts** (``expect: {rule: N}``): a count that differs is refused with a
  :class:`~surgery.errors.SurgeryError` naming the rule, so a model that no longer matches what a
  recipe was written for fails loudly instead of silently keeping the slow graph;
* **explain** (``explain: true``): a dry run under onnxscript's ``MatchingTracer``, then one line
  per rule that did not fire, with its best partial match and the reason the matcher or the rule's
  check gave. The dry run is made on a clone (weights shared): onnxscript documents it as changing
  nothing, but a replacement it builds and drops stays a user of the matched inputs (measured: 16
  such uses after grouped-attention's), which a later rule or pass reading use counts would see. onnxscript's own ``MatchingTracer.report`` prints
  only the single best match over all rules, to stdout; we want every silent rule, on stderr.
* **match-only rules** (:attr:`RewritePass.match_only`): the rules find subgraphs and
  :meth:`RewritePass.on_match` records them; the graph is left exactly as it was. This is how an
  analysis (the fp32 islands of :mod:`passes.fp16_islands`) is written as pattern rules without
  rewriting nodes only to mark them: a marker rewrite would re-create the matched nodes (new
  names, new order, rule metadata) and the graph the next pass sees would differ.
"""

from __future__ import annotations

import logging
import sys
import typing
from collections.abc import Sequence
from typing import Any, ClassVar, TextIO, TypeVar

import numpy as np
import onnx_ir as ir
import pydantic
from onnxscript.rewriter import pattern

from surgery.cloning import clone_model
from surgery.errors import SurgeryError
from surgery.pass_infra import ModelPass, PassOptions

__all__ = ["RewriteOptions", "RewritePass", "rule_name", "scalar_constant"]

logger = logging.getLogger(__name__)


class RewriteOptions(PassOptions):
    """Options every pattern-rule pass has."""

    explain: bool = pydantic.Field(
        default=False, description="print, for each rule that did not fire, why (MatchingTracer)"
    )
    expect: dict[str, int] = pydantic.Field(
        default_factory=dict,
        description="rule name -> how many times it must fire on each part (a differing count "
        "is an error)",
    )


OptionsT = TypeVar("OptionsT", bound=RewriteOptions)


def rule_name(rule: Any) -> str:
    """The name a rule is counted under (commuted variants of one rule share it)."""
    return str(getattr(rule, "name", None) or rule)


class _Counted:
    """A rule as ``RewriteRuleSet`` sees it, counting its applications for the owning pass."""

    def __init__(self, rule: Any, owner: RewritePass[Any], *, record: bool) -> None:
        self.rule = rule
        self.owner = owner
        self.record = record
        self.name = rule_name(rule)
        # A match-only rule removes nothing, so the rule set must not sweep "unused" nodes.
        self.remove_nodes = True if owner.match_only else rule.remove_nodes
        self.as_function = False if owner.match_only else rule.as_function
        self.graph_pre_visitor = getattr(rule, "graph_pre_visitor", None)
        self.graph_post_visitor = getattr(rule, "graph_post_visitor", None)

    def __str__(self) -> str:
        return self.name

    def try_rewrite(
        self,
        model: ir.Model,
        graph_or_function: ir.Graph | ir.Function,
        node: ir.Node,
        *,
        verbose: int | None = None,
        tracer: pattern.MatchingTracer | None = None,
    ) -> Any:
        if self.owner.match_only:
            match = self.rule.match(
                model,
                graph_or_function,
                node,
                verbose=verbose,
                check_nodes_are_removable=False,
                tracer=tracer,
            )
            if match and self.record:
                self.owner.statistics[self.name] += 1
                self.owner.on_match(self.name, match)
            return None
        delta = self.rule.try_rewrite(
            model, graph_or_function, node, verbose=verbose, tracer=tracer
        )
        if delta is not None and self.record:
            self.owner.statistics[self.name] += 1
            self.owner.on_match(self.name, delta.match)
        return delta


class RewritePass(ModelPass[OptionsT]):
    """A pass made of onnxscript rewrite rules; subclasses say which in :meth:`rules`.

    ``statistics`` holds, after each call, how many times each rule fired on that part.
    """

    #: True: rules only find subgraphs for :meth:`on_match`; the graph is not changed.
    match_only: ClassVar[bool] = False
    #: Where ``explain`` prints (None: stderr).
    explain_stream: TextIO | None = None

    def rules(self) -> pattern.RewriteRuleSet | Sequence[Any]:
        """The rules: a ``RewriteRuleSet`` (say ``commute=True`` there) or a list of rules."""
        raise NotImplementedError

    def on_match(self, rule: str, match: pattern.MatchResult) -> None:
        """Called for each application of ``rule`` (each match, for match-only rules)."""

    def _rule_list(self) -> list[Any]:
        rules = self.rules()
        return list(rules.rules if isinstance(rules, pattern.RewriteRuleSet) else rules)

    def _apply(
        self, model: ir.Model, rules: list[Any], *, tracer: pattern.MatchingTracer | None
    ) -> None:
        if not rules:  # RewriteRuleSet refuses an empty list; nothing can fire
            return
        counted = [_Counted(rule, self, record=tracer is None) for rule in rules]
        rule_set = pattern.RewriteRuleSet(typing.cast(list[pattern.RewriteRule], counted))
        rule_set.apply_to_model(model, tracer=tracer)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        rules = self._rule_list()
        self.statistics = dict.fromkeys((rule_name(r) for r in rules), 0)
        if self.options.explain:
            self._explain(model, rules)
        self._apply(model, rules, tracer=None)
        logger.info(
            "%s: %s",
            self.name,
            ", ".join(f"{rule} {count}" for rule, count in self.statistics.items()),
        )
        for rule, expected in self.options.expect.items():
            if rule not in self.statistics:
                raise SurgeryError(
                    f"{self.name}: expect: no rule named '{rule}'; rules: "
                    f"{', '.join(self.statistics)}"
                )
            if self.statistics[rule] != expected:
                raise SurgeryError(
                    f"{self.name}: rule '{rule}' fired {self.statistics[rule]} times in "
                    f"'{model.graph.name}', expected {expected}"
                )
        fired = sum(self.statistics.values())
        return ir.passes.PassResult(model, modified=fired > 0 and not self.match_only)

    def _explain(self, model: ir.Model, rules: list[Any]) -> None:
        tracer = pattern.MatchingTracer()
        self._apply(clone_model(model), rules, tracer=tracer)
        best: dict[str, Any] = {}
        for rule, infos in tracer.best_matches_map.items():
            name = rule_name(rule)
            if infos and (name not in best or infos[0].score() > best[name].score()):
                best[name] = infos[0]
        stream = self.explain_stream or sys.stderr
        for name in dict.fromkeys(rule_name(r) for r in rules):
            line = _why_not(name, best.get(name))
            if line is not None:
                print(f"{self.name}: {line}", file=stream)


def _why_not(rule: str, info: Any) -> str | None:
    """One line saying why ``rule`` did not fire, from its best ``MatchInfo`` (None: it fired)."""
    if info is None:
        return f"rule '{rule}' did not fire: no node matched any part of its pattern"
    status = info.status
    if status == pattern.MatchStatus.SUCCESS:
        return None
    result = info.match_result
    root = info.root_node
    at = f"at node '{root.name}' ({root.op_type}), {len(result.nodes)} pattern nodes matched"
    reason = result.reason or "no reason given"
    culprits = [getattr(x, "name", None) or "?" for x in result.failure_nodes_and_values]
    where = f" (at {', '.join(culprits)})" if culprits else ""
    kind = {
        pattern.MatchStatus.NO_MATCH: "best partial match",
        pattern.MatchStatus.CONDITION_FAILED: "matched but its check failed",
        pattern.MatchStatus.REPLACEMENT_FAILED: "matched but its replacement failed",
    }[status]
    return f"rule '{rule}' did not fire: {kind} {at}: {reason}{where}"


def scalar_constant(value: ir.Value | None) -> float | None:
    """The value of a one-element constant (an initializer or a ``Constant`` node), or None.

    Rules check such operands (a scale, a softcap, an exponent) in their ``check`` functions.
    """
    if value is None:
        return None
    tensor = value.const_value
    if tensor is None:
        producer = value.producer()
        attr = producer.attributes.get("value") if producer is not None else None
        if producer is None or producer.op_type != "Constant" or attr is None:
            return None
        tensor = attr.as_tensor()
    if tensor.size != 1:
        return None
    return float(np.asarray(tensor.numpy()).reshape(-1)[0])
