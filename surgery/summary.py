"""``surgery inspect``: what a model takes, computes, holds and where its weights live.

Reads only the graph: parameter counts and sizes come from tensor shapes, external-data sizes
from the files on disk; no weight is loaded.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from pathlib import Path

import onnx_ir as ir

from surgery.bundle import Bundle
from surgery.tensors import iter_tensors

__all__ = ["format_bytes", "op_histogram", "summarize"]


def op_histogram(models: Sequence[ir.Model]) -> collections.Counter[str]:
    """Count nodes by op type (``domain::Op`` outside the default domain), subgraphs included."""
    counts: collections.Counter[str] = collections.Counter()
    for model in models:
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            counts[f"{node.domain}::{node.op_type}" if node.domain else node.op_type] += 1
    return counts


def format_bytes(n: float) -> str:
    """``1536`` → ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _type_of(value: ir.Value) -> str:
    dtype = value.dtype.short_name() if value.dtype is not None else "?"
    if value.shape is None:
        return f"{dtype} [?]"
    dims = ", ".join(str(d) if d is not None else "?" for d in value.shape)
    return f"{dtype} [{dims}]"


def _io_lines(title: str, values: list[ir.Value]) -> list[str]:
    lines = [f"  {title}:"]
    width = max((len(v.name or "") for v in values), default=0)
    lines += [f"    {(v.name or '').ljust(width)}  {_type_of(v)}" for v in values]
    return lines


def _summarize_model(part: str, model: ir.Model) -> list[str]:
    lines = [f"part '{part}' (opset {model.opset_imports.get('', '?')}, IR v{model.ir_version})"]
    lines += _io_lines("inputs", list(model.graph.inputs))
    lines += _io_lines("outputs", list(model.graph.outputs))
    ops = op_histogram([model])
    histogram = ", ".join(f"{op} {n}" for op, n in ops.most_common())
    lines.append(f"  ops ({sum(ops.values())} nodes): {histogram or '-'}")
    count: collections.Counter[str] = collections.Counter()
    size: collections.Counter[str] = collections.Counter()
    files: dict[Path, str] = {}
    for _, tensor in iter_tensors(model):
        dtype = tensor.dtype.short_name()
        count[dtype] += tensor.size
        size[dtype] += tensor.nbytes
        if isinstance(tensor, ir.ExternalTensor):
            files[Path(tensor.path).resolve()] = str(tensor.location)
    lines.append(f"  parameters: {sum(count.values()):,} ({format_bytes(sum(size.values()))})")
    lines += [
        f"    {dtype:<8} {count[dtype]:>14,}  {format_bytes(size[dtype])}"
        for dtype in sorted(count)
    ]
    if files:
        lines.append("  external data:")
        for path, location in sorted(files.items(), key=lambda kv: kv[1]):
            on_disk = path.stat().st_size
            lines.append(f"    {location}  {format_bytes(on_disk)} ({on_disk:,} bytes on disk)")
    else:
        lines.append("  external data: none (all weights inside the .onnx file)")
    return lines


def summarize(bundle: Bundle) -> str:
    """A human-readable summary of every part."""
    return "\n\n".join("\n".join(_summarize_model(p, m)) for p, m in bundle.items())
