"""Transposed copies of 2-D arrays, tile by tile.

numpy's own transposed copy (``np.ascontiguousarray(a.T)``) walks the source with a stride of a
whole row for every element it writes, which on a large weight misses the caches and the TLB at
nearly every step. Copying in tiles of :data:`TILE_ROWS` x :data:`TILE_COLS` keeps both sides in
cache. Measured here on a 64000 x 2304 float32 array (563 MiB): 3.2 s with numpy's copy, 0.52 s in
tiles, 0.86 s with ONNX Runtime's ``Transpose`` (one thread). It is a copy: the same bytes.
"""

from __future__ import annotations

import numpy as np

__all__ = ["TILE_COLS", "TILE_ROWS", "transpose_into", "transposed"]

#: Rows and columns of the source copied per step.
TILE_ROWS, TILE_COLS = 128, 1024


def transpose_into(source: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Copy ``source.T`` into ``out`` (of shape ``source.shape[::-1]``) and return ``out``."""
    if source.shape[::-1] != out.shape:
        raise ValueError(f"out has shape {out.shape}, expected {source.shape[::-1]}")
    if source.T.flags.c_contiguous:  # a transposed view of a stored array: a plain copy
        out[...] = source.T
        return out
    rows, cols = source.shape
    for row in range(0, rows, TILE_ROWS):
        for col in range(0, cols, TILE_COLS):
            tile = source[row : row + TILE_ROWS, col : col + TILE_COLS]
            out[col : col + TILE_COLS, row : row + TILE_ROWS] = tile.T
    return out


def transposed(source: np.ndarray) -> np.ndarray:
    """``np.ascontiguousarray(source.T)`` for a 2-D ``source``, copied in tiles."""
    return transpose_into(source, np.empty(source.shape[::-1], source.dtype))
