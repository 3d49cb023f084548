"""Built-in passes, one module per job; importing this package registers them all."""

from passes.cleanup import (
    CommonSubexpressionElimination,
    DeduplicateInitializers,
    RemoveUnused,
    ShapeInference,
    TopologicalSort,
)
from passes.optimize import Optimize

__all__ = [
    "CommonSubexpressionElimination",
    "DeduplicateInitializers",
    "Optimize",
    "RemoveUnused",
    "ShapeInference",
    "TopologicalSort",
]
