"""The rows a rank will load into one saved table, read and merged aside before anything changes.

``stage(store, directory, manifest, world_size, rank)`` streams, in chunks, every row set
of the store's table key in the checkpoint (``rows`` sets first, then ``owner_slots``,
each by saved rank) into a fresh ``RowStore`` that belongs to nobody, keeping:

- the ids this rank owns under ``world_size`` for a partitioned store (a sharded table,
  an owner shard), every id otherwise;
- ``weight`` where a row set has it; an id only an ``owner_slots`` set holds starts at
  the table's initial value for it (``HashTable.initial_values``, a pure function of id);
- every slot field, except for a table that keeps no slots (a replica whose slots live
  at its owner shard);
- the ``meta.<name>`` fields of the metadata columns the table keeps (others are skipped).

A later set overwrites the fields it has of an id an earlier set holds, as loading into
the table did. Staging reads only the checkpoint and the table's configuration; the
live table is replaced only by ``StagedRows.commit``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recis.checkpoint.manifest import CheckpointError, rank_file
from recis.checkpoint.row_file import dtype_of, read_field_chunks, row_bytes, rows_per_chunk
from recis.checkpoint.saved_tables import META_PREFIX, OWNER_SLOTS, ROWS, SLOT_PREFIX, SavedTable
from recis.dist.partition import owner_rank
from recis.nn.modules.hashtable import HashTable
from recis.store import RowStore


@dataclass
class StagedRows:
    """A table's new rows (``rows``), and the slots the checkpoint gave them, by name."""

    store: SavedTable
    rows: RowStore | None  # None once committed

    def check_slots(self) -> None:
        """Raise ``CheckpointError`` unless the table keeps every staged slot, at its width. Called once
        the optimizers are loaded (loading one registers the slots its param groups need)."""
        table, kept = self.store.table, self.store.table.slot_names()
        for name in self.rows.slot_names():
            if name not in kept:
                raise CheckpointError(
                    f"table {self.store.key!r}: the checkpoint has field '{SLOT_PREFIX}{name}', a slot the table "
                    f"does not keep (it keeps {kept})"
                )
            saved, live = self.rows.slot(name).shape[1], table.slot(name).shape[1]
            if saved != live:
                raise CheckpointError(
                    f"table {self.store.key!r}: field '{SLOT_PREFIX}{name}' has width {saved}, the table's slot {live}"
                )

    def commit(self) -> None:
        """Make the staged rows the table's (``HashTable.load_rows``: its pending gradient is dropped
        and its window ended, as ``clear_grad`` does). The staged id map is let go first, so that
        it and the table's new one never coexist."""
        rows, table = self.rows, self.store.table
        ids, weight = rows.ids(), rows.weight
        slots = {name: rows.slot(name) for name in rows.slot_names()}
        columns = {name: rows.column(name) for name in rows.column_names()}
        self.rows = rows = None
        table.clear_grad()
        table.load_rows(ids, weight, slots, columns)


