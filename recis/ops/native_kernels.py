"""Python front of the native row kernels (``torch.ops.recis``): same signatures and
results (to float32 rounding) as the pure-torch kernels beside this file.

Each function runs the native kernel for the layouts it supports (contiguous tables;
float32 or float64 slots on CPU, float32 on CUDA; float32, bfloat16, float16 or float64
rows no wider than their slots; a device the library has kernels for) and hands
anything else to the torch kernel it mirrors.
"""

from __future__ import annotations

import torch

from recis.ops import adamw_tf_update, coalesce
from recis.ops.native_library import has_kernels_for
from recis.ops.sparse_adam_update import EpsilonPlacement, WeightDecay
from recis.ops.sparse_adam_update import sparse_adam_update as torch_sparse_adam_update

_DECAY_CODES = {WeightDecay.L2: 0, WeightDecay.DECOUPLED: 1, WeightDecay.DECOUPLED_NO_LR: 2}
_EPSILON_CODES = {EpsilonPlacement.CORRECTED: 0, EpsilonPlacement.UNCORRECTED: 1}
_STATE_DTYPES = (torch.float32, torch.float64)
_ROW_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _compute_dtype(weight: torch.Tensor, exp_avg: torch.Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(exp_avg.dtype, weight.dtype), torch.float32)


def _native_layout(weight: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> bool:
    """Whether the fused kernel handles these tables (else the torch kernel does); CUDA: float32 slots."""
    return (
        has_kernels_for(weight.device)
        and (exp_avg.dtype == torch.float32 or weight.device.type == "cpu")
        and exp_avg.dtype in _STATE_DTYPES
        and exp_avg_sq.dtype == exp_avg.dtype
        and weight.dtype in _ROW_DTYPES
        and weight.element_size() <= exp_avg.element_size()
        and weight.dim() == 2
        and all(t.is_contiguous() and t.device == weight.device for t in (weight, exp_avg, exp_avg_sq))
    )


def coalesce_rows(rows: torch.Tensor, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Native ``recis.ops.coalesce.coalesce_rows``: radix grouping, sums in input order."""
    accumulate_dtype = torch.promote_types(grads.dtype, torch.float32)
    supported = accumulate_dtype == torch.float32 or (accumulate_dtype in _STATE_DTYPES and grads.device.type == "cpu")
    if grads.dim() != 2 or not supported or not has_kernels_for(grads.device):
        return coalesce.coalesce_rows(rows, grads)
    return torch.ops.recis.coalesce_rows(rows.contiguous(), grads.to(accumulate_dtype).contiguous())


def sparse_adam_update(
    weight: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    rows: torch.Tensor,
    grad: torch.Tensor,
    *,
    step: int,
    row_steps: torch.Tensor | None = None,
    **hyper,
) -> None:
    """Native ``recis.ops.sparse_adam_update.sparse_adam_update`` (same arguments)."""
    if not _native_layout(weight, exp_avg, exp_avg_sq):
        torch_sparse_adam_update(weight, exp_avg, exp_avg_sq, rows, grad, step=step, row_steps=row_steps, **hyper)
        return
    grad = grad.to(_compute_dtype(weight, exp_avg)).contiguous()
    _run(weight, exp_avg, exp_avg_sq, rows.contiguous(), grad, row_steps, step, hyper)


def _run(weight, exp_avg, exp_avg_sq, rows, grad, row_steps, step, hyper) -> None:
    if row_steps is not None:
        row_steps = row_steps.view(-1)
    torch.ops.recis.sparse_adam_update(
        weight, exp_avg, exp_avg_sq, rows, grad, row_steps,
        hyper["lr"], hyper["beta1"], hyper["beta2"], hyper["eps"], hyper["weight_decay"],
        _DECAY_CODES[hyper["decay"]], _EPSILON_CODES[hyper["epsilon"]], hyper["maximize"], int(step),
    )  # fmt: skip


def adamw_tf_multi_tensor(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    state_steps: list[torch.Tensor],
    **hyper,
) -> None:
    """Native ``recis.ops.adamw_tf_update.adamw_tf_multi_tensor``: one fused pass
    over all tensors of one device and dtype."""
    dtype = params[0].dtype if params else None
    native = dtype in _STATE_DTYPES and all(
        t.device.type == "cpu" and t.is_contiguous() and t.dtype == dtype and not t.is_sparse
        for tensors in (params, grads, exp_avgs, exp_avg_sqs)
        for t in tensors
    )
    if not native:
        adamw_tf_update.adamw_tf_multi_tensor(params, grads, exp_avgs, exp_avg_sqs, state_steps, **hyper)
        return
    torch.ops.recis.adamw_tf_multi_tensor(
        params, grads, exp_avgs, exp_avg_sqs, state_steps,
        hyper["lr"], hyper["beta1"], hyper["beta2"], hyper["eps"], hyper["weight_decay"], hyper["maximize"],
    )  # fmt: skip
