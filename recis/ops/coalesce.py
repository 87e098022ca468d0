"""Coalescing of sparse row gradients: sum the gradients that share a row."""

from __future__ import annotations

import torch

from recis.ops.row_pieces import RowsOrPieces, joined


def coalesce_rows(rows: torch.Tensor, grads: RowsOrPieces) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum ``grads[i]`` over equal ``rows[i]``.

    Returns ``(unique_rows, summed)`` with ``unique_rows`` ascending and ``summed`` in
    float32 (or the wider dtype of ``grads``), so duplicates of a bf16 table add up at
    full precision. ``grads`` may come in pieces (``recis.ops.row_pieces``).
    """
    grads = joined(grads)
    unique_rows, inverse = torch.unique(rows, return_inverse=True)
    accumulate_dtype = torch.promote_types(grads.dtype, torch.float32)
    summed = torch.zeros((unique_rows.numel(), grads.shape[1]), dtype=accumulate_dtype, device=grads.device)
    summed.index_add_(0, inverse, grads.to(accumulate_dtype))
    return unique_rows, summed


def sum_by_index(index: torch.Tensor, values: torch.Tensor, count: int) -> torch.Tensor:
    """``sums[u] = sum of values[i] over index[i] == u`` for ``u < count``, added in input order,
    in float32 (or the wider dtype of ``values``): the backward of ``rows.index_select(0, index)``."""
    accumulate_dtype = torch.promote_types(values.dtype, torch.float32)
    sums = torch.zeros((count, values.shape[1]), dtype=accumulate_dtype, device=values.device)
    return sums.index_add_(0, index, values.to(accumulate_dtype))
