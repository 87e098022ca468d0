"""Optimizers: sparse ones for HashTable rows; AdamWTF and the name-keyed Named* wrappers for dense parameters."""

from recis.optim.adamw_tf import AdamWTF
from recis.optim.named_optimizer import (
    NamedAdagrad,
    NamedAdam,
    NamedAdamW,
    NamedAdamWTF,
    NamedSGD,
    wrapped_named_optimizer,
)
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
    "NamedAdagrad",
    "NamedAdam",
    "NamedAdamW",
    "NamedAdamWTF",
    "NamedSGD",
    "SparseAdagrad",
    "SparseAdagradSum",
    "SparseAdam",
    "SparseAdamW",
    "SparseAdamWTF",
    "SparseOptimizer",
    "SparseRowWiseAdagrad",
    "SparseRowWiseAdagradSum",
    "wrapped_named_optimizer",
]
