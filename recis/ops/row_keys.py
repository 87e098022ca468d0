"""The inverse of an id map: the id stored in each row, kept beside the buckets.

Keeping it costs 8 bytes per row and makes "which ids do these rows hold" O(rows
asked) instead of a scan of every bucket.
"""

from __future__ import annotations

import torch


class RowKeys:
    """The id of each row ``0 .. len(self) - 1``, in a buffer grown by doubling."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        with torch.inference_mode(False):
            self._buffer = torch.empty(0, dtype=torch.int64, device=device)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def room_for(self, count: int) -> None:
        """Grow the buffer to hold ``count`` keys (so a map can grow it before it changes
        anything else, as growing can fail for memory)."""
        if count > self._buffer.numel():
            with torch.inference_mode(False):  # the keys outlive an inference_mode block they grow in
                capacity = max(count, 2 * self._buffer.numel(), 64)
                grown = torch.empty(capacity, dtype=torch.int64, device=self._buffer.device)
                grown[: self._size] = self._buffer[: self._size]
            self._buffer = grown

    def write(self, rows: torch.Tensor, ids: torch.Tensor) -> None:
        """Record ``ids`` as the keys of ``rows`` (within the room made)."""
        self._buffer[rows] = ids

    def resize(self, count: int) -> None:
        """Make rows ``0 .. count - 1`` the rows that hold keys (within the room made)."""
        self._size = count

    def of_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The ids held by ``rows`` (each in ``0 .. len(self) - 1``)."""
        return self._buffer[: self._size][rows]

    def all(self) -> torch.Tensor:
        """Every id in row order, as a new tensor (writing to it leaves the map alone)."""
        return self._buffer[: self._size].clone()
