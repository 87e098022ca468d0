"""SparseOptimizer: the shared front of the sparse optimizers (the Adam and Adagrad families).

The class validates hyperparameters, holds the per-table state and the gradient
accumulation phase, and drives ``step``; the math is one call per table to
``recis.ops.sparse_adam_update``. Adam's subclasses only choose the weight-decay rule,
the epsilon placement and the default weight decay. The Adagrad family
(``recis.optim.adagrad_family``) keeps all of this and replaces the formula's parts:
its defaults (``init_tables``), their checks (``checked_hyperparameters``), its slots
(``_slot_specs``) and its update (``update_rows``).

It is a ``torch.optim.Optimizer`` whose params are ``HashTable``s, so LR schedulers,
step hooks and ``param_groups`` work unchanged. Optimizer slots (``exp_avg``,
``exp_avg_sq``, and ``step`` with per-row bias correction) live in the tables, so they
grow with the rows and travel in ``model.state_dict()``; the optimizer's own
``state_dict`` holds the per-table step counts, the param groups and the
accumulation phase.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch

from recis.nn.modules.hashtable import HashTable
from recis.ops import EpsilonPlacement, WeightDecay, coalesce_rows, sparse_adam_update
from recis.ops.row_pieces import RowsOrPieces, joined
from recis.optim.hyperparameters import check_eps, check_lr, check_weight_decay, merge_betas, tables_argument

DEFAULT_BETA1 = 0.9
DEFAULT_BETA2 = 0.999
BIAS_CORRECTIONS = ("table", "row")
EXP_AVG, EXP_AVG_SQ, ROW_STEP = "exp_avg", "exp_avg_sq", "step"

TableParams = HashTable | dict[str, HashTable] | Iterable[HashTable] | Iterable[dict[str, Any]]


def _tables_of(params: Any) -> list[HashTable]:
    if isinstance(params, HashTable):
        return [params]
    if isinstance(params, dict):
        params = params.values()
    if isinstance(params, torch.Tensor):
        raise TypeError("a sparse optimizer takes HashTables; dense tensors go to torch.optim or recis.optim.AdamWTF")
    tables = list(params)
    for table in tables:
        if not isinstance(table, HashTable):
            raise TypeError(
                f"a sparse optimizer takes HashTables (see filter_out_sparse_param), got {type(table).__name__}"
            )
    return tables


def _trained(tables: list[HashTable]) -> list[HashTable]:
    """The tables an optimizer keeps: frozen ones (``requires_optimizer_state=False``) are left
    out, as RecIS's sparse optimizers leave them out."""
    return [table for table in tables if table.requires_optimizer_state]


def _as_param_groups(params: TableParams) -> list[Any]:
    """Turn ``params`` into what ``torch.optim.Optimizer.__init__`` expects, tables kept as they are."""
    if isinstance(params, (HashTable, dict)):
        return [{"params": _tables_of(params)}]
    items = list(params)
    if items and isinstance(items[0], dict) and "params" in items[0]:
        return items
    return [{"params": _tables_of(items)}]


