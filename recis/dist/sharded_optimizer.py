"""ShardedOptimizer: a recis sparse optimizer whose updates happen at each row's owner.

``step()`` on every rank, for all tables of the wrapped optimizer at once:

1. grad_dist: each table's local gradient, summed per id once at the source (by
   backward), goes to the owners of its ids; one swap of counts and ONE all-to-all of
   ids and gradient rows, packed across tables of any dims (two collective calls
   however many tables; none in a world of one);
2. apply: owners sum what several ranks sent for an id (the one deduplication at the
   owner, grouped by row), divide by the world size (the mean over workers, as DistributedDataParallel
   does for dense gradients) and the wrapped optimizer applies it, one fused update
   per table, on owned rows only;
3. row_dist: for replicated tables only, the updated rows go back to every rank (one
   gather of counts and one of rows, for all replicated tables).

Two kinds of table are handled:

- ``ShardedHashTable``: rows and slots live at their owner only.
- plain ``HashTable`` (drop-in mode): every rank holds a full replica of the rows, but
  the optimizer slots of a row live only at its owner, in an owner-side shard that
  the wrapped optimizer updates; slot memory is divided by the world size, and the
  replicas stay identical because updated rows are sent to every rank after each
  update. A replica an optimizer already trained hands each owner the trained rows it
  owns; the ranks must agree on which rows those are (checked at construction).
  A bounded replica (capacity, filter or admit hook) shares its training lookups
  (``recis.dist.lookup_union``): every replica admits and evicts the union of the ranks'
  ids alike, and an owner drops the slots of rows the replicas give up, so that a
  returning id starts fresh. Such replicas must hold the same rows when wrapped.

A table that received a gradient on any rank counts a step on every rank, so per-table
step counts agree everywhere and equal those of one process seeing the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from recis.dist.agreement import require_same_config
from recis.dist.exchange import all_gather_blocks, group_size_and_rank, route, traffic
from recis.dist.lookup_union import LookupUnion
from recis.dist.partition import owner_rank
from recis.dist.sharded_hashtable import ShardedHashTable
from recis.nn.modules.hashtable import HashTable
from recis.ops import coalesce_rows, mix64
from recis.ops.row_pieces import RowsOrPieces, joined
from recis.optim.sparse_optimizer import SparseOptimizer


@dataclass
class _Route:
    """One table's gradient path: taken from ``source`` on every rank, applied to ``target`` at owners.

    For a ShardedHashTable both are the table; for a replicated HashTable the source is
    the replica and the target is the owner-side shard holding the slots.
    """

    source: HashTable
    target: HashTable

    @property
    def replicated(self) -> bool:
        return self.source is not self.target


@dataclass
class _OwnedGradient:
    """What the owners received for one table: ids and gradient rows, an id repeated when
    several ranks sent it (``repeats``). The rows may be the pieces the ranks sent, read where
    they arrived (``recis.ops.row_pieces``): valid until the next exchange."""

    ids: torch.Tensor
    grad: RowsOrPieces
    repeats: bool


def _owner_shard_of(replica: HashTable) -> HashTable:
    return HashTable(
        replica.embedding_shape,
        dtype=replica.dtype,
        device=replica.device,
        initializer=replica.initializer(),
        name=replica.name,
        seed=replica.seed,
    )


def _drop_owned_rows(shard: HashTable, world_size: int, rank: int, ids: torch.Tensor) -> None:
    """The replica gave up the rows of ``ids``: their slots go too, so that a returning id starts fresh."""
    shard.remove(ids[owner_rank(ids, world_size) == rank])


def _rows_digest(table: HashTable) -> list[int]:
    """Numbers equal on two ranks whose bounded replicas hold the same ids, metadata and lifecycle state."""
    key = mix64(table.local_ids())
    digest = [len(table), int(key.sum())]
    digest += [int((key * table.column(name)).sum()) for name in table.column_names()]
    state = table.lifecycle.state()
    digest += state["clock_window_step"].tolist()
    if "sketch" in state:
        digest.append(int(state["sketch"].sum()))
    return digest


def _grad_dtype(table: HashTable) -> torch.dtype:
    """The dtype a table's gradient travels in, the same on every rank: float32, or float64 for float64 rows."""
    return torch.promote_types(table.dtype, torch.float32)


def _trained_rows(table: HashTable) -> torch.Tensor:
    """Which rows hold optimizer state (a nonzero slot); the others equal fresh rows' slots."""
    trained = torch.zeros(len(table), dtype=torch.bool, device=table.device)
    for name in table.slot_names():
        trained |= table.slot(name).ne(0).any(dim=1)
    return trained


