"""The fused Adagrad updates of the touched rows of a table (pure torch).

One call updates ``weight`` and its accumulator slot ``grad_sq_sum`` at ``rows`` with the
gradient ``grad / grad_divisor`` (``grad`` perhaps in pieces, ``recis.ops.row_pieces``), in
float32, or float64 when the rows or the slot are float64. ``rows`` are distinct, or with
``sum_repeated_rows`` may repeat: a row's gradient rows are then summed first, in input
order (``coalesce_rows``), and the row updated once. With g the gradient of a row (``-g``
when maximizing), theta the row, t the table's step count including this update, init the
initial accumulator value and S the slot (the sum of squares since the row was created, so
that a fresh row's zero slot means an accumulator of init):

    g     += wd * theta                              (L2, on the value before the update)
    S     += g^2                (element-wise)    or  mean_j g_j^2   (row-wise: one per row)
    clr    = lr / (1 + (t - 1) * lr_decay)
    theta -= clr * g / (sqrt(init + S) + eps)

Element-wise it is ``torch.optim.Adagrad`` (whose ``state_sum`` is init + S) on the
touched rows; row-wise it is torchrec's ``RowWiseAdagrad`` / FBGEMM's row-wise Adagrad
on the touched rows. With ``grad_sq`` (the "Sum" variants: the sum over contributions of
their squared gradients), S grows by ``grad_sq`` (row-wise: its mean over the row)
instead of g^2, and there is no weight decay.
"""

from __future__ import annotations

import torch

from recis.ops.coalesce import coalesce_rows
from recis.ops.row_pieces import RowsOrPieces, joined


def adagrad_lr(lr: float, lr_decay: float, step: int) -> float:
    """The step size of step ``step`` (1 for the first): ``lr / (1 + (step - 1) * lr_decay)``, torch's."""
    return lr / (1 + (step - 1) * lr_decay)


def sparse_adagrad_update(
    weight: torch.Tensor,
    grad_sq_sum: torch.Tensor,
    rows: torch.Tensor,
    grad: RowsOrPieces,
    *,
    lr: float,
    lr_decay: float,
    initial_accumulator_value: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    step: int,
    grad_sq: torch.Tensor | None = None,
    grad_divisor: float = 1.0,
    sum_repeated_rows: bool = False,
) -> None:
    """Element-wise Adagrad on ``rows`` of ``weight`` and of its ``(rows, dim)`` slot, in place."""
    _update(weight, grad_sq_sum, rows, grad, grad_sq, row_wise=False, lr=adagrad_lr(lr, lr_decay, step),
            init=initial_accumulator_value, eps=eps, weight_decay=weight_decay, maximize=maximize,
            grad_divisor=grad_divisor, sum_repeated_rows=sum_repeated_rows)  # fmt: skip


def sparse_row_wise_adagrad_update(
    weight: torch.Tensor,
    grad_sq_sum: torch.Tensor,
    rows: torch.Tensor,
    grad: RowsOrPieces,
    *,
    lr: float,
    lr_decay: float,
    initial_accumulator_value: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    step: int,
    grad_sq: torch.Tensor | None = None,
    grad_divisor: float = 1.0,
    sum_repeated_rows: bool = False,
) -> None:
    """Row-wise Adagrad on ``rows`` of ``weight`` and of its ``(rows, 1)`` slot, in place."""
    _update(weight, grad_sq_sum, rows, grad, grad_sq, row_wise=True, lr=adagrad_lr(lr, lr_decay, step),
            init=initial_accumulator_value, eps=eps, weight_decay=weight_decay, maximize=maximize,
            grad_divisor=grad_divisor, sum_repeated_rows=sum_repeated_rows)  # fmt: skip


def _update(
    weight: torch.Tensor,
    grad_sq_sum: torch.Tensor,
    rows: torch.Tensor,
    grad: RowsOrPieces,
    grad_sq: torch.Tensor | None,
    *,
    row_wise: bool,
    lr: float,
    init: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    grad_divisor: float,
    sum_repeated_rows: bool,
) -> None:
    if sum_repeated_rows and grad_sq is not None:
        raise ValueError("sparse_adagrad_update: grad_sq needs distinct rows; coalesce first")
    if not grad_divisor > 0:
        raise ValueError(f"sparse_adagrad_update: grad_divisor must be positive, got {grad_divisor}")
    compute_dtype = torch.promote_types(torch.promote_types(grad_sq_sum.dtype, weight.dtype), torch.float32)
    g = joined(grad).to(compute_dtype)
    if sum_repeated_rows:
        rows, g = coalesce_rows(rows, g)
    theta = weight.index_select(0, rows).to(compute_dtype)
    total = grad_sq_sum.index_select(0, rows).to(compute_dtype)
    if grad_divisor != 1:
        g = g / grad_divisor
    if maximize:
        g = -g
    if weight_decay != 0:
        g = g.add(theta, alpha=weight_decay)
    squares = g * g if grad_sq is None else grad_sq.to(compute_dtype)
    total.add_(squares.mean(dim=1, keepdim=True) if row_wise else squares)
    denom = total.add(init).sqrt_().add_(eps)  # torch.optim.Adagrad's order: sqrt, then + eps
    theta.addcdiv_(g, denom, value=-lr)
    weight.index_copy_(0, rows, theta.to(weight.dtype))
    grad_sq_sum.index_copy_(0, rows, total.to(grad_sq_sum.dtype))