class SparseOptimizer(torch.optim.Optimizer):
    """Base of the Adam-family optimizers over ``HashTable`` rows; subclasses give the formula.

    Args:
        params: tables to optimize: the dict of ``filter_out_sparse_param``, an iterable of
            ``HashTable``, or a list of param-group dicts (``{"params": ..., "lr": ...}``)
            whose entries override the defaults for their tables. Frozen tables
            (``requires_optimizer_state=False``) are left out, as in RecIS.
        param_dict: RecIS's name for ``params`` (keyword only; the same values); give one of the two.
        lr, beta1, beta2, eps: the Adam hyperparameters of the formula.
        weight_decay: its coefficient; None takes the class's ``default_weight_decay``.
        betas: ``(beta1, beta2)``, the torch spelling; not together with beta1/beta2.
        maximize: ascend instead of descend (g = -g).
        bias_correction: ``"table"``: t counts the steps in which the table received a
            gradient (torch.optim.SparseAdam's rule); ``"row"``: t counts the updates of
            each row, kept in the ``step`` slot, so a row first seen late gets a fully
            corrected first step (about lr, not a multiple of it).
        state_dtype: dtype of the ``exp_avg``/``exp_avg_sq`` slots; math is float32 or wider.
        skip_nonfinite: leave rows whose gradient has a NaN or Inf untouched and count
            them in ``state[table]["nonfinite_rows"]``. Off by default, as in torch.
    """

    weight_decay_rule: ClassVar[WeightDecay]
    epsilon_placement: ClassVar[EpsilonPlacement]
    default_weight_decay: ClassVar[float]
    # Whether ``apply_gradient`` takes the per-contribution squared gradients (``grad_sq``);
    # ShardedOptimizer computes them at the owners for an optimizer that does.
    takes_grad_sq: ClassVar[bool] = False

    def __init__(
        self,
        params: TableParams | None = None,
        lr: float = 1e-3,
        beta1: float = DEFAULT_BETA1,
        beta2: float = DEFAULT_BETA2,
        eps: float = 1e-8,
        weight_decay: float | None = None,
        *,
        param_dict: TableParams | None = None,
        betas: tuple[float, float] | None = None,
        maximize: bool = False,
        bias_correction: str = "table",
        state_dtype: torch.dtype = torch.float32,
        skip_nonfinite: bool = False,
    ) -> None:
        params = tables_argument(params, param_dict)
        if weight_decay is None:
            weight_decay = self.default_weight_decay
        spelled_separately = beta1 is not DEFAULT_BETA1 or beta2 is not DEFAULT_BETA2
        if betas is not None and spelled_separately:
            raise ValueError(f"give either betas={betas!r} or beta1={beta1}/beta2={beta2}, not both")
        defaults = dict(
            lr=lr,
            betas=betas if betas is not None else (beta1, beta2),
            eps=eps,
            weight_decay=weight_decay,
            maximize=maximize,
            bias_correction=bias_correction,
            state_dtype=state_dtype,
            skip_nonfinite=skip_nonfinite,
        )
        self.init_tables(params, defaults)

    def init_tables(self, params: TableParams, defaults: dict[str, Any]) -> None:
        """The construction every sparse optimizer shares, after its own ``defaults`` are built.

        Validates every param group and the slots its tables would need before any table
        gains one, then hands the groups to ``torch.optim.Optimizer``. A subclass whose
        hyperparameters are not Adam's (the Adagrad family) builds ``defaults`` itself and
        calls this instead of ``SparseOptimizer.__init__``.
        """
        self.defaults = defaults
        groups = _as_param_groups(params)
        validated = [self._validated_group(group) for group in groups]
        self._check_distinct_tables(validated)
        for group in validated:  # every table's slots before any table gains one
            self._check_slots(group)
        self._grad_accum_steps = 1
        self._accum_phase = 0  # micro-steps taken since the last update
        torch.optim.Optimizer.__init__(self, groups, defaults)

    # ------------------------------------------------------------------ groups
    def _validated_group(self, group: dict[str, Any]) -> dict[str, Any]:
        """A complete, checked copy of ``group``; raises before anything changes."""
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError(f"a param group must be a dict with a 'params' entry, got {group!r:.100}")
        merged = {**self.defaults, **group}
        merged["params"] = _trained(_tables_of(group["params"]))
        merged["lr"] = check_lr(merged["lr"])
        merged["eps"] = check_eps(merged["eps"])
        merged["weight_decay"] = check_weight_decay(merged["weight_decay"])
        return self.checked_hyperparameters(merged, group)

    def checked_hyperparameters(self, merged: dict[str, Any], group: dict[str, Any]) -> dict[str, Any]:
        """``merged`` (defaults overridden by ``group``; lr, eps and weight decay checked) with the
        formula's own hyperparameters checked: here Adam's betas, bias correction and state dtype."""
        merged["betas"] = merge_betas(
            {key: group[key] for key in ("betas", "beta1", "beta2") if key in group}, merged.get("betas")
        )
        merged.pop("beta1", None)
        merged.pop("beta2", None)
        if merged["bias_correction"] not in BIAS_CORRECTIONS:
            raise ValueError(f"bias_correction must be one of {BIAS_CORRECTIONS}, got {merged['bias_correction']!r}")
        state_dtype = merged["state_dtype"]
        if not isinstance(state_dtype, torch.dtype) or not state_dtype.is_floating_point:
            raise TypeError(f"state_dtype must be a floating torch.dtype, got {state_dtype!r}")
        return merged

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = self._validated_group(param_group)
        self._check_distinct_tables([*self.param_groups, group])
        self._check_slots(group)
        self.param_groups.append(group)
        for table in group["params"]:
            self.prepare_table(table, group)

    def add_params(self, params: TableParams) -> None:
        """RecIS's way to add tables: into the first param group, with its hyperparameters.

        Raises ``RuntimeError``, changing nothing, for a table the optimizer already has or
        one named like a table it has (RecIS keys tables by name). Under
        ``recis.dist.ShardedOptimizer`` use its ``add_param_group``.
        """
        tables = _trained(_tables_of(params))
        have = self._tables()
        names = {table.name for table in have if table.name is not None}
        for table in tables:
            if any(table is other for other in have) or table.name in names:
                raise RuntimeError(f"{type(self).__name__} already optimizes {table.describe()}")
        first = self.param_groups[0]
        grown = self._validated_group({**first, "params": [*first["params"], *tables]})
        self._check_distinct_tables([grown, *self.param_groups[1:]])
        self._check_slots(grown)
        first["params"].extend(tables)
        for table in tables:
            self.prepare_table(table, first)

    def reset_state_dict(self) -> None:
        """RecIS's name: every table's step count back to 0 (before loading a state dict, in tests)."""
        for table in self._tables():
            self._table_state(table)["step"] = 0

    @staticmethod
    def _check_distinct_tables(groups: list[dict[str, Any]]) -> None:
        seen: set[int] = set()
        for group in groups:
            for table in group["params"]:
                if id(table) in seen:
                    raise ValueError(f"{table.describe()} appears twice in the optimizer's param groups")
                seen.add(id(table))

    @staticmethod
    def _slot_specs(table: HashTable, group: dict[str, Any]) -> list[tuple[str, int, torch.dtype]]:
        specs = [
            (EXP_AVG, table.embedding_dim, group["state_dtype"]),
            (EXP_AVG_SQ, table.embedding_dim, group["state_dtype"]),
        ]
        if group["bias_correction"] == "row":
            specs.append((ROW_STEP, 1, torch.int64))
        return specs

    def _check_slots(self, group: dict[str, Any]) -> None:
        """Raise, changing nothing, if a table of ``group`` holds a slot incompatible with it."""
        for table in group["params"]:
            for spec in self._slot_specs(table, group):
                table.check_slot(*spec)

    def prepare_table(self, table: HashTable, group: dict[str, Any]) -> None:
        """Register the slots ``group``'s formula keeps on ``table`` (zero for every row)."""
        for spec in self._slot_specs(table, group):
            table.add_slot(*spec)

    # ------------------------------------------------------------------ accumulation
    @property
    def grad_accum_steps(self) -> int:
        return self._grad_accum_steps

    def set_grad_accum_steps(self, steps: int) -> None:
        """Update every ``steps``-th ``step()``, with the mean of the gradients since the last update."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"grad accumulation steps must be an int >= 1, got {steps!r}")
        if self._accum_phase != 0:
            raise RuntimeError(
                f"set_grad_accum_steps({steps}) called in the middle of an accumulation "
                f"({self._accum_phase} of {self._grad_accum_steps} micro-steps taken); call it after an update"
            )
        self._grad_accum_steps = steps

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the tables' pending gradients, unless an accumulation is under way."""
        if self.accumulating:
            return
        for group in self.param_groups:
            for table in group["params"]:
                table.clear_grad()

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Take each table's pending gradient and apply it (every ``grad_accum_steps``-th call)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.micro_step():
            for group in self.param_groups:
                for table in group["params"]:
                    pending = table.pending_grad()
                    if pending is not None:  # no gradient: the step count stays (torch.optim.SparseAdam's rule)
                        self.apply_gradient(table, *pending, group)
        return loss

    def micro_step(self, check: bool = True) -> bool:
        """Count one ``step()`` call of the accumulation window; True when it is the update.

        Checks the param groups first (unless ``check`` is False: the caller checks them
        where it matters), so an invalid edit raises before anything changes.
        """
        if check:
            self.check_param_groups()
        self._accum_phase += 1
        if self._accum_phase < self._grad_accum_steps:
            return False
        self._accum_phase = 0
        return True

    def check_param_groups(self) -> None:
        """Raise, changing nothing, if a param group was edited into an invalid state."""
        for group in self.param_groups:
            self._check_slots(self._validated_group(group))  # a scheduler or user may have edited it

    @property
    def update_due(self) -> bool:
        """Whether the next ``step()`` updates (rather than only accumulates)."""
        return self._accum_phase + 1 >= self._grad_accum_steps

    @property
    def accumulating(self) -> bool:
        """Whether micro-steps have been taken since the last update (``zero_grad`` then keeps gradients)."""
        return self._accum_phase != 0

    def group_of(self, table: HashTable) -> dict[str, Any]:
        """The param group holding ``table``."""
        for group in self.param_groups:
            if any(member is table for member in group["params"]):
                return group
        raise KeyError(f"{table.describe()} is not optimized by this optimizer")

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
        """One update of ``table``: the summed gradient ``grad`` of its distinct ``rows``.
        With ``rows_repeat``, rows may repeat (several ranks' gradients of one row; ``grad``
        perhaps in pieces, ``recis.ops.row_pieces``): a row's gradient rows are summed first,
        inside the fused update where it can (``update_rows``'s ``sum_repeated_rows``).

        The gradient is divided by ``grad_accum_steps * workers`` (the mean over the
        accumulation window and over the ``workers`` ranks that summed into it), rows with
        a non-finite gradient are skipped when ``skip_nonfinite``, the table's step count
        advances, and ``update_rows`` applies the formula of the subclass in one fused
        update of rows and slots. ``grad_sq`` (only for an optimizer whose ``takes_grad_sq``):
        the sum over contributions (ranks) of their squared gradients, divided by the square
        of that count.
        """
        group = self.group_of(table) if group is None else group
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"{type(self).__name__}.apply_gradient: workers must be an int >= 1, got {workers!r}")
        if grad_sq is not None and not self.takes_grad_sq:
            raise TypeError(f"{type(self).__name__} takes no grad_sq (only the Adagrad 'Sum' variants do)")
        if rows_repeat and (grad_sq is not None or group["skip_nonfinite"]):  # these need the sums per row
            rows, grad = coalesce_rows(rows, grad)
            rows_repeat = False
        grad = grad if rows_repeat else joined(grad)
        scale = self._grad_accum_steps * workers
        if scale > 1 and grad_sq is not None:
            grad_sq = grad_sq / scale**2
        state = self._table_state(table)
        if group["skip_nonfinite"]:
            finite = torch.isfinite(grad).all(dim=1)
            if grad_sq is not None:
                finite &= torch.isfinite(grad_sq).all(dim=1)
            state["nonfinite_rows"] += (~finite).sum()
            rows, grad = rows[finite], grad[finite]
            grad_sq = None if grad_sq is None else grad_sq[finite]
        state["step"] += 1
        self.update_rows(
            table, rows, grad, group, state["step"], grad_sq, grad_divisor=scale, sum_repeated_rows=rows_repeat
        )

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
        """The formula: one fused update of ``table``'s distinct ``rows`` with their final gradient
        ``grad / grad_divisor``, ``step`` being the table's step count including this update. With
        ``sum_repeated_rows`` the rows may repeat and a row's gradient rows are summed first (in input
        order, as ``coalesce_rows`` sums them). Here the Adam family's (``recis.ops.sparse_adam_update``,
        which divides and sums row by row as it updates); ``grad_sq`` is for the optimizers that take
        it, already divided."""
        beta1, beta2 = group["betas"]
        sparse_adam_update(
            table.weight,
            table.slot(EXP_AVG),
            table.slot(EXP_AVG_SQ),
            rows,
            grad,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            decay=self.weight_decay_rule,
            epsilon=self.epsilon_placement,
            maximize=group["maximize"],
            step=step,
            row_steps=table.slot(ROW_STEP) if group["bias_correction"] == "row" else None,
            grad_divisor=grad_divisor,
            sum_repeated_rows=sum_repeated_rows,
        )

    def _table_state(self, table: HashTable) -> dict[str, Any]:
        state = self.state[table]
        if not state:
            state.update(step=0, nonfinite_rows=torch.zeros((), dtype=torch.int64))
        return state

    # ------------------------------------------------------------------ state dict
    def _tables(self) -> list[HashTable]:
        return [table for group in self.param_groups for table in group["params"]]

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """Per-table step counts, param groups and accumulation phase; slots are in the tables.

        Tables are numbered in param-group order, as torch numbers parameters.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        index = {id(table): i for i, table in enumerate(self._tables())}
        groups = [
            {**{k: v for k, v in g.items() if k != "params"}, "params": [index[id(t)] for t in g["params"]]}
            for g in self.param_groups
        ]
        state = {
            index[id(table)]: {**copy.deepcopy(table_state), "table": table.name}
            for table, table_state in self.state.items()
            if table_state
        }
        state_dict = {
            "state": state,
            "param_groups": groups,
            "grad_accum_steps": self._grad_accum_steps,
            "accum_phase": self._accum_phase,
        }
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            state_dict = post_hook(self, state_dict) or state_dict
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Restore what ``state_dict`` saved; checks everything before changing anything."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = pre_hook(self, state_dict) or state_dict
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state dict has {len(saved_groups)} param groups, the optimizer {len(self.param_groups)}")
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"param group {i} has {len(group['params'])} tables, the state dict {len(saved['params'])}"
                )
            missing = [key for key in self.defaults if key not in saved]
            if missing:
                raise ValueError(
                    f"state dict param group {i} lacks {missing}, which a sparse optimizer's groups always hold "
                    "(is this another optimizer's state dict?)"
                )
        tables = self._tables()
        new_groups = [
            self._validated_group({**saved, "params": group["params"]})
            for saved, group in zip(saved_groups, self.param_groups)
        ]
        new_state = {}
        for index, table_state in state_dict["state"].items():
            table = _table_at(tables, index)
            new_state[table] = _checked_table_state(index, table, table_state)
        accum_steps, phase = state_dict.get("grad_accum_steps", 1), state_dict.get("accum_phase", 0)
        if not (isinstance(accum_steps, int) and accum_steps >= 1 and 0 <= phase < accum_steps):
            raise ValueError(f"state dict has grad_accum_steps={accum_steps!r}, accum_phase={phase!r}")
        for group in new_groups:
            self._check_slots(group)

        self.param_groups[:] = new_groups
        self.state.clear()
        self.state.update(new_state)
        self._grad_accum_steps, self._accum_phase = accum_steps, phase
        for group in self.param_groups:
            for table in group["params"]:
                self.prepare_table(table, group)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


_TABLE_STATE_KEYS = {"step", "nonfinite_rows"}


def _table_at(tables: list[HashTable], index: Any) -> HashTable:
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(tables):
        raise ValueError(f"state dict has an entry for table {index!r}; the optimizer has tables 0..{len(tables) - 1}")
    return tables[index]


def _checked_table_state(index: int, table: HashTable, table_state: Any) -> dict[str, Any]:
    """A copy of one table's saved state (its step count and non-finite row count), or a clear error."""
    if not isinstance(table_state, dict):
        raise ValueError(f"state dict entry {index} must be a dict, got {type(table_state).__name__}")
    saved_name = table_state.get("table")
    if saved_name is not None and table.name is not None and saved_name != table.name:
        raise ValueError(f"state dict entry {index} belongs to table {saved_name!r}, not {table.name!r}")
    keys = set(table_state) - {"table"}
    if keys != _TABLE_STATE_KEYS:
        raise ValueError(
            f"state dict entry {index} holds {sorted(keys)}; a sparse optimizer's table state holds "
            f"{sorted(_TABLE_STATE_KEYS)} (is this another optimizer's state dict?)"
        )
    step, nonfinite = table_state["step"], table_state["nonfinite_rows"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"state dict entry {index} has step={step!r}; it must be an int >= 0")
    if not isinstance(nonfinite, torch.Tensor) or nonfinite.dtype != torch.int64 or nonfinite.dim() != 0:
        raise ValueError(f"state dict entry {index} has nonfinite_rows={nonfinite!r}; it must be a 0-dim int64 tensor")
    if int(nonfinite) < 0:
        raise ValueError(f"state dict entry {index} has nonfinite_rows={int(nonfinite)}; it must be >= 0")
    return {"step": step, "nonfinite_rows": nonfinite.clone()}
