"""Kernels of the hot path: the id map, hash partitioning, gradient coalescing and the fused row updates.

Each exported kernel runs, at call time, the backend that ``recis.ops.backend.choose_backend``
names (``RECIS_BACKEND=native|torch|auto``, or ``use_backend``): the native C++/CUDA
kernels of ``csrc/`` (fronted by ``native_kernels.py`` and ``native_id_map.py``) or the
vectorized pure-torch kernels (``id_map.py``, ``partition.py``, ``coalesce.py``, ``sparse_adam_update.py``,
``gather.py``, ``sparse_adagrad_update.py`` (no native twin: it runs on both backends),
``adamw_tf_update.py``), which stay as the reference. ``dispatch.py`` holds the fronts.
"""

from recis.ops.backend import choose_backend, use_backend
from recis.ops.dispatch import (
    IdMap,
    adamw_tf_multi_tensor,
    coalesce_rows,
    gather_rows,
    owner_rank,
    sparse_adagrad_update_rows,
    sparse_adam_update,
    sum_by_index,
    unique_by_owner,
)
from recis.ops.hashing import mix64
from recis.ops.sparse_adam_update import EpsilonPlacement, WeightDecay

__all__ = [
    "EpsilonPlacement",
    "IdMap",
    "WeightDecay",
    "adamw_tf_multi_tensor",
    "choose_backend",
    "coalesce_rows",
    "gather_rows",
    "mix64",
    "owner_rank",
    "sparse_adagrad_update_rows",
    "sparse_adam_update",
    "sum_by_index",
    "unique_by_owner",
    "use_backend",
]
