"""HashTableFilterHook: advance the tables' filter steps and run their filters every N steps.

RecIS's hook of the same name, with its schedule: each ``after_step`` advances the
global step of every table's filter by one; the filters run when ``global_step`` has
moved at least ``filter_interval`` past the step of the last run (the first call
only records its step). By default it serves every live table created with a
``filter_hook`` (as RecIS's process-wide registry does); ``tables=`` limits it.

Call it on every rank of a sharded job, as every rank steps: each rank filters the
rows it owns, so no communication is needed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from recis.nn.modules.hashtable import HashTable
from recis.nn.tables_with_filters import tables_with_filters

_log = logging.getLogger(__name__)


class HashTableFilterHook:
    """Runs the tables' filters every ``filter_interval`` steps (None: never, steps still advance)."""

    def __init__(self, filter_interval: int | None = 100, tables: Sequence[HashTable] | None = None) -> None:
        self.reset_filter_interval(filter_interval)
        if tables is not None:
            missing = [table.describe() for table in tables if table.lifecycle.filter_hook is None]
            if missing:
                raise ValueError(f"HashTableFilterHook: these tables have no filter_hook: {missing}")
        self._tables = list(tables) if tables is not None else None
        self.last_filter_step = 0
        self.last_removed: dict[str, int] = {}

    def reset_filter_interval(self, interval: int | None = 100) -> None:
        if interval is not None and (isinstance(interval, bool) or not isinstance(interval, int) or interval < 1):
            raise ValueError(f"filter_interval must be an int >= 1 or None, got {interval!r}")
        self.filter_interval = interval

    def tables(self) -> list[HashTable]:
        return self._tables if self._tables is not None else tables_with_filters()

    def after_step(self, *args: Any, global_step: int | torch.Tensor | None = None, **kwargs: Any) -> None:
        """Called after each training step with the step number: ``after_step(global_step=n)``,
        ``after_step(n)`` or RecIS's older ``after_step(_, n)``."""
        if global_step is None:
            if not args:
                raise TypeError("HashTableFilterHook.after_step needs the global step")
            global_step = args[-1]
        step = int(global_step.item() if isinstance(global_step, torch.Tensor) else global_step)
        if self.last_filter_step == 0:
            self.last_filter_step = step
        run = self.filter_interval is not None and step - self.last_filter_step >= self.filter_interval
        removed = {}
        for index, table in enumerate(self.tables()):
            table.advance_filter_step()
            if run:
                removed[table.name or f"table {index}"] = table.run_filter()
        if run:
            self.last_filter_step = step
            self.last_removed = removed
            _log.info("HashTableFilterHook at step %d removed %s", step, removed)

    def state_dict(self) -> dict[str, Any]:
        return {"filter_interval": self.filter_interval, "last_filter_step": self.last_filter_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset_filter_interval(state["filter_interval"])
        self.last_filter_step = int(state["last_filter_step"])
