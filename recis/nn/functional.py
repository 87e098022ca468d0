"""The differentiable read of table rows.

Forward expands the rows of the unique ids to every position of the batch; backward
sums the output gradient per unique id (in float32) and hands it to the table as a
pending row gradient. No dense gradient of the table is ever formed, and nothing is
written to a ``.grad`` attribute.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from recis.nn.modules.hashtable import HashTable


class _RowLookup(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        anchor: torch.Tensor,
        table: HashTable,
        rows: torch.Tensor,
        inverse: torch.Tensor,
        unique_values: torch.Tensor,
    ) -> torch.Tensor:
        ctx.table = table
        ctx.unique_count = unique_values.shape[0]
        ctx.save_for_backward(rows, inverse)
        return unique_values.index_select(0, inverse)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[None, ...]:
        rows, inverse = ctx.saved_tensors
        grad_dtype = torch.promote_types(grad_output.dtype, torch.float32)
        per_unique = torch.zeros((ctx.unique_count, grad_output.shape[1]), dtype=grad_dtype, device=grad_output.device)
        per_unique.index_add_(0, inverse, grad_output.to(grad_dtype))
        present = rows >= 0  # eval-mode reads of absent ids have no row to receive a gradient
        ctx.table._accept_row_grad(rows[present], per_unique[present])
        return None, None, None, None, None


def row_lookup(
    anchor: torch.Tensor, table: HashTable, rows: torch.Tensor, inverse: torch.Tensor, unique_values: torch.Tensor
) -> torch.Tensor:
    """``unique_values[inverse]`` whose gradient goes to ``table``'s ``rows``.

    ``anchor`` is a leaf that requires grad, so autograd records the call.
    """
    return _RowLookup.apply(anchor, table, rows, inverse, unique_values)
