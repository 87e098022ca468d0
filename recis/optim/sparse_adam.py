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

from typing import Any

from recis.ops import EpsilonPlacement, WeightDecay
from recis.optim.hyperparameters import check_unsupported_flag
from recis.optim.sparse_optimizer import DEFAULT_BETA1, DEFAULT_BETA2, SparseOptimizer, TableParams


class SparseAdam(SparseOptimizer):
    """Adam on the touched rows of hash tables, as torch.optim.SparseAdam.

    Positional arguments in RecIS's order: ``(param_dict, lr, beta1, beta2, eps,
    weight_decay, amsgrad)``; ``amsgrad`` must be False (AMSGrad is not implemented,
    and RecIS raises ``ValueError`` for True too). Other arguments: see ``SparseOptimizer``.
    The default weight decay is 0 (as torch.optim.SparseAdam); RecIS's signature says 1e-2
    while its docstring's example says "no weight decay by default".
    """

    weight_decay_rule = WeightDecay.L2
    epsilon_placement = EpsilonPlacement.UNCORRECTED
    default_weight_decay = 0.0

    def __init__(
        self,
        params: TableParams | None = None,
        lr: float = 1e-3,
        beta1: float = DEFAULT_BETA1,
        beta2: float = DEFAULT_BETA2,
        eps: float = 1e-8,
        weight_decay: float | None = 0.0,
        amsgrad: bool = False,
        **options: Any,
    ) -> None:
        check_unsupported_flag("amsgrad", amsgrad, "AMSGrad is not implemented (RecIS's SparseAdam refuses it too)")
        super().__init__(params, lr, beta1, beta2, eps, weight_decay, **options)
