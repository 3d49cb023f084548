"""The chunked writer: Transformers.js chunk names, sizes under the limit, alignment, parity."""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from _util import run_onnx

from surgery import SurgeryError, load, writer
from surgery.bundle import Bundle
from surgery.lazy import (
    ConcatenatedTensor,
    DerivedTensor,
    SharedComputation,
    TransposedTensor,
    computed_whole_when_written,
)
from surgery.synthetic import write_synthetic_model
from surgery.transformersjs import TransformersJsLayout
from surgery.writer import LARGE_ALIGNMENT, write_model


def test_chunks_stay_under_the_limit_with_transformersjs_names(tmp_path: Path) -> None:
    source = write_synthetic_model(tmp_path / "m.onnx", layers=6)  # six 4 KiB weights
    layout = TransformersJsLayout(max_chunk_bytes=10_000)
    out = tmp_path / "out" / layout.model_file("decoder_fp16")
    names = write_model(
        load(source)["m"],
        out,
        lambda chunk: layout.data_file("decoder_fp16", chunk),
        max_chunk_bytes=layout.max_chunk_bytes,
    )
    assert out == tmp_path / "out" / "onnx" / "decoder_fp16.onnx"
    assert names == [
        "decoder_fp16.onnx_data",
        "decoder_fp16.onnx_data_1",
        "decoder_fp16.onnx_data_2",
    ]
    sizes = [(out.parent / n).stat().st_size for n in names]
    assert all(size <= 10_000 for size in sizes), sizes
    locations = {
        e.value
        for t in onnx.load(out, load_external_data=False).graph.initializer
        for e in t.external_data
        if e.key == "location"
    }
    assert locations == set(names)
    # Same weights, same kernels: the outputs are bitwise equal.
    np.testing.assert_array_equal(run_onnx(out), run_onnx(source))


def test_large_tensors_are_aligned_for_memory_mapping(tmp_path: Path) -> None:
    source = write_synthetic_model(tmp_path / "m.onnx", width=600, layers=3)  # 1.4 MB weights
    out = tmp_path / "out" / "m.onnx"
    write_model(load(source)["m"], out, lambda _: "m.onnx_data")
    offsets = {
        t.name: int(e.value)
        for t in onnx.load(out, load_external_data=False).graph.initializer
        for e in t.external_data
        if e.key == "offset"
    }
    weights = [offsets[f"layer{i}.weight"] for i in range(3)]
    assert all(offset % LARGE_ALIGNMENT == 0 for offset in weights), weights
    assert any(offset % LARGE_ALIGNMENT for offset in offsets.values()), "small ones packed"
    np.testing.assert_array_equal(run_onnx(out, width=600), run_onnx(source, width=600))


def test_a_tensor_larger_than_the_limit_is_refused(tmp_path: Path) -> None:
    source = write_synthetic_model(tmp_path / "m.onnx")
    with pytest.raises(SurgeryError) as info:
        write_model(
            load(source)["m"], tmp_path / "out.onnx", lambda c: f"d{c}", max_chunk_bytes=1000
        )
    assert str(info.value) == (
        "out.onnx: tensor 'layer0.weight' (4.0 KiB) is larger than the chunk limit (1000 B); "
        "split it in the graph first (pass split-large-tensors) or raise the limit"
    )


def test_a_model_without_large_tensors_writes_no_data_file(tmp_path: Path) -> None:
    source = write_synthetic_model(tmp_path / "m.onnx", width=8)  # 256-byte weights: all inline
    out = tmp_path / "out" / "m.onnx"
    assert write_model(load(source)["m"], out, lambda _: "m.onnx.data") == []
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.onnx"]
    np.testing.assert_array_equal(run_onnx(out, width=8), run_onnx(source, width=8))


