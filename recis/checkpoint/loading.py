"""recis.checkpoint.load: restore a run from a checkpoint written at any world size.

Two phases, so that a load either happens entirely or changes nothing:

1. *Prepare*, changing nothing: read and verify the manifest (its own checksum and
   schema, ``manifest``), every file's size and CRC-32, that the checkpoint fits the
   model and optimizers (tables, dims, dtypes, optimizer kinds), every rank's small
   state (``small_state``: dense entries and shapes, pending gradients, lifecycle
   states); then build every table's new rows aside (``staged_rows``): a sharded table
   or an owner shard keeps the ids it owns under the new world size, a replicated or
   one-process table every id, each row with its slots and metadata columns
   (``meta.<name>``; columns the table does not keep are skipped, ones the checkpoint
   lacks start at zero). A bounded table whose share exceeds its capacity is refused
   here, instead of evicting while loading.
2. *Commit*: load the optimizers' states, check that every table keeps the staged
   slots, load the dense state, and make each table's staged rows, pending gradient and
   lifecycle state its own (``lifecycle_states`` says which; a table whose checkpoint
   has none, an older checkpoint, keeps its state but for the ended gradient window).
   Every change is recorded first (``live_state``); if any step fails, on any rank,
   every rank puts back what it changed, bitwise, and raises.

Under torch.distributed every rank takes part in both phases and all raise if any
rank found a problem (one all-reduce after each phase). What cannot be undone: nothing
that ``load`` changes, but an undo step can itself fail (out of memory); ``load`` then
raises ``CheckpointError`` saying the state may be inconsistent. Memory: a table's
staged rows and its new storage coexist while it is committed, and its former rows are
kept until the load has succeeded everywhere (loading into an empty table: about twice
the table and its id map).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from recis.checkpoint.lifecycle_states import State, checked, resharded_state
from recis.checkpoint.live_state import ObjectBefore, TableBefore, Undo, restore_changed
from recis.checkpoint.manifest import CheckpointError, rank_file, read_manifest, resolve, verify_files
from recis.checkpoint.row_file import dtype_name
from recis.checkpoint.saved_tables import (
    ROWS,
    SavedTable,
    dense_state_dict,
    saved_tables,
    table_prefixes,
    tables_by_path,
)
from recis.checkpoint.saving import optimizer_kind, optimizer_state, world
from recis.checkpoint.small_state import check_dense, check_pending, dense_part, read_small_state
from recis.checkpoint.staged_rows import StagedRows, stage
from recis.dist.sharded_optimizer import ShardedOptimizer


def _check_fits(manifest: dict[str, Any], model: nn.Module, optimizers: tuple, world_size: int) -> None:
    """Raise ``CheckpointError`` naming the table or optimizer and the field that does not fit."""
    saved_tables = manifest["tables"]
    tables = tables_by_path(model)
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


def _agree(problem: BaseException | None, world_size: int) -> None:
    """Raise on every rank if any rank found a problem (so no rank trains on alone)."""
    if world_size > 1:
        flag = torch.tensor([0 if problem is None else 1])
        dist.all_reduce(flag)
        if problem is None and int(flag):
            raise CheckpointError("another rank could not load this checkpoint (see its error); nothing changed")
    if problem is not None:
        raise problem


def _lifecycle_states(
    stores: list[SavedTable], manifest: dict, loaded: dict[int, dict], world_size: int, rank: int
) -> dict[str, State]:
    """The lifecycle state each table of this rank restores (``lifecycle_states``), checked;
    tables whose checkpoint has none are left out. ``loaded``: the small states by saved rank."""
    tables = {store.key: store.table for store in stores if store.role == ROWS}
    if world_size == manifest["world_size"]:
        own = loaded[rank].get("lifecycle", {})
        return {key: checked(table, key, own[key], f"rank {rank}") for key, table in tables.items() if key in own}
    saved = [loaded[r].get("lifecycle", {}) for r in range(manifest["world_size"])]
    states = {key: resharded_state(table, key, [s.get(key) for s in saved], rank) for key, table in tables.items()}
    return {key: state for key, state in states.items() if state is not None}


def _check_capacities(staged: list[StagedRows], world_size: int, rank: int) -> None:
    """Raise ``CheckpointError`` if a bounded table would keep more rows than its capacity."""
    for rows in staged:
        table = rows.store.table
        if rows.store.role == ROWS and table.capacity is not None and len(rows.rows) > table.capacity:
            raise CheckpointError(
                f"table {rows.store.key!r}: rank {rank} of {world_size} would keep {len(rows.rows)} rows, "
                f"over its capacity of {table.capacity}"
            )


@dataclass
class _Plan:
    """What ``load`` read, checked and built before changing anything."""

    manifest: dict[str, Any]
    small_state_file: Path  # rank 0's: dense state and optimizer states
    dense: dict[str, Any]  # rank 0's dense state, checked
    rank0_state: dict[str, Any]
    own_state: dict[str, Any]  # pending gradients and ``extra``
    staged: list[StagedRows]  # every saved table's new rows
    lifecycles: dict[str, State]  # by table key; tables whose checkpoint has none are left out


def _prepare(path: str | os.PathLike, model: nn.Module, optimizers: tuple, world_size: int, rank: int) -> _Plan:
    """Read, check and stage everything ``load`` needs; raises before anything changes."""
    directory = resolve(path)
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    _check_fits(manifest, model, optimizers, world_size)
    same_world = world_size == manifest["world_size"]
    own = rank if same_world else 0
    ranks = {0, own} if same_world else set(range(manifest["world_size"]))
    loaded = {r: read_small_state(directory, r, len(optimizers)) for r in sorted(ranks)}
    dense = dense_part(model, loaded[0]["dense"])
    check_dense(model, dense, directory / rank_file(0, "pt"))
    stores = saved_tables(model, optimizers, world_size)
    lifecycles = _lifecycle_states(stores, manifest, loaded, world_size, rank)
    staged = [stage(store, directory, manifest, world_size, rank) for store in stores]
    _check_capacities(staged, world_size, rank)
    check_pending(loaded[own]["pending"], staged, manifest["mid_accumulation"], directory / rank_file(own, "pt"))
    return _Plan(manifest, directory / rank_file(0, "pt"), dense, loaded[0], loaded[own], staged, lifecycles)


def _load_optimizer(optimizer: Any, state: dict[str, Any]) -> None:
    if isinstance(optimizer, ShardedOptimizer):
        optimizer.optimizer.load_state_dict(state)
    else:
        optimizer.load_state_dict(state)


def _record_former(optimizer: Any, undo: Undo) -> None:
    """Record how to put back what ``_load_optimizer`` replaces (``ObjectBefore``; an object
    without attributes of its own gets its former state dict loaded back)."""
    target = optimizer.optimizer if isinstance(optimizer, ShardedOptimizer) else optimizer
    if hasattr(target, "__dict__"):
        undo.record(ObjectBefore.of(target).restore)
    else:
        undo.record(partial(_load_optimizer, optimizer, copy.deepcopy(optimizer_state(optimizer))))


def _load_optimizers(plan: _Plan, optimizers: tuple, undo: Undo) -> None:
    """Load every optimizer's state, recording first how to put its former state back."""
    for i, (optimizer, state) in enumerate(zip(optimizers, plan.rank0_state["optimizers"])):
        _record_former(optimizer, undo)
        try:
            _load_optimizer(optimizer, state)
        except Exception as error:
            kind = optimizer_kind(optimizer)
            raise CheckpointError(
                f"{plan.small_state_file}: optimizer {i} ({kind}) refused its state: {error}"
            ) from error


