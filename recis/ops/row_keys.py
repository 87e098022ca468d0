"""The inverse of an id map: the id stored in each row, kept beside the buckets.

An id map numbers rows 0, 1, 2, ... in insertion order and never moves them, so the
inverse is an append-only array. Keeping it costs 8 bytes per row and makes "which
ids do these rows hold" O(rows asked) instead of a scan of every bucket.
"""

from __future__ import annotations

import torch


class RowKeys:
    """The id of each row ``0 .. len(self) - 1``, in a buffer grown by doubling."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self._buffer = torch.empty(0, dtype=torch.int64, device=device)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def append(self, ids: torch.Tensor) -> None:
        """Record ``ids`` as the keys of the next ``len(ids)`` rows."""
        end = self._size + ids.numel()
        if end > self._buffer.numel():
            grown = torch.empty(max(end, 2 * self._buffer.numel(), 64), dtype=torch.int64, device=self._buffer.device)
            grown[: self._size] = self._buffer[: self._size]
            self._buffer = grown
        self._buffer[self._size : end] = ids
        self._size = end

    def of_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The ids held by ``rows`` (each in ``0 .. len(self) - 1``)."""
        return self._buffer[: self._size][rows]

    def all(self) -> torch.Tensor:
        """Every id in row order, as a new tensor (writing to it leaves the map alone)."""
        return self._buffer[: self._size].clone()
