"""recis.checkpoint.load: restore a run from a checkpoint written at any world size.

Everything is checked before anything changes: the manifest, every file's size and
CRC-32, and that the checkpoint fits the model and optimizers (tables, dims, dtypes,
optimizer kinds). Every rank checks, and all raise if any rank found a problem.

Then rows are streamed from every rank's file in chunks: a sharded table or an owner
shard keeps the ids it owns under the new world size, a replicated or one-process
table keeps every id. Dense state and optimizer scalars come from rank 0's file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from recis.checkpoint.manifest import CheckpointError, rank_file, read_manifest, resolve, verify_files
from recis.checkpoint.row_file import dtype_name, read_field_chunks, row_bytes, rows_per_chunk
from recis.checkpoint.saved_tables import OWNER_SLOTS, ROWS, SavedTable, saved_tables, table_prefixes
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


def _stream_into(store: SavedTable, directory: Path, manifest: dict[str, Any], world_size: int, rank: int) -> None:
    """Write into ``store`` the rows of its table key that this rank keeps; rows first, then slots."""
    wanted_slots = {f"slot.{name}" for name in store.table.slot_names()}
    sets = [s for s in manifest["row_sets"] if s["key"] == store.key]
    most_rows = max([sum(s["count"] for s in sets if s["role"] == role) for role in (ROWS, OWNER_SLOTS)])
    store.table.reserve(most_rows if not store.partitioned else most_rows // world_size + most_rows // (8 * world_size))
    for row_set in sorted(sets, key=lambda s: (s["role"] != ROWS, s["rank"])):
        path = directory / rank_file(row_set["rank"], "bin")
        names = [name for name in row_set["fields"] if name in ("ids", "weight") or name in wanted_slots]
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
                {name.removeprefix("slot."): value[keep] for name, value in fields.items()},
            )


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


def load(path: str | os.PathLike, model: nn.Module, *optimizers: Any) -> dict[str, Any]:
    """Load the checkpoint at ``path`` (a checkpoint directory, or a root's ``latest``).

    Works at any world size: each rank keeps the ids it owns under the current one.
    Call it on every rank. Returns the ``extra`` dict given to ``save``.
    """
    world_size, rank = world()
    problem, states = None, []
    try:
        directory = resolve(path)
        manifest = read_manifest(directory)
        verify_files(directory, manifest)
        own = rank if rank < manifest["world_size"] and world_size == manifest["world_size"] else 0
        states = [torch.load(directory / rank_file(r, "pt"), weights_only=False) for r in sorted({0, own})]
        _check_fits(manifest, model, optimizers, world_size)
    except (CheckpointError, FileNotFoundError) as error:
        problem = error
    _agree(problem, world_size)
    rank0_state, own_state = states[0], states[-1]

    _load_dense(model, rank0_state["dense"])
    for optimizer, state in zip(optimizers, rank0_state["optimizers"]):
        _load_optimizer(optimizer, state)
    stores = saved_tables(model, optimizers, world_size)
    for store in stores:
        store.table.clear()
    for store in stores:
        _stream_into(store, directory, manifest, world_size, rank)
    for store in stores:
        pending = own_state["pending"].get(store.key)
        if pending is not None:
            store.table.restore_grad(*pending)
    return own_state["extra"]
