"""One Gemma 2 attention layer: ``grouped-attention``'s standard ops against opset-23 ``Attention``.

Issue 12's option (b): ONNX's ``Attention`` (opset 23: grouped kv heads, ``softcap``,
``attn_mask``, ``past_key``/``past_value`` in, ``present_key``/``present_value`` out). Both
graphs take the same inputs, as the decoder has them after the rotary: ``Q [1, 8, S, 256]``,
the new ``K``/``V [1, 4, S, 256]``, the past ``[1, 4, P, 256]`` and an additive ``[1, 1, S, T]``
mask, and give the attention output and both presents:

* ``grouped``: what ``grouped-attention`` writes: the presents are ``Concat(past, new)``, then
  ``Q`` viewed ``[1, 4, 2·S, 256]`` against them (Q·Kᵀ, scale, ``50·tanh(s/50)``, mask, softmax,
  P·V), no repeat of the past;
* ``Attention``: one opset-23 node with ``scale`` and ``softcap``.

Before timing it checks that the two agree on every cell and that ONNX Runtime's ``Attention``
applies the softcap *before* the mask (a masked key with a large logit, the others very negative:
capping after the mask would give the masked key as much weight as the others). Then each cell
(decode: S = 1 at P = 272, 1040, 4112; prefill: S = 272, P = 0), both graphs taking turns run by
run, ONNX Runtime CPU with 2 intra-op threads; median and min of ``--runs`` after two warm-ups.

Usage: python benchmarks/attention_op.py [--runs N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

THREADS = 2
HEADS, KV_HEADS, HEAD_DIM, CAP = 8, 4, 256, 50.0
SCALE = 256**-0.5  # query_pre_attn_scalar 256
CELLS = [(1, 272), (1, 1040), (1, 4112), (272, 0)]


def _model(nodes: list[onnx.NodeProto], heads: int, kv_heads: int, dim: int) -> bytes:
    def value(name: str, h: int, seq: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, h, seq, dim])

    inputs = [value("q", heads, "S"), value("k", kv_heads, "S"), value("v", kv_heads, "S")]
    inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 1, "S", "T"]))
    inputs += [value("past_k", kv_heads, "P"), value("past_v", kv_heads, "P")]
    outputs = [value("y", heads, "S"), value("present_k", kv_heads, "T")]
    outputs.append(value("present_v", kv_heads, "T"))
    graph = helper.make_graph(nodes, "attention", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    return model.SerializeToString()


def grouped(heads: int = HEADS, kv_heads: int = KV_HEADS, dim: int = HEAD_DIM) -> bytes:
    """The layer as ``grouped-attention`` rewrites it (the presents joined by Concat)."""

    def const(name: str, value: object, dtype: type = np.int64) -> onnx.NodeProto:
        tensor = numpy_helper.from_array(np.array(value, dtype), name)
        return helper.make_node("Constant", [], [name], value=tensor)

    node = helper.make_node
    nodes = [
        node("Concat", ["past_k", "k"], ["present_k"], axis=2),
        node("Concat", ["past_v", "v"], ["present_v"], axis=2),
        const("by_kv", [0, kv_heads, -1, dim]),
        const("by_head", [0, heads, -1, 0]),
        const("probs_by_kv", [0, kv_heads, -1, 0]),
        const("out_by_head", [0, heads, -1, dim]),
        const("scale", SCALE, np.float32),
        const("cap", CAP, np.float32),
        node("Reshape", ["q", "by_kv"], ["q_kv"]),
        node("Transpose", ["present_k"], ["k_t"], perm=[0, 1, 3, 2]),
        node("MatMul", ["q_kv", "k_t"], ["qk"]),
        node("Mul", ["qk", "scale"], ["scaled"]),
        node("Div", ["scaled", "cap"], ["over_cap"]),
        node("Tanh", ["over_cap"], ["tanh"]),
        node("Mul", ["tanh", "cap"], ["capped"]),
        node("Reshape", ["capped", "by_head"], ["scores"]),
        node("Add", ["scores", "mask"], ["masked"]),
        node("Softmax", ["masked"], ["probs"], axis=-1),
        node("Reshape", ["probs", "probs_by_kv"], ["probs_kv"]),
        node("MatMul", ["probs_kv", "present_v"], ["out_kv"]),
        node("Reshape", ["out_kv", "out_by_head"], ["y"]),
    ]
    return _model(nodes, heads, kv_heads, dim)


def attention(heads: int = HEADS, kv_heads: int = KV_HEADS, dim: int = HEAD_DIM) -> bytes:
    """The layer as one opset-23 ``Attention`` node."""
    inputs = ["q", "k", "v", "mask", "past_k", "past_v"]
    outputs = ["y", "present_k", "present_v"]
    node = helper.make_node("Attention", inputs, outputs, scale=SCALE, softcap=CAP)
    return _model([node], heads, kv_heads, dim)


def _session(model: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _feeds(length: int, past: int, heads: int = HEADS, kv_heads: int = KV_HEADS,
           dim: int = HEAD_DIM) -> dict[str, np.ndarray]:  # fmt: skip
    rng = np.random.default_rng(0)

    def normal(h: int, seq: int) -> np.ndarray:
        return rng.standard_normal((1, h, seq, dim), dtype=np.float32)

    total = past + length
    mask = np.zeros((1, 1, length, total), np.float32)
    mask[..., 0] = np.finfo(np.float32).min  # one padded key, as the exporter's bias hides it
    return {"q": normal(heads, length), "k": normal(kv_heads, length),
            "v": normal(kv_heads, length), "mask": mask, "past_k": normal(kv_heads, past),
            "past_v": normal(kv_heads, past)}  # fmt: skip


def softcap_before_mask() -> bool:
    """Whether ONNX Runtime's ``Attention`` caps the scores before adding the mask."""
    session = _session(attention(1, 1, 4))
    feeds = _feeds(1, 2, 1, 1, 4)
    feeds["q"] = np.array([1, 0, 0, 0], np.float32).reshape(1, 1, 1, 4)
    # scores 1000 (masked), -1000, -1000: capped 50, -50, -50; values 100, 1, 3
    feeds["k"] = np.array([-1000, 0, 0, 0], np.float32).reshape(1, 1, 1, 4)
    feeds["past_k"] = np.array([[1000, 0, 0, 0], [-1000, 0, 0, 0]], np.float32).reshape(1, 1, 2, 4)
    feeds["v"] = np.array([3, 0, 0, 0], np.float32).reshape(1, 1, 1, 4)
    feeds["past_v"] = np.array([[100, 0, 0, 0], [1, 0, 0, 0]], np.float32).reshape(1, 1, 2, 4)
    feeds["mask"] = np.array([np.finfo(np.float32).min, 0, 0], np.float32).reshape(1, 1, 1, 3)
    feeds["q"] *= 1 / SCALE  # the scale attribute is query_pre_attn_scalar's
    out = float(session.run(["y"], feeds)[0].reshape(-1)[0])
    return abs(out - 2.0) < 1e-3  # the mean of 1 and 3; capped after the mask: about 34.7


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=21, help="timed runs per cell")
    args = parser.parse_args()
    print(f"ONNX Runtime {ort.__version__}: Attention applies softcap before the mask: "
          f"{softcap_before_mask()}")  # fmt: skip
    sessions = {"grouped": _session(grouped()), "Attention": _session(attention())}
    print(f"CPU, {THREADS} threads, ms per layer, median (min) of {args.runs} after 2 warm-ups")
    print("| cell | " + " | ".join(sessions) + " | max abs diff |")
    print("|---|" + "---:|" * (len(sessions) + 1))
    for length, past in CELLS:
        feeds = _feeds(length, past)
        outs = [s.run(None, feeds) for s in sessions.values()]
        diff = max(float(np.abs(a - b).max()) for a, b in zip(*outs, strict=True))
        times: dict[str, list[float]] = {label: [] for label in sessions}
        for run in range(args.runs + 2):
            for label, session in sessions.items():
                start = time.perf_counter()
                session.run(None, feeds)
                if run >= 2:
                    times[label].append((time.perf_counter() - start) * 1000)
        cell = f"decode, past {past}" if length == 1 else f"prefill {length}"
        print(f"| {cell} | " + " | ".join(
            f"{statistics.median(t):.2f} ({min(t):.2f})" for t in times.values()
        ) + f" | {diff:.1g} |")  # fmt: skip


if __name__ == "__main__":
    main()
