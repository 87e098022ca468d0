"""Checks of the optimizers' hyperparameters (Adam and Adagrad), shared by the sparse and dense ones.

Every check raises before anything is changed and names the offending value.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"Invalid {name}: {value}")
    return value


def _check_non_negative(name: str, label: str, value: Any) -> float:
    value = _as_float(name, value)
    if value < 0:
        raise ValueError(f"Invalid {label}: {value} (must be >= 0)")
    return value


def check_lr(lr: Any) -> float:
    return _check_non_negative("lr", "learning rate", lr)


def check_eps(eps: Any) -> float:
    return _check_non_negative("eps", "epsilon value", eps)


def check_weight_decay(weight_decay: Any) -> float:
    return _check_non_negative("weight_decay", "weight_decay value", weight_decay)


def check_lr_decay(lr_decay: Any) -> float:
    return _check_non_negative("lr_decay", "lr_decay value", lr_decay)


def check_initial_accumulator_value(value: Any) -> float:
    return _check_non_negative("initial_accumulator_value", "initial_accumulator_value", value)


def check_betas(betas: Any) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    checked = []
    for index, beta in enumerate(betas):
        beta = _as_float(f"beta{index + 1}", beta)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {index}: {beta} (must be in [0, 1))")
        checked.append(beta)
    return checked[0], checked[1]


def merge_betas(group: dict, default_betas: tuple[float, float]) -> tuple[float, float]:
    """The group's betas from either spelling: ``betas=(b1, b2)`` or ``beta1``/``beta2``.

    Both spellings at once are an error, even when they agree.
    """
    separate = {key: group[key] for key in ("beta1", "beta2") if key in group}
    if "betas" in group and separate:
        raise ValueError(f"give either betas={group['betas']!r} or {', '.join(separate)}, not both")
    if "betas" in group:
        return check_betas(group["betas"])
    return check_betas((separate.get("beta1", default_betas[0]), separate.get("beta2", default_betas[1])))


def check_unsupported_flag(name: str, value: Any, why: str) -> bool:
    """A RecIS switch for a variant that neither RecIS nor recis implements: False is accepted
    (and returned); True raises ``ValueError`` saying ``why``; anything else is a ``TypeError``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    if value:
        raise ValueError(f"{name}=True is not supported: {why}")
    return value


def tables_argument(params: Any, param_dict: Any) -> Any:
    """The tables of a sparse optimizer, given positionally (``params``) or as RecIS's ``param_dict=``."""
    if params is None and param_dict is None:
        raise TypeError("a sparse optimizer needs its tables: pass them first or as param_dict=")
    if params is not None and param_dict is not None:
        raise TypeError("give the tables once: as the first argument or as param_dict=, not both")
    return params if params is not None else param_dict
