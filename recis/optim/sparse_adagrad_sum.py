"""SparseAdagradSum: SparseAdagrad that sums the workers' gradients instead of averaging them.

With g_w the gradient rank w sent for a touched row (summed over its occurrences and
micro-batches, divided by the accumulation count), theta the row, t the table's step count:

    state   = state + sum_w g_w^2                  (starting at initial_accumulator_value)
    theta  -= lr / (1 + (t - 1) * lr_decay) * (sum_w g_w) / (sqrt(state) + eps)

whatever the table's ``grad_reduce_by`` says; no weight decay (weight_decay must be 0).
In one process (one worker) it equals SparseAdagrad without weight decay. RecIS's
SparseAdagradSum, whose squared sums come from its HDMP backward; here the owners of the
rows compute them from what each rank sent (``recis.dist.ShardedOptimizer``).
"""

from __future__ import annotations

from recis.optim.sparse_adagrad_family import SparseAdagradFamily


class SparseAdagradSum(SparseAdagradFamily):
    """Element-wise Adagrad over the sum of the workers' gradients (module docstring).

    RecIS's signature and defaults (those of SparseAdagrad; ``weight_decay`` other than 0
    raises ``ValueError``); other arguments: see ``SparseAdagradFamily``.
    """

    takes_grad_sq = True