def _load_dense(model: nn.Module, dense: dict[str, Any], undo: Undo) -> None:
    """Load the dense state (checked by ``check_dense``), recording first how to put it back."""
    if "" in table_prefixes(model):
        return
    former = {key: value.detach().clone() for key, value in dense_state_dict(model).items()}
    undo.record(partial(model.load_state_dict, former, strict=False))
    model.load_state_dict(dense, strict=False)


def _commit_table(rows: StagedRows, plan: _Plan, before: TableBefore) -> None:
    """Make the staged rows, the pending gradient and the lifecycle state the table's own."""
    store = rows.store
    before.replaced = True
    rows.commit()
    if store.role != ROWS:
        return  # an owner shard: its slots only
    if store.key in plan.lifecycles:  # before the gradient: it protects its rows in the loaded window
        store.table.lifecycle.load_state(plan.lifecycles[store.key])
    pending = plan.own_state["pending"].get(store.key)
    if pending is not None:
        store.table.restore_grad(*pending)


def _commit(plan: _Plan, model: nn.Module, optimizers: tuple, undo: Undo) -> None:
    """Change the live objects (module docstring, step 2), recording in ``undo`` how to put them back."""
    tables = [TableBefore.of(rows.store.table) for rows in plan.staged]
    undo.record(partial(restore_changed, tables))
    _load_optimizers(plan, optimizers, undo)
    for rows in plan.staged:
        rows.check_slots()
    _load_dense(model, plan.dense, undo)
    for i, (rows, before) in enumerate(zip(plan.staged, tables)):
        _commit_table(rows, plan, before)
        plan.staged[i] = None  # frees the staged rows


def load(path: str | os.PathLike, model: nn.Module, *optimizers: Any) -> dict[str, Any]:
    """Load the checkpoint at ``path`` (a checkpoint directory, or a root's ``latest``).

    Works at any world size: each rank keeps the ids it owns under the current one.
    Call it on every rank. Returns the ``extra`` dict given to ``save``. Raises on every
    rank if any rank fails: ``CheckpointError`` naming the file and field it refuses,
    ``FileNotFoundError`` where there is no checkpoint, or what a failing step raised (a
    ``MemoryError``, say); then every table, optimizer and dense parameter is as it was,
    bitwise (module docstring).
    """
    world_size, rank = world()
    problem, plan = None, None
    try:
        plan = _prepare(path, model, optimizers, world_size, rank)
    except Exception as error:
        problem = error
    _agree(problem, world_size)  # raises on every rank unless every rank has its plan

    undo = Undo()
    try:
        _commit(plan, model, optimizers, undo)
    except BaseException as error:
        problem = error
    try:
        _agree(problem, world_size)
    except BaseException:
        undo.run()
        raise
    return plan.own_state["extra"]
