"""Modules: the HashTable embedding, its initializers, hooks and differentiable lookup.

``from recis.nn import HashTable`` works as in RecIS.
"""

from recis.nn.modules.hashtable import HashTable, filter_out_sparse_param

__all__ = ["HashTable", "filter_out_sparse_param"]
