"""Synthetic fp32 models of any size, written without ever holding the weights in memory.

Used by tests (small, runnable in ONNX Runtime) and benchmarks (gigabytes). The graph is a chain
of ``MatMul → Add → Relu`` layers over an input ``x [batch, width]``, plus a dead branch and a
duplicated small constant, so cleanup passes have real work. Each weight is an
``onnx_ir.LazyTensor`` whose bytes are generated when the writer reaches it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import onnx_ir as ir

from surgery.progress import bar
from surgery.writer import external_bytes, save_model

__all__ = ["write_synthetic_model"]


def _random(shape: tuple[int, ...], seed: int, name: str) -> ir.LazyTensor:
    def make() -> ir.Tensor:
        rng = np.random.default_rng(seed)
        scale = 1.0 / math.sqrt(shape[0])
        return ir.Tensor(rng.standard_normal(shape, dtype=np.float32) * scale, name=name)

    return ir.LazyTensor(make, dtype=ir.DataType.FLOAT, shape=ir.Shape(shape), name=name)


def write_synthetic_model(
    path: str | os.PathLike[str],
    *,
    width: int = 32,
    layers: int = 3,
    total_bytes: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> Path:
    """Write ``path`` (+ ``<path>.data``) with fp32 weights, one tensor in memory at a time.

    Args:
        path: The ``.onnx`` file to write; its data file goes beside it.
        width: Width of each layer; weights are square, ``(width, width)``.
        layers: Number of layers, unless ``total_bytes`` is given.
        total_bytes: If given, enough layers for at least this many weight bytes.
        seed: Seed of the random weights.
        progress: Show a progress bar while writing.
    """
    path = Path(path)
    if total_bytes is not None:
        layers = max(1, math.ceil(total_bytes / (width * width * 4)))
    batch = ir.SymbolicDim("batch_size")
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([batch, width]))
    nodes: list[ir.Node] = []
    initializers: list[ir.Value] = []

    def weight(name: str, shape: tuple[int, ...], tensor_seed: int) -> ir.Value:
        value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.FLOAT))
        value.const_value = _random(shape, tensor_seed, name)
        initializers.append(value)
        return value

    def node(op: str, inputs: list[ir.Value], name: str) -> ir.Value:
        n = ir.Node("", op, inputs, name=name, num_outputs=1)
        n.outputs[0].name = f"{name}_out"
        n.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        n.outputs[0].shape = ir.Shape([batch, width])
        nodes.append(n)
        return n.outputs[0]

    h = x
    for i in range(layers):
        w = weight(f"layer{i}.weight", (width, width), seed * 100003 + 2 * i)
        b = weight(f"layer{i}.bias", (width,), seed * 100003 + 2 * i + 1)
        h = node(
            "Relu",
            [node("Add", [node("MatMul", [h, w], f"layer{i}.matmul"), b], f"layer{i}.add")],
            f"layer{i}.relu",
        )
    # Two identical small constants and a dead branch: work for dedup and unused-node removal.
    one_a = ir.Value(name="one_a", shape=ir.Shape([width]), type=ir.TensorType(ir.DataType.FLOAT))
    one_a.const_value = ir.tensor(np.ones(width, np.float32), name="one_a")
    one_b = ir.Value(name="one_b", shape=ir.Shape([width]), type=ir.TensorType(ir.DataType.FLOAT))
    one_b.const_value = ir.tensor(np.ones(width, np.float32), name="one_b")
    initializers += [one_a, one_b]
    y = node("Add", [node("Mul", [h, one_a], "scale"), one_b], "shift")
    y.name = "y"
    node("Neg", [h], "dead_branch")
    graph = ir.Graph(
        [x], [y], nodes=nodes, initializers=initializers, opset_imports={"": 21}, name="synthetic"
    )
    model = ir.Model(graph, ir_version=10, producer_name="onnx-surgery synthetic")
    total = external_bytes(model)
    with bar(total=total, desc="synthetic", enabled=progress) as progress_bar:
        save_model(model, path, progress=lambda tensor: progress_bar.update(tensor.nbytes))
    return path
