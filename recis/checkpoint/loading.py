"""recis.checkpoint.load: restore a run from a checkpoint written at any world size.

Everything is checked before anything changes: the manifest, every file's size and
CRC-32, and that the checkpoint fits the model and optimizers (tables, dims, dtypes,
optimizer kinds). Every rank checks, and all raise if any rank found a problem.

Then rows are streamed from every rank's file in chunks: a sharded table or an owner
shard keeps the ids it owns under the new world size, a replicated or one-process
table keeps every id, each row with its slots and metadata columns (``meta.<name>``;
columns the table does not keep are skipped, and ones the checkpoint lacks start at
zero). Dense state and optimizer scalars come from rank 0's file. Last, every table's
lifecycle state (clock, window, filter step, counters, sketch) is restored as
``lifecycle_states`` says; a table whose checkpoint has none (an older checkpoint)
keeps the state it had, so loading rows never counts as inserting them.

A bounded table must hold the rows it keeps: a rank whose share exceeds its capacity
refuses the checkpoint (``CheckpointError``) instead of evicting while loading.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from recis.checkpoint.lifecycle_states import State, checked, resharded_state
from recis.checkpoint.manifest import CheckpointError, rank_file, read_manifest, resolve, verify_files
from recis.checkpoint.row_file import dtype_name, read_field_chunks, row_bytes, rows_per_chunk
from recis.checkpoint.saved_tables import (
    META_PREFIX,
    OWNER_SLOTS,
    ROWS,
    SLOT_PREFIX,
    SavedTable,
    saved_tables,
    table_prefixes,
)
from recis.checkpoint.saving import optimizer_kind, world
from recis.dist.partition import owner_rank
from recis.dist.sharded_optimizer import ShardedOptimizer
from recis.nn.modules.hashtable import filter_out_sparse_param


def _check_fits(manifest: dict[str, Any], model: nn.Module, optimizers: tuple, world_size: int) -> None:
    """Raise ``CheckpointError`` naming the table or optimizer and the field that does not fit."""
    saved_tables = manifest["tables"]
    tables = filter_out_sparse_param(model)
    if set(saved_tables) != set(tables):
        raise CheckpointError(f"tables differ: checkpoint has {sorted(saved_tables)}, the model {sorted(tables)}")
    for key, table in tables.items():
        saved = saved_tables[key]
        for field, value in (("embedding_shape", list(table.embedding_shape)), ("dtype", dtype_name(table.dtype))):
            if saved[field] != value:
                raise CheckpointError(f"table {key!r}: checkpoint has {field}={saved[field]}, the model {value}")
    kinds = [optimizer_kind(optimizer) for optimizer in optimizers]
    if manifest["optimizers"] != kinds:
        raise CheckpointError(f"optimizers differ: checkpoint has {manifest['optimizers']}, this run {kinds}")
    if world_size != manifest["world_size"] and manifest["mid_accumulation"]:
        raise CheckpointError(
            f"checkpoint was taken mid-accumulation on {manifest['world_size']} ranks (field 'mid_accumulation'): "
            f"its pending gradients belong to those ranks' data, so it resumes only on {manifest['world_size']} ranks"
        )


def _agree(problem: Exception | None, world_size: int) -> None:
    """Raise on every rank if any rank found a problem (so no rank trains on alone)."""
    if world_size > 1:
        flag = torch.tensor([0 if problem is None else 1])
        dist.all_reduce(flag)
        if problem is None and int(flag):
            raise CheckpointError("another rank could not load this checkpoint (see its error)")
    if problem is not None:
        raise problem


def _kept(store: SavedTable, ids: torch.Tensor, world_size: int, rank: int) -> torch.Tensor | slice:
    """Which of ``ids`` this rank keeps: its own under ``world_size`` if partitioned, else all."""
    if store.partitioned:
        return owner_rank(ids, world_size) == rank
    return slice(None)


def _under(fields: dict[str, torch.Tensor], prefix: str, keep: torch.Tensor | slice) -> dict[str, torch.Tensor]:
    """The kept rows of the fields named ``<prefix><name>``, keyed by name."""
    return {name.removeprefix(prefix): value[keep] for name, value in fields.items() if name.startswith(prefix)}


def _stream_into(store: SavedTable, directory: Path, manifest: dict[str, Any], world_size: int, rank: int) -> None:
    """Write into ``store`` the rows of its table key that this rank keeps, with the slots and
    metadata columns it keeps; rows first, then slots."""
    wanted_slots = {SLOT_PREFIX + name for name in store.table.slot_names()}
    wanted = {"ids", "weight", *wanted_slots, *(META_PREFIX + name for name in store.table.column_names())}
    sets = [s for s in manifest["row_sets"] if s["key"] == store.key]
    most_rows = max([sum(s["count"] for s in sets if s["role"] == role) for role in (ROWS, OWNER_SLOTS)])
    store.table.reserve(most_rows if not store.partitioned else most_rows // world_size + most_rows // (8 * world_size))
    for row_set in sorted(sets, key=lambda s: (s["role"] != ROWS, s["rank"])):
        path = directory / rank_file(row_set["rank"], "bin")
        names = [name for name in row_set["fields"] if name in wanted]
        if row_set["role"] == OWNER_SLOTS and store.role == ROWS and not wanted_slots:
            continue  # slots of a replica: this table keeps none
        described = [row_set["fields"][name] for name in names]
        chunk_rows = rows_per_chunk(max(row_bytes(field) for field in described))  # one chunking for all fields
        readers = [read_field_chunks(path, field, row_set["count"], chunk_rows) for field in described]
        for chunk in zip(*readers):
            fields = dict(zip(names, chunk))
            ids = fields.pop("ids").reshape(-1).to(store.table.device)
            keep = _kept(store, ids, world_size, rank)
            weight = fields.pop("weight", None)
            store.table.write_rows(
                ids[keep],
                None if weight is None else weight[keep],
                _under(fields, SLOT_PREFIX, keep),
                _under(fields, META_PREFIX, keep),
            )


def _rows_kept(store: SavedTable, directory: Path, manifest: dict[str, Any], world_size: int, rank: int) -> int:
    """How many rows of ``store``'s table this rank keeps (reads the saved ids of a partitioned
    table loaded on several ranks; the manifest's counts otherwise)."""
    sets = [s for s in manifest["row_sets"] if s["key"] == store.key and s["role"] == ROWS]
    if not store.partitioned or world_size == 1:
        return sum(s["count"] for s in sets)
    kept = 0
    for row_set in sets:
        path = directory / rank_file(row_set["rank"], "bin")
        for ids in read_field_chunks(path, row_set["fields"]["ids"], row_set["count"]):
            kept += int(_kept(store, ids.reshape(-1), world_size, rank).sum())
    return kept