@pytest.mark.parametrize(
    ("parts", "transposing"),
    [(1, False), (2, False), (2, True)],
    ids=["one part", "two parts side by side", "beside a part transposing lazy tensors"],
)
def test_a_tensor_over_the_ahead_window_is_computed_only_after_the_last_is_freed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, parts: int, transposing: bool
) -> None:
    """Peak memory is the window plus one large tensor: never two large ones at once, also when
    two parts are written side by side (they share the window).

    Each lazy weight here is larger than the (shrunk) window, so at most one computed array
    may be alive at any time; the writer's loop and the prefetching generator must both let go
    of a tensor before the next one is computed (a held reference doubled the 3B apply's peak),
    and a part may not compute while the other's tensor is alive (two parts at once took the
    3B apply from 1.38 to 1.56 GiB). A tensor streaming itself from a lazy source it computes
    whole (``fold-transposes`` after ``fp16``) counts too.
    """
    monkeypatch.setattr(writer, "AHEAD_BYTES", 1024)
    source = write_synthetic_model(tmp_path / "m.onnx", layers=6)  # six 4 KiB weights
    bundle = Bundle({f"p{i}": load(source)["m"] for i in range(parts)})
    alive = most_alive = 0
    count = threading.Lock()

    def freed() -> None:
        nonlocal alive
        with count:
            alive -= 1

    def lazy(tensor: ir.TensorProtocol) -> ir.LazyTensor:
        def compute() -> ir.Tensor:
            nonlocal alive, most_alive
            array = tensor.numpy() + np.float32(1)  # a new array, like a real conversion
            weakref.finalize(array, freed)
            with count:
                alive += 1
                most_alive = max(most_alive, alive)
            time.sleep(0.01)  # room for the other part to compute meanwhile, were it let
            return ir.Tensor(array, name=tensor.name)

        return ir.LazyTensor(compute, dtype=tensor.dtype, shape=tensor.shape, name=tensor.name)

    for part, model in bundle.items():
        for value in model.graph.initializers.values():
            assert value.const_value is not None
            if value.const_value.nbytes > 1024:  # the data file's (small ones go inline)
                value.const_value = lazy(value.const_value)
                if transposing and part == "p1":  # square weights: the same shape transposed
                    value.const_value = TransposedTensor(value.const_value, name=value.name or "")
    if parts == 1:
        write_model(bundle["p0"], tmp_path / "out" / "m.onnx", lambda chunk: "m.onnx.data")
    else:
        writer.save(bundle, tmp_path / "out", progress=False)
    assert most_alive == 1


def test_lazy_tensor_subclasses_are_computed_ahead_unless_they_stream_themselves(
    tmp_path: Path,
) -> None:
    """Found by capability, not exact type: a ``LazyTensor`` subclass that writing would compute
    whole (``DerivedTensor``) is computed by the writer's threads; one with its own ``tofile``
    (like the exporter's ``CastingTensor``) streams itself from the writing thread."""
    source = write_synthetic_model(tmp_path / "m.onnx", layers=2)
    model = load(source)["m"]
    threads: dict[str, str] = {}

    class Streaming(ir.LazyTensor):
        def tofile(self, file: Any) -> None:
            threads[self.name or ""] = threading.current_thread().name
            super().tofile(file)

    values = [
        v
        for v in model.graph.initializers.values()
        if v.const_value is not None and v.const_value.nbytes > 1024
    ]
    derived, streaming = values[0], values[1]
    assert derived.const_value is not None and streaming.const_value is not None

    def plus_one(array: np.ndarray) -> np.ndarray:
        threads[derived.name or ""] = threading.current_thread().name
        return array + np.float32(1)

    expected = derived.const_value.numpy() + np.float32(1)
    derived.const_value = DerivedTensor(derived.const_value, plus_one, name=derived.name or "")
    original = streaming.const_value
    streaming.const_value = Streaming(
        original.numpy, dtype=original.dtype, shape=original.shape, name=streaming.name
    )
    assert computed_whole_when_written(derived.const_value)
    assert not computed_whole_when_written(streaming.const_value)
    out = tmp_path / "out" / "m.onnx"
    write_model(model, out, lambda chunk: "m.onnx.data")
    assert threads[derived.name or ""] != threading.main_thread().name
    assert threads[streaming.name or ""] == threading.main_thread().name
    written = {t.name: t for t in onnx.load(out).graph.initializer}
    np.testing.assert_array_equal(
        onnx.numpy_helper.to_array(written[derived.name], str(out.parent)), expected
    )


def test_lazy_tensors_have_a_finite_repr() -> None:
    """Printing a model holding lazy tensors works: onnx_ir's ``LazyTensor`` repr shows its
    function, a bound method of the tensor, whose repr showed the tensor again, without end."""
    source = ir.Tensor(np.arange(6, dtype=np.float32).reshape(2, 3), name="w")
    group = SharedComputation(source, lambda a: [a, a.max()], key="max")
    tensors = [
        DerivedTensor(source, lambda a: a * 2, name="doubled"),
        ConcatenatedTensor([source, source], axis=0, name="joined"),
        TransposedTensor(source, name="w_t"),
        group.member(1, name="w_max", dtype=ir.DataType.FLOAT, shape=ir.Shape([])),
    ]
    for tensor in tensors:
        assert repr(ir.Value(name=tensor.name, const_value=tensor)).count(tensor.name) >= 1
    assert repr(tensors[2]) == "TransposedTensor(name='w_t', dtype=FLOAT, shape=[3,2])"


def _three_parts(tmp_path: Path) -> Bundle:
    """A bundle of three copies of one synthetic model (each its own graph, as copy-parts makes)."""
    source = write_synthetic_model(tmp_path / "m.onnx", layers=2)
    return Bundle({part: load(source)["m"] for part in ("a", "b", "c")})


