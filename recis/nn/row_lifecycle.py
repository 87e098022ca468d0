"""RowLifecycle: how rows come and go in a table, and the counters of it.

A training lookup of distinct ids (``lookup_rows``):

1. finds the present ids (hits);
2. asks the admission hook which absent ids get rows (``recis.nn.hashtable_hook``):
   all of them by default, none with ``ReadOnly``, those sighted ``min_count`` times
   with ``Frequency`` (counted in a ``FrequencySketch``);
3. if the admitted ids do not fit in ``capacity``, chooses as many victims as needed by
   the eviction policy (``recis.nn.eviction``), never a row of this lookup nor one
   looked up differentiably since the last ``end_window`` (the table ends the window
   when its pending gradient is cleared), and gives their rows to the new ids
   (``RowStore.replace``: the row, its slots and metadata restart; memory stays flat);
   if there are not enough such rows, raises ``ValueError`` before changing anything;
4. records, for every row of the lookup, the metadata the policies read: ``last_seen``
   (the lookup clock), ``sightings``, the gradient window, the filter's global step.

``run_filter`` removes the rows the filter hook finds stale (RecIS's GlobalStepFilter:
``filter_step < global_step - N``), except rows with a gradient pending. Metadata
columns exist only when a capacity or a filter needs them.

Counters (``stats``): ``rows``, ``capacity``, ``inserted``, ``evicted`` (= ``evicted_capacity``
+ ``evicted_filter``), ``not_admitted`` (absent ids refused, per lookup), ``lookups``
(distinct ids per training lookup, summed over lookups) and ``hits`` (those present).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from recis.nn.eviction import EVICTION_POLICIES, LAST_SEEN, SIGHTINGS, choose_victims, eviction_scores
from recis.nn.frequency_sketch import FrequencySketch
from recis.nn.hashtable_hook import AdmitHook, FilterHook
from recis.store import RowStore

GRAD_WINDOW = "grad_window"
FILTER_STEP = "filter_step"
_COUNTERS = ("inserted", "evicted_capacity", "evicted_filter", "not_admitted", "lookups", "hits")


def _checked_capacity(capacity: int | None) -> int | None:
    if capacity is None:
        return None
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0:
        raise ValueError(f"capacity must be a positive int or None, got {capacity!r}")
    return capacity


def _checked_hook(kind: type, value: object, argument: str) -> Any:
    if value is not None and not isinstance(value, kind):
        raise TypeError(f"{argument} must be a {kind.__name__} or None, got {type(value).__name__}")
    return value


class RowLifecycle:
    """Admission, capacity eviction, filtering and statistics of one table (module docstring)."""

    def __init__(
        self,
        device: torch.device,
        *,
        capacity: int | None = None,
        eviction: str | None = None,
        admit_hook: AdmitHook | None = None,
        filter_hook: FilterHook | None = None,
    ) -> None:
        self.capacity = _checked_capacity(capacity)
        if eviction is not None and eviction not in EVICTION_POLICIES:
            raise ValueError(f"eviction must be one of {list(EVICTION_POLICIES)}, got {eviction!r}")
        if eviction is not None and capacity is None:
            raise ValueError(f"eviction={eviction!r} needs a capacity")
        self.eviction = eviction or ("lru" if capacity is not None else None)
        self.admit_hook = _checked_hook(AdmitHook, admit_hook, "admit_hook")
        self.filter_hook = _checked_hook(FilterHook, filter_hook, "filter_hook")
        self.device = device
        self.clock = 0  # training lookups so far
        self.window = 1  # the gradient window; rows marked with it are protected (fresh rows hold 0)
        self.global_step = 0  # the filter's step, advanced by HashTableFilterHook
        self.sketch: FrequencySketch | None = None
        self.removal_listener: Callable[[torch.Tensor], None] | None = None  # told the ids of evicted rows
        self._counts = {name: torch.zeros((), dtype=torch.int64, device=device) for name in _COUNTERS}

    # ------------------------------------------------------------------ configuration
    def config(self) -> dict[str, Any]:
        """What must agree across the ranks of a sharded table."""
        return {
            "capacity": self.capacity,
            "eviction": self.eviction,
            "admit_hook": str(self.admit_hook),
            "filter_hook": str(self.filter_hook),
        }

    @property
    def columns(self) -> list[str]:
        """The metadata columns the policies read."""
        names = []
        if self.capacity is not None:
            names += [LAST_SEEN, SIGHTINGS]
        if self.filter_hook is not None:
            names.append(FILTER_STEP)
        if names:
            names.append(GRAD_WINDOW)
        return names

    def prepare(self, store: RowStore) -> None:
        for name in self.columns:
            store.add_column(name)
        store.limit_rows(self.capacity)

    def moved(self, device: torch.device) -> None:
        self.device = device
        self._counts = {name: count.to(device) for name, count in self._counts.items()}
        if self.sketch is not None:
            self.sketch.counters = self.sketch.counters.to(device)

    # ------------------------------------------------------------------ lookups
    def lookup_rows(
        self,
        store: RowStore,
        unique_ids: torch.Tensor,
        initial_values: Callable[[torch.Tensor], torch.Tensor],
        admit_hook: AdmitHook | None,
        *,
        protect: bool,
    ) -> torch.Tensor:
        """Rows of distinct ids for a training lookup, -1 for ids not admitted (module docstring)."""
        admit_hook = admit_hook if admit_hook is not None else self.admit_hook
        rows = store.find(unique_ids)
        absent = rows < 0
        if bool(absent.any()):
            rows = self._insert_admitted(store, unique_ids, rows, absent, initial_values, admit_hook)
        self.count_lookup(unique_ids.numel(), unique_ids.numel() - absent.sum())
        self.clock += 1
        self._mark_seen(store, rows[rows >= 0] if admit_hook is not None else rows, protect)
        return rows

    def count_lookup(self, ids: int, hits: int | torch.Tensor) -> None:
        self._counts["lookups"] += ids
        self._counts["hits"] += hits

    def _insert_admitted(
        self,
        store: RowStore,
        unique_ids: torch.Tensor,
        rows: torch.Tensor,
        absent: torch.Tensor,
        initial_values: Callable[[torch.Tensor], torch.Tensor],
        admit_hook: AdmitHook | None,
    ) -> torch.Tensor:
        absent_ids = unique_ids[absent]
        admitted = self._admitted(absent_ids, admit_hook)
        new_ids = absent_ids[admitted]
        victims = self._victims(store, new_ids.numel(), rows[~absent], unique_ids.numel())
        values = initial_values(new_ids) if new_ids.numel() else None  # may fail: before any change
        if admit_hook is not None and admit_hook.name == "Frequency":
            self._sketch_for(admit_hook).add(absent_ids)
        self._counts["not_admitted"] += absent_ids.numel() - new_ids.numel()
        self._counts["inserted"] += new_ids.numel()
        self._counts["evicted_capacity"] += victims.numel()
        if values is None:
            return rows
        rows[absent.nonzero().squeeze(1)[admitted]] = self._place(store, new_ids, values, victims)
        return rows

    def insert(
        self, store: RowStore, new_ids: torch.Tensor, values: torch.Tensor, keep_rows: torch.Tensor
    ) -> torch.Tensor:
        """Rows for distinct absent ``new_ids`` with first ``values`` outside a lookup (an assignment,
        a gradient's owner), evicting as a lookup does but never ``keep_rows``; no admission."""
        victims = self._victims(store, new_ids.numel(), keep_rows, keep_rows.numel() + new_ids.numel())
        self._counts["inserted"] += new_ids.numel()
        self._counts["evicted_capacity"] += victims.numel()
        return self._place(store, new_ids, values, victims)

    def _place(
        self, store: RowStore, new_ids: torch.Tensor, values: torch.Tensor, victims: torch.Tensor
    ) -> torch.Tensor:
        reused = victims.numel()
        if reused:
            evicted = store.ids_of(victims) if self.removal_listener is not None else None
            store.replace(victims, new_ids[:reused], values[:reused])
            if evicted is not None:
                self.removal_listener(evicted)
        return torch.cat([victims, store.insert(new_ids[reused:], values[reused:])])

    def _admitted(self, absent_ids: torch.Tensor, admit_hook: AdmitHook | None) -> torch.Tensor:
        """Which absent ids get rows; changes nothing (the sighting is counted after the checks)."""
        if admit_hook is None:
            return torch.ones(absent_ids.numel(), dtype=torch.bool, device=absent_ids.device)
        if admit_hook.name == "ReadOnly":
            return torch.zeros(absent_ids.numel(), dtype=torch.bool, device=absent_ids.device)
        sightings = self._sketch_for(admit_hook).estimate(absent_ids) + 1  # with this one
        return sightings >= admit_hook.param("min_count")

    def _sketch_for(self, admit_hook: AdmitHook) -> FrequencySketch:
        width, depth = admit_hook.param("sketch_width"), admit_hook.param("sketch_depth")
        if self.sketch is None:
            self.sketch = FrequencySketch(width, depth, self.device)
        elif (self.sketch.width, self.sketch.depth) != (width, depth):
            raise ValueError(
                f"this table counts sightings in a sketch of width {self.sketch.width} and depth "
                f"{self.sketch.depth}; the admit hook asks for {width} and {depth}"
            )
        return self.sketch

    def _victims(self, store: RowStore, new_count: int, batch_rows: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Rows to give to ``new_count`` new ids so that the table stays within capacity."""
        excess = len(store) + new_count - self.capacity if self.capacity is not None else 0
        if excess <= 0:
            return torch.empty(0, dtype=torch.int64, device=store.device)
        if new_count > self.capacity:
            raise ValueError(
                f"a lookup brings {new_count} new ids, more than the capacity of {self.capacity} rows; "
                "raise the capacity or split the batch"
            )
        eligible = store.column(GRAD_WINDOW) != self.window
        eligible[batch_rows] = False
        available = int(eligible.sum())
        if available < excess:
            raise ValueError(
                f"a lookup brings {new_count} new ids to a table at {len(store)} of {self.capacity} rows, but only "
                f"{available} rows can be evicted: the others are in this lookup ({batch_size} ids) or have a "
                "gradient pending since the last zero_grad; raise the capacity"
            )
        scores = eviction_scores(self.eviction, store.column(LAST_SEEN), store.column(SIGHTINGS))
        return choose_victims(scores, eligible, excess, store.ids_of)

    def _mark_seen(self, store: RowStore, rows: torch.Tensor, protect: bool) -> None:
        if self.capacity is not None:
            store.column(LAST_SEEN)[rows] = self.clock
            store.column(SIGHTINGS).index_add_(0, rows, torch.ones_like(rows))
        if self.filter_hook is not None:
            store.column(FILTER_STEP)[rows] = self.global_step
        if protect and self.columns:
            store.column(GRAD_WINDOW)[rows] = self.window

    def protect(self, store: RowStore, rows: torch.Tensor) -> None:
        """A gradient arrived for ``rows``: keep them from eviction until the window ends (even
        when ``zero_grad`` ended the window of the lookup that read them)."""
        if self.columns:
            store.column(GRAD_WINDOW)[rows] = self.window

    def end_window(self) -> None:
        """The pending gradient was applied or dropped: its rows may be evicted again."""
        self.window += 1

    # ------------------------------------------------------------------ filters
    def advance_step(self, steps: int = 1) -> None:
        self.global_step += steps

    def stale_ids(self, store: RowStore) -> torch.Tensor:
        """Ids the filter hook would remove now: stale, and without a gradient pending."""
        if self.filter_hook is None:
            return torch.empty(0, dtype=torch.int64, device=store.device)
        stale = store.column(FILTER_STEP) < self.global_step - self.filter_hook.param("filter_step")
        stale &= store.column(GRAD_WINDOW) != self.window
        return store.ids_of(stale.nonzero().squeeze(1))

    def count_filtered(self, removed: int) -> None:
        self._counts["evicted_filter"] += removed

    # ------------------------------------------------------------------ statistics and state
    def stats(self, rows: int) -> dict[str, int | None]:
        counts = {name: int(count) for name, count in self._counts.items()}
        evicted = counts["evicted_capacity"] + counts["evicted_filter"]
        return {"rows": rows, "capacity": self.capacity, **counts, "evicted": evicted}

    def state(self) -> dict[str, torch.Tensor]:
        """Everything besides the rows' columns that a checkpoint must carry to resume exactly."""
        scalars = torch.tensor([self.clock, self.window, self.global_step], dtype=torch.int64)
        state = {"clock_window_step": scalars, "counters": torch.stack([self._counts[n].cpu() for n in _COUNTERS])}
        if self.sketch is not None:
            state["sketch"] = self.sketch.counters
        return state

    def state_problem(self, state: dict[str, Any]) -> str | None:
        scalars, counters = state.get("clock_window_step"), state.get("counters")
        for key, value, size in (("clock_window_step", scalars, 3), ("counters", counters, len(_COUNTERS))):
            if not isinstance(value, torch.Tensor) or value.dtype != torch.int64 or tuple(value.shape) != (size,):
                return f"'lifecycle.{key}' must be an int64 tensor of shape ({size},)"
        sketch = state.get("sketch")
        well_formed = isinstance(sketch, torch.Tensor) and sketch.dtype == torch.int64 and sketch.dim() == 2
        if sketch is not None and not well_formed:
            return "'lifecycle.sketch' must be a 2-D int64 tensor"
        return None

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.clock, self.window, self.global_step = (int(v) for v in state["clock_window_step"])
        self._counts = {n: state["counters"][i].to(self.device).clone() for i, n in enumerate(_COUNTERS)}
        sketch = state.get("sketch")
        if sketch is None:
            self.sketch = None
        else:
            self.sketch = FrequencySketch(sketch.shape[1], sketch.shape[0], self.device)
            self.sketch.counters.copy_(sketch)
