"""ShardedOptimizer: a recis sparse optimizer whose updates happen at each row's owner.

``step()`` on every rank, for the tables of the wrapped optimizer:

1. coalesce the local gradient of each table (summed per id);
2. all-to-all (ids, gradient rows) to the owners, after one swap of sizes for all tables;
3. owners sum the contributions and divide by the world size (the mean over workers,
   as DistributedDataParallel does for dense gradients);
4. the wrapped optimizer runs its fused update once per table, on owned rows only;
5. for replicated tables, the updated rows go back to every rank.

Two kinds of table are handled:

- ``ShardedHashTable``: rows and slots live at their owner only.
- plain ``HashTable`` (drop-in mode): every rank holds a full replica of the rows, but
  the optimizer slots of a row live only at its owner, in an owner-side shard that
  the wrapped optimizer updates; slot memory is divided by the world size, and the
  replicas stay identical because updated rows are broadcast after each update. A
  replica an optimizer already trained hands each owner the trained rows it owns; the
  ranks must agree on which rows those are (checked at construction).

A table that received a gradient on any rank counts a step on every rank, so per-table
step counts agree everywhere and equal those of one process seeing the whole batch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from recis.dist.agreement import require_same_config
from recis.dist.exchange import all_gather_rows, all_to_all_rows, group_size_and_rank, swap_sizes, traffic
from recis.dist.partition import owner_rank
from recis.dist.sharded_hashtable import ShardedHashTable
from recis.nn.modules.hashtable import HashTable
from recis.ops import mix64
from recis.optim.sparse_optimizer import SparseOptimizer

_TORCH_HOOK_REGISTRIES = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


@dataclass
class _Route:
    """One table's gradient path: taken from ``source`` on every rank, applied to ``target`` at owners.

    For a ShardedHashTable both are the table; for a replicated HashTable the source is
    the replica and the target is the owner-side shard holding the slots.
    """

    source: HashTable
    target: HashTable
    owned_ids: torch.Tensor | None = None  # ids this rank updated in the current step

    @property
    def replicated(self) -> bool:
        return self.source is not self.target


def _owner_shard_of(replica: HashTable) -> HashTable:
    return HashTable(
        replica.embedding_shape,
        dtype=replica.dtype,
        device=replica.device,
        initializer=replica.initializer,
        name=replica.name,
        seed=replica.seed,
    )


def _trained_rows(table: HashTable) -> torch.Tensor:
    """Which rows hold optimizer state (a nonzero slot); the others equal fresh rows' slots."""
    trained = torch.zeros(len(table), dtype=torch.bool, device=table.device)
    for name in table.slot_names():
        trained |= table.slot(name).ne(0).any(dim=1)
    return trained


