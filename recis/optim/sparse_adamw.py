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

from typing import Any

from recis.ops import EpsilonPlacement, WeightDecay
from recis.optim.hyperparameters import check_unsupported_flag
from recis.optim.sparse_optimizer import DEFAULT_BETA1, DEFAULT_BETA2, SparseOptimizer, TableParams


class SparseAdamW(SparseOptimizer):
    """AdamW on the touched rows of hash tables, as torch.optim.AdamW.

    Positional arguments in RecIS's order: ``(param_dict, lr, beta1, beta2, eps,
    weight_decay, amsgrad)``; ``amsgrad`` must be False (AMSGrad is not implemented,
    and RecIS raises ``ValueError`` for True too). Other arguments: see ``SparseOptimizer``.
    """

    weight_decay_rule = WeightDecay.DECOUPLED
    epsilon_placement = EpsilonPlacement.CORRECTED
    default_weight_decay = 1e-2

    def __init__(
        self,
        params: TableParams | None = None,
        lr: float = 1e-3,
        beta1: float = DEFAULT_BETA1,
        beta2: float = DEFAULT_BETA2,
        eps: float = 1e-8,
        weight_decay: float | None = 1e-2,
        amsgrad: bool = False,
        **options: Any,
    ) -> None:
        check_unsupported_flag("amsgrad", amsgrad, "AMSGrad is not implemented (RecIS's SparseAdamW refuses it too)")
        super().__init__(params, lr, beta1, beta2, eps, weight_decay, **options)
