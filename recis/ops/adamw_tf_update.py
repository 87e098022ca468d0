"""AdamWTF's multi-tensor update of dense parameters (pure torch, ``torch._foreach_*``).

For every tensor, with its step t incremented first, bc1 = 1 - beta1^t, bc2 = 1 - beta2^t:

    theta *= 1 - weight_decay
    m      = beta1 * m + (1 - beta1) * g
    v      = beta2 * v + (1 - beta2) * g^2
    theta -= lr * sqrt(bc2) / bc1 * m / (sqrt(v) + eps)

The tensors of one call share a device and dtype (``recis.optim.AdamWTF`` groups them).
"""

from __future__ import annotations

import math

import torch


def tf_step_size(lr: float, beta1: float, beta2: float, step: float) -> float:
    """lr * sqrt(1 - beta2^t) / (1 - beta1^t)."""
    return lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)


def adamw_tf_multi_tensor(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    state_steps: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """Update ``params``, the moments and the step counts in place."""
    if maximize:
        grads = torch._foreach_neg(grads)
    torch._foreach_add_(state_steps, 1)
    torch._foreach_mul_(params, 1 - weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denoms, eps)
    step_sizes = [-tf_step_size(lr, beta1, beta2, step.item()) for step in state_steps]
    torch._foreach_addcdiv_(params, exp_avgs, denoms, step_sizes)
