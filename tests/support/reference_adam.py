"""A float64 NumPy reference of the Adam-family update rules, written from the formulas.

Importable from any test file of ``tests/`` as ``import reference_adam`` (pytest's default
``prepend`` import mode puts the directory of a test file without ``__init__.py`` on
``sys.path``). Nothing here imports recis or uses torch's optimizers.

Notation: g the gradient, p (theta) the parameter, m and v the first and second moments,
t the step (1 on the first update), bc1 = 1 - beta1^t, bc2 = 1 - beta2^t.

    moments:     m = beta1 * m + (1 - beta1) * g ;  v = beta2 * v + (1 - beta2) * g^2
    torch form:  p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)      torch.optim.Adam / AdamW
    TF form:     p -= lr * sqrt(bc2) / bc1 * m / (sqrt(v) + eps)      TF ApplyAdam, torch.optim.SparseAdam

The four rules (decay first, on the value before the Adam update):

    adam_step        L2 (g += wd * p), torch form          torch.optim.Adam(weight_decay=wd)
    sparse_adam_step L2 (g += wd * p), TF form             recis SparseAdam, torch.optim.SparseAdam (wd = 0)
    adamw_step       p *= 1 - lr * wd, torch form           recis SparseAdamW, torch.optim.AdamW
    adamw_tf_step    p *= 1 - wd, TF form                   recis SparseAdamWTF / AdamWTF, TF AdamW

Every ``*_step`` takes scalars or arrays (broadcast elementwise; ``t`` may be an array of
per-element or per-row steps) and returns new float64 ``(p, m, v)``; inputs are not changed.
``lazy_table_step`` applies a rule to the touched rows of a 2-D table, with the table-level
step count or per-row counts, the way the sparse optimizers do.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Array = np.ndarray
StepFn = Callable[..., tuple[Array, Array, Array]]


def _f64(x) -> Array:
    return np.asarray(x, dtype=np.float64)


def _moments(g: Array, m: Array, v: Array, beta1: float, beta2: float) -> tuple[Array, Array]:
    """m = beta1 * m + (1 - beta1) * g ;  v = beta2 * v + (1 - beta2) * g^2."""
    return beta1 * m + (1.0 - beta1) * g, beta2 * v + (1.0 - beta2) * g * g


def _bias_corrections(t, beta1: float, beta2: float) -> tuple[Array, Array]:
    t = _f64(t)
    if np.any(t < 1):
        raise ValueError(f"the step t counts from 1, got {t}")
    return 1.0 - beta1**t, 1.0 - beta2**t


def torch_form_update(p, m, v, t, *, lr: float, beta1: float, beta2: float, eps: float) -> Array:
    """p - lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)   (torch.optim.Adam / AdamW)."""
    bc1, bc2 = _bias_corrections(t, beta1, beta2)
    return _f64(p) - lr / bc1 * _f64(m) / (np.sqrt(_f64(v)) / np.sqrt(bc2) + eps)


def tf_form_update(p, m, v, t, *, lr: float, beta1: float, beta2: float, eps: float) -> Array:
    """p - lr * sqrt(bc2) / bc1 * m / (sqrt(v) + eps)   (TF ApplyAdam, torch.optim.SparseAdam)."""
    bc1, bc2 = _bias_corrections(t, beta1, beta2)
    return _f64(p) - lr * np.sqrt(bc2) / bc1 * _f64(m) / (np.sqrt(_f64(v)) + eps)


def adam_step(
    p,
    g,
    m,
    v,
    t,
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    maximize: bool = False,
) -> tuple[Array, Array, Array]:
    """Adam with L2 weight decay, torch form (torch.optim.Adam):

    g = -g if maximize; g += wd * p; m, v updated; p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps).
    """
    p, g, m, v = _f64(p), _f64(g), _f64(m), _f64(v)
    g = -g if maximize else g
    g = g + weight_decay * p
    m, v = _moments(g, m, v, beta1, beta2)
    return torch_form_update(p, m, v, t, lr=lr, beta1=beta1, beta2=beta2, eps=eps), m, v


def sparse_adam_step(
    p,
    g,
    m,
    v,
    t,
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    maximize: bool = False,
) -> tuple[Array, Array, Array]:
    """SparseAdam: L2 weight decay, TF form (recis SparseAdam; torch.optim.SparseAdam when wd = 0):

    g = -g if maximize; g += wd * p; m, v updated; p -= lr * sqrt(bc2) / bc1 * m / (sqrt(v) + eps).
    """
    p, g, m, v = _f64(p), _f64(g), _f64(m), _f64(v)
    g = -g if maximize else g
    g = g + weight_decay * p
    m, v = _moments(g, m, v, beta1, beta2)
    return tf_form_update(p, m, v, t, lr=lr, beta1=beta1, beta2=beta2, eps=eps), m, v


def adamw_step(
    p,
    g,
    m,
    v,
    t,
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    maximize: bool = False,
) -> tuple[Array, Array, Array]:
    """AdamW, decoupled decay scaled by lr, torch form (torch.optim.AdamW, recis SparseAdamW):

    g = -g if maximize; p *= 1 - lr * wd; m, v updated; p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps).
    """
    p, g, m, v = _f64(p), _f64(g), _f64(m), _f64(v)
    g = -g if maximize else g
    p = p * (1.0 - lr * weight_decay)
    m, v = _moments(g, m, v, beta1, beta2)
    return torch_form_update(p, m, v, t, lr=lr, beta1=beta1, beta2=beta2, eps=eps), m, v


def adamw_tf_step(
    p,
    g,
    m,
    v,
    t,
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    maximize: bool = False,
) -> tuple[Array, Array, Array]:
    """TF AdamW, decoupled decay NOT scaled by lr, TF form (TF DecoupledWeightDecayExtension over
    Adam/LazyAdam; recis SparseAdamWTF and AdamWTF):

    g = -g if maximize; p *= 1 - wd; m, v updated; p -= lr * sqrt(bc2) / bc1 * m / (sqrt(v) + eps).
    """
    p, g, m, v = _f64(p), _f64(g), _f64(m), _f64(v)
    g = -g if maximize else g
    p = p * (1.0 - weight_decay)
    m, v = _moments(g, m, v, beta1, beta2)
    return tf_form_update(p, m, v, t, lr=lr, beta1=beta1, beta2=beta2, eps=eps), m, v


RULES: dict[str, StepFn] = {
    "adam": adam_step,
    "sparse_adam": sparse_adam_step,
    "adamw": adamw_step,
    "adamw_tf": adamw_tf_step,
}


def coalesce(rows, grad) -> tuple[Array, Array]:
    """Sum the gradient rows that share a row index: (distinct ascending rows, summed float64 grads)."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    grad = _f64(grad)
    width = grad.size // rows.size if rows.size else (grad.shape[-1] if grad.ndim > 1 else 1)
    grad = grad.reshape(rows.size, width)
    unique, inverse = np.unique(rows, return_inverse=True)
    summed = np.zeros((unique.size, grad.shape[1]), dtype=np.float64)
    np.add.at(summed, inverse.reshape(-1), grad)
    return unique, summed


