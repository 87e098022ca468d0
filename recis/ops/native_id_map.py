"""The native id map: int64 id -> row, open addressing in C++/CUDA (``csrc/*/id_map*``).

Same interface and row numbering as ``recis.ops.id_map.IdMap``: rows 0, 1, 2, ... in
insertion order, never moved; new ids of a batch numbered in order of first appearance.
The buckets are one ``(bucket_count, 2)`` int64 tensor of (key, row) pairs, so a probe
touches one cache line; row -1 marks an empty bucket, so every int64 is a valid id.
Linear probing from ``mix64(id) & (bucket_count - 1)``; the load factor is kept <= 1/2
by doubling (a rehash, amortized O(1) per id). ``find`` runs in parallel;
``find_or_insert`` accepts repeated ids: every occurrence of a new id gets the row of
its first occurrence, which alone is flagged new.
"""

from __future__ import annotations

import torch

from recis.ops.id_map import IdMap, bucket_count_for
from recis.ops.native_library import has_kernels_for
from recis.ops.row_keys import KeysByRow, RowKeys

_MIN_BUCKETS = bucket_count_for(0)


class NativeIdMap(KeysByRow):
    """Maps int64 ids to dense row indices ``0 .. len(self) - 1``.

    On a device the library has no kernels for (CUDA in a CPU-only build), constructing
    one gives the torch ``IdMap`` instead.
    """

    def __new__(cls, device: torch.device | str = "cpu"):
        if not has_kernels_for(torch.device(device)):
            return IdMap(device)
        return super().__new__(cls)

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
        """Insert absent, pairwise distinct ids; returns their new rows, numbered in order."""
        ids = ids.contiguous()
        rows = torch.full_like(ids, -1)
        self._insert_missing(ids, rows, ids.numel())
        return rows

    def find_or_insert(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of ids, inserting absent ones; returns ``(rows, is_new)``.

        Ids may repeat: new rows are numbered in order of first appearance, and only
        the first occurrence of a new id is flagged new.
        """
        ids = ids.contiguous()
        rows = self.find(ids)
        missing = int((rows < 0).sum())
        if missing == 0:
            return rows, torch.zeros_like(rows, dtype=torch.bool)
        return rows, self._insert_missing(ids, rows, missing)

    def _insert_missing(self, ids: torch.Tensor, rows: torch.Tensor, missing: int) -> torch.Tensor:
        needed = bucket_count_for(self._size + missing)
        if needed > self.bucket_count:
            with torch.inference_mode(False):
                self._buckets = torch.ops.recis.id_map_rehash(self._buckets, needed)
        # The kernel writes the new rows' keys. The CUDA binding cannot count the missing
        # ids without a synchronization, so it asks for room for every id to be new.
        room = missing if ids.device.type == "cpu" else ids.numel()
        row_keys = self._row_keys.room_for(self._size + room)
        is_new, self._size = torch.ops.recis.id_map_insert_missing(self._buckets, ids, rows, row_keys, self._size)
        self._row_keys.set_length(self._size)
        return is_new

    def clear(self) -> None:
        self._size = 0
        self._row_keys = RowKeys(self.device)
        self._buckets = self._empty_buckets(_MIN_BUCKETS)
