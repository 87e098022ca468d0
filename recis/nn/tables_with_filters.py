"""The live tables that have a filter hook, for ``recis.hooks.filter_hook.HashTableFilterHook``.

RecIS keeps every table's filter in a process-wide registry that its hook walks; so
does recis, but weakly: a table nothing else uses is not kept alive by it.
"""

from __future__ import annotations

import itertools
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from recis.nn.modules.hashtable import HashTable

_CREATION_NUMBER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_NEXT = itertools.count()


def register_filtered_table(table: HashTable) -> None:
    _CREATION_NUMBER[table] = next(_NEXT)


def tables_with_filters() -> list[HashTable]:
    """The live tables created with a filter hook, in creation order."""
    return sorted(_CREATION_NUMBER.keys(), key=lambda table: _CREATION_NUMBER[table])
