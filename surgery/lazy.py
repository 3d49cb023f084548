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
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

__all__ = ["DerivedTensor", "computed_whole_when_written"]


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


def computed_whole_when_written(tensor: ir.TensorProtocol) -> bool:
    """Whether writing ``tensor`` evaluates all of it at once (a lazy tensor not streaming itself)."""
    return isinstance(tensor, ir.LazyTensor) and type(tensor).tofile is ir.LazyTensor.tofile
