"""recis.checkpoint.save: everything a training run holds, atomically, from any number of ranks.

Protocol (rank 0 decides the name; every rank writes its own files):

1. every rank writes ``rank<r>.bin`` (its saved tables, streamed) and ``rank<r>.pt``
   (dense state, optimizer scalars, pending gradients, every table's lifecycle state,
   ``extra``) into ``.tmp-<name>/``;
2. rank 0 gathers every rank's file descriptions, writes ``manifest.json`` (sealed with
   its own SHA-256, see ``manifest``) last,
   renames the directory to ``<name>/`` and only then points ``latest`` at it;
3. with ``keep=N``, older complete checkpoints are removed after that.

A rank killed at any point leaves no manifest in place, so the previous checkpoint
stays the latest and loadable.
"""

from __future__ import annotations

import io
import os
import shutil
import time
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from recis.checkpoint.lifecycle_states import saved_state
from recis.checkpoint.manifest import (
    FORMAT,
    LATEST,
    MANIFEST,
    PREFIX,
    complete_checkpoints,
    manifest_text,
    rank_file,
    sync_directory,
    write_atomically,
)
from recis.checkpoint.row_file import RowFileWriter, dtype_name
from recis.checkpoint.saved_tables import ROWS, SavedTable, dense_state_dict, saved_tables, tables_by_path
from recis.dist.sharded_optimizer import ShardedOptimizer
from recis.optim.sparse_optimizer import SparseOptimizer


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def optimizer_state(optimizer: Any) -> dict[str, Any]:
    """An optimizer's state without row data (a ShardedOptimizer's owner shards are saved tables)."""
    if isinstance(optimizer, ShardedOptimizer):
        return optimizer.optimizer.state_dict()
    return optimizer.state_dict()


def mid_accumulation(optimizers: tuple[Any, ...]) -> bool:
    """Whether a sparse optimizer has taken micro-steps since its last update."""
    inner = [o.optimizer if isinstance(o, ShardedOptimizer) else o for o in optimizers]
    return any(isinstance(o, SparseOptimizer) and o.accumulating for o in inner)


def optimizer_kind(optimizer: Any) -> str:
    """The class whose state is saved: a ShardedOptimizer's is its wrapped optimizer's, so the
    checkpoint of a sharded run loads into a one-process run of the same optimizer, and back."""
    if isinstance(optimizer, ShardedOptimizer):
        return type(optimizer.optimizer).__name__
    return type(optimizer).__name__


def _checkpoint_name(root: Path, extra: dict[str, Any]) -> tuple[int, str]:
    sequence = max((seq for seq, _ in complete_checkpoints(root)), default=0) + 1
    step = extra.get("step")
    names_step = isinstance(step, int) and not isinstance(step, bool)  # True is an int to Python
    return sequence, f"{PREFIX}{sequence:06d}" + (f"-step{step}" if names_step else "")


def _broadcast(value: Any, world_size: int) -> Any:
    if world_size == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _write_rank_files(directory: Path, rank: int, stores: list[SavedTable], small_state: dict[str, Any]) -> tuple:
    writer = RowFileWriter(directory / rank_file(rank, "bin"))
    row_sets = []
    for store in stores:
        if not store.saved_by(rank):
            continue
        fields = {name: writer.write_field(array) for name, array in store.field_tensors().items()}
        row_sets.append(
            {"key": store.key, "role": store.role, "rank": rank, "count": len(store.table), "fields": fields}
        )
    files = {rank_file(rank, "bin"): writer.close()}
    buffer = io.BytesIO()
    torch.save(small_state, buffer)
    payload = buffer.getvalue()
    with open(directory / rank_file(rank, "pt"), "wb") as file:
        file.write(payload)
        file.flush()
        os.fsync(file.fileno())
    files[rank_file(rank, "pt")] = {"bytes": len(payload), "crc32": zlib.crc32(payload)}
    return row_sets, files


def _table_descriptions(model: nn.Module) -> dict[str, dict[str, Any]]:
    return {
        key: {
            "class": type(table).__name__,
            "embedding_shape": list(table.embedding_shape),
            "dtype": dtype_name(table.dtype),
        }
        for key, table in tables_by_path(model).items()
    }


def _commit(root: Path, staging: Path, name: str, manifest: dict[str, Any], keep: int | None) -> Path:
    write_atomically(staging / MANIFEST, manifest_text(manifest))
    final = root / name
    os.rename(staging, final)
    sync_directory(root)
    write_atomically(root / LATEST, name)
    if keep is not None:
        for _, old in complete_checkpoints(root)[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(f".tmp-{PREFIX}*"):  # left by saves that were killed
        shutil.rmtree(stale, ignore_errors=True)
    return final


def save(
    path: str | os.PathLike,
    model: nn.Module,
    *optimizers: Any,
    extra: dict[str, Any] | None = None,
    keep: int | None = None,
) -> Path:
    """Save ``model`` (dense state; every table's ids, rows, slots, metadata columns and each
    rank's lifecycle state, see ``lifecycle_states``) and ``optimizers``.

    ``optimizers`` are recis or torch optimizers, ``ShardedOptimizer``s, or anything else
    with ``state_dict``/``load_state_dict`` (LR schedulers, a data loader's position).

    Call it on every rank (it is collective when torch.distributed is initialized).
    ``extra`` (e.g. ``{"step": n, "data_position": ...}``) comes back from ``load``; an
    int ``extra["step"]`` also names the checkpoint. ``keep=N`` removes all but the N
    newest complete checkpoints once the new one is complete. Returns its directory.
    """
    if keep is not None and (not isinstance(keep, int) or keep < 1):
        raise ValueError(f"keep must be an int >= 1, got {keep!r}")
    extra = dict(extra or {})
    world_size, rank = world()
    root = Path(path)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        sequence, name = _checkpoint_name(root, extra)
        shutil.rmtree(root / f".tmp-{name}", ignore_errors=True)  # left by a save of the same name that was killed
    sequence, name = _broadcast((sequence, name) if rank == 0 else None, world_size)
    staging = root / f".tmp-{name}"
    staging.mkdir(parents=True, exist_ok=True)
    stores = saved_tables(model, optimizers, world_size)
    accumulating = mid_accumulation(optimizers)  # only then are pending gradients part of the state
    small_state = {
        "dense": dense_state_dict(model) if rank == 0 else {},
        "optimizers": [optimizer_state(optimizer) for optimizer in optimizers],
        "pending": {s.key: s.table.grad_by_id() for s in stores if accumulating and s.role == ROWS},
        "lifecycle": {s.key: saved_state(s.table) for s in stores if s.role == ROWS},  # this rank's, every table
        "extra": extra,
    }
    written = _write_rank_files(staging, rank, stores, small_state)
    gathered = [written]
    if world_size > 1:
        gathered = [None] * world_size if rank == 0 else None
        dist.gather_object(written, gathered, dst=0)
    final = root / name
    if rank == 0:
        manifest = {
            "format": FORMAT,
            "sequence": sequence,
            "name": name,
            "created": time.time(),
            "world_size": world_size,
            "mid_accumulation": accumulating,
            "tables": _table_descriptions(model),
            "optimizers": [optimizer_kind(optimizer) for optimizer in optimizers],
            "row_sets": [row_set for row_sets, _ in gathered for row_set in row_sets],
            "files": {file: info for _, files in gathered for file, info in files.items()},
        }
        final = _commit(root, staging, name, manifest, keep)
    if world_size > 1:
        dist.barrier()
    return final