def _check_capacities(stores: list[SavedTable], directory: Path, manifest: dict, world_size: int, rank: int) -> None:
    """Raise ``CheckpointError`` if a bounded table would keep more rows than its capacity."""
    for store in stores:
        if store.role == ROWS and store.table.capacity is not None:
            kept = _rows_kept(store, directory, manifest, world_size, rank)
            if kept > store.table.capacity:
                raise CheckpointError(
                    f"table {store.key!r}: rank {rank} of {world_size} would keep {kept} rows, "
                    f"over its capacity of {store.table.capacity}"
                )


def _small_state(directory: Path, saved_rank: int, loaded: dict[int, dict]) -> dict[str, Any]:
    """Saved rank ``saved_rank``'s small-state file, read once."""
    if saved_rank not in loaded:
        loaded[saved_rank] = torch.load(directory / rank_file(saved_rank, "pt"), weights_only=False)
    return loaded[saved_rank]


def _lifecycle_states(
    stores: list[SavedTable], directory: Path, manifest: dict, loaded: dict[int, dict], world_size: int, rank: int
) -> dict[str, State]:
    """The lifecycle state each table of this rank restores (``lifecycle_states``), checked;
    tables whose checkpoint has none are left out. ``loaded``: the small states read so far."""
    tables = {store.key: store.table for store in stores if store.role == ROWS}
    if world_size == manifest["world_size"]:
        own = _small_state(directory, rank, loaded).get("lifecycle", {})
        return {key: checked(table, key, own[key], f"rank {rank}") for key, table in tables.items() if key in own}
    saved = [_small_state(directory, r, loaded).get("lifecycle", {}) for r in range(manifest["world_size"])]
    states = {key: resharded_state(table, key, [s.get(key) for s in saved], rank) for key, table in tables.items()}
    return {key: state for key, state in states.items() if state is not None}


