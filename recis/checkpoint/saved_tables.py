"""What a training run holds in tables, and who saves it.

A *saved table* is a HashTable whose rows a checkpoint streams to disk:

- every ``HashTable``/``ShardedHashTable`` of the model, under its module path (role
  ``rows``: ids, rows, any slots it holds and, for a bounded table, the per-row
  metadata columns its policies read);
- the owner shards that a ``ShardedOptimizer`` keeps for replicated tables (role
  ``owner_slots``: ids and slots of the rows a rank owns).

A sharded table and an owner shard are saved by every rank (each its own ids); a
replicated table is identical on every rank for every row that was ever updated, so
rank 0 alone saves it. Everything else (dense parameters, optimizer scalars) is small
and goes into one torch.save file per rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from recis.dist.sharded_hashtable import ShardedHashTable
from recis.dist.sharded_optimizer import ShardedOptimizer
from recis.nn.modules.hashtable import HashTable

ROWS, OWNER_SLOTS = "rows", "owner_slots"
SLOT_PREFIX, META_PREFIX = "slot.", "meta."


@dataclass
class SavedTable:
    key: str  # the table's module path in the model
    role: str  # ROWS or OWNER_SLOTS
    table: HashTable
    partitioned: bool  # each rank holds the ids it owns (else: every rank holds every id)

    def saved_by(self, rank: int) -> bool:
        return self.partitioned or rank == 0

    def field_tensors(self) -> dict[str, torch.Tensor]:
        """The 2-D arrays to save, all in row order: ``ids`` (as one column), ``weight`` for ROWS,
        ``slot.<name>`` for every slot and ``meta.<name>`` (int64, one column) for every metadata
        column (none for a table without capacity or filter, so it saves no ``meta.`` field)."""
        fields = {"ids": self.table.local_ids().reshape(-1, 1)}
        if self.role == ROWS:
            fields["weight"] = self.table.weight
        for name in self.table.slot_names():
            fields[SLOT_PREFIX + name] = self.table.slot(name)
        for name in self.table.column_names():
            fields[META_PREFIX + name] = self.table.column(name).reshape(-1, 1)
        return fields


def saved_tables(model: nn.Module, optimizers: tuple[Any, ...], world_size: int) -> list[SavedTable]:
    shards = {}
    for optimizer in optimizers:
        if isinstance(optimizer, ShardedOptimizer):
            shards.update(optimizer.owner_shards())
    stores = []
    for key, table in tables_by_path(model).items():
        sharded = isinstance(table, ShardedHashTable)
        stores.append(SavedTable(key, ROWS, table, partitioned=sharded))
        if id(table) in shards:
            stores.append(SavedTable(key, OWNER_SLOTS, shards[id(table)], partitioned=True))
    return stores


def tables_by_path(model: nn.Module) -> dict[str, HashTable]:
    """Each table of ``model`` once, keyed by its first module path: a checkpoint's table keys.

    Not ``filter_out_sparse_param``'s keys (table names, as RecIS's): paths stay what
    checkpoints written before that change hold, and a rename of a table keeps them.
    """
    return {path: module for path, module in model.named_modules() if isinstance(module, HashTable)}


def table_prefixes(model: nn.Module) -> list[str]:
    """The ``state_dict`` prefixes of the model's tables: their module paths (every path of a
    table reachable by several), not the table names ``filter_out_sparse_param`` keys them by."""
    modules = model.named_modules(remove_duplicate=False)
    return [f"{path}." if path else "" for path, module in modules if isinstance(module, HashTable)]


def dense_state_dict(model: nn.Module) -> dict[str, Any]:
    """``model.state_dict()`` without the tables' entries (those are streamed as saved tables).

    The tables' entries are views, so leaving them out copies nothing.
    """
    prefixes = tuple(table_prefixes(model))
    if "" in prefixes:
        return {}
    return {key: value for key, value in model.state_dict().items() if not key.startswith(prefixes)}
