"""Lazy tensors: one helper for "a tensor computed from another by a function", and how to tell
whether writing a lazy tensor computes it whole.

Passes that change weights (fp16, fold-transposes, split-large-tensors) never compute them in the
pipeline: they wrap the source in a :class:`DerivedTensor`, an ``onnx_ir.LazyTensor`` whose bytes
are ``fn(source.numpy())``, computed when the writer reaches it and dropped after. Reused from
onnx_ir: ``LazyTensor`` itself (its ``numpy``, ``tofile`` and ``tobytes`` all evaluate the
function); what this adds is the source kept beside the function, so the four copies of this
closure in the passes are one.

The writer computes such tensors ahead of time in threads (:mod:`surgery.writer`). Which tensors
qualify is decided by capability, not exact type: :func:`computed_whole_when_written` is true for
any ``LazyTensor`` (subclasses included) whose ``tofile`` is ``LazyTensor``'s own, i.e. writing
it evaluates the whole tensor anyway, so computing it earlier in a thread costs no extra memory
beyond the writer's budget. A subclass that streams itself in blocks from its own ``tofile``
(the exporter's ``CastingTensor``) is written by that ``tofile``, which keeps its memory bounded.

Some computations give several tensors at once: quantizing one weight gives its packed values,
scales and zero points. :class:`SharedComputation` runs such a computation once for all of its
:class:`SharedTensor` members and lets go of each member's array as soon as that member has
been read, so after the last member is written nothing is held. The writer reaches the members
one after the other (they are declared together); its threads computing ahead may ask for two
members at once, so the computation runs under a lock. Groups given a ``key`` (what they compute)
name their members' bytes (:func:`content_key`): q4 and q4f16 variants of one weight quantize it
alike, so the writer copies the bytes the first wrote for the second, file to file, and computes
a tensor derived from them (q4f16's fp16 scales) from those bytes (:func:`reuse_written`): one
quantization per weight and save, not one per variant.

Some tensors are computed from several: :class:`ConcatenatedTensor` is the concatenation of its
sources along one axis (the fused Q/K/V weight of :mod:`passes.fuse_projections`), read from
the sources when written.

:class:`TransposedTensor` (the weights :mod:`passes.fold_transposes` folds) streams itself: its
``tofile`` transposes a strip of :data:`STRIP_BYTES` at a time (in tiles, :mod:`surgery.transpose`),
so a tied 1.1 GiB ``lm_head`` is never held transposed whole (measured on it: 8.4 s with numpy's
whole transposed copy, which was also the largest allocation of a quantize run).
"""

from __future__ import annotations

import threading
import typing
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from surgery.transpose import transpose_into, transposed

__all__ = [
    "STRIP_BYTES",
    "ConcatenatedTensor",
    "DerivedTensor",
    "SharedComputation",
    "SharedTensor",
    "TransposedTensor",
    "computed_whole_when_written",
    "content_key",
    "holds_source_whole_when_written",
    "read_locked",
    "reuse_key",
    "reuse_written",
]

#: Bytes of a :class:`TransposedTensor` transposed and written per step.
STRIP_BYTES = 32 << 20


