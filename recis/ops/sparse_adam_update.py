"""The fused Adam-family update of the touched rows of a table (pure torch).

One call updates ``weight``, ``exp_avg`` and ``exp_avg_sq`` at ``rows`` (distinct) with
the coalesced gradient ``grad``, in float32, or float64 when the rows or the state are
float64: never narrower than float32, whatever the dtype of the rows. With g the gradient, theta the row, t the step:

    decay (first, on the value before the Adam update):
        L2:              g     += wd * theta              torch.optim.SparseAdam / Adam
        DECOUPLED:       theta *= 1 - lr * wd             torch.optim.AdamW
        DECOUPLED_NO_LR: theta *= 1 - wd                  TF DecoupledWeightDecayExtension
    moments:  m = b1 * m + (1 - b1) * g ;  v = b2 * v + (1 - b2) * g^2
    update, bc1 = 1 - b1^t, bc2 = 1 - b2^t:
        CORRECTED:   theta -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)     torch.optim.Adam(W)
        UNCORRECTED: theta -= lr * sqrt(bc2) / bc1 * m / (sqrt(v) + eps)     TF ApplyAdam, torch SparseAdam

``t`` is either one count for the whole table (``step``) or a per-row count kept in
``row_steps``, which this call increments for the updated rows.
"""

from __future__ import annotations

import enum
import math

import torch

from recis.ops.coalesce import coalesce_rows
from recis.ops.row_pieces import RowsOrPieces, joined


class WeightDecay(enum.Enum):
    L2 = "l2"
    DECOUPLED = "decoupled"
    DECOUPLED_NO_LR = "decoupled_no_lr"


class EpsilonPlacement(enum.Enum):
    CORRECTED = "corrected"
    UNCORRECTED = "uncorrected"


def sparse_adam_update(
    weight: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    rows: torch.Tensor,
    grad: RowsOrPieces,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decay: WeightDecay,
    epsilon: EpsilonPlacement,
    maximize: bool,
    step: int,
    row_steps: torch.Tensor | None = None,
    grad_divisor: float = 1.0,
    sum_repeated_rows: bool = False,
) -> None:
    """Apply one Adam-family update in place to ``rows`` of ``weight`` and its two slots, with the
    gradient ``grad / grad_divisor`` (divided in the compute dtype; the divisor averages over
    workers or accumulation steps). ``grad`` may come in pieces (``recis.ops.row_pieces``).
    ``rows`` are distinct, or with ``sum_repeated_rows`` may repeat: the gradient rows of a row
    are then summed in the compute dtype, in input order (``coalesce_rows``), and the row updated once."""
    if not grad_divisor > 0:  # a zero or negative divisor would write inf or flipped steps into the table
        raise ValueError(f"sparse_adam_update: grad_divisor must be positive, got {grad_divisor}")
    compute_dtype = torch.promote_types(torch.promote_types(exp_avg.dtype, weight.dtype), torch.float32)
    grad = joined(grad).to(compute_dtype)
    if sum_repeated_rows:
        rows, grad = coalesce_rows(rows, grad)
    theta = weight.index_select(0, rows).to(compute_dtype)
    m = exp_avg.index_select(0, rows).to(compute_dtype)
    v = exp_avg_sq.index_select(0, rows).to(compute_dtype)
    g = grad.to(compute_dtype)
    if grad_divisor != 1:
        g = g / grad_divisor
    if maximize:
        g = -g

    if decay is WeightDecay.L2 and weight_decay != 0:
        g = g.add(theta, alpha=weight_decay)
    elif decay is WeightDecay.DECOUPLED:
        theta.mul_(1 - lr * weight_decay)
    elif decay is WeightDecay.DECOUPLED_NO_LR:
        theta.mul_(1 - weight_decay)

    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)

    if row_steps is None:
        _apply_table_step(theta, m, v, lr=lr, beta1=beta1, beta2=beta2, eps=eps, epsilon=epsilon, step=step)
    else:
        t = row_steps.index_select(0, rows) + 1
        row_steps.index_copy_(0, rows, t)
        _apply_row_steps(theta, m, v, lr=lr, beta1=beta1, beta2=beta2, eps=eps, epsilon=epsilon, t=t)

    weight.index_copy_(0, rows, theta.to(weight.dtype))
    exp_avg.index_copy_(0, rows, m.to(exp_avg.dtype))
    exp_avg_sq.index_copy_(0, rows, v.to(exp_avg_sq.dtype))


def _apply_table_step(
    theta: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    epsilon: EpsilonPlacement,
    step: int,
) -> None:
    # Same operations, in the same order, as torch.optim.Adam's single-tensor path.
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    if epsilon is EpsilonPlacement.CORRECTED:
        denom = (v.sqrt() / math.sqrt(bias_correction2)).add_(eps)
        theta.addcdiv_(m, denom, value=-lr / bias_correction1)
    else:
        denom = v.sqrt().add_(eps)
        theta.addcdiv_(m, denom, value=-lr * math.sqrt(bias_correction2) / bias_correction1)


def _apply_row_steps(
    theta: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    epsilon: EpsilonPlacement,
    t: torch.Tensor,
) -> None:
    t = t.to(torch.float64)
    bias_correction1 = 1 - torch.pow(beta1, t)
    bias_correction2 = 1 - torch.pow(beta2, t)
    if epsilon is EpsilonPlacement.CORRECTED:
        denom = (v.sqrt() / bias_correction2.sqrt().to(v.dtype)).add_(eps)
        step_size = lr / bias_correction1
    else:
        denom = v.sqrt().add_(eps)
        step_size = lr * bias_correction2.sqrt() / bias_correction1
    theta.sub_(step_size.to(theta.dtype) * m / denom)
