"""SparseAdagradFamily: the shared front of SparseAdagrad, SparseRowWiseAdagrad and their "Sum" variants.

A ``SparseOptimizer`` (param groups, gradient accumulation, per-table step counts,
validated ``state_dict``, ``ShardedOptimizer`` and checkpoints all work alike) whose
formula is Adagrad's (``recis.ops.sparse_adagrad_update``): with g the gradient of a
touched row, theta the row, t the table's step count, init the initial accumulator value:

    g     += wd * theta                      (not in the Sum variants)
    S     += g^2         element-wise, or    mean_j g_j^2 per row (row-wise)
    theta -= lr / (1 + (t - 1) * lr_decay) * g / (sqrt(init + S) + eps)

The accumulator of a row is ``init + S``; the table's slot keeps S, the sum of squares
since the row was created (``grad_sq_sum``, width dim, or ``row_grad_sq_sum``, width 1),
so that a new row, whose slots start at zero, has the accumulator init. ``state_sum``
gives the accumulators. ``initial_accumulator_value`` is a hyperparameter of the param
group, like lr: changing it changes every row's accumulator (RecIS writes it into a
row's slot when the row is created).

The "Sum" variants take, instead of the mean over workers, the sum over workers of the
ranks' gradients, and grow S by the sum over workers of their squared gradients (each
rank's gradient summed over its occurrences and micro-batches, divided by the
accumulation count): ``S += sum_w g_w^2`` rather than ``(sum_w g_w)^2``. In one process
the two are the same and a Sum variant equals its plain twin without weight decay.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from recis.nn.modules.hashtable import HashTable
from recis.ops import coalesce_rows, sparse_adagrad_update_rows
from recis.ops.row_pieces import RowsOrPieces, joined
from recis.optim.hyperparameters import check_initial_accumulator_value, check_lr_decay, tables_argument
from recis.optim.sparse_optimizer import SparseOptimizer, TableParams
from recis.optim.step_update_info import StepUpdateInfo, check_interval

GRAD_SQ_SUM, ROW_GRAD_SQ_SUM = "grad_sq_sum", "row_grad_sq_sum"
# Hyperparameters RecIS's super_param_state_dict carries (with save_update_info_interval).
_SUPER_PARAMS = ("lr", "lr_decay", "initial_accumulator_value", "eps")


class SparseAdagradFamily(SparseOptimizer):
    """Adagrad over the touched rows of hash tables; subclasses choose row-wise and Sum.

    Args (RecIS's, in its positional order):
        params: the tables: the dict of ``filter_out_sparse_param``, an iterable of
            ``HashTable``, or param-group dicts overriding the defaults for their tables.
        lr, lr_decay, initial_accumulator_value, eps, weight_decay: the formula's (module
            docstring); every one must be >= 0, and weight_decay 0 for the Sum variants.
        save_update_info_interval: record every N-th update of a table (0: never); see
            ``get_step_update_info``.

    Keyword-only:
        param_dict: RecIS's name for ``params``; give one of the two.
        maximize: ascend instead of descend (g = -g).
        state_dtype: dtype of the accumulator slot; the math is float32 or wider.
        skip_nonfinite: leave rows whose gradient has a NaN or Inf untouched and count
            them in ``state[table]["nonfinite_rows"]``.
    """

    row_wise: ClassVar[bool] = False

    def __init__(
        self,
        params: TableParams | None = None,
        lr: float = 1e-3,
        lr_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        weight_decay: float = 0.0,
        save_update_info_interval: int = 0,
        *,
        param_dict: TableParams | None = None,
        maximize: bool = False,
        state_dtype: torch.dtype = torch.float32,
        skip_nonfinite: bool = False,
    ) -> None:
        params = tables_argument(params, param_dict)
        self._update_info = StepUpdateInfo(save_update_info_interval)
        defaults = dict(
            lr=lr,
            lr_decay=lr_decay,
            initial_accumulator_value=initial_accumulator_value,
            eps=eps,
            weight_decay=weight_decay,
            maximize=maximize,
            state_dtype=state_dtype,
            skip_nonfinite=skip_nonfinite,
        )
        self.init_tables(params, defaults)
        if not self._tables():
            raise ValueError(
                "optimizer got an empty parameter list (frozen tables, requires_optimizer_state=False, are left out)"
            )

    # ------------------------------------------------------------------ the formula's parts
    def checked_hyperparameters(self, merged: dict[str, Any], group: dict[str, Any]) -> dict[str, Any]:
        merged["lr_decay"] = check_lr_decay(merged["lr_decay"])
        merged["initial_accumulator_value"] = check_initial_accumulator_value(merged["initial_accumulator_value"])
        if self.takes_grad_sq and merged["weight_decay"] != 0:
            raise ValueError(f"{type(self).__name__} does not support weight_decay; got {merged['weight_decay']}")
        state_dtype = merged["state_dtype"]
        if not isinstance(state_dtype, torch.dtype) or not state_dtype.is_floating_point:
            raise TypeError(f"state_dtype must be a floating torch.dtype, got {state_dtype!r}")
        return merged

    @property
    def slot_name(self) -> str:
        return ROW_GRAD_SQ_SUM if self.row_wise else GRAD_SQ_SUM

    def _slot_specs(self, table: HashTable, group: dict[str, Any]) -> list[tuple[str, int, torch.dtype]]:
        return [(self.slot_name, 1 if self.row_wise else table.embedding_dim, group["state_dtype"])]

    def apply_gradient(
        self,
        table: HashTable,
        rows: torch.Tensor,
        grad: RowsOrPieces,
        group: dict[str, Any] | None = None,
        *,
        workers: int = 1,
        grad_sq: torch.Tensor | None = None,
        rows_repeat: bool = False,
    ) -> None:
        """``SparseOptimizer.apply_gradient``; a Sum variant sums over workers (``workers`` is
        ignored) and, given no ``grad_sq``, takes the gradient as one worker's (grad_sq = grad^2)."""
        if self.takes_grad_sq:
            workers = 1
        super().apply_gradient(table, rows, grad, group, workers=workers, grad_sq=grad_sq, rows_repeat=rows_repeat)

    def update_rows(
        self,
        table: HashTable,
        rows: torch.Tensor,
        grad: RowsOrPieces,
        group: dict[str, Any],
        step: int,
        grad_sq: torch.Tensor | None = None,
        grad_divisor: int = 1,
        sum_repeated_rows: bool = False,
    ) -> None:
        recorded = self._update_info.due(step) and rows.numel() > 0
        before = None
        if recorded:  # the record holds the distinct rows and their gradient: sum and divide first
            if sum_repeated_rows:
                rows, grad = coalesce_rows(rows, grad)
            grad = joined(grad)
            if grad_divisor != 1:
                grad = grad / grad_divisor
            grad_divisor, sum_repeated_rows = 1, False
            before = self._rows_and_state(table, rows, group)
        # A Sum variant given no grad_sq grows S by g^2, as the kernel does without one (no weight decay).
        sparse_adagrad_update_rows(
            table.weight,
            table.slot(self.slot_name),
            rows,
            grad,
            row_wise=self.row_wise,
            lr=group["lr"],
            lr_decay=group["lr_decay"],
            initial_accumulator_value=group["initial_accumulator_value"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            maximize=group["maximize"],
            step=step,
            grad_sq=grad_sq,
            grad_divisor=grad_divisor,
            sum_repeated_rows=sum_repeated_rows,
        )
        if before is not None:
            params_before, state_before = before
            self._update_info.record(
                self._table_key(table),
                step,
                {
                    "updated_indices": rows,
                    "updated_ids": table.ids_of_rows(rows),
                    "updated_state_sum": state_before,
                    "updated_params_before": params_before,
                    "updated_params_after": table.weight.index_select(0, rows),
                    "updated_grad": grad,
                },
            )

    def micro_step(self, check: bool = True) -> bool:
        update = super().micro_step(check)
        if update:
            self._update_info.start_update()
        return update

    # ------------------------------------------------------------------ accumulators
    def state_sum(self, table: HashTable) -> torch.Tensor:
        """The accumulator of every row of ``table`` (``initial_accumulator_value`` + the slot),
        ``(len(table), dim)``, or ``(len(table), 1)`` row-wise; a new tensor, float32 or wider."""
        group = self.group_of(table)
        slot = table.slot(self.slot_name)
        return slot.to(torch.promote_types(slot.dtype, torch.float32)) + group["initial_accumulator_value"]

    def _rows_and_state(
        self, table: HashTable, rows: torch.Tensor, group: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        slot = table.slot(self.slot_name).index_select(0, rows)
        state = slot.to(torch.promote_types(slot.dtype, torch.float32)) + group["initial_accumulator_value"]
        return table.weight.index_select(0, rows), state

    def _table_key(self, table: HashTable) -> str:
        if table.name is not None:
            return table.name
        return f"table_{next(i for i, t in enumerate(self._tables()) if t is table)}"

    # ------------------------------------------------------------------ RecIS's update info
    def get_step_update_info(self) -> dict[str, torch.Tensor]:
        """What the last update recorded (see ``recis.optim.step_update_info``), keyed
        ``"<table name>_<field>"``; empty when it recorded nothing."""
        return self._update_info.snapshot()

    def clear_step_update_info(self) -> None:
        self._update_info.clear()

    def set_save_update_info_interval(self, interval: int) -> None:
        """Record every ``interval``-th update of each table (its step count a multiple of it); 0: never."""
        self._update_info.interval = check_interval(interval)

    def save_update_info_interval(self) -> int:
        return self._update_info.interval

    # ------------------------------------------------------------------ RecIS's hyperparameter state
    def super_param_state_dict(self) -> dict[str, Any]:
        """RecIS's hyperparameter record: the first param group's lr (live, as a scheduler set
        it), lr_decay, initial_accumulator_value and eps, and the update-info interval."""
        group = self.param_groups[0]
        state = {key: group[key] for key in _SUPER_PARAMS}
        state["save_update_info_interval"] = self._update_info.interval
        return state

    def load_super_param_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Set what ``super_param_state_dict`` records, in every param group (RecIS's optimizers
        have one); keys it lacks keep their value. Checked before anything changes."""
        values = {key: state_dict[key] for key in _SUPER_PARAMS if key in state_dict}
        interval = check_interval(state_dict.get("save_update_info_interval", self._update_info.interval))
        checked = [self._validated_group({**group, **values}) for group in self.param_groups]
        for group, new in zip(self.param_groups, checked):
            group.update({key: new[key] for key in values})
        self._update_info.interval = interval