class _Lazy(ir.LazyTensor):
    """A ``LazyTensor`` whose function is a method of its own: ``onnx_ir``'s ``repr`` shows the
    function, and a bound method's ``repr`` shows the tensor again (endless recursion), so this
    one shows the type, name, dtype and shape."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dtype={self.dtype}, shape={self.shape})"


class DerivedTensor(_Lazy):
    """``fn(source.numpy())`` as a tensor, computed each time its bytes are read.

    Args:
        source: The tensor it is computed from (memory-mapped, lazy, or in memory).
        fn: The function of the source's array; it must return an array of ``shape``.
        name: The tensor's name.
        dtype: The result's type (default: the source's).
        shape: The result's shape (default: the source's).
    """

    __slots__ = ("fn", "source")

    def __init__(
        self,
        source: ir.TensorProtocol,
        fn: Callable[[np.ndarray], np.ndarray],
        *,
        name: str,
        dtype: ir.DataType | None = None,
        shape: ir.Shape | None = None,
    ) -> None:
        dtype = source.dtype if dtype is None else dtype
        if shape is None:
            shape = ir.Shape(source.shape.numpy())
        super().__init__(self._compute, dtype=dtype, shape=shape, name=name)
        self.source = source
        self.fn = fn

    def _compute(self) -> ir.TensorProtocol:
        return ir.Tensor(self.fn(read_locked(self.source)), dtype=self.dtype, name=self.name)


class ConcatenatedTensor(_Lazy):
    """The concatenation of ``sources`` along ``axis``, computed each time its bytes are read.

    Args:
        sources: Tensors of one dtype and rank whose dims agree except along ``axis``.
        axis: The axis joined (non-negative).
        name: The tensor's name.
    """

    __slots__ = ("axis", "sources")

    def __init__(self, sources: Sequence[ir.TensorProtocol], *, axis: int, name: str) -> None:
        dims = [list(source.shape.numpy()) for source in sources]
        shape = list(dims[0])
        shape[axis] = sum(d[axis] for d in dims)
        super().__init__(self._compute, dtype=sources[0].dtype, shape=ir.Shape(shape), name=name)
        self.sources = tuple(sources)
        self.axis = axis

    def _compute(self) -> ir.TensorProtocol:
        array = np.concatenate([read_locked(s) for s in self.sources], axis=self.axis)
        return ir.Tensor(array, dtype=self.dtype, name=self.name)


#: Held while a stored tensor (``onnx_ir.ExternalTensor``) is first read by a computation: two
#: writer threads may read one at once (a tied table quantized for its Gather and for its MatMul;
#: two parts written side by side sharing a source, as copy-parts parts do), and
#: ``onnx_ir.ExternalTensor`` maps its file on first read without a lock ("Bug: The array should
#: be loaded only once").
_SOURCE_LOCK = threading.Lock()


def read_locked(source: ir.TensorProtocol) -> np.ndarray:
    """``source.numpy()``, under :data:`_SOURCE_LOCK` for a stored tensor (a lazy one computes
    outside it, reading its own sources with this)."""
    if not isinstance(source, ir.ExternalTensor):
        return source.numpy()
    with _SOURCE_LOCK:
        return source.numpy()


class TransposedTensor(_Lazy):
    """The transpose of a 2-D tensor of whole bytes: written strip by strip, whole from ``numpy``.

    Args:
        source: The ``[rows, cols]`` tensor (memory-mapped, lazy, or in memory).
        name: The tensor's name.
    """

    __slots__ = ("source",)

    def __init__(self, source: ir.TensorProtocol, *, name: str) -> None:
        if len(source.shape) != 2 or source.dtype.bitwidth < 8:
            raise ValueError(f"{name}: expected a 2-D tensor of whole bytes, got {source!r}")
        rows, cols = (int(d) for d in source.shape.numpy())
        super().__init__(self._compute, dtype=source.dtype, shape=ir.Shape([cols, rows]), name=name)
        self.source = source

    def _compute(self) -> ir.TensorProtocol:
        return ir.Tensor(transposed(read_locked(self.source)), dtype=self.dtype, name=self.name)

    def tofile(self, file: typing.Any) -> None:
        """Write the transposed bytes a strip of :data:`STRIP_BYTES` of rows at a time."""
        array = read_locked(self.source)
        rows, cols = array.shape
        strip = max(1, STRIP_BYTES // max(1, rows * array.itemsize))
        buffer = np.empty((min(strip, cols), rows), array.dtype)
        for start in range(0, cols, strip):
            part = array[:, start : start + strip]
            out = transpose_into(part, buffer[: part.shape[1]])
            ir.Tensor(out, dtype=self.dtype).tofile(file)


class SharedComputation:
    """``fn(source.numpy())``, a sequence of arrays, computed once for the tensors that hold them.

    The first member read computes every array; each member's array is dropped once that member
    has been read, so memory is held only between the first and the last read of the group. A
    member read again after that (a second save of the same model) computes the group again.

    Args:
        source: The tensor the arrays are computed from.
        fn: The function of the source's array; it returns one array per member.
        key: What ``fn`` computes, apart from its source (say, the kernel and its options), or
            None: groups with the same ``source`` object and ``key`` give the same arrays, so a
            member's bytes written once may be copied for the other's (:func:`reuse_written`).
    """

    def __init__(
        self,
        source: ir.TensorProtocol,
        fn: Callable[[np.ndarray], Sequence[np.ndarray]],
        *,
        key: Hashable | None = None,
    ) -> None:
        self.source = source
        self.key = key
        self._fn = fn
        self._lock = threading.Lock()
        self._arrays: list[np.ndarray | None] | None = None
        self._skipped: set[int] = set()
        #: How many times the arrays were computed (one per save when each member is read once).
        self.computations = 0

    @property
    def held_bytes(self) -> int:
        """Bytes of computed arrays held now (those of members not read yet)."""
        arrays = self._arrays
        return sum(a.nbytes for a in arrays if a is not None) if arrays is not None else 0

    def member(self, index: int, *, name: str, dtype: ir.DataType, shape: ir.Shape) -> SharedTensor:
        """The lazy tensor holding array ``index`` of the result."""
        return SharedTensor(self, index, name=name, dtype=dtype, shape=shape)

    def take(self, index: int) -> np.ndarray:
        """Array ``index``, computing the group if needed; the group lets go of it."""
        with self._lock:
            self._skipped.discard(index)
            if self._arrays is None or self._arrays[index] is None:
                self._arrays = list(self._fn(read_locked(self.source)))
                self.computations += 1
            array = self._arrays[index]
            assert array is not None
            self._drop([index, *self._skipped])
            return array

    def skip(self, index: int) -> None:
        """Member ``index`` will not be read (its bytes come from elsewhere): hold no array for it
        (until it is read after all)."""
        with self._lock:
            self._skipped.add(index)
            self._drop([index])

    def _drop(self, indices: Iterable[int]) -> None:
        if self._arrays is None:
            return
        for index in indices:
            self._arrays[index] = None
        if all(a is None for a in self._arrays):
            self._arrays = None


class SharedTensor(_Lazy):
    """One array of a :class:`SharedComputation`, as a lazy tensor."""

    __slots__ = ("group", "index")

    def __init__(
        self,
        group: SharedComputation,
        index: int,
        *,
        name: str,
        dtype: ir.DataType,
        shape: ir.Shape,
    ) -> None:
        super().__init__(self._compute, dtype=dtype, shape=shape, name=name)
        self.group = group
        self.index = index

    @property
    def content_key(self) -> Hashable | None:
        """Equal for members giving the same bytes (see :class:`SharedComputation`'s ``key``)."""
        group = self.group
        return None if group.key is None else (id(group.source), group.key, self.index)

    def _compute(self) -> ir.TensorProtocol:
        array = self.group.take(self.index)
        if self.dtype.bitwidth < 8:  # sub-byte types (int4): the array holds the packed bytes
            return ir.PackedTensor(array, self.dtype, shape=self.shape, name=self.name)
        return ir.Tensor(array.reshape(self.shape.numpy()), dtype=self.dtype, name=self.name)


def computed_whole_when_written(tensor: ir.TensorProtocol) -> bool:
    """Whether writing ``tensor`` evaluates all of it at once (a lazy tensor not streaming itself)."""
    return isinstance(tensor, ir.LazyTensor) and type(tensor).tofile is ir.LazyTensor.tofile


def holds_source_whole_when_written(tensor: ir.TensorProtocol) -> bool:
    """Whether writing ``tensor``, which streams itself, computes its source whole first (a
    :class:`TransposedTensor` of a lazy tensor: ``fold-transposes`` after ``fp16``)."""
    return isinstance(tensor, TransposedTensor) and isinstance(tensor.source, ir.LazyTensor)


def content_key(tensor: ir.TensorProtocol) -> Hashable | None:
    """A hashable naming ``tensor``'s bytes where other tensors may have the same (a member of a
    keyed :class:`SharedComputation`), else None."""
    return tensor.content_key if isinstance(tensor, SharedTensor) else None


def reuse_key(tensor: ir.TensorProtocol) -> Hashable | None:
    """The content key under which :func:`reuse_written` looks for ``tensor``'s bytes (or for
    those it is derived from), else None."""
    if isinstance(tensor, DerivedTensor):
        tensor = tensor.source
    return content_key(tensor)


def reuse_written(
    tensor: ir.TensorProtocol, written: Mapping[Hashable, ir.TensorProtocol]
) -> ir.TensorProtocol:
    """What to write for ``tensor`` given ``written`` (content key → those bytes, already
    written): the written bytes themselves for a :class:`SharedTensor` whose content was written
    before, a :class:`DerivedTensor` computed from them for one derived from such a tensor, else
    ``tensor``. The group of the member not read is told so (:meth:`SharedComputation.skip`)."""
    key = reuse_key(tensor)
    if key is None or key not in written:
        return tensor
    member = tensor.source if isinstance(tensor, DerivedTensor) else tensor
    assert isinstance(member, SharedTensor)  # only members have content keys
    member.group.skip(member.index)
    if member is tensor:
        return written[key]
    assert isinstance(tensor, DerivedTensor)
    return DerivedTensor(
        written[key],
        tensor.fn,
        name=tensor.name or "",
        dtype=tensor.dtype,
        shape=ir.Shape(tensor.shape.numpy()),
    )
