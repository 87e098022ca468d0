"""The native id map: int64 id -> row, open addressing in C++/CUDA (``csrc/*/id_map*``).

Same interface and row numbering as the torch map (``recis.ops.id_map.TorchIdMap``);
the bookkeeping is shared (``recis.ops.id_map_base``). The buckets are one
``(bucket_count, 2)`` int64 tensor of (key, row) pairs, so a probe touches one cache
line; row -1 marks an empty bucket and -2 an erased one, so every int64 is a valid id.
``find`` runs in parallel.
"""

from __future__ import annotations

import torch

from recis.ops.id_map_base import IdMapBase


class NativeIdMap(IdMapBase):
    """Maps int64 ids to dense row indices ``0 .. len(self) - 1``."""

    @property
    def bucket_count(self) -> int:
        return self._buckets.shape[0]

    @torch.inference_mode(False)  # the map outlives an inference_mode block it grows in
    def _reset(self, buckets: int) -> None:
        self._buckets = torch.zeros((buckets, 2), dtype=torch.int64, device=self.device)
        self._buckets[:, 1] = -1

    def find(self, ids: torch.Tensor) -> torch.Tensor:
        """Row of each id, or -1 where the id is absent. ``ids`` is 1-D int64."""
        return torch.ops.recis.id_map_find(self._buckets, ids.contiguous())

    def _place(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        torch.ops.recis.id_map_insert(self._buckets, ids, rows)

    def _erase(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.ops.recis.id_map_erase(self._buckets, ids)

    def _rehash(self, buckets: int) -> None:
        """Into ``buckets`` buckets without tombstones; on CPU at an unchanged count, in place
        (a full bounded table does this every few steps: no second bucket array to allocate)."""
        if buckets == self.bucket_count and self.device.type == "cpu":
            torch.ops.recis.id_map_drop_tombstones(self._buckets)
            return
        with torch.inference_mode(False):
            self._buckets = torch.ops.recis.id_map_rehash(self._buckets, buckets)
