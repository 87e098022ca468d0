"""Kernels of the hot path: the id map, gradient coalescing and the fused row update.

This package is the one place where an implementation is chosen; today every kernel
is the vectorized pure-torch one defined beside this file.
"""

from recis.ops.coalesce import coalesce_rows
from recis.ops.hashing import mix64
from recis.ops.id_map import IdMap
from recis.ops.sparse_adam_update import EpsilonPlacement, WeightDecay, sparse_adam_update

__all__ = ["EpsilonPlacement", "IdMap", "WeightDecay", "coalesce_rows", "mix64", "sparse_adam_update"]
