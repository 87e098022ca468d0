"""The torch id map: int64 id -> row index, an open-addressing hash table on torch tensors.

Rows are numbered in insertion order (0, 1, 2, ...) and never move, so a row index
stays valid for the table's lifetime. Buckets use linear probing from
``mix64(id) & (capacity - 1)``; an empty bucket holds row -1, so every int64 value,
including -1 and the extremes, is a valid id. Every operation is vectorized over the
whole batch: one probe round handles all ids still searching, and the number of
rounds is the longest probe sequence, short at the load factor kept here (<= 1/2).
Growth doubles the bucket array and re-inserts the keys (amortized O(1) per id).
"""

from __future__ import annotations

import torch

from recis.ops.hashing import mix64
from recis.ops.row_keys import KeysByRow, RowKeys

_MAX_LOAD = 0.5
_MIN_BUCKETS = 64


def bucket_count_for(num_ids: int) -> int:
    """The smallest power-of-two bucket count (>= 64) that keeps the load factor <= 1/2."""
    buckets = _MIN_BUCKETS
    while num_ids > buckets * _MAX_LOAD:
        buckets *= 2
    return buckets


class TorchIdMap(KeysByRow):
    """Maps int64 ids to dense row indices ``0 .. len(self) - 1``."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._size = 0
        self._row_keys = RowKeys(self.device)
        self._allocate(_MIN_BUCKETS)

    def __len__(self) -> int:
        return self._size

    @property
    def bucket_count(self) -> int:
        return self._bucket_keys.numel()

    @torch.inference_mode(False)  # the map outlives an inference_mode block it grows in
    def _allocate(self, buckets: int) -> None:
        self._bucket_keys = torch.zeros(buckets, dtype=torch.int64, device=self.device)
        self._bucket_rows = torch.full((buckets,), -1, dtype=torch.int64, device=self.device)
        self._claims = torch.empty(buckets, dtype=torch.int64, device=self.device)

    def _home_buckets(self, ids: torch.Tensor) -> torch.Tensor:
        return mix64(ids) & (self.bucket_count - 1)

    def find(self, ids: torch.Tensor) -> torch.Tensor:
        """Row of each id, or -1 where the id is absent. ``ids`` is 1-D int64."""
        rows = torch.full_like(ids, -1)
        bucket = self._home_buckets(ids)
        searching = torch.arange(ids.numel(), device=self.device)
        mask = self.bucket_count - 1
        while searching.numel() > 0:
            probe = bucket[searching]
            probe_rows = self._bucket_rows[probe]
            hit = (probe_rows >= 0) & (self._bucket_keys[probe] == ids[searching])
            rows[searching[hit]] = probe_rows[hit]
            go_on = (probe_rows >= 0) & ~hit
            searching = searching[go_on]
            bucket[searching] = (probe[go_on] + 1) & mask
        return rows

    def insert_new(self, ids: torch.Tensor) -> torch.Tensor:
        """Insert ids known to be absent and pairwise distinct; returns their new rows.

        New rows are numbered in the order of ``ids``.
        """
        count = ids.numel()
        new_rows = torch.arange(self._size, self._size + count, device=self.device)
        if count == 0:
            return new_rows
        needed = bucket_count_for(self._size + count)
        if needed > self.bucket_count:
            self._rehash(needed)
        self._row_keys.room_for(self._size + count)  # can fail (memory): before any bucket changes
        self._place(ids, new_rows)
        self._row_keys.append(ids)
        self._size += count
        return new_rows

    def clear(self) -> None:
        self._size = 0
        self._row_keys = RowKeys(self.device)
        self._allocate(_MIN_BUCKETS)

    def _rehash(self, buckets: int) -> None:
        occupied = self._bucket_rows >= 0
        ids, rows = self._bucket_keys[occupied], self._bucket_rows[occupied]
        self._allocate(buckets)
        self._place(ids, rows)

    def _place(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """Put distinct absent ids into free buckets, racing for buckets in rounds.

        In each round every unplaced id tries its current bucket; where several try the
        same free bucket, the one whose claim was written wins and the rest move on.
        """
        mask = self.bucket_count - 1
        bucket = self._home_buckets(ids)
        unplaced = torch.arange(ids.numel(), device=self.device)
        while unplaced.numel() > 0:
            probe = bucket[unplaced]
            free = self._bucket_rows[probe] < 0
            contenders, targets = unplaced[free], probe[free]
            self._claims[targets] = contenders
            won = self._claims[targets] == contenders
            winners, won_buckets = contenders[won], targets[won]
            self._bucket_keys[won_buckets] = ids[winners]
            self._bucket_rows[won_buckets] = rows[winners]
            placed = torch.zeros(ids.numel(), dtype=torch.bool, device=self.device)
            placed[winners] = True
            unplaced = unplaced[~placed[unplaced]]
            bucket[unplaced] = (bucket[unplaced] + 1) & mask
