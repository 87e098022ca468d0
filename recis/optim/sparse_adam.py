"""SparseAdam: Adam on the touched rows of hash tables, as torch.optim.SparseAdam.

With g the gradient of a touched row (duplicates and micro-batches summed, divided by
the accumulation count), theta the row, t the table's step count (or the row's, with
``bias_correction="row"``), bc1 = 1 - beta1^t, bc2 = 1 - beta2^t:

    g     += weight_decay * theta                 (L2; weight_decay = 0 by default)
    m      = beta1 * m + (1 - beta1) * g
    v      = beta2 * v + (1 - beta2) * g^2
    theta -= lr * sqrt(bc2) / bc1 * m / (sqrt(v) + eps)

Only rows that received a gradient are read or written (lazy, like LazyAdam and
torch.optim.SparseAdam); untouched rows keep their value and slots.
Reference: torch.optim.SparseAdam on nn.Embedding(sparse=True) when weight_decay = 0
(same values to fp32 rounding).
"""

from __future__ import annotations

from recis.ops import EpsilonPlacement, WeightDecay
from recis.optim.sparse_optimizer import SparseOptimizer


class SparseAdam(SparseOptimizer):
    """Adam on the touched rows of hash tables, as torch.optim.SparseAdam. Arguments: see ``SparseOptimizer``."""

    weight_decay_rule = WeightDecay.L2
    epsilon_placement = EpsilonPlacement.UNCORRECTED
    default_weight_decay = 0.0