def lazy_table_step(
    rule: StepFn | str,
    weight: Array,
    exp_avg: Array,
    exp_avg_sq: Array,
    table_step: int,
    rows,
    grad,
    *,
    row_steps: Array | None = None,
    **hyper,
) -> int:
    """One lazy sparse-optimizer step of a 2-D float64 table, IN PLACE; returns the new table step.

    ``rows``/``grad`` are the gradient rows received in the step (duplicates allowed: they are
    summed first; zero rows is an empty batch, which still counts as a step). The table step
    becomes ``table_step + 1``; only the touched rows and their moments change. With
    ``row_steps`` (int array, one per row, changed in place) t is each touched row's own count
    plus one, else t is the new table step.
    """
    fn = RULES[rule] if isinstance(rule, str) else rule
    unique, g = coalesce(rows, grad)
    table_step += 1
    if unique.size == 0:
        return table_step
    if row_steps is None:
        t = table_step
    else:
        row_steps[unique] += 1
        t = row_steps[unique].astype(np.float64).reshape(-1, 1)
    p, m, v = fn(weight[unique], g, exp_avg[unique], exp_avg_sq[unique], t, **hyper)
    weight[unique], exp_avg[unique], exp_avg_sq[unique] = p, m, v
    return table_step


def run_steps(rule: StepFn | str, p0, grads, *, first_t: int = 1, **hyper) -> tuple[Array, Array, Array]:
    """Dense run: apply ``rule`` with every gradient of ``grads`` in turn, t = first_t, first_t + 1, ...

    Starts from p0 with zero moments; returns the final float64 ``(p, m, v)``.
    """
    fn = RULES[rule] if isinstance(rule, str) else rule
    p = _f64(p0)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for i, g in enumerate(grads):
        p, m, v = fn(p, g, m, v, first_t + i, **hyper)
    return p, m, v
