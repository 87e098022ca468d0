"""RowStore: the storage of one table, and the only code that touches it.

A row store maps int64 ids to dense rows ``0 .. len(store) - 1`` and holds, for every
row, its value (``weight``, ``dim`` elements of ``dtype``), the optimizer slots
registered on it (one 2-D tensor per slot name, same rows) and its metadata columns
(one int64 per row and column name: when it was last seen, how often; the bounded-table
policies keep them). Rows, slots and columns live in buffers with spare capacity that
double when full, on transparent huge pages where Linux allows (``recis.ops.huge_pages``).

New ids are appended in insertion order. ``replace`` gives the rows of evicted ids to
new ids in place, in O(rows replaced); ``remove`` moves the last rows into the holes
it leaves, in O(rows removed). A row's storage is always reused, so memory stays flat
under eviction. Row numbers are stable until rows are renumbered (``load``, ``remove``,
``clear``, a move to another device); ``generation`` counts those renumberings, and
``replacements`` counts ``replace`` calls, so a holder of row numbers (a lookup waiting
for its backward) can tell that they may have gone stale.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from recis.ops import IdMap, gather_rows
from recis.ops.huge_pages import empty_rows, zero_rows

# The first values of new rows: a function of the new ids, or values for all the ids asked for.
NewRows = Callable[[torch.Tensor], torch.Tensor] | torch.Tensor


class RowStore:
    """Ids, rows and optimizer slots of one table on one device.

    Args:
        dim: elements per row.
        dtype: dtype of the rows (slots keep their own dtype).
        device: where ids, rows and slots live.
    """

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device, *, generation: int = 0) -> None:
        self._dim = dim
        self._dtype = dtype
        self._device = device
        self._id_map = IdMap(device)
        self._weight = torch.empty((0, dim), dtype=dtype, device=device)
        self._slots: dict[str, torch.Tensor] = {}
        self._columns: dict[str, torch.Tensor] = {}
        self._generation = generation
        self._replacements = 0
        self._row_limit: int | None = None

    # ------------------------------------------------------------------ shape
    def __len__(self) -> int:
        return len(self._id_map)

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def capacity(self) -> int:
        """Rows that fit before the buffers grow."""
        return self._weight.shape[0]

    @property
    def generation(self) -> int:
        """Bumped whenever rows are renumbered; row numbers of an older generation are stale."""
        return self._generation

    @property
    def replacements(self) -> int:
        """How many ``replace`` calls gave rows to new ids."""
        return self._replacements

    @property
    def weight(self) -> torch.Tensor:
        """All rows, ``(len(self), dim)``, in row order; a view."""
        return self._weight[: len(self)]

    # ------------------------------------------------------------------ ids and rows
    def find(self, ids: torch.Tensor) -> torch.Tensor:
        """Row of each 1-D int64 id, -1 where absent."""
        return self._id_map.find(ids)

    def find_or_insert(self, unique_ids: torch.Tensor, new_rows: NewRows) -> torch.Tensor:
        """Rows of distinct ids; absent ids get new rows and zero slots.

        A new row's value is ``new_rows(absent ids)`` when ``new_rows`` is a function (run
        before anything changes, so a failing initializer changes nothing), or its entry
        in ``new_rows`` when that is a tensor of values for all of ``unique_ids``.
        """
        rows = self._id_map.find(unique_ids)
        absent = rows < 0
        if not bool(absent.any()):
            return rows
        new_ids = unique_ids[absent]
        rows[absent] = self.insert(new_ids, new_rows[absent] if isinstance(new_rows, torch.Tensor) else new_rows)
        return rows

    def insert(self, new_ids: torch.Tensor, new_rows: NewRows) -> torch.Tensor:
        """Append rows for distinct absent ``new_ids``: values ``new_rows(new_ids)`` or the given
        ``(len(new_ids), dim)`` values, zero slots and columns. Returns their rows."""
        values = new_rows if isinstance(new_rows, torch.Tensor) else new_rows(new_ids)
        self.grow(len(self) + new_ids.numel())
        inserted = self._id_map.insert_new(new_ids)
        self._weight.index_copy_(0, inserted, values.to(self._dtype))
        self._zero_extras(inserted)
        return inserted

    def replace(self, rows: torch.Tensor, new_ids: torch.Tensor, values: torch.Tensor) -> None:
        """Give distinct present ``rows`` to distinct absent ``new_ids`` with first ``values``:
        the rows' old ids leave the table; slots and columns of the rows restart at zero.
        Other rows keep their numbers. O(len(rows))."""
        values = values.to(self._dtype)
        old_ids = self._id_map.keys_of_rows(rows)
        self._id_map.erase(old_ids)
        self._id_map.insert_new(new_ids, rows)
        self._weight.index_copy_(0, rows, values)
        self._zero_extras(rows)
        self._replacements += 1

    def _zero_extras(self, rows: torch.Tensor) -> None:
        for storage in (*self._slots.values(), *self._columns.values()):
            storage.index_fill_(0, rows, 0)

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """The values of ``rows``, ``(len(rows), dim)``; a copy."""
        return gather_rows(self._weight, rows)

    def scatter(self, rows: torch.Tensor, values: torch.Tensor | None, slots: dict[str, torch.Tensor] = {}) -> None:  # noqa: B006 (read only)
        """Overwrite the values of distinct ``rows`` (when given) and the named slots' entries."""
        if values is not None:
            self._weight.index_copy_(0, rows, values.to(device=self._device, dtype=self._dtype))
        for name, entries in slots.items():
            if name in self._slots:
                slot = self._slots[name]
                slot.index_copy_(0, rows, entries.to(device=self._device, dtype=slot.dtype).reshape(-1, slot.shape[1]))

    def ids(self) -> torch.Tensor:
        """Every id, in row order."""
        return self._id_map.keys_by_row()

    def ids_of(self, rows: torch.Tensor) -> torch.Tensor:
        """The ids stored in ``rows``; O(len(rows))."""
        return self._id_map.keys_of_rows(rows)

    def remove(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Remove the present ids among ``ids`` with their rows, slots and columns.

        The last rows move into the holes, so the cost is O(rows removed). Returns
        ``(moved_from, moved_to)``: the old and new numbers of the rows that moved.
        """
        rows = self._id_map.find(ids)
        rows = torch.unique(rows[rows >= 0])
        nothing = rows[:0]
        if rows.numel() == 0:
            return nothing, nothing
        remaining = len(self) - rows.numel()
        holes = rows[rows < remaining]
        tail = torch.arange(remaining, len(self), device=self._device)
        movers = tail[~torch.isin(tail, rows)]
        self._id_map.erase(self._id_map.keys_of_rows(rows))
        if movers.numel():
            mover_ids = self._id_map.keys_of_rows(movers)
            self._id_map.erase(mover_ids)
            self._id_map.insert_new(mover_ids, holes)
            for storage in (self._weight, *self._slots.values(), *self._columns.values()):
                storage.index_copy_(0, holes, storage.index_select(0, movers))
        self._id_map.truncate(remaining)
        self._generation += 1
        return movers, holes

    def clear(self) -> None:
        """Remove every row (slot registrations stay)."""
        self.load(torch.empty(0, dtype=torch.int64, device=self._device), self.weight[:0], {})

    # ------------------------------------------------------------------ capacity
    def reserve(self, row_count: int) -> None:
        """Make room for ``row_count`` rows (and their slots) at once."""
        if row_count > self.capacity:
            self._resize(row_count)

    def grow(self, row_count: int) -> None:
        """Make room for ``row_count`` rows, at least doubling the buffers (amortized O(1) per row),
        but not past the row limit (``limit_rows``) when ``row_count`` is within it."""
        if row_count > self.capacity:
            doubled = max(row_count, 2 * self.capacity, 16)
            if self._row_limit is not None and row_count <= self._row_limit:
                doubled = min(doubled, self._row_limit)
            self._resize(doubled)

    def limit_rows(self, row_limit: int | None) -> None:
        """The most rows the store will hold (a bounded table's capacity): growth stops there."""
        self._row_limit = row_limit

    def _resize(self, capacity: int) -> None:
        self._weight = self._grown(self._weight, capacity)
        self._slots = {name: self._grown(slot, capacity) for name, slot in self._slots.items()}
        self._columns = {name: self._grown(column, capacity) for name, column in self._columns.items()}

    def _grown(self, storage: torch.Tensor, capacity: int) -> torch.Tensor:
        grown = empty_rows((capacity, *storage.shape[1:]), dtype=storage.dtype, device=storage.device)
        grown[: len(self)] = storage[: len(self)]
        grown[len(self) :].zero_()
        return grown

    # ------------------------------------------------------------------ slots
    def check_slot(self, name: str, width: int, dtype: torch.dtype) -> str | None:
        """Why ``add_slot(name, width, dtype)`` would fail, or None."""
        existing = self._slots.get(name)
        if existing is not None and (existing.shape[1] != width or existing.dtype != dtype):
            return (
                f"slot {name!r} exists with width {existing.shape[1]} and dtype {existing.dtype}; "
                f"asked for width {width} and dtype {dtype}"
            )
        return None

    def add_slot(self, name: str, width: int, dtype: torch.dtype) -> None:
        """Register a per-row slot of ``width`` elements, zero for every row; no-op if it exists alike."""
        problem = self.check_slot(name, width, dtype)
        if problem:
            raise ValueError(problem)
        if name not in self._slots:
            self._slots[name] = zero_rows((self.capacity, width), dtype=dtype, device=self._device)

    def slot(self, name: str) -> torch.Tensor:
        """The slot ``name`` of every row, ``(len(self), width)``; a view."""
        return self._slots[name][: len(self)]

    def has_slot(self, name: str) -> bool:
        return name in self._slots

    def slot_names(self) -> list[str]:
        return sorted(self._slots)

    def drop_slots(self) -> None:
        self._slots = {}

    # ------------------------------------------------------------------ metadata columns
    def add_column(self, name: str) -> None:
        """Register an int64 metadata column, zero for every row; no-op if it exists."""
        if name not in self._columns:
            self._columns[name] = torch.zeros(self.capacity, dtype=torch.int64, device=self._device)

    def column(self, name: str) -> torch.Tensor:
        """The column ``name`` of every row, ``(len(self),)``; a view (write to it to set entries)."""
        return self._columns[name][: len(self)]

    def has_column(self, name: str) -> bool:
        return name in self._columns

    def column_names(self) -> list[str]:
        return sorted(self._columns)

    # ------------------------------------------------------------------ whole-store changes
    def load(
        self,
        ids: torch.Tensor,
        weight: torch.Tensor,
        slots: dict[str, torch.Tensor],
        columns: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Replace the whole content by distinct ``ids`` with their rows, slots and columns.

        Registered slots (columns) absent from ``slots`` (``columns``) start at zero; one
        given but not yet registered is registered. Rows are renumbered in the order of ``ids``.
        """
        count = ids.numel()
        id_map = IdMap(self._device)
        id_map.insert_new(ids.to(self._device))
        new_weight = self._stored(weight.reshape(count, self._dim), self._dtype)
        new_slots = {}
        for name, values in slots.items():
            registered = self._slots.get(name)
            dtype = registered.dtype if registered is not None else values.dtype
            width = registered.shape[1] if registered is not None else (values.shape[-1] if values.dim() > 1 else 1)
            new_slots[name] = self._stored(values.reshape(count, width), dtype)  # (0, -1) would be ambiguous
        for name, slot in self._slots.items():
            if name not in new_slots:
                new_slots[name] = zero_rows((count, slot.shape[1]), dtype=slot.dtype, device=self._device)
        columns = columns or {}
        new_columns = {name: self._stored(values.reshape(count), torch.int64) for name, values in columns.items()}
        for name in self._columns:
            if name not in new_columns:
                new_columns[name] = torch.zeros(count, dtype=torch.int64, device=self._device)
        self._id_map, self._weight, self._slots, self._columns = id_map, new_weight, new_slots, new_columns
        self._generation += 1

    def moved(self, device: torch.device, dtype: torch.dtype) -> RowStore:
        """A copy on ``device`` with rows cast to ``dtype`` (slots keep theirs); this store is unchanged."""
        copy = RowStore(self._dim, dtype, device, generation=self._generation)
        copy.load(
            self.ids(),
            self.weight,
            {name: self.slot(name) for name in self._slots},
            {name: self.column(name) for name in self._columns},
        )
        return copy

    def _stored(self, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        storage = empty_rows(tuple(values.shape), dtype=dtype, device=self._device)
        storage.copy_(values)
        return storage
