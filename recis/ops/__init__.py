"""Kernels of the hot path: the id map, gradient coalescing and the fused row updates.

This package is the one place where an implementation is chosen (``recis.ops.backend``,
``RECIS_BACKEND=native|torch``): the native C++/CUDA kernels of ``csrc/`` (fronted by
``native_kernels.py`` and ``native_id_map.py``) or the vectorized pure-torch kernels
(``id_map.py``, ``coalesce.py``, ``sparse_adam_update.py``, ``adamw_tf_update.py``),
which stay as the reference and the fallback.
"""

from recis.ops.backend import choose_backend
from recis.ops.hashing import mix64
from recis.ops.sparse_adam_update import EpsilonPlacement, WeightDecay

BACKEND = choose_backend()

if BACKEND == "native":
    from recis.ops.native_id_map import NativeIdMap as IdMap
    from recis.ops.native_kernels import adamw_tf_multi_tensor, coalesce_rows, sparse_adam_update
else:
    from recis.ops.adamw_tf_update import adamw_tf_multi_tensor
    from recis.ops.coalesce import coalesce_rows
    from recis.ops.id_map import IdMap
    from recis.ops.sparse_adam_update import sparse_adam_update

__all__ = [
    "BACKEND",
    "EpsilonPlacement",
    "IdMap",
    "WeightDecay",
    "adamw_tf_multi_tensor",
    "coalesce_rows",
    "mix64",
    "sparse_adam_update",
]
