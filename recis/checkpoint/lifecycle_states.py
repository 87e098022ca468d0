"""The tables' lifecycle states in a checkpoint, and which state each rank restores.

Every rank saves, for every table of the model, ``table.lifecycle.state()``
(``recis.nn.row_lifecycle``): ``clock_window_step`` (lookup clock, gradient window,
filter step), ``counters`` (the six counts behind ``stats()``) and, once a Frequency
admission has counted sightings, ``sketch`` (its count-min counters). The per-row
metadata the policies read travel with the rows as ``meta.<name>`` fields instead.

On load, each table restores:

- at the world size it was saved at: each rank its own saved state, exactly;
- at another world size (resharding), on every rank:

  * ``clock_window_step`` of saved rank 0. Every rank of a table looks up, zeroes
    gradients and advances the filter once per step, so all saved ranks hold the same
    values, and they are the values one process would hold.
  * ``counters``: the elementwise sum over the saved ranks on the new rank 0, zeros on
    the others. The table's totals (``stats()`` summed over the ranks: inserted,
    evicted, not admitted, lookups, hits) are exactly those saved; how a total splits
    over the new ranks is not recorded anywhere, so no rank claims another's share.
  * ``sketch``: the elementwise sum of the saved ranks' sketches (those that have one;
    none if no rank has). Count-min counts are additive and each saved owner counted
    only the ids it owned, so the sum is exactly the sketch one process would hold for
    the same stream. Each new owner queries only ids it owns, so its estimates are
    those one process would make; for W' > 1 ranks they can exceed those of a run that
    was sharded W' ways from the start only where ids collide in every row of the sketch.
"""

from __future__ import annotations

from typing import Any

import torch

from recis.checkpoint.manifest import CheckpointError
from recis.nn.modules.hashtable import HashTable

State = dict[str, torch.Tensor]


def saved_state(table: HashTable) -> State:
    """``table.lifecycle.state()`` as CPU copies, for the rank's small-state file."""
    return {key: value.detach().cpu().clone() for key, value in table.lifecycle.state().items()}


def checked(table: HashTable, key: str, state: Any, where: str) -> State:
    """``state`` if ``table``'s lifecycle can load it, else ``CheckpointError`` naming table and field."""
    problem = table.lifecycle.state_problem(state) if isinstance(state, dict) else "not a dict of tensors"
    if problem:
        raise CheckpointError(f"table {key!r}: lifecycle state of {where} does not fit: {problem}")
    return state


def resharded_state(table: HashTable, key: str, saved: list[State | None], rank: int) -> State | None:
    """The state ``rank`` restores from every saved rank's ``saved`` state of one table (module
    docstring); None when no saved rank has one (an older checkpoint). Raises ``CheckpointError``
    when only some ranks have one, or their sketches differ in shape."""
    if all(state is None for state in saved):
        return None
    if any(state is None for state in saved):
        missing = [r for r, state in enumerate(saved) if state is None]
        raise CheckpointError(f"table {key!r}: saved ranks {missing} have no lifecycle state, the others do")
    saved = [checked(table, key, state, f"saved rank {r}") for r, state in enumerate(saved)]
    counters = torch.stack([state["counters"] for state in saved]).sum(0)
    merged = {
        "clock_window_step": saved[0]["clock_window_step"].clone(),
        "counters": counters if rank == 0 else torch.zeros_like(counters),
    }
    sketches = [state["sketch"] for state in saved if "sketch" in state]
    if sketches:
        shapes = sorted({tuple(sketch.shape) for sketch in sketches})
        if len(shapes) > 1:
            raise CheckpointError(f"table {key!r}: saved ranks hold sketches of different shapes {shapes}")
        merged["sketch"] = torch.stack(sketches).sum(0)
    return checked(table, key, merged, "the merged saved ranks")
