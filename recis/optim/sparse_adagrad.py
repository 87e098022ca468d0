"""SparseAdagrad: Adagrad on the touched rows of hash tables, as torch.optim.Adagrad.

With g the gradient of a touched row (duplicates and micro-batches summed, divided by
the accumulation count), theta the row, t the table's step count:

    g      += weight_decay * theta                 (L2, on the value before the update)
    state   = state + g^2                          (starting at initial_accumulator_value)
    theta  -= lr / (1 + (t - 1) * lr_decay) * g / (sqrt(state) + eps)

Only rows that received a gradient are read or written; untouched rows keep their value
and accumulator (so weight decay reaches touched rows only). Reference:
``torch.optim.Adagrad`` on the touched rows: with sparse gradients (``nn.Embedding(...,
sparse=True)``, no weight decay) exactly, and with dense ones when every row is touched
every step. RecIS's SparseAdagrad (its kernel and its docs agree on this formula).
"""

from __future__ import annotations

from recis.optim.sparse_adagrad_family import SparseAdagradFamily


class SparseAdagrad(SparseAdagradFamily):
    """Element-wise Adagrad on the touched rows of hash tables, as torch.optim.Adagrad.

    ``SparseAdagrad(param_dict, lr=1e-3, lr_decay=0, initial_accumulator_value=0,
    eps=1e-10, weight_decay=0, save_update_info_interval=0)``, RecIS's signature and
    defaults (torch's lr default is 1e-2); other arguments: see ``SparseAdagradFamily``.
    """
