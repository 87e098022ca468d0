"""SparseRowWiseAdagrad: row-wise Adagrad on the touched rows of hash tables.

One accumulator per row. With g the gradient of a touched row (duplicates and
micro-batches summed, divided by the accumulation count), theta the row (all its
elements, whatever the embedding shape), t the table's step count:

    g      += weight_decay * theta                 (L2, on the value before the update)
    state   = state + mean_j g_j^2                 (one scalar per row, from initial_accumulator_value)
    theta  -= lr / (1 + (t - 1) * lr_decay) * g / (sqrt(state) + eps)

Reference: torchrec's ``RowWiseAdagrad`` (FBGEMM's row-wise Adagrad) on the touched rows:
exactly when untouched rows get no decay (weight_decay 0, or every row touched every
step), as RecIS's SparseRowWiseAdagrad.
"""

from __future__ import annotations

from recis.optim.sparse_adagrad_family import SparseAdagradFamily


class SparseRowWiseAdagrad(SparseAdagradFamily):
    """Row-wise Adagrad on the touched rows of hash tables, as torchrec's RowWiseAdagrad.

    ``SparseRowWiseAdagrad(param_dict, lr=1e-3, lr_decay=0, initial_accumulator_value=0,
    eps=1e-10, weight_decay=0, *, maximize=False)``, RecIS's signature and defaults;
    other arguments: see ``SparseAdagradFamily``.
    """

    row_wise = True
