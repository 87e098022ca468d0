"""The differentiable read of table rows.

Forward expands the rows of the unique ids to every position of the batch; backward
sums the output gradient per unique id (in float32) and hands it to a receiver (the
table's pending gradient). No dense gradient of a table is ever formed, and nothing
is written to a ``.grad`` attribute. The unique rows may come in pieces (what each rank
sent, ``recis.ops.row_pieces``): they are read where they lie.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from recis.ops import gather_rows, sum_by_index
from recis.ops.row_pieces import RowsOrPieces, row_count

GradReceiver = Callable[[torch.Tensor], None]


class _RowLookup(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, anchor: torch.Tensor, unique_values: RowsOrPieces, inverse: torch.Tensor, receive: GradReceiver
    ) -> torch.Tensor:
        ctx.receive = receive
        ctx.unique_count = row_count(unique_values)
        ctx.save_for_backward(inverse)
        return gather_rows(unique_values, inverse)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[None, ...]:
        (inverse,) = ctx.saved_tensors
        ctx.receive(sum_by_index(inverse, grad_output, ctx.unique_count))
        return None, None, None, None


def row_lookup(
    anchor: torch.Tensor, unique_values: RowsOrPieces, inverse: torch.Tensor, receive: GradReceiver
) -> torch.Tensor:
    """``unique_values[inverse]``; backward calls ``receive`` with the gradient summed per unique row.

    ``anchor`` is a leaf that requires grad, so autograd records the call.
    """
    return _RowLookup.apply(anchor, unique_values, inverse, receive)
