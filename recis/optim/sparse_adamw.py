"""SparseAdamW: AdamW on the touched rows of hash tables, as torch.optim.AdamW.

With g the gradient of a touched row (duplicates and micro-batches summed, divided by
the accumulation count), theta the row, t the table's step count (or the row's, with
``bias_correction="row"``), bc1 = 1 - beta1^t, bc2 = 1 - beta2^t:

    theta *= 1 - lr * weight_decay                (decoupled, before the Adam update)
    m      = beta1 * m + (1 - beta1) * g
    v      = beta2 * v + (1 - beta2) * g^2
    theta -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)

Only rows that received a gradient are read or written (lazy, like LazyAdam and
torch.optim.SparseAdam); untouched rows keep their value and slots.
Reference: torch.optim.AdamW restricted to the touched rows; when every row gets a
gradient every step, a table trained with SparseAdamW equals nn.Embedding trained with
torch.optim.AdamW.
"""

from __future__ import annotations

from recis.ops import EpsilonPlacement, WeightDecay
from recis.optim.sparse_optimizer import SparseOptimizer


class SparseAdamW(SparseOptimizer):
    """AdamW on the touched rows of hash tables, as torch.optim.AdamW. Arguments: see ``SparseOptimizer``."""

    weight_decay_rule = WeightDecay.DECOUPLED
    epsilon_placement = EpsilonPlacement.CORRECTED
    default_weight_decay = 1e-2
