"""Rows given in pieces: 2-D tensors of one dtype and width read as their concatenation.

An exchange hands each table's rows over as the piece each rank sent (``recis.dist.exchange``);
``gather_rows`` and ``coalesce_rows`` read them where they lie, so the concatenation is made
only by a kernel that needs it (``joined``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

RowsOrPieces = torch.Tensor | Sequence[torch.Tensor]


def as_pieces(rows: RowsOrPieces) -> list[torch.Tensor]:
    """``rows`` as a list of pieces (a tensor is one piece)."""
    if isinstance(rows, torch.Tensor):
        return [rows]
    if not rows:
        raise ValueError("rows in pieces need at least one piece")
    return list(rows)


def joined(rows: RowsOrPieces) -> torch.Tensor:
    """The rows as one tensor: a tensor as it is, the only non-empty piece as it is, else a concatenation."""
    pieces = as_pieces(rows)
    filled = [piece for piece in pieces if piece.shape[0] > 0]
    if len(filled) == 1:
        return filled[0]
    return torch.cat(pieces)


def row_count(rows: RowsOrPieces) -> int:
    return sum(piece.shape[0] for piece in as_pieces(rows))
