"""Training-loop hooks (RecIS's ``recis.hooks``): ``HashTableFilterHook`` runs the tables' filters."""

from recis.hooks.filter_hook import HashTableFilterHook

__all__ = ["HashTableFilterHook"]
