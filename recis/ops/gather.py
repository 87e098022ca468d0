"""Gathering rows that come in pieces: ``cat(pieces)[index]``, the reference of the native kernel."""

from __future__ import annotations

import torch

from recis.ops.row_pieces import RowsOrPieces, joined


def gather_rows(rows: RowsOrPieces, index: torch.Tensor) -> torch.Tensor:
    """``joined(rows).index_select(0, index)``: the rows of a tensor, or of its pieces' concatenation, at ``index``."""
    return joined(rows).index_select(0, index)