class ShardedOptimizer(torch.optim.Optimizer):
    """Drop-in wrapper of a recis sparse optimizer for multi-rank training (see module docstring).

    A ``torch.optim.Optimizer`` whose ``param_groups`` and ``state`` are the wrapped
    optimizer's own, so LR schedulers and hooks work unchanged. Construction is
    collective: it checks that every rank wrapped the same optimizer class,
    hyperparameters and tables, and raises naming the first rank and field that differ.
    """

    def __init__(self, optimizer: SparseOptimizer, process_group: dist.ProcessGroup | None = None) -> None:
        if not isinstance(optimizer, SparseOptimizer):
            raise TypeError(f"ShardedOptimizer wraps a recis sparse optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.process_group = process_group
        self.world_size, self.rank = group_size_and_rank(process_group)
        self.last_step_bytes_sent = 0
        self._routes: list[_Route] = []
        self._adopting = True  # torch.optim.Optimizer.__init__ hands us the wrapped optimizer's groups
        require_same_config("ShardedOptimizer", self._config(), process_group)  # before changing anything
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self._adopting = False
        self.param_groups = optimizer.param_groups  # the same list and dicts: schedulers edit both
        self.state = optimizer.state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add tables (call it on every rank alike; unlike construction, it is not checked across ranks)."""
        if self._adopting:
            self.param_groups.append(param_group)
            self._route_group(param_group)
            return
        self.optimizer.add_param_group(param_group)
        self._route_group(self.optimizer.param_groups[-1])

    def _route_group(self, group: dict[str, Any]) -> None:
        """Route every table of ``group``; replicated tables are replaced by their owner shards.

        Everything that can fail (checks, the shards' allocations) happens before anything changes.
        """
        routes = []
        for index, table in enumerate(group["params"]):
            if not isinstance(table, ShardedHashTable):
                routes.append((index, _Route(table, self._owner_shard_for(table, group))))
            elif table.world_size == self.world_size:
                routes.append((index, _Route(table, table)))
            else:
                raise ValueError(f"{table.describe()} spans {table.world_size} ranks, the optimizer {self.world_size}")
        for index, route_ in routes:
            if route_.replicated:
                self._swap_in_shard(group, index, route_)
            self._routes.append(route_)

    def _owner_shard_for(self, replica: HashTable, group: dict[str, Any]) -> HashTable:
        """A new owner-side shard holding the optimizer's slots. Rows this rank owns whose
        slots the replica already trained move into it; untrained rows start there on demand."""
        shard = _owner_shard_of(replica)
        self.optimizer.prepare_table(shard, group)
        names = [name for name in replica.slot_names() if name in shard.slot_names()]
        if not names or len(replica) == 0:
            return shard
        ids = replica.local_ids()
        keep = _trained_rows(replica) & (owner_rank(ids, self.world_size) == self.rank)
        shard.write_rows(ids[keep], replica.weight[keep], {name: replica.slot(name)[keep] for name in names})
        return shard

    def _swap_in_shard(self, group: dict[str, Any], index: int, route_: _Route) -> None:
        group["params"][index] = route_.target
        if route_.source in self.optimizer.state:
            self.optimizer.state[route_.target] = self.optimizer.state.pop(route_.source)
        route_.source.drop_slots()  # slots live at owners only
        route_.source.share_lookups(LookupUnion(self.process_group))  # replicas decide alike (lookup_union.py)
        route_.source.register_row_removal_hook(partial(_drop_owned_rows, route_.target, self.world_size, self.rank))

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "optimizer": type(self.optimizer).__name__,
            "grad_accum_steps": self.optimizer.grad_accum_steps,
            "param_groups": len(self.optimizer.param_groups),
        }
        for g, group in enumerate(self.optimizer.param_groups):
            for key, value in group.items():
                if key != "params":
                    config[f"param_groups[{g}].{key}"] = repr(value)
        tables = [table for group in self.optimizer.param_groups for table in group["params"]]
        for t, table in enumerate(tables):
            kind = "sharded" if isinstance(table, ShardedHashTable) else "replicated"
            config[f"tables[{t}]"] = f"{kind} {table.name!r} shape={list(table.embedding_shape)} {table.dtype}"
            config[f"tables[{t}].seed"] = table.seed
            if kind == "replicated":  # what the replicas' slots learned must agree, or some would be lost
                trained_ids = table.local_ids()[_trained_rows(table)]
                config[f"tables[{t}].trained_rows"] = trained_ids.numel()
                config[f"tables[{t}].trained_ids_digest"] = int(mix64(trained_ids).sum())
                config.update({f"tables[{t}].{key}": value for key, value in table.lifecycle.config().items()})
            if kind == "replicated" and (table.column_names() or table.lifecycle.admit_hook is not None):
                # replicas whose lifecycle decides which ids hold rows must start alike
                config[f"tables[{t}].rows_digest"] = _rows_digest(table)
        return config

    def owner_shards(self) -> dict[int, HashTable]:
        """``{id(replicated table): the owner-side shard holding its slots on this rank}``."""
        return {id(route_.source): route_.target for route_ in self._routes if route_.replicated}

    # ------------------------------------------------------------------ torch.optim.Optimizer API
    @property
    def grad_accum_steps(self) -> int:
        return self.optimizer.grad_accum_steps

    def set_grad_accum_steps(self, steps: int) -> None:
        """Collective: every rank must ask for the same ``steps`` (checked before anything changes;
        ranks that differ all raise ``ConfigMismatchError`` naming the values)."""
        require_same_config("ShardedOptimizer.set_grad_accum_steps", {"steps": steps}, self.process_group)
        self.optimizer.set_grad_accum_steps(steps)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not self.optimizer.accumulating:
            for route_ in self._routes:
                route_.source.clear_grad()
        self.optimizer.zero_grad(set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """grad_dist, apply and row_dist (see the module docstring) every ``grad_accum_steps``-th call."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.optimizer.update_due:  # a micro-step: gradients stay local, nothing is sent
            # Nothing is applied now, and a check failing on one rank would strand the others
            # in their next collective: a bad group is caught at the update, on every rank.
            self.optimizer.micro_step(check=False)
            self.last_step_bytes_sent = 0
            return loss
        sent_before = traffic.bytes_sent
        owned = self.grad_dist(self._group_problem())  # a bad group on any rank: every rank raises
        self.optimizer.micro_step()  # the update is due: this checks again and ends the window
        self.apply(owned)
        self.row_dist(owned)
        self.last_step_bytes_sent = traffic.bytes_sent - sent_before
        return loss

    # ------------------------------------------------------------------ step, 1: grad_dist
    def _group_problem(self) -> Exception | None:
        """Why this rank's param groups cannot be applied (a bad lr, say), or None."""
        try:
            self.optimizer.check_param_groups()
        except (TypeError, ValueError) as problem:
            return problem
        return None

    def grad_dist(self, error: Exception | None = None) -> list[_OwnedGradient | None]:
        """Send every table's local gradient to the owners of its ids, all tables in one exchange.

        With ``error`` (this rank cannot take part) the other ranks are told, every rank
        raises, and nothing changes: the gradients stay where they are.

        Returns, per table, the ids this rank owns and their gradient rows as the ranks sent
        them (an id repeats when several ranks sent it; the rows in pieces, valid until the next
        exchange), or None when no rank had a gradient for the table (then its step count stays).
        Consumes the local gradients.
        """
        local = [route_.source.grad_by_id() for route_ in self._routes]
        ids = [self._no_ids(route_) if g is None else g[0] for route_, g in zip(self._routes, local)]
        flags = [int(g is not None) for g in local]
        known = [self._owner_counts(route_, g) for route_, g in zip(self._routes, local)]
        routing, sorted_ids = route(ids, self.process_group, error, flags=flags, owner_counts=known)
        grads = [
            routing.by_owner(t, self._no_grad(route_) if g is None else g[1].to(_grad_dtype(route_.source)))
            for t, (route_, g) in enumerate(zip(self._routes, local))
        ]
        received = routing.forward_pieces([*sorted_ids, *grads])
        for route_ in self._routes:
            route_.source.clear_grad()
        tables = len(self._routes)
        owned: list[_OwnedGradient | None] = []
        for t in range(tables):
            if any(flags_of_rank[t] for flags_of_rank in routing.received_flags):
                ids_of_table, grad_pieces = torch.cat(received[t]), received[tables + t]
                owned.append(_OwnedGradient(ids_of_table, grad_pieces, repeats=routing.sources(t) > 1))
            else:
                owned.append(None)
        return owned

    # ------------------------------------------------------------------ step, 2: apply
    def apply(self, owned: list[_OwnedGradient | None]) -> None:
        """At the owners: sum each id's gradient over the ranks that sent it, take the mean over
        workers, and run the wrapped optimizer's fused update of each table's owned rows."""
        for route_, gradient in zip(self._routes, owned):
            if gradient is None:
                continue
            grad_sq = self._squares_per_id(gradient) if self.optimizer.takes_grad_sq else None
            if route_.replicated:
                rows, grad = self._rows_of_replicated(route_, gradient)
            else:  # summed by row, not by id: rows are small integers, cheaper to group
                rows, has_row = route_.target.rows_to_update(gradient.ids)
                grad = gradient.grad
                if not bool(has_row.all()):  # ids the owner did not admit get no update
                    rows, grad = rows[has_row], joined(grad)[has_row]
                    grad_sq = None if grad_sq is None else grad_sq[has_row]
            workers = self.world_size if route_.source.grad_reduce_by == "worker" else 1  # RecIS's meaning
            self.optimizer.apply_gradient(  # repeated rows are summed inside the fused update
                route_.target, rows, grad, workers=workers, grad_sq=grad_sq, rows_repeat=gradient.repeats
            )

    @staticmethod
    def _squares_per_id(gradient: _OwnedGradient) -> torch.Tensor:
        """For an optimizer that takes them (the Adagrad Sum variants): the sum over the ranks
        that sent an id of their gradients' squares, aligned with ``gradient.ids`` once this
        sums the gradient per id (in place, as ``_rows_of_replicated`` does)."""
        grad = joined(gradient.grad)
        if not gradient.repeats:
            return grad * grad
        dim = grad.shape[1]
        gradient.ids, both = coalesce_rows(gradient.ids, torch.cat([grad, grad * grad], dim=1))
        gradient.grad, gradient.repeats = both[:, :dim].contiguous(), False
        return both[:, dim:].contiguous()

    @staticmethod
    def _rows_of_replicated(route_: _Route, gradient: _OwnedGradient) -> tuple[torch.Tensor, torch.Tensor]:
        """The owner shard's rows of the gradient's ids, valued as the replica's current rows.

        Sums the gradient per id in place first, so that row_dist sends each id once.
        """
        if gradient.repeats:
            gradient.ids, gradient.grad = coalesce_rows(gradient.ids, gradient.grad)
            gradient.repeats = False
        gradient.grad = joined(gradient.grad)
        current = route_.source.peek(gradient.ids)
        rows = route_.target.store.find_or_insert(gradient.ids, current)
        route_.target.store.scatter(rows, current)
        return rows, gradient.grad

    # ------------------------------------------------------------------ step, 3: row_dist
    def row_dist(self, owned: list[_OwnedGradient | None]) -> None:
        """Send the rows updated at their owners to every replica of the replicated tables."""
        replicated = [(route_, gradient) for route_, gradient in zip(self._routes, owned) if route_.replicated]
        if not replicated:
            return
        blocks = []
        for route_, gradient in replicated:
            ids = self._no_ids(route_) if gradient is None else gradient.ids
            blocks += [ids, route_.target.peek(ids)]
        gathered = all_gather_blocks(blocks, self.process_group)
        for r, (route_, _) in enumerate(replicated):
            route_.source.write_rows(gathered[2 * r], gathered[2 * r + 1], {})

    @staticmethod
    def _owner_counts(route_: _Route, local: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor | None:
        """Per-rank counts of the local gradient's ids when they are known without hashing: the
        gradient of one lookup of a sharded table, whose ids that lookup grouped by owner."""
        if local is None or not isinstance(route_.source, ShardedHashTable):
            return None
        return route_.source.owner_counts_of(local[0])

    @staticmethod
    def _no_ids(route_: _Route) -> torch.Tensor:
        return torch.empty(0, dtype=torch.int64, device=route_.source.device)

    @staticmethod
    def _no_grad(route_: _Route) -> torch.Tensor:
        source = route_.source
        return torch.empty((0, source.embedding_dim), dtype=_grad_dtype(source), device=source.device)

    # ------------------------------------------------------------------ state dict
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped optimizer's state, plus the owner shards (slots) of replicated tables."""
        shards = {t: route_.target.state_dict() for t, route_ in enumerate(self._routes) if route_.replicated}
        return {"optimizer": self.optimizer.state_dict(), "owner_shards": shards, "world_size": self.world_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        if state_dict.get("world_size") != self.world_size:
            raise ValueError(
                f"ShardedOptimizer state was saved with world_size={state_dict.get('world_size')}, "
                f"this run has {self.world_size}"
            )
        self.optimizer.load_state_dict(state_dict["optimizer"])
        for t, shard_state in state_dict["owner_shards"].items():
            self._routes[int(t)].target.load_state_dict(shard_state)
