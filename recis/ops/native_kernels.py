"""Python front of the native row kernels (``torch.ops.recis``): same signatures and
results (to float32 rounding) as the pure-torch kernels beside this file.

Layouts the kernels take. CPU: rows and slots of any floating dtype (float32, float64,
bfloat16, float16), math in float32, or float64 when the rows or the slots are float64;
AdamWTF tensors of any floating dtype, non-contiguous ones through contiguous copies.
CUDA: float32 slots and gradients, float32, bfloat16 or float16 rows. Tables are
contiguous and 2-D. Anything else raises ``NativeLayoutError`` (the torch kernels,
``RECIS_BACKEND=torch``, run it): a kernel never hands a call to the torch kernels.
"""

from __future__ import annotations

import torch

from recis.ops.row_pieces import RowsOrPieces, as_pieces, joined
from recis.ops.sparse_adagrad_update import adagrad_lr
from recis.ops.sparse_adam_update import EpsilonPlacement, WeightDecay

# The codes of common/adam_rule.h's enums (tests/kernels/test_rule_codes.py checks them).
DECAY_CODES = {WeightDecay.L2: 0, WeightDecay.DECOUPLED: 1, WeightDecay.DECOUPLED_NO_LR: 2}
EPSILON_CODES = {EpsilonPlacement.CORRECTED: 0, EpsilonPlacement.UNCORRECTED: 1}
_FLOATING = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_CUDA_ROWS = (torch.float32, torch.bfloat16, torch.float16)


class NativeLayoutError(RuntimeError):
    """A tensor layout no native kernel takes."""


def _unsupported(op: str, layout: str) -> NativeLayoutError:
    return NativeLayoutError(f"the native {op} does not take {layout}; RECIS_BACKEND=torch runs it")


def _compute_dtype(weight: torch.Tensor, exp_avg: torch.Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(exp_avg.dtype, weight.dtype), torch.float32)


