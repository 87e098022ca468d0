"""SparseAdamWTF: TensorFlow's AdamW on the touched rows of hash tables.

With g the gradient of a touched row (duplicates and micro-batches summed, divided by
the accumulation count), theta the row, t the table's step count (or the row's, with
``bias_correction="row"``), bc1 = 1 - beta1^t, bc2 = 1 - beta2^t:

    theta *= 1 - weight_decay                     (decoupled, NOT scaled by lr)
    m      = beta1 * m + (1 - beta1) * g
    v      = beta2 * v + (1 - beta2) * g^2
    theta -= lr * sqrt(bc2) / bc1 * m / (sqrt(v) + eps)

Only rows that received a gradient are read or written (lazy, like LazyAdam and
torch.optim.SparseAdam); untouched rows keep their value and slots.
Reference: TensorFlow's DecoupledWeightDecayExtension (tf.contrib.opt / TensorFlow
Addons AdamW) over LazyAdam, whose update is TF's ApplyAdam: epsilon added to the
uncorrected sqrt(v), bias correction folded into the step size. Unlike TF, t is per
table, not the optimizer's global iteration count. (Keras 3's AdamW differs: it decays
by lr * weight_decay.)
"""

from __future__ import annotations

from typing import Any

from recis.ops import EpsilonPlacement, WeightDecay
from recis.optim.hyperparameters import check_unsupported_flag
from recis.optim.sparse_optimizer import DEFAULT_BETA1, DEFAULT_BETA2, SparseOptimizer, TableParams


class SparseAdamWTF(SparseOptimizer):
    """TensorFlow's AdamW on the touched rows of hash tables.

    Positional arguments in RecIS's order: ``(param_dict, lr, beta1, beta2, eps,
    weight_decay, use_nesterov)``; ``use_nesterov`` must be False (TF's Nesterov variant
    of Adam is not implemented, and RecIS raises ``ValueError`` for True too). Other
    arguments: see ``SparseOptimizer``.
    """

    weight_decay_rule = WeightDecay.DECOUPLED_NO_LR
    epsilon_placement = EpsilonPlacement.UNCORRECTED
    default_weight_decay = 1e-2

    def __init__(
        self,
        params: TableParams | None = None,
        lr: float = 1e-3,
        beta1: float = DEFAULT_BETA1,
        beta2: float = DEFAULT_BETA2,
        eps: float = 1e-8,
        weight_decay: float | None = 1e-2,
        use_nesterov: bool = False,
        **options: Any,
    ) -> None:
        check_unsupported_flag(
            "use_nesterov", use_nesterov, "Nesterov momentum is not implemented (RecIS's SparseAdamWTF refuses it too)"
        )
        super().__init__(params, lr, beta1, beta2, eps, weight_decay, **options)
