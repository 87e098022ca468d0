"""What ``load`` replaces in live objects, kept so that a failed load can put it back.

``load`` builds the new state aside first (``staged_rows``); then it changes the live
objects in this order, recording before each change how to undo it (``Undo``):

1. each optimizer's ``load_state_dict`` (undone by ``ObjectBefore``: its former
   attributes put back as they were, without calling ``load_state_dict`` again, which
   would refuse a param group that was edited by hand into an invalid state, a NaN
   learning rate say; any object with ``state_dict``/``load_state_dict`` works, LR
   schedulers included). A recis sparse optimizer may register slots on its tables here;
2. the dense parameters and buffers (undone with a copy of their former values);
3. each table's rows, slots, metadata columns, pending gradient and lifecycle state.

``TableBefore`` holds a table's former content by reference (its id list, and views of
its rows, slots and columns, whose storage a commit does not free while the reference
lives), plus copies of its pending gradient and lifecycle state. Undoing puts back,
exactly, the tables that a commit replaced or that gained a slot: the same ids in the
same row order, rows, slots (the same names, dtypes and widths), columns, pending
gradient and lifecycle state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from recis.checkpoint.lifecycle_states import State, saved_state
from recis.checkpoint.manifest import CheckpointError
from recis.nn.modules.hashtable import HashTable


@dataclass
class TableBefore:
    """A table's content before ``load`` changed it (module docstring)."""

    table: HashTable
    ids: torch.Tensor
    weight: torch.Tensor
    slots: dict[str, torch.Tensor]
    columns: dict[str, torch.Tensor]
    pending: tuple[torch.Tensor, torch.Tensor] | None
    lifecycle: State
    replaced: bool = False  # set once a commit replaced the rows

    @classmethod
    def of(cls, table: HashTable) -> TableBefore:
        return cls(
            table,
            table.local_ids(),
            table.weight,
            {name: table.slot(name) for name in table.slot_names()},
            {name: table.column(name) for name in table.column_names()},
            table.grad_by_id() if table.has_grad else None,
            saved_state(table),
        )

    def changed(self) -> bool:
        return self.replaced or self.table.slot_names() != list(self.slots)

    def restore(self) -> None:
        """Put the former content back (the slots too: ``drop_slots`` forgets any slot registered since)."""
        table = self.table
        if table.slot_names() != list(self.slots):
            table.drop_slots()
        table.load_rows(self.ids, self.weight, self.slots, self.columns)
        table.lifecycle.load_state(self.lifecycle)  # before the gradient: it protects its rows in this window
        if self.pending is not None:
            table.restore_grad(*self.pending)


@dataclass
class ObjectBefore:
    """An object's attributes before its ``load_state_dict`` ran, to put back exactly.

    Each attribute is kept by reference, and a list's items or a dict's entries by a
    shallow copy: ``load_state_dict`` of torch's and recis's optimizers and of LR
    schedulers replaces attributes, list items and dict entries (new param groups, new
    state entries) and never changes the former ones in place. Putting back restores
    each attribute's object, with its former items, so that an object sharing one (a
    ``ShardedOptimizer`` shares its wrapped optimizer's ``param_groups`` and ``state``)
    sees them too. It runs no validation, so it cannot fail on the state it restores.
    """

    owner: Any
    attributes: dict[str, Any]
    contents: dict[str, list | dict]

    @classmethod
    def of(cls, owner: Any) -> ObjectBefore:
        attributes = dict(vars(owner))
        contents = {
            name: list(value) if isinstance(value, list) else dict(value)
            for name, value in attributes.items()
            if isinstance(value, list | dict)
        }
        return cls(owner, attributes, contents)

    def restore(self) -> None:
        for name in set(vars(self.owner)) - set(self.attributes):
            delattr(self.owner, name)
        for name, value in self.attributes.items():
            former = self.contents.get(name)
            if isinstance(former, list):
                value[:] = former
            elif former is not None:
                value.clear()
                value.update(former)
            setattr(self.owner, name, value)


@dataclass
class Undo:
    """Steps that undo changes, run last-recorded first."""

    steps: list[Callable[[], Any]] = field(default_factory=list)

    def record(self, step: Callable[[], Any]) -> None:
        self.steps.append(step)

    def run(self) -> None:
        """Run every step, even past one that fails; then raise ``CheckpointError`` if any failed."""
        failed = None
        while self.steps:
            try:
                self.steps.pop()()
            except BaseException as error:  # the other steps must still run; raised below
                failed = failed or error
        if failed is not None:
            raise CheckpointError(
                f"putting back the state a failed load changed failed too ({type(failed).__name__}: {failed}); "
                "the model and optimizers may be inconsistent"
            ) from failed


def restore_changed(tables: list[TableBefore]) -> None:
    """Put back every table a load changed, leaving the others as they are."""
    for before in tables:
        if before.changed():
            before.restore()
