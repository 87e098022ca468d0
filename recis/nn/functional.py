"""The differentiable read of table rows.

Forward expands the rows of the unique ids to every position of the batch; backward
sums the output gradient per unique id (in float32) and hands it to a receiver (the
table's pending gradient). No dense gradient of a table is ever formed, and nothing
is written to a ``.grad`` attribute.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

GradReceiver = Callable[[torch.Tensor], None]


class _RowLookup(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, anchor: torch.Tensor, unique_values: torch.Tensor, inverse: torch.Tensor, receive: GradReceiver
    ) -> torch.Tensor:
        ctx.receive = receive
        ctx.unique_count = unique_values.shape[0]
        ctx.save_for_backward(inverse)
        return unique_values.index_select(0, inverse)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[None, ...]:
        (inverse,) = ctx.saved_tensors
        grad_dtype = torch.promote_types(grad_output.dtype, torch.float32)
        per_unique = torch.zeros((ctx.unique_count, grad_output.shape[1]), dtype=grad_dtype, device=grad_output.device)
        per_unique.index_add_(0, inverse, grad_output.to(grad_dtype))
        ctx.receive(per_unique)
        return None, None, None, None


def row_lookup(
    anchor: torch.Tensor, unique_values: torch.Tensor, inverse: torch.Tensor, receive: GradReceiver
) -> torch.Tensor:
    """``unique_values[inverse]``; backward calls ``receive`` with the gradient summed per unique row.

    ``anchor`` is a leaf that requires grad, so autograd records the call.
    """
    return _RowLookup.apply(anchor, unique_values, inverse, receive)