def _load_optimizer(optimizer: Any, state: dict[str, Any]) -> None:
    if isinstance(optimizer, ShardedOptimizer):
        optimizer.optimizer.load_state_dict(state)
    else:
        optimizer.load_state_dict(state)


def _load_dense(model: nn.Module, dense: dict[str, Any]) -> None:
    prefixes = table_prefixes(model)
    if "" in prefixes:
        return
    missing, unexpected = model.load_state_dict(dense, strict=False)
    missing = [key for key in missing if not any(key.startswith(p) for p in prefixes)]
    if missing or unexpected:
        raise CheckpointError(f"dense state does not fit the model: missing {missing}, unexpected {unexpected}")


@dataclass
class _Plan:
    """What ``load`` read and checked before changing anything."""

    directory: Path
    manifest: dict[str, Any]
    rank0_state: dict[str, Any]  # dense state and optimizer scalars
    own_state: dict[str, Any]  # pending gradients and ``extra``
    stores: list[SavedTable]
    lifecycles: dict[str, State]  # by table key; tables whose checkpoint has none are left out


def _prepare(path: str | os.PathLike, model: nn.Module, optimizers: tuple, world_size: int, rank: int) -> _Plan:
    """Read and check everything ``load`` needs; raises before anything changes."""
    directory = resolve(path)
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    own = rank if rank < manifest["world_size"] and world_size == manifest["world_size"] else 0
    loaded: dict[int, dict] = {}
    rank0_state, own_state = _small_state(directory, 0, loaded), _small_state(directory, own, loaded)
    _check_fits(manifest, model, optimizers, world_size)
    stores = saved_tables(model, optimizers, world_size)
    _check_capacities(stores, directory, manifest, world_size, rank)
    lifecycles = _lifecycle_states(stores, directory, manifest, loaded, world_size, rank)
    return _Plan(directory, manifest, rank0_state, own_state, stores, lifecycles)


def _restore_tables(plan: _Plan, world_size: int, rank: int) -> None:
    """Replace every saved table's rows, pending gradient and lifecycle state by the checkpoint's."""
    stores, lifecycles = plan.stores, plan.lifecycles
    for store in stores:
        store.table.clear()
    rows = [store for store in stores if store.role == ROWS]
    unchanged = {store.key: store.table.lifecycle.state() for store in rows if store.key not in lifecycles}
    for store in stores:
        _stream_into(store, plan.directory, plan.manifest, world_size, rank)
    for store in stores:
        pending = plan.own_state["pending"].get(store.key)
        if pending is not None:
            store.table.restore_grad(*pending)
    for store in rows:
        store.table.lifecycle.load_state(lifecycles.get(store.key, unchanged.get(store.key)))


def load(path: str | os.PathLike, model: nn.Module, *optimizers: Any) -> dict[str, Any]:
    """Load the checkpoint at ``path`` (a checkpoint directory, or a root's ``latest``).

    Works at any world size: each rank keeps the ids it owns under the current one.
    Call it on every rank. Returns the ``extra`` dict given to ``save``.
    """
    world_size, rank = world()
    problem, plan = None, None
    try:
        plan = _prepare(path, model, optimizers, world_size, rank)
    except (CheckpointError, FileNotFoundError) as error:
        problem = error
    _agree(problem, world_size)  # raises on every rank unless every rank has its plan

    _load_dense(model, plan.rank0_state["dense"])
    for optimizer, state in zip(optimizers, plan.rank0_state["optimizers"]):
        _load_optimizer(optimizer, state)
    _restore_tables(plan, world_size, rank)
    return plan.own_state["extra"]
