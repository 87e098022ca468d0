"""What both id maps share: the count of live ids and tombstones, the load rule, and
the row -> id inverse (``RowKeys``).

An id map maps int64 ids to rows ``0 .. len(map) - 1``. New ids are appended (rows
numbered in insertion order) or placed at rows the caller frees by erasing their ids
(the row store reuses an evicted row this way, and renumbers the last rows into holes).
Buckets use open addressing with linear probing from ``mix64(id) & (bucket_count - 1)``;
an erased id leaves a tombstone that probes go past. Live ids plus tombstones stay
<= 1/2 of the buckets: when an insert would exceed that, the map rehashes, which drops
the tombstones and doubles the buckets only if the live ids need it.
"""

from __future__ import annotations

import torch

from recis.ops.row_keys import RowKeys

_MAX_LOAD = 0.5
_MIN_BUCKETS = 64


def bucket_count_for(num_ids: int) -> int:
    """The smallest power-of-two bucket count (>= 64) that keeps the load factor <= 1/2."""
    buckets = _MIN_BUCKETS
    while num_ids > buckets * _MAX_LOAD:
        buckets *= 2
    return buckets


class IdMapBase:
    """The bookkeeping of an id map; subclasses hold the buckets and implement
    ``find``, ``bucket_count``, ``_reset``, ``_place``, ``_erase`` and ``_rehash``."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._size = 0
        self._erased = 0
        self._row_keys = RowKeys(self.device)
        self._reset(_MIN_BUCKETS)

    def __len__(self) -> int:
        return self._size

    # ------------------------------------------------------------------ backend primitives
    @property
    def bucket_count(self) -> int:
        raise NotImplementedError

    def find(self, ids: torch.Tensor) -> torch.Tensor:
        """Row of each 1-D int64 id, or -1 where the id is absent."""
        raise NotImplementedError

    def _reset(self, buckets: int) -> None:
        raise NotImplementedError

    def _place(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        raise NotImplementedError

    def _erase(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _rehash(self, buckets: int) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ changes
    def insert_new(self, ids: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Insert ids known to be absent and pairwise distinct; returns their rows.

        Without ``rows`` the ids get new rows ``len(self) ...``, in the order of ``ids``;
        with ``rows`` they take those rows, which must have been freed by ``erase``.
        """
        ids = ids.contiguous()
        count = ids.numel()
        appended = rows is None
        if appended:
            rows = torch.arange(len(self._row_keys), len(self._row_keys) + count, device=self.device)
        if count == 0:
            return rows
        if self._size + self._erased + count > self.bucket_count * _MAX_LOAD:
            self._rehash(max(self.bucket_count, bucket_count_for(self._size + count)))
            self._erased = 0
        end = len(self._row_keys) + (count if appended else 0)
        self._row_keys.room_for(end)  # can fail (memory): before any bucket changes
        self._place(ids, rows.contiguous())
        self._row_keys.write(rows, ids)
        self._row_keys.resize(end)
        self._size += count
        return rows

    def erase(self, ids: torch.Tensor) -> torch.Tensor:
        """Erase distinct ids; returns the row each had (-1 where absent). Their rows
        still count in ``keys_by_row`` until refilled by ``insert_new`` or cut by ``truncate``."""
        rows = self._erase(ids.contiguous())
        erased = int((rows >= 0).sum())
        self._size -= erased
        self._erased += erased
        return rows

    def truncate(self, row_count: int) -> None:
        """Keep rows ``0 .. row_count - 1`` (the caller erased or moved the ids of the others)."""
        self._row_keys.resize(row_count)

    def clear(self) -> None:
        self._size = 0
        self._erased = 0
        self._row_keys = RowKeys(self.device)
        self._reset(_MIN_BUCKETS)

    # ------------------------------------------------------------------ reads of the inverse
    def keys_by_row(self) -> torch.Tensor:
        """All ids, ordered by their row (a new tensor)."""
        return self._row_keys.all()

    def keys_of_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The id held by each of ``rows``; O(len(rows))."""
        return self._row_keys.of_rows(rows)
