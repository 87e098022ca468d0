"""AdamWTF: TensorFlow's AdamW for dense parameters.

With g the gradient, theta the parameter, t the step, bc1 = 1 - beta1^t, bc2 = 1 - beta2^t:

    theta *= 1 - weight_decay                     (decoupled, NOT scaled by lr)
    m      = beta1 * m + (1 - beta1) * g
    v      = beta2 * v + (1 - beta2) * g^2
    theta -= lr * sqrt(bc2) / bc1 * m / (sqrt(v) + eps)

Reference: TensorFlow's DecoupledWeightDecayExtension (tf.contrib.opt.AdamWOptimizer,
TensorFlow Addons AdamW) over Adam, whose update is TF's ApplyAdam (epsilon added to
the uncorrected sqrt(v), bias correction folded into the step size). Every element is
updated every step, as in TF's dense Adam.

The class validates and holds state in torch's layout (``step``, ``exp_avg``,
``exp_avg_sq`` per parameter); ``adamw_tf`` is the functional core, with a
multi-tensor path, the default (``recis.ops.adamw_tf_multi_tensor``: a fused native
kernel, or ``torch._foreach_*``), and a per-tensor path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from recis.ops import adamw_tf_multi_tensor
from recis.ops.adamw_tf_update import tf_step_size
from recis.optim.hyperparameters import check_betas, check_eps, check_lr, check_weight_decay


class AdamWTF(Optimizer):
    """TensorFlow-aligned AdamW for dense parameters (formula in the module docstring)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=check_lr(lr),
            betas=check_betas(betas),
            eps=check_eps(eps),
            weight_decay=check_weight_decay(weight_decay),
            maximize=maximize,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key, check in (
            ("lr", check_lr),
            ("betas", check_betas),
            ("eps", check_eps),
            ("weight_decay", check_weight_decay),
        ):
            if key in param_group:
                param_group[key] = check(param_group[key])
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_groups()  # every group before any is updated: an error changes nothing
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps = self._gather(group)
            beta1, beta2 = group["betas"]
            adamw_tf(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                steps,
                foreach=group["foreach"],
                lr=check_lr(group["lr"]),
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                maximize=group["maximize"],
            )
        return loss

    def _check_groups(self) -> None:
        """Raise, changing nothing, if a group was edited into an invalid state or holds a sparse gradient."""
        for group in self.param_groups:
            check_lr(group["lr"])
            check_betas(group["betas"])
            check_eps(group["eps"])
            check_weight_decay(group["weight_decay"])
            if any(p.grad is not None and p.grad.is_sparse for p in group["params"]):
                raise RuntimeError("AdamWTF does not support sparse gradients; use recis.optim.SparseAdamWTF")

    def _gather(self, group: dict[str, Any]) -> tuple[list[torch.Tensor], ...]:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        return params, grads, exp_avgs, exp_avg_sqs, steps


def adamw_tf(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    state_steps: list[torch.Tensor],
    *,
    foreach: bool | None,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """Functional AdamWTF: updates ``params``, the moments and the step counts in place."""
    if not params:
        return
    use_foreach = foreach is not False  # multi-tensor unless asked otherwise
    update = _multi_tensor_adamw_tf if use_foreach else _single_tensor_adamw_tf
    update(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        state_steps,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        maximize=maximize,
    )


def _single_tensor_adamw_tf(
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
    for param, grad, exp_avg, exp_avg_sq, step_t in zip(params, grads, exp_avgs, exp_avg_sqs, state_steps):
        grad = -grad if maximize else grad
        step_t += 1
        param.mul_(1 - weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = exp_avg_sq.sqrt().add_(eps)
        param.addcdiv_(exp_avg, denom, value=-tf_step_size(lr, beta1, beta2, step_t.item()))


def _multi_tensor_adamw_tf(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    state_steps: list[torch.Tensor],
    **hyper: Any,
) -> None:
    grouped = Optimizer._group_tensors_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs, state_steps])
    for (device_params, device_grads, device_exp_avgs, device_exp_avg_sqs, device_steps), _ in grouped.values():
        adamw_tf_multi_tensor(device_params, device_grads, device_exp_avgs, device_exp_avg_sqs, device_steps, **hyper)
