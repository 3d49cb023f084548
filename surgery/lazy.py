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
members at once, so the computation runs under a lock.

Some tensors are computed from several: :class:`ConcatenatedTensor` is the concatenation of its
sources along one axis (the fused Q/K/V weight of :mod:`passes.fuse_projections`), read from
the sources when written.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

__all__ = [
    "ConcatenatedTensor",
    "DerivedTensor",
    "SharedComputation",
    "SharedTensor",
    "computed_whole_when_written",
]


class DerivedTensor(ir.LazyTensor):
    """``fn(source.numpy())`` as a tensor, computed each time its bytes are read.

    Args:
        source: The tensor it is computed from (memory-mapped, lazy, or in memory).
        fn: The function of the source's array; it must return an array of ``shape``.
        name: The tensor's name.
        dtype: The result's type (default: the source's).
        shape: The result's shape (default: the source's).
    """

    __slots__ = ("_fn", "source")

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
        self._fn = fn

    def _compute(self) -> ir.TensorProtocol:
        return ir.Tensor(self._fn(self.source.numpy()), dtype=self.dtype, name=self.name)


class ConcatenatedTensor(ir.LazyTensor):
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
        array = np.concatenate([source.numpy() for source in self.sources], axis=self.axis)
        return ir.Tensor(array, dtype=self.dtype, name=self.name)


#: Held while a group reads its source: two groups of one source (a tied table quantized for its
#: Gather and for its MatMul) may be computed at once by the writer's threads, and
#: ``onnx_ir.ExternalTensor`` maps its file on first read without a lock ("Bug: The array should
#: be loaded only once").
_SOURCE_LOCK = threading.Lock()


class SharedComputation:
    """``fn(source.numpy())``, a sequence of arrays, computed once for the tensors that hold them.

    The first member read computes every array; each member's array is dropped once that member
    has been read, so memory is held only between the first and the last read of the group. A
    member read again after that (a second save of the same model) computes the group again.

    Args:
        source: The tensor the arrays are computed from.
        fn: The function of the source's array; it returns one array per member.
    """

    def __init__(
        self, source: ir.TensorProtocol, fn: Callable[[np.ndarray], Sequence[np.ndarray]]
    ) -> None:
        self.source = source
        self._fn = fn
        self._lock = threading.Lock()
        self._arrays: list[np.ndarray | None] | None = None
        #: How many times the arrays were computed (one per save when each member is read once).
        self.computations = 0

    @property
    def held_bytes(self) -> int:
        """Bytes of computed arrays held now (those of members not read yet)."""
        arrays = self._arrays
        return sum(a.nbytes for a in arrays if a is not None) if arrays is not None else 0

    def member(
        self, index: int, *, name: str, dtype: ir.DataType, shape: ir.Shape
    ) -> SharedTensor:
        """The lazy tensor holding array ``index`` of the result."""
        return SharedTensor(self, index, name=name, dtype=dtype, shape=shape)

    def take(self, index: int) -> np.ndarray:
        """Array ``index``, computing the group if needed; the group lets go of it."""
        with self._lock:
            if self._arrays is None or self._arrays[index] is None:
                with _SOURCE_LOCK:  # onnx_ir maps an external tensor on first read, unlocked
                    source = self.source.numpy()
                self._arrays = list(self._fn(source))
                self.computations += 1
            array = self._arrays[index]
            assert array is not None
            self._arrays[index] = None
            if all(a is None for a in self._arrays):
                self._arrays = None
            return array


class SharedTensor(ir.LazyTensor):
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

    def _compute(self) -> ir.TensorProtocol:
        array = self.group.take(self.index)
        if self.dtype.bitwidth < 8:  # sub-byte types (int4): the array holds the packed bytes
            return ir.PackedTensor(array, self.dtype, shape=self.shape, name=self.name)
        return ir.Tensor(array.reshape(self.shape.numpy()), dtype=self.dtype, name=self.name)


def computed_whole_when_written(tensor: ir.TensorProtocol) -> bool:
    """Whether writing ``tensor`` evaluates all of it at once (a lazy tensor not streaming itself)."""
    return isinstance(tensor, ir.LazyTensor) and type(tensor).tofile is ir.LazyTensor.tofile
