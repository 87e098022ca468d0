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

from recis.ops import EpsilonPlacement, WeightDecay
from recis.optim.sparse_optimizer import SparseOptimizer


class SparseAdamWTF(SparseOptimizer):
    """TensorFlow's AdamW on the touched rows of hash tables. Arguments: see ``SparseOptimizer``."""

    weight_decay_rule = WeightDecay.DECOUPLED_NO_LR
    epsilon_placement = EpsilonPlacement.UNCORRECTED
    default_weight_decay = 1e-2
