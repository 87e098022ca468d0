"""recis: dynamic hash-table embeddings and sparse optimizers for PyTorch.

Data flow: ``recis.nn.modules.hashtable`` (tables) -> ``recis.optim`` (optimizers) ->
``recis.ops`` (kernels); ``recis.dist`` shards tables across ranks.
"""

from recis.nn.modules.hashtable import HashTable, filter_out_sparse_param

__version__ = "0.1.0"
__all__ = ["HashTable", "filter_out_sparse_param"]
