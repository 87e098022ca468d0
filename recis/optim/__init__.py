"""Optimizers: sparse ones for HashTable rows, and AdamWTF for dense parameters."""

from recis.optim.adamw_tf import AdamWTF
from recis.optim.sparse_adam import SparseAdam
from recis.optim.sparse_adamw import SparseAdamW
from recis.optim.sparse_adamw_tf import SparseAdamWTF
from recis.optim.sparse_optimizer import SparseOptimizer

__all__ = ["AdamWTF", "SparseAdam", "SparseAdamW", "SparseAdamWTF", "SparseOptimizer"]