class ShardedOptimizer(torch.optim.Optimizer):
    """Drop-in wrapper of a recis sparse optimizer for multi-rank training (see module docstring).

    ``param_groups`` and ``state`` are the wrapped optimizer's own, so LR schedulers and
    hooks work unchanged. Construction is collective: it checks that every rank wrapped
    the same optimizer class, hyperparameters and tables, and raises naming the first
    rank and field that differ.
    """

    def __init__(self, optimizer: SparseOptimizer, process_group: dist.ProcessGroup | None = None) -> None:
        if not isinstance(optimizer, SparseOptimizer):
            raise TypeError(f"ShardedOptimizer wraps a recis sparse optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.process_group = process_group
        self.world_size, self.rank = group_size_and_rank(process_group)
        self.defaults = optimizer.defaults
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        for registry in _TORCH_HOOK_REGISTRIES:
            setattr(self, registry, OrderedDict())
        self._patch_step_function()
        self.last_step_bytes_sent = 0
        self._routes: list[_Route] = []
        require_same_config("ShardedOptimizer", self._config(), process_group)  # before changing anything
        for group in self.param_groups:
            self._route_group(group)

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
        for index, route in routes:
            if route.replicated:
                self._swap_in_shard(group, index, route)
            self._routes.append(route)

    def _owner_shard_for(self, replica: HashTable, group: dict[str, Any]) -> HashTable:
        """A new owner-side shard holding the optimizer's slots. Rows this rank owns whose
        slots the replica already trained move into it; untrained rows start there on demand."""
        shard = _owner_shard_of(replica)
        self.optimizer._ensure_slots(shard, group)
        names = [name for name in replica.slot_names() if name in shard.slot_names()]
        if not names or len(replica) == 0:
            return shard
        ids = replica.local_ids()
        keep = _trained_rows(replica) & (owner_rank(ids, self.world_size) == self.rank)
        shard._write_rows(ids[keep], replica.weight[keep], {name: replica.slot(name)[keep] for name in names})
        return shard

    def _swap_in_shard(self, group: dict[str, Any], index: int, route: _Route) -> None:
        group["params"][index] = route.target
        if route.source in self.optimizer.state:
            self.optimizer.state[route.target] = self.optimizer.state.pop(route.source)
        route.source.drop_slots()  # slots live at owners only

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "optimizer": type(self.optimizer).__name__,
            "grad_accum_steps": self.optimizer.grad_accum_steps,
            "param_groups": len(self.param_groups),
        }
        for g, group in enumerate(self.param_groups):
            for key, value in group.items():
                if key != "params":
                    config[f"param_groups[{g}].{key}"] = repr(value)
        tables = [table for group in self.param_groups for table in group["params"]]
        for t, table in enumerate(tables):
            kind = "sharded" if isinstance(table, ShardedHashTable) else "replicated"
            config[f"tables[{t}]"] = f"{kind} {table.name!r} shape={list(table.embedding_shape)} {table.dtype}"
            config[f"tables[{t}].seed"] = table.seed
            if kind == "replicated":  # what the replicas' slots learned must agree, or some would be lost
                trained_ids = table.local_ids()[_trained_rows(table)]
                config[f"tables[{t}].trained_rows"] = trained_ids.numel()
                config[f"tables[{t}].trained_ids_digest"] = int(mix64(trained_ids).sum())
        return config

    def owner_shards(self) -> dict[int, HashTable]:
        """``{id(replicated table): the owner-side shard holding its slots on this rank}``."""
        return {id(route.source): route.target for route in self._routes if route.replicated}

    # ------------------------------------------------------------------ torch.optim.Optimizer API
    @property
    def grad_accum_steps(self) -> int:
        return self.optimizer.grad_accum_steps

    def set_grad_accum_steps(self, steps: int) -> None:
        self.optimizer.set_grad_accum_steps(steps)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not self.optimizer.accumulating:
            for route in self._routes:
                route.source.clear_grad()
        self.optimizer.zero_grad(set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add tables (call it on every rank alike; unlike construction, it is not checked across ranks)."""
        self.optimizer.add_param_group(param_group)
        self._route_group(self.param_groups[-1])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.optimizer.check_param_groups()
        if not self.optimizer.update_due:
            self.optimizer.step()  # a micro-step: gradients stay local, nothing is sent
            self.last_step_bytes_sent = 0
            return loss
        sent_before = traffic.bytes_sent
        self._send_gradients_to_owners()
        self.optimizer.step()
        self._send_updated_rows_to_replicas()
        self.last_step_bytes_sent = traffic.bytes_sent - sent_before
        return loss

    # ------------------------------------------------------------------ step, steps 1-3
    def _send_gradients_to_owners(self) -> None:
        local = [self._take_local_gradient(route.source) for route in self._routes]
        outgoing = [self._sorted_by_owner(g, route.source) for g, route in zip(local, self._routes)]
        device = self._routes[0].source.device if self._routes else torch.device("cpu")
        sizes = torch.zeros((self.world_size, 2 * len(self._routes)), dtype=torch.int64, device=device)
        for t, ((_, _, per_rank), gradient) in enumerate(zip(outgoing, local)):
            sizes[:, 2 * t] = per_rank
            sizes[:, 2 * t + 1] = int(gradient is not None)
        received_sizes = swap_sizes(sizes, self.process_group)
        for t, (route, (ids, grads, per_rank)) in enumerate(zip(self._routes, outgoing)):
            send_sizes, recv_sizes = per_rank.tolist(), received_sizes[:, 2 * t].tolist()
            owned_ids = all_to_all_rows(ids, send_sizes, recv_sizes, self.process_group)
            owned_grads = all_to_all_rows(grads, send_sizes, recv_sizes, self.process_group)
            route.owned_ids = None
            if bool(received_sizes[:, 2 * t + 1].any()):
                self._accept_owned_gradient(route, owned_ids, owned_grads / self.world_size)

    def _take_local_gradient(self, source: HashTable) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This rank's gradient of a table as (distinct ids, float32 rows), consumed; None if none."""
        if isinstance(source, ShardedHashTable):
            return source.take_local_grad()
        pending = source.pending_grad()
        source.clear_grad()
        if pending is None:
            return None
        rows, grads = pending
        return source.ids_of_rows(rows), grads

    def _sorted_by_owner(
        self, gradient: tuple[torch.Tensor, torch.Tensor] | None, table: HashTable
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, grads) grouped by owner rank, and how many go to each rank."""
        if gradient is None:
            no_ids = torch.empty(0, dtype=torch.int64, device=table.device)
            no_rows = torch.empty(0, table.embedding_dim, device=table.device)
            return no_ids, no_rows, torch.zeros(self.world_size, dtype=torch.int64, device=table.device)
        ids, grads = gradient
        owners = owner_rank(ids, self.world_size)
        order = torch.argsort(owners, stable=True)
        return ids[order], grads[order], torch.bincount(owners, minlength=self.world_size)

    def _accept_owned_gradient(self, route: _Route, ids: torch.Tensor, grads: torch.Tensor) -> None:
        """Hand the owners' share of the gradient to the table the wrapped optimizer updates."""
        target = route.target
        unique_ids, inverse = torch.unique(ids, return_inverse=True)
        if route.replicated:  # the shard's rows start from the replica's current values
            current = route.source.peek(unique_ids)
            rows = target._find_or_insert(unique_ids, current)
            target.weight[rows] = current
        else:
            rows = target._find_or_insert(unique_ids)
        target._accept_row_grad(rows[inverse], grads)
        route.owned_ids = unique_ids

    # ------------------------------------------------------------------ step 5
    def _send_updated_rows_to_replicas(self) -> None:
        for route in self._routes:
            if not route.replicated:
                continue
            no_ids = torch.empty(0, dtype=torch.int64, device=route.source.device)
            owned = route.owned_ids if route.owned_ids is not None else no_ids
            values = route.target.peek(owned)
            all_ids = all_gather_rows(owned, self.process_group)
            all_values = all_gather_rows(values, self.process_group)
            route.source._assign_rows(all_ids, all_values)

    # ------------------------------------------------------------------ state dict
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped optimizer's state, plus the owner shards (slots) of replicated tables."""
        shards = {t: route.target.state_dict() for t, route in enumerate(self._routes) if route.replicated}
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
