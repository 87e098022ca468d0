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

RecIS's signature is accepted as is: ``AdamWTF(params, lr, betas, eps, weight_decay,
use_nesterov=False, *, maximize=False, fuse=True)``. ``use_nesterov`` must be False:
RecIS accepts True here but both its update paths assert it is False at the first
``step()``, so this class refuses it when constructed. ``fuse`` is RecIS's choice between
its fused multi-tensor kernel (True) and a per-tensor loop (False); here it selects the
same two paths as torch's ``foreach`` (True: the multi-tensor path, False: the
per-tensor one), which compute the same formula. A state dict saved by RecIS's AdamWTF
(groups with ``use_nesterov`` and ``fuse``, no ``foreach``) loads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from recis.ops import adamw_tf_multi_tensor
from recis.ops.adamw_tf_update import tf_step_size
from recis.optim.adamw_tf_state import checked_state_dict
from recis.optim.hyperparameters import (
    check_betas,
    check_eps,
    check_lr,
    check_unsupported_flag,
    check_weight_decay,
)

_NESTEROV_WHY = "Nesterov momentum is not implemented (RecIS's AdamWTF fails on it at the first step)"


def _path_choice(foreach: bool | None, fuse: bool | None) -> bool | None:
    """torch's ``foreach`` from either spelling: RecIS's ``fuse`` is the same switch."""
    for name, value in (("foreach", foreach), ("fuse", fuse)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool or None, got {value!r}")
    if foreach is not None and fuse is not None and foreach != fuse:
        raise ValueError(f"foreach={foreach} and fuse={fuse} ask for different update paths; give one")
    return foreach if foreach is not None else fuse


class AdamWTF(Optimizer):
    """TensorFlow-aligned AdamW for dense parameters (formula and RecIS's arguments in the module docstring).

    Args:
        params, lr, betas, eps, weight_decay, maximize: as torch.optim.AdamW.
        use_nesterov: RecIS's switch; must be False.
        foreach: None or True: the multi-tensor path; False: the per-tensor path.
        fuse: RecIS's name for the same choice (True: multi-tensor); not together with a different ``foreach``.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        use_nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fuse: bool | None = None,
    ) -> None:
        check_unsupported_flag("use_nesterov", use_nesterov, _NESTEROV_WHY)
        foreach = _path_choice(foreach, fuse)
        defaults = dict(
            lr=check_lr(lr),
            betas=check_betas(betas),
            eps=check_eps(eps),
            weight_decay=check_weight_decay(weight_decay),
            maximize=maximize,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Also completes groups saved by RecIS's AdamWTF (``fuse`` rather than ``foreach``)."""
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("foreach", group.pop("fuse", None))
            group.setdefault("maximize", False)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        check_unsupported_flag("use_nesterov", param_group.get("use_nesterov", False), _NESTEROV_WHY)
        if "fuse" in param_group:
            foreach = _path_choice(param_group.get("foreach"), param_group["fuse"])
            param_group = {**{k: v for k, v in param_group.items() if k != "fuse"}, "foreach": foreach}
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

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load, after ``checked_state_dict`` (``adamw_tf_state``): a state dict that
        ``step()`` could not use (a bad step count or moment, a bad hyperparameter, another
        optimizer's) raises ``ValueError`` naming the entry, and nothing changes."""
        super().load_state_dict(checked_state_dict(state_dict, self.param_groups, _check_hyperparameters))

    def _check_groups(self) -> None:
        """Raise, changing nothing, if a group was edited into an invalid state or holds a sparse gradient."""
        for group in self.param_groups:
            _check_hyperparameters(group)
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


def _check_hyperparameters(group: dict[str, Any]) -> None:
    check_lr(group["lr"])
    check_betas(group["betas"])
    check_eps(group["eps"])
    check_weight_decay(group["weight_decay"])
    check_unsupported_flag("use_nesterov", group.get("use_nesterov", False), _NESTEROV_WHY)


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
