"""The kernels ``recis.ops`` exports: each call runs the backend ``choose_backend`` names
for its tensors' device at that moment (``recis/ops/backend.py``), the native kernel
(``native_kernels.py``, ``native_id_map.py``) or the torch one beside it."""

from __future__ import annotations

import torch
from torch.autograd import forward_ad

from recis.ops import adamw_tf_update, coalesce, gather, native_kernels, partition, sparse_adagrad_update
from recis.ops.backend import choose_backend
from recis.ops.id_map import TorchIdMap
from recis.ops.native_id_map import NativeIdMap
from recis.ops.row_pieces import RowsOrPieces, as_pieces
from recis.ops.sparse_adam_update import EpsilonPlacement, WeightDecay
from recis.ops.sparse_adam_update import sparse_adam_update as torch_sparse_adam_update


def IdMap(device: torch.device | str = "cpu") -> NativeIdMap | TorchIdMap:
    """A new, empty id map on ``device``, of the backend in force; it keeps that backend."""
    native = choose_backend(device, "id_map") == "native"
    return NativeIdMap(device) if native else TorchIdMap(device)


def coalesce_rows(rows: torch.Tensor, grads: RowsOrPieces) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum ``grads[i]`` over equal ``rows[i]``: ``(unique_rows ascending, sums)``, the sums in
    float32 or the wider dtype of ``grads``, which may come in pieces (``recis.ops.coalesce.coalesce_rows``)."""
    native = choose_backend(as_pieces(grads)[0].device, "coalesce_rows") == "native"
    return (native_kernels if native else coalesce).coalesce_rows(rows, grads)


def gather_rows(rows: RowsOrPieces, index: torch.Tensor) -> torch.Tensor:
    """The rows of a tensor, or of its pieces' concatenation, at ``index`` (``recis.ops.gather``)."""
    if isinstance(rows, torch.Tensor) and not _native_gather_takes(rows, index):
        return rows.index_select(0, index)
    native = choose_backend(index.device, "gather_rows") == "native"
    return (native_kernels if native else gather).gather_rows(rows, index)


def _native_gather_takes(rows: torch.Tensor, index: torch.Tensor) -> bool:
    """Whether one tensor's rows may be gathered by the native kernel: a plain (not quantized, not
    a subclass), contiguous 2-D CPU tensor that no autograd mode tracks, at an int64 index on
    its device (``index_select`` takes the rest: it is differentiable, the kernel on a GPU, and
    copies nothing first). On the rows of a table (8,192 of 34,447, dims 8-64, 26 tables; AMD
    EPYC) the native gather took 4-7 ms against ``index_select``'s 21-23 ms."""
    plain = type(rows) in (torch.Tensor, torch.nn.Parameter) and rows.layout == torch.strided and not rows.is_quantized
    layout = rows.device.type == "cpu" and rows.dim() == 2 and rows.is_contiguous()
    tracked = (rows.requires_grad and torch.is_grad_enabled()) or forward_ad.unpack_dual(rows).tangent is not None
    at_index = index.dtype == torch.int64 and index.dim() == 1 and index.device == rows.device
    return plain and layout and not tracked and at_index


def sum_by_index(index: torch.Tensor, values: torch.Tensor, count: int) -> torch.Tensor:
    """``zeros(count, dim).index_add_(0, index, values)`` in float32 or wider: the per-row sums of a
    gathered tensor's gradient (``recis.ops.coalesce.sum_by_index``)."""
    native = choose_backend(values.device, "sum_by_index") == "native"
    return (native_kernels if native else coalesce).sum_by_index(index, values, count)


def owner_rank(ids: torch.Tensor, world_size: int) -> torch.Tensor:
    """The rank that owns each int64 id: ``mix64(id) mod world_size`` (``recis.ops.partition``)."""
    native = choose_backend(ids.device, "owner_rank") == "native"
    return (native_kernels if native else partition).owner_rank(ids, world_size)


def unique_by_owner(ids: torch.Tensor, world_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(unique, inverse, counts)``: the distinct 1-D ``ids`` grouped by owner rank, each group in
    order of first appearance (``recis.ops.partition.unique_by_owner``)."""
    native = choose_backend(ids.device, "unique_by_owner") == "native"
    return (native_kernels if native else partition).unique_by_owner(ids, world_size)


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
    """One fused Adam-family update of ``rows`` of ``weight`` and its two slots, in place, with the
    gradient ``grad / grad_divisor``, summed first over repeated rows with ``sum_repeated_rows``
    (the formulas: ``recis.ops.sparse_adam_update``)."""
    native = choose_backend(weight.device, "sparse_adam_update") == "native"
    kernel = native_kernels.sparse_adam_update if native else torch_sparse_adam_update
    kernel(
        weight, exp_avg, exp_avg_sq, rows, grad, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
        decay=decay, epsilon=epsilon, maximize=maximize, step=step, row_steps=row_steps, grad_divisor=grad_divisor,
        sum_repeated_rows=sum_repeated_rows,
    )  # fmt: skip


def sparse_adagrad_update_rows(
    weight: torch.Tensor,
    grad_sq_sum: torch.Tensor,
    rows: torch.Tensor,
    grad: RowsOrPieces,
    *,
    row_wise: bool,
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
    """One fused Adagrad update (element-wise, or ``row_wise``) of ``rows`` of ``weight`` and its
    accumulator slot, in place, with the gradient ``grad / grad_divisor``, summed first over
    repeated rows with ``sum_repeated_rows`` (the formulas: ``recis.ops.sparse_adagrad_update``)."""
    op = "sparse_row_wise_adagrad_update" if row_wise else "sparse_adagrad_update"
    native = choose_backend(weight.device, op) == "native"
    kernel = getattr(native_kernels if native else sparse_adagrad_update, op)
    kernel(
        weight, grad_sq_sum, rows, grad, lr=lr, lr_decay=lr_decay, initial_accumulator_value=initial_accumulator_value,
        eps=eps, weight_decay=weight_decay, maximize=maximize, step=step, grad_sq=grad_sq, grad_divisor=grad_divisor,
        sum_repeated_rows=sum_repeated_rows,
    )  # fmt: skip


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
    """AdamWTF's update of dense tensors of one device and dtype, with their moments and step
    counts, in place (the formula: ``recis.ops.adamw_tf_update``)."""
    device = params[0].device if params else torch.device("cpu")
    native = choose_backend(device, "adamw_tf_multi_tensor") == "native"
    kernel = native_kernels.adamw_tf_multi_tensor if native else adamw_tf_update.adamw_tf_multi_tensor
    kernel(
        params, grads, exp_avgs, exp_avg_sqs, state_steps,
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, maximize=maximize,
    )  # fmt: skip
