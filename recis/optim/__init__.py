"""Optimizers: sparse ones for HashTable rows, and AdamWTF for dense parameters."""

from recis.optim.adamw_tf import AdamWTF
from recis.optim.sparse_adagrad import SparseAdagrad
from recis.optim.sparse_adagrad_sum import SparseAdagradSum
from recis.optim.sparse_adam import SparseAdam
from recis.optim.sparse_adamw import SparseAdamW
from recis.optim.sparse_adamw_tf import SparseAdamWTF
from recis.optim.sparse_optimizer import SparseOptimizer
from recis.optim.sparse_row_wise_adagrad import SparseRowWiseAdagrad
from recis.optim.sparse_row_wise_adagrad_sum import SparseRowWiseAdagradSum

__all__ = [
    "AdamWTF",
    "SparseAdagrad",
    "SparseAdagradSum",
    "SparseAdam",
    "SparseAdamW",
    "SparseAdamWTF",
    "SparseOptimizer",
    "SparseRowWiseAdagrad",
    "SparseRowWiseAdagradSum",
]
