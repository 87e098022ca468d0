"""TableChildren: the features ("children") that share one table, as RecIS names them.

A table lists the names of the features it serves (``children``; by default its own
name). In a ``coalesced`` table the children's ids are kept apart: a child's id is
stored as ``encode(id, child)``, its low 52 bits with the child's index in the top 12
bits (RecIS's encoding: so a coalesced table serves at most 4095 children, and ids that
differ only in their top 12 bits collide within a child). In a table that is not
coalesced, children share ids: the same id of two children is one row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

INDEX_BITS = 12
ID_BITS = 64 - INDEX_BITS
MAX_CHILDREN = (1 << INDEX_BITS) - 1
_ID_MASK = (1 << ID_BITS) - 1


class TableChildren:
    """Which features share a table and how their ids are told apart (module docstring)."""

    def __init__(self, children: Sequence[str] | None, coalesced: bool, name: str | None) -> None:
        if not isinstance(coalesced, bool):
            raise TypeError(f"coalesced must be a bool, got {coalesced!r}")
        names = list(children) if children is not None else ([name] if name else [])
        if not all(isinstance(child, str) and child for child in names):
            raise TypeError(f"children must be a list of non-empty names, got {children!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"children must be distinct, got {names}")
        if len(names) > MAX_CHILDREN:
            raise ValueError(f"a table serves at most {MAX_CHILDREN} children, got {len(names)}")
        self.names = names
        self.coalesced = coalesced

    def index(self, child: str) -> int:
        if child not in self.names:
            raise KeyError(f"no child {child!r}; the table's children are {self.names}")
        return self.names.index(child)

    def encode(self, ids: torch.Tensor, child: str) -> torch.Tensor:
        """The ids under which ``child``'s ids are stored: themselves unless coalesced."""
        index = self.index(child)
        if not self.coalesced:
            return ids
        return (ids & _ID_MASK) | (index << ID_BITS)

    def holds(self, stored_ids: torch.Tensor, child: str) -> torch.Tensor:
        """Which stored ids belong to ``child`` (all of them unless coalesced)."""
        index = self.index(child)
        if not self.coalesced:
            return torch.ones_like(stored_ids, dtype=torch.bool)
        return ((stored_ids >> ID_BITS) & MAX_CHILDREN) == index