def _check_update_layout(weight: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> None:
    op = "sparse_adam_update"
    tables = (weight, exp_avg, exp_avg_sq)
    if weight.dim() != 2 or any(t.shape != weight.shape for t in tables):
        raise _unsupported(op, f"tables of shapes {[tuple(t.shape) for t in tables]} (one 2-D shape)")
    if any(t.device != weight.device for t in tables) or not all(t.is_contiguous() for t in tables):
        raise _unsupported(op, "tables on several devices or non-contiguous tables")
    if exp_avg.dtype != exp_avg_sq.dtype or any(t.dtype not in _FLOATING for t in tables):
        raise _unsupported(op, f"rows of {weight.dtype} with slots of {exp_avg.dtype} and {exp_avg_sq.dtype}")
    if weight.device.type == "cuda" and (exp_avg.dtype != torch.float32 or weight.dtype not in _CUDA_ROWS):
        raise _unsupported(op, f"CUDA rows of {weight.dtype} with slots of {exp_avg.dtype} (float32 slots only)")


def coalesce_rows(rows: torch.Tensor, grads: RowsOrPieces) -> tuple[torch.Tensor, torch.Tensor]:
    """Native ``recis.ops.coalesce.coalesce_rows``: radix grouping, sums in input order. On CPU
    the gradients' pieces are read in place; on CUDA they are joined first."""
    pieces = as_pieces(grads)
    first = pieces[0]
    accumulate_dtype = torch.promote_types(first.dtype, torch.float32)
    supported = (torch.float32,) if first.device.type == "cuda" else (torch.float32, torch.float64)
    if first.dim() != 2 or accumulate_dtype not in supported or rows.device != first.device:
        layout = f"{first.dim()}-D {first.dtype} gradients on {first.device} with rows on {rows.device}"
        raise _unsupported("coalesce_rows", layout)
    if first.device.type == "cuda":
        pieces = [joined(pieces)]
    return torch.ops.recis.coalesce_rows(rows.contiguous(), [piece.to(accumulate_dtype) for piece in pieces])


def gather_rows(rows: RowsOrPieces, index: torch.Tensor) -> torch.Tensor:
    """Native ``recis.ops.gather.gather_rows`` (CPU): rows copied from the pieces where they lie."""
    pieces = as_pieces(rows)
    if pieces[0].dim() != 2 or index.device != pieces[0].device:
        raise _unsupported("gather_rows", f"{pieces[0].dim()}-D pieces on {pieces[0].device}, index on {index.device}")
    return torch.ops.recis.gather_rows(pieces, index)


def sum_by_index(index: torch.Tensor, values: torch.Tensor, count: int) -> torch.Tensor:
    """Native ``recis.ops.coalesce.sum_by_index`` (CPU): one pass, sums in input order."""
    accumulate_dtype = torch.promote_types(values.dtype, torch.float32)
    if values.dim() != 2 or accumulate_dtype not in (torch.float32, torch.float64) or index.device != values.device:
        layout = f"{values.dim()}-D {values.dtype} values on {values.device} with an index on {index.device}"
        raise _unsupported("sum_by_index", layout)
    return torch.ops.recis.sum_by_index(index, values.to(accumulate_dtype), count)


def owner_rank(ids: torch.Tensor, world_size: int) -> torch.Tensor:
    """Native ``recis.ops.partition.owner_rank`` (CPU)."""
    return torch.ops.recis.owner_rank(ids.reshape(-1), world_size).reshape(ids.shape)


def unique_by_owner(ids: torch.Tensor, world_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Native ``recis.ops.partition.unique_by_owner`` (CPU): one hashing pass, no sort."""
    return torch.ops.recis.unique_by_owner(ids, world_size)


def sparse_adam_update(
    weight: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    rows: torch.Tensor,
    grad: RowsOrPieces,
    *,
    step: int,
    row_steps: torch.Tensor | None = None,
    grad_divisor: float = 1.0,
    sum_repeated_rows: bool = False,
    **hyper,
) -> None:
    """Native ``recis.ops.sparse_adam_update.sparse_adam_update`` (same arguments). On CPU the
    gradient's pieces are read in place and repeated rows summed inside the update; on CUDA
    they are joined and coalesced first (``coalesce_rows``)."""
    _check_update_layout(weight, exp_avg, exp_avg_sq)
    compute_dtype = _compute_dtype(weight, exp_avg)
    pieces = [piece.to(compute_dtype) for piece in as_pieces(grad)]
    if weight.device.type == "cuda":
        rows, joined_grad = coalesce_rows(rows, pieces) if sum_repeated_rows else (rows, joined(pieces))
        pieces, sum_repeated_rows = [joined_grad.contiguous()], False
    if row_steps is not None:
        row_steps = row_steps.view(-1)
    torch.ops.recis.sparse_adam_update(
        weight, exp_avg, exp_avg_sq, rows.contiguous(), pieces, row_steps,
        hyper["lr"], hyper["beta1"], hyper["beta2"], hyper["eps"], hyper["weight_decay"],
        DECAY_CODES[hyper["decay"]], EPSILON_CODES[hyper["epsilon"]], hyper["maximize"], int(step),
        float(grad_divisor), sum_repeated_rows,
    )  # fmt: skip


def sparse_adagrad_update(
    weight: torch.Tensor, grad_sq_sum: torch.Tensor, rows: torch.Tensor, grad: RowsOrPieces, **options
) -> None:
    """Native ``recis.ops.sparse_adagrad_update.sparse_adagrad_update`` (CPU, same arguments)."""
    _adagrad_update(weight, grad_sq_sum, rows, grad, row_wise=False, **options)


def sparse_row_wise_adagrad_update(
    weight: torch.Tensor, grad_sq_sum: torch.Tensor, rows: torch.Tensor, grad: RowsOrPieces, **options
) -> None:
    """Native ``recis.ops.sparse_adagrad_update.sparse_row_wise_adagrad_update`` (CPU, same arguments)."""
    _adagrad_update(weight, grad_sq_sum, rows, grad, row_wise=True, **options)


def _adagrad_update(
    weight: torch.Tensor,
    grad_sq_sum: torch.Tensor,
    rows: torch.Tensor,
    grad: RowsOrPieces,
    *,
    row_wise: bool,
    step: int,
    grad_sq: torch.Tensor | None = None,
    grad_divisor: float = 1.0,
    sum_repeated_rows: bool = False,
    **hyper,
) -> None:
    """One pass over the touched rows: the gradient's pieces read in place, repeated rows summed inside."""
    tables = (weight, grad_sq_sum)
    if any(t.device.type != "cpu" or t.dtype not in _FLOATING or not t.is_contiguous() or t.dim() != 2 for t in tables):
        layout = f"tables of {weight.dtype} on {weight.device}, a slot of {grad_sq_sum.dtype} on {grad_sq_sum.device}"
        raise _unsupported("sparse_adagrad_update", f"{layout} (contiguous 2-D CPU tables only)")
    compute_dtype = _compute_dtype(weight, grad_sq_sum)
    pieces = [piece.to(compute_dtype) for piece in as_pieces(grad)]
    squares = None if grad_sq is None else grad_sq.to(compute_dtype).contiguous()
    torch.ops.recis.sparse_adagrad_update(
        weight, grad_sq_sum, rows.contiguous(), pieces, squares, row_wise,
        adagrad_lr(hyper["lr"], hyper["lr_decay"], step), hyper["initial_accumulator_value"], hyper["eps"],
        hyper["weight_decay"], hyper["maximize"], float(grad_divisor), sum_repeated_rows,
    )  # fmt: skip


def adamw_tf_multi_tensor(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    state_steps: list[torch.Tensor],
    **hyper,
) -> None:
    """Native ``recis.ops.adamw_tf_update.adamw_tf_multi_tensor``: one fused pass over
    all tensors (CPU, one dtype); non-contiguous ones are updated through contiguous copies."""
    lists = (params, grads, exp_avgs, exp_avg_sqs)
    dtype = params[0].dtype if params else torch.float32
    foreign = any(t.is_sparse or t.device.type != "cpu" or t.dtype != dtype for ts in lists for t in ts)
    if foreign or dtype not in _FLOATING:
        raise _unsupported("adamw_tf_multi_tensor", "tensors that are not dense CPU tensors of one floating dtype")
    dense = [[t.contiguous() for t in tensors] for tensors in lists]
    torch.ops.recis.adamw_tf_multi_tensor(
        *dense, state_steps,
        hyper["lr"], hyper["beta1"], hyper["beta2"], hyper["eps"], hyper["weight_decay"], hyper["maximize"],
    )  # fmt: skip
    for originals, copies in zip((params, exp_avgs, exp_avg_sqs), (dense[0], dense[2], dense[3])):
        for original, copy in zip(originals, copies):
            if copy is not original:
                original.copy_(copy)
