"""split_sparse_dense_state_dict: a state dict's hash tables apart from its dense entries (RecIS's).

In RecIS a ``HashTable`` puts its C++ table into ``state_dict()`` under the table's name,
and ``split_sparse_dense_state_dict(model.state_dict())`` moves those entries into a dict
of their own, the one RecIS's sparse optimizers take (``SparseAdamW(sparse_state)``).

A recis table writes tensors instead (``ids``, ``weight``, ``slots.*``, ...), which load
and checkpoint as any state does. To find the tables again, each table notes, when it
writes its state, the ``ids`` tensor it wrote and the keys it wrote; the note is kept
only while that tensor lives and never keeps the table alive. So the split works on the
dict ``state_dict()`` returned (or a shallow copy of it), not on one that went through
``torch.save``/``torch.load``: there, table entries are plain tensors and stay dense.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
from torch.utils.weak import WeakIdKeyDictionary

if TYPE_CHECKING:
    from recis.nn.modules.hashtable import HashTable

# The ids tensor a table wrote -> [(the table, weakly; the keys it wrote)], one per prefix it was saved under.
_NOTES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def note_table_state(table: HashTable, ids_entry: torch.Tensor, keys: list[str]) -> None:
    """Record that ``table`` wrote ``keys`` (the first being its ``ids`` entry, ``ids_entry``)."""
    _NOTES.setdefault(ids_entry, []).append((weakref.ref(table), tuple(keys)))


def _tables_in(state_dict: dict) -> dict[str, tuple[HashTable, tuple[str, ...]]]:
    """Module path -> (table, its keys) for each table entry of ``state_dict``."""
    found = {}
    for key, value in state_dict.items():
        if not (isinstance(value, torch.Tensor) and key.endswith("ids") and value in _NOTES):
            continue
        for table_ref, keys in _NOTES[value]:
            table = table_ref()
            if table is not None and keys[0] == key and all(k in state_dict for k in keys):
                found[key[: -len("ids")].rstrip(".")] = (table, keys)
    return found


def split_sparse_dense_state_dict(state_dict: dict) -> tuple[dict[str, HashTable], dict]:
    """``(sparse, dense)``: the hash tables of ``state_dict`` and what is left of it, as RecIS.

    ``sparse`` maps each table, once, to its name (as ``filter_out_sparse_param`` keys it;
    by module path when unnamed or when another table has the name). Like RecIS, the
    tables' entries are deleted from ``state_dict`` itself, which is returned as ``dense``.
    """
    found = _tables_in(state_dict)
    by_table: dict[int, tuple[str, HashTable]] = {}
    for path, (table, _) in found.items():
        by_table.setdefault(id(table), (path, table))
    names = [table.name for _, table in by_table.values()]
    sparse = {}
    for path, table in by_table.values():
        sparse[table.name if table.name and names.count(table.name) == 1 else path] = table
    for _, keys in found.values():
        for key in keys:
            del state_dict[key]
    return sparse, state_dict