def _row_sets(store: SavedTable, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    sets = [s for s in manifest["row_sets"] if s["key"] == store.key]
    return sorted(sets, key=lambda s: (s["role"] != ROWS, s["rank"]))


def _keeps_slots(store: SavedTable) -> bool:
    """False for a replica, whose slots live at its owner shard (it has none of its own)."""
    return store.role == OWNER_SLOTS or bool(store.table.slot_names())


def _wanted(store: SavedTable, sets: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The fields to stage, by name, with their description (dtype, width) in the checkpoint."""
    table, keeps_slots = store.table, _keeps_slots(store)
    wanted = {}
    for row_set in sets:
        for name, field in row_set["fields"].items():
            if name.startswith(SLOT_PREFIX) and not keeps_slots:
                continue
            if name.startswith(META_PREFIX) and name.removeprefix(META_PREFIX) not in table.column_names():
                continue
            wanted[name] = field
    return wanted


def _empty_rows(table: HashTable, wanted: dict[str, dict[str, Any]]) -> RowStore:
    rows = RowStore(table.embedding_dim, table.dtype, table.device)
    for name, field in wanted.items():
        if name.startswith(SLOT_PREFIX):
            rows.add_slot(name.removeprefix(SLOT_PREFIX), field["width"], dtype_of(field["dtype"]))
        elif name.startswith(META_PREFIX):
            rows.add_column(name.removeprefix(META_PREFIX))
    return rows


def _repeats(ids: torch.Tensor) -> bool:
    """Whether an id occurs twice in ``ids`` (sorted by numpy on CPU: torch's CPU sort is far slower)."""
    if ids.device.type == "cpu":
        ordered = torch.from_numpy(np.sort(ids.numpy()))
    else:
        ordered = torch.sort(ids).values
    return bool((ordered[1:] == ordered[:-1]).any())


def _merge(rows: RowStore, table: HashTable, ids: torch.Tensor, fields: dict[str, torch.Tensor], where: str) -> None:
    """Insert or overwrite distinct ``ids`` in ``rows`` with ``fields`` (weight, slot.*, meta.*)."""
    weight = fields.get("weight")
    found = rows.find(ids)
    absent = found < 0
    fresh = bool(absent.all())  # the usual case, taken without masks: every id new, its weight written once
    new_ids = ids if fresh else ids[absent]
    if new_ids.numel():
        if _repeats(new_ids):
            raise CheckpointError(f"{where}: field 'ids' repeats an id")
        if weight is None:
            values = table.initial_values(new_ids)
        else:
            values = weight if fresh else weight[absent]
        inserted = rows.insert(new_ids, values)
        found = inserted if fresh else found.masked_scatter_(absent, inserted)
    slots = {name.removeprefix(SLOT_PREFIX): v for name, v in fields.items() if name.startswith(SLOT_PREFIX)}
    rows.scatter(found, None if fresh else weight, slots)
    for name, values in fields.items():
        if name.startswith(META_PREFIX):
            rows.column(name.removeprefix(META_PREFIX))[found] = values.reshape(-1)


def _stage_set(rows: RowStore, store: SavedTable, path: Path, row_set: dict, wanted: dict, keep: Any) -> None:
    """Merge the rows of one row set that ``keep(ids)`` selects."""
    names = [name for name in row_set["fields"] if name == "ids" or name in wanted]
    described = [row_set["fields"][name] for name in names]
    chunk_rows = rows_per_chunk(max(row_bytes(field) for field in described))  # one chunking for all fields
    readers = [read_field_chunks(path, field, row_set["count"], chunk_rows) for field in described]
    where = f"{path} ({row_set['role']} of table {store.key!r})"
    device = store.table.device
    for chunk in zip(*readers):
        fields = {name: values.to(device) for name, values in zip(names, chunk)}
        ids = fields.pop("ids").reshape(-1)
        kept = keep(ids)
        _merge(rows, store.table, ids[kept], {name: values[kept] for name, values in fields.items()}, where)


def stage(store: SavedTable, directory: Path, manifest: dict[str, Any], world_size: int, rank: int) -> StagedRows:
    """Read the rows ``store``'s table gets on this rank (module docstring) into a new ``RowStore``."""
    sets = _row_sets(store, manifest)
    wanted = _wanted(store, sets)
    rows = _empty_rows(store.table, wanted)
    most = max(sum(s["count"] for s in sets if s["role"] == role) for role in (ROWS, OWNER_SLOTS))
    rows.reserve(most if not store.partitioned or world_size == 1 else most // world_size + most // (8 * world_size))

    def keep(ids: torch.Tensor) -> torch.Tensor | slice:
        return owner_rank(ids, world_size) == rank if store.partitioned else slice(None)

    for row_set in sets:
        if row_set["role"] == OWNER_SLOTS and not _keeps_slots(store):
            continue  # slots of a replica, which keeps none
        _stage_set(rows, store, directory / rank_file(row_set["rank"], "bin"), row_set, wanted, keep)
    return StagedRows(store, rows)