def test_save_writes_two_parts_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parts that share no written bytes are written side by side (a copy-only fp32 part leaves
    a core to another part's quantization): the first two meet at a barrier while both are being
    written, which times out if ``save`` writes one part at a time."""
    assert writer.PARALLEL_PARTS == 2
    meet = threading.Barrier(2, timeout=30)
    write = writer.write_model

    def meeting(model: ir.Model, path: Path, *args: Any, **kwargs: Any) -> list[str]:
        if path.stem in ("a", "b"):
            meet.wait()
        return write(model, path, *args, **kwargs)

    monkeypatch.setattr(writer, "write_model", meeting)
    bundle = _three_parts(tmp_path)
    writer.save(bundle, tmp_path / "out", progress=False)
    for part in bundle:
        assert load(tmp_path / "out" / f"{part}.onnx")[part].graph.initializers.keys() == (
            bundle[part].graph.initializers.keys()
        )


def test_a_part_failing_beside_another_leaves_nothing(tmp_path: Path) -> None:
    """One part's error while another is being written: the error comes out once the other is
    done, and no output folder is left."""
    bundle = _three_parts(tmp_path)
    value = next(v for v in bundle["b"].graph.initializers.values() if v.name.endswith("weight"))
    assert value.const_value is not None

    def broken(array: np.ndarray) -> np.ndarray:
        raise SurgeryError("b: broken on purpose")

    value.const_value = DerivedTensor(value.const_value, broken, name=value.name or "")
    with pytest.raises(SurgeryError, match="broken on purpose"):
        writer.save(bundle, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx", "m.onnx.data"]


def test_parts_written_side_by_side_read_a_shared_stored_tensor_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two parts computing from one stored tensor at once (copy-parts shares tensors: an fp16
    part beside its fp32 one) map it once: ``onnx_ir.ExternalTensor`` maps on first read without
    a lock, and two first reads at once failed the 3B apply ("The array should be loaded only
    once"). The first read is slowed here so that both parts reach it together."""
    source = write_synthetic_model(tmp_path / "m.onnx", width=64, layers=1)
    bundle = Bundle({part: load(source)["m"] for part in ("a", "b")})
    shared = next(
        v.const_value
        for v in bundle["a"].graph.initializers.values()
        if v.const_value is not None and v.const_value.nbytes > 1024
    )
    assert isinstance(shared, ir.ExternalTensor)
    for model in bundle.values():
        for value in model.graph.initializers.values():
            if value.const_value is not None and value.const_value.nbytes > 1024:
                value.const_value = DerivedTensor(
                    shared, lambda array: array + np.float32(1), name=value.name or ""
                )
    # A first save imports what writing needs: an import in one thread holds a lock that would
    # keep the other part from the meeting below.
    writer.save(Bundle({"warm": load(source)["m"]}), tmp_path / "warm", progress=False)
    load_once = ir.ExternalTensor._load
    meet = threading.Barrier(2, timeout=5)

    def slow_load(self: ir.ExternalTensor) -> None:
        with contextlib.suppress(threading.BrokenBarrierError):
            meet.wait()  # both parts here at once, unless one waits for the other's read
        load_once(self)

    monkeypatch.setattr(ir.ExternalTensor, "_load", slow_load)
    writer.save(bundle, tmp_path / "out", progress=False)
    expected = shared.numpy() + np.float32(1)
    for part in bundle:
        written = load(tmp_path / "out" / f"{part}.onnx")[part]
        arrays = [v.const_value.numpy() for v in written.graph.initializers.values()]
        assert any(np.array_equal(a, expected) for a in arrays if a.shape == expected.shape)


def test_a_part_failing_while_the_other_waits_for_the_window_ends_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A part whose computation fails gives back its room in the shared window, so the part
    waiting for it goes on and the error comes out (held room would leave the other waiting
    forever, and ``save`` with it)."""
    monkeypatch.setattr(writer, "AHEAD_BYTES", 1024)
    source = write_synthetic_model(tmp_path / "m.onnx", layers=4)  # 4 KiB weights
    bundle = Bundle({part: load(source)["m"] for part in ("a", "b")})

    def failing(array: np.ndarray) -> np.ndarray:
        time.sleep(0.2)  # b is waiting for the window meanwhile
        raise SurgeryError("a: broken on purpose")

    for part, model in bundle.items():
        for value in model.graph.initializers.values():
            if value.const_value is not None and value.const_value.nbytes > 1024:
                fn = failing if part == "a" else (lambda array: array + np.float32(1))
                value.const_value = DerivedTensor(value.const_value, fn, name=value.name or "")
    errors: list[BaseException] = []

    def run() -> None:
        try:
            writer.save(bundle, tmp_path / "out", progress=False)
        except SurgeryError as error:
            errors.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "save hangs: the failed part kept its room in the window"
    assert [str(e) for e in errors] == ["a: broken on purpose"]
    assert not (tmp_path / "out").exists()
