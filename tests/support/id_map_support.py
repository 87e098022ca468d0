"""Shared by the id map tests: find-or-insert as the row store does it, over a map's public methods."""

from __future__ import annotations

import torch


def find_or_insert(id_map, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the distinct ``ids``, inserting the absent ones in order; returns ``(rows, is_new)``."""
    rows = id_map.find(ids)
    is_new = rows < 0
    rows[is_new] = id_map.insert_new(ids[is_new])
    return rows, is_new
