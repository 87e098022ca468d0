"""The native id map: int64 id -> row, open addressing in C++/CUDA (``csrc/*/id_map*``).

Same interface and row numbering as the torch map (``recis.ops.id_map.TorchIdMap``):
rows 0, 1, 2, ... in insertion order, never moved. The buckets are one
``(bucket_count, 2)`` int64 tensor of (key, row) pairs, so a probe touches one cache
line; row -1 marks an empty bucket, so every int64 is a valid id. Linear probing from
``mix64(id) & (bucket_count - 1)``; the load factor is kept <= 1/2 by doubling (a
rehash, amortized O(1) per id). ``find`` runs in parallel.
"""

from __future__ import annotations

import torch

from recis.ops.id_map import bucket_count_for
from recis.ops.row_keys import KeysByRow, RowKeys

_MIN_BUCKETS = bucket_count_for(0)


class NativeIdMap(KeysByRow):
    """Maps int64 ids to dense row indices ``0 .. len(self) - 1``."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._size = 0
        self._row_keys = RowKeys(self.device)
        self._buckets = self._empty_buckets(_MIN_BUCKETS)

    def __len__(self) -> int:
        return self._size

    @property
    def bucket_count(self) -> int:
        return self._buckets.shape[0]

    @torch.inference_mode(False)  # the map outlives an inference_mode block it grows in
    def _empty_buckets(self, count: int) -> torch.Tensor:
        buckets = torch.zeros((count, 2), dtype=torch.int64, device=self.device)
        buckets[:, 1] = -1
        return buckets

    def find(self, ids: torch.Tensor) -> torch.Tensor:
        """Row of each id, or -1 where the id is absent. ``ids`` is 1-D int64."""
        return torch.ops.recis.id_map_find(self._buckets, ids.contiguous())

    def insert_new(self, ids: torch.Tensor) -> torch.Tensor:
        """Insert ids known to be absent and pairwise distinct; returns their new rows,
        numbered in the order of ``ids``."""
        ids = ids.contiguous()
        count = ids.numel()
        needed = bucket_count_for(self._size + count)
        if needed > self.bucket_count:
            with torch.inference_mode(False):
                self._buckets = torch.ops.recis.id_map_rehash(self._buckets, needed)
        self._row_keys.room_for(self._size + count)  # can fail (memory): before any bucket changes
        torch.ops.recis.id_map_insert(self._buckets, ids, self._size)
        self._row_keys.append(ids)
        new_rows = torch.arange(self._size, self._size + count, device=self.device)
        self._size += count
        return new_rows

    def clear(self) -> None:
        self._size = 0
        self._row_keys = RowKeys(self.device)
        self._buckets = self._empty_buckets(_MIN_BUCKETS)
