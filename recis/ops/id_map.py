"""The torch id map: int64 id -> row index, an open-addressing hash table on torch tensors.

Buckets use linear probing from ``mix64(id) & (capacity - 1)``; an empty bucket holds
row -1 and an erased one row -2, so every int64 value, including -1 and the extremes,
is a valid id. Every operation is vectorized over the whole batch: one probe round
handles all ids still searching, and the number of rounds is the longest probe
sequence, short at the load factor kept (<= 1/2, tombstones included). The rest of
the bookkeeping is shared with the native map (``recis.ops.id_map_base``).
"""

from __future__ import annotations

import torch

from recis.ops.hashing import mix64
from recis.ops.id_map_base import IdMapBase, bucket_count_for

_EMPTY = -1
_ERASED = -2

__all__ = ["TorchIdMap", "bucket_count_for"]


class TorchIdMap(IdMapBase):
    """Maps int64 ids to dense row indices ``0 .. len(self) - 1``."""

    @property
    def bucket_count(self) -> int:
        return self._bucket_keys.numel()

    @torch.inference_mode(False)  # the map outlives an inference_mode block it grows in
    def _reset(self, buckets: int) -> None:
        self._bucket_keys = torch.zeros(buckets, dtype=torch.int64, device=self.device)
        self._bucket_rows = torch.full((buckets,), _EMPTY, dtype=torch.int64, device=self.device)
        self._claims = torch.empty(buckets, dtype=torch.int64, device=self.device)

    def _home_buckets(self, ids: torch.Tensor) -> torch.Tensor:
        return mix64(ids) & (self.bucket_count - 1)

    def find(self, ids: torch.Tensor) -> torch.Tensor:
        """Row of each id, or -1 where the id is absent. ``ids`` is 1-D int64."""
        buckets = self._buckets_holding(ids)
        return torch.where(buckets >= 0, self._bucket_rows[buckets.clamp(min=0)], _EMPTY)

    def _buckets_holding(self, ids: torch.Tensor) -> torch.Tensor:
        """The bucket of each id, or -1 where the id is absent."""
        found = torch.full_like(ids, -1)
        bucket = self._home_buckets(ids)
        searching = torch.arange(ids.numel(), device=self.device)
        mask = self.bucket_count - 1
        while searching.numel() > 0:
            probe = bucket[searching]
            probe_rows = self._bucket_rows[probe]
            hit = (probe_rows >= 0) & (self._bucket_keys[probe] == ids[searching])
            found[searching[hit]] = probe[hit]
            go_on = (probe_rows != _EMPTY) & ~hit  # tombstones do not end a probe sequence
            searching = searching[go_on]
            bucket[searching] = (probe[go_on] + 1) & mask
        return found

    def _erase(self, ids: torch.Tensor) -> torch.Tensor:
        buckets = self._buckets_holding(ids)
        present = buckets[buckets >= 0]
        rows = torch.where(buckets >= 0, self._bucket_rows[buckets.clamp(min=0)], _EMPTY)
        self._bucket_rows[present] = _ERASED
        return rows

    def _rehash(self, buckets: int) -> None:
        live = self._bucket_rows >= 0
        ids, rows = self._bucket_keys[live], self._bucket_rows[live]
        if buckets == self.bucket_count:  # a full bounded table, every few steps: reuse the arrays
            self._bucket_rows.fill_(_EMPTY)
        else:
            self._reset(buckets)
        self._place(ids, rows)

    def _place(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """Put distinct absent ids into empty buckets, racing for buckets in rounds.

        In each round every unplaced id tries its current bucket; where several try the
        same empty bucket, the one whose claim was written wins and the rest move on.
        """
        mask = self.bucket_count - 1
        bucket = self._home_buckets(ids)
        unplaced = torch.arange(ids.numel(), device=self.device)
        while unplaced.numel() > 0:
            probe = bucket[unplaced]
            free = self._bucket_rows[probe] == _EMPTY
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
