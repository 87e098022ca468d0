"""Each rank's small-state file ``rank<r>.pt``: read, and checked against the run before use.

``save`` writes one dict per rank with exactly these entries (``lifecycle`` since
checkpoints carried bounded tables' state; older ones lack it):

- ``dense``: rank 0's ``model.state_dict()`` without the tables (``{}`` on other ranks);
- ``optimizers``: one ``state_dict()`` per optimizer, in the order given to ``save``;
- ``pending``: ``{table key: (distinct ids, float gradient rows) or None}``, only when
  the run was mid-accumulation;
- ``lifecycle``: ``{table key: lifecycle state}`` (checked by ``lifecycle_states``);
- ``extra``: the ``extra`` dict given to ``save``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from recis.checkpoint.manifest import CheckpointError, rank_file
from recis.checkpoint.saved_tables import ROWS, dense_state_dict, table_prefixes
from recis.checkpoint.staged_rows import StagedRows

REQUIRED = {"dense": dict, "optimizers": list, "pending": dict, "extra": dict}
OPTIONAL = {"lifecycle": dict}


def read_small_state(directory: Path, saved_rank: int, optimizers: int) -> dict[str, Any]:
    """Saved rank ``saved_rank``'s small state, its entries of the right types, one state per optimizer."""
    path = directory / rank_file(saved_rank, "pt")
    try:
        state = torch.load(path, weights_only=False)
    except Exception as error:  # unpickling raises anything; the file's CRC-32 was checked before
        raise CheckpointError(f"{path}: unreadable ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a dict")
    unknown = sorted(set(state) - set(REQUIRED) - set(OPTIONAL), key=str)
    if unknown:
        raise CheckpointError(f"{path}: unknown entry {unknown[0]!r}")
    for name, kind in {**REQUIRED, **OPTIONAL}.items():
        if name not in state and name in REQUIRED:
            raise CheckpointError(f"{path}: entry {name!r} missing")
        if name in state and not isinstance(state[name], kind):
            raise CheckpointError(f"{path}: entry {name!r} is a {type(state[name]).__name__}, not a {kind.__name__}")
    if len(state["optimizers"]) != optimizers:
        raise CheckpointError(f"{path}: entry 'optimizers' holds {len(state['optimizers'])} states, not {optimizers}")
    return state


def dense_part(model: nn.Module, dense: dict[str, Any]) -> dict[str, Any]:
    """The entries of a saved ``dense`` state that are not under a table's module path. (Checkpoints
    written while tables were told apart by name held a named table's entries there too; its rows
    come from the row files, so those entries are left out.)"""
    prefixes = tuple(table_prefixes(model))
    if "" in prefixes:
        return {}
    return {key: value for key, value in dense.items() if not (isinstance(key, str) and key.startswith(prefixes))}


def check_dense(model: nn.Module, dense: dict[str, Any], where: Path) -> None:
    """Raise ``CheckpointError`` unless ``dense`` (a ``dense_part``) has exactly the model's dense
    entries, each a tensor of the entry's shape (dtypes may differ: loading casts, as
    ``load_state_dict`` does)."""
    live = {} if "" in table_prefixes(model) else dense_state_dict(model)
    missing, unexpected = sorted(set(live) - set(dense)), sorted(set(dense) - set(live), key=str)
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: dense state does not fit the model: missing {missing}, unexpected {unexpected}"
        )
    for key, value in dense.items():
        if not isinstance(value, torch.Tensor) or value.shape != live[key].shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise CheckpointError(f"{where}: dense entry {key!r} is {shape}, the model's {tuple(live[key].shape)}")


def _pending_problem(staged: StagedRows, pending: Any) -> str | None:
    table = staged.store.table
    if not (isinstance(pending, tuple | list) and len(pending) == 2):
        return "must be None or (ids, gradient rows)"
    ids, grad = pending
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64 or ids.dim() != 1:
        return "ids must be a 1-D int64 tensor"
    if torch.unique(ids).numel() != ids.numel():
        return "ids repeat"
    if not isinstance(grad, torch.Tensor) or not grad.is_floating_point():
        return "gradient rows must be a floating tensor"
    if tuple(grad.shape) != (ids.numel(), table.embedding_dim):
        return f"gradient rows have shape {tuple(grad.shape)}, expected ({ids.numel()}, {table.embedding_dim})"
    if not staged.store.partitioned and bool((staged.rows.find(ids.to(table.device)) < 0).any()):
        return "names ids the loaded table does not hold"  # kept by row: they must have one
    return None


def check_pending(pending: dict[str, Any], staged: list[StagedRows], mid_accumulation: bool, where: Path) -> None:
    """Raise ``CheckpointError`` unless each pending gradient fits its table's staged rows."""
    if pending and not mid_accumulation:
        raise CheckpointError(f"{where}: pending gradients in a checkpoint not taken mid-accumulation")
    by_key = {s.store.key: s for s in staged if s.store.role == ROWS}
    for key, value in pending.items():
        if key not in by_key:
            raise CheckpointError(f"{where}: pending gradient of {key!r}, not a table of the model")
        problem = None if value is None else _pending_problem(by_key[key], value)
        if problem:
            raise CheckpointError(f"{where}: pending gradient of table {key!r}: {problem}")
