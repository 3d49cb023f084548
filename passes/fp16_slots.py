"""Op-schema slot typing for :mod:`passes.fp16`: which inputs and outputs of an op may hold float16.

An fp16 node's slot becomes float16 only where the op's schema allows it: a slot typed by a type
variable whose allowed types include ``tensor(float16)`` converts, a slot of fixed type
(``Resize`` scales, ``LayerNormalization``'s float32 statistics) keeps float32. Read from ONNX's
schemas (``onnx.defs``) and, for ``com.microsoft`` contrib ops, ONNX Runtime's; memoised per
(domain, op, version). An op without a known schema is None: the converter keeps it fp32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import onnx

__all__ = ["Signature", "op_signature"]

_ORT_DOMAINS = ("com.microsoft",)


@dataclasses.dataclass(frozen=True)
class Signature:
    """Which input and output slots of an op may hold float16."""

    inputs: tuple[bool, ...]
    outputs: tuple[bool, ...]
    variadic_input: bool
    variadic_output: bool

    def input(self, index: int) -> bool:
        return _slot(self.inputs, index, self.variadic_input)

    def output(self, index: int) -> bool:
        return _slot(self.outputs, index, self.variadic_output)


def _slot(slots: tuple[bool, ...], index: int, variadic: bool) -> bool:
    if index < len(slots):
        return slots[index]
    return variadic and bool(slots) and slots[-1]


def _signature(params: Any, formal_in: Any, formal_out: Any, type_str: str) -> Signature:
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in params}

    def converts(param: Any) -> bool:
        kind = getattr(param, type_str)
        return "tensor(float16)" in allowed.get(kind, {kind})

    def variadic(formal: Any) -> bool:
        return bool(formal) and "Variadic" in str(formal[-1].option)

    return Signature(
        tuple(converts(p) for p in formal_in),
        tuple(converts(p) for p in formal_out),
        variadic(formal_in),
        variadic(formal_out),
    )


@functools.cache
def _ort_schemas() -> dict[tuple[str, str], list[Any]]:
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    schemas: dict[tuple[str, str], list[Any]] = {}
    for schema in ort_state.get_all_operator_schema():
        if schema.domain in _ORT_DOMAINS:
            schemas.setdefault((schema.domain, schema.name), []).append(schema)
    return schemas


@functools.cache
def op_signature(domain: str, op_type: str, version: int) -> Signature | None:
    """The fp16-capable slots of an op, from ONNX's schemas (or ONNX Runtime's contrib ones)."""
    if domain in ("", "ai.onnx"):
        try:
            schema = onnx.defs.get_schema(op_type, max_inclusive_version=version, domain="")
        except onnx.defs.SchemaError:
            return None
        return _signature(schema.type_constraints, schema.inputs, schema.outputs, "type_str")
    candidates = [
        s for s in _ort_schemas().get((domain, op_type), []) if s.since_version <= max(version, 1)
    ]
    if not candidates:
        return None
    schema = max(candidates, key=lambda s: s.since_version)
    return _signature(schema.type_constraints, schema.inputs, schema.outputs, "typeStr")
