"""What AdamWTF's ``load_state_dict`` checks before torch's load changes anything.

torch's ``Optimizer.load_state_dict`` checks only the number of groups and of
parameters in each; it takes any state entry as it is. An entry that ``step()`` later
cannot use (a step count of -1 or NaN, a moment of another shape, a missing key) then
writes NaN rows, or raises in the middle of a step after earlier groups were updated.
``checked_state_dict`` refuses such a state dict first, naming the entry and the field.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

_ENTRY_KEYS = ("exp_avg", "exp_avg_sq", "step")
_HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay")
# Keys every group of a recis sparse optimizer holds and AdamWTF's never do.
_SPARSE_GROUP_KEYS = ("bias_correction", "state_dtype", "skip_nonfinite")


def _step_value(step: Any) -> float | None:
    """The step count a saved ``step`` holds, or None when it is not a whole number >= 0."""
    if isinstance(step, torch.Tensor):
        if step.numel() != 1 or step.is_complex() or step.dtype == torch.bool:
            return None
        step = step.item()
    if isinstance(step, bool) or not isinstance(step, int | float):
        return None
    if not math.isfinite(step) or step < 0 or step != int(step):
        return None
    return float(step)


def _entry_problem(param: torch.Tensor, entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return f"is a {type(entry).__name__}, not a dict"
    if sorted(entry, key=str) != list(_ENTRY_KEYS):
        return f"holds {sorted(entry, key=str)}; AdamWTF's state holds {list(_ENTRY_KEYS)}"
    if _step_value(entry["step"]) is None:
        return f"has step={entry['step']!r}; it must be a whole number >= 0"
    for key in ("exp_avg", "exp_avg_sq"):
        moment = entry[key]
        if not isinstance(moment, torch.Tensor) or not moment.is_floating_point():
            return f"has {key} of type {getattr(moment, 'dtype', type(moment).__name__)}; it must be a floating tensor"
        if moment.shape != param.shape:
            return f"has {key} of shape {tuple(moment.shape)}; its parameter has shape {tuple(param.shape)}"
    if bool((entry["exp_avg_sq"] < 0).any()):
        return "has negative values in exp_avg_sq"
    return None


def checked_state_dict(
    state_dict: Any, param_groups: list[dict[str, Any]], check_group: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    """``state_dict`` if AdamWTF with ``param_groups`` can load it and step with it (a step
    count saved as a number becomes a 0-dim float32 tensor, torch's layout); else
    ``ValueError`` naming the problem.

    Checked: the groups and their sizes match; each saved group has valid hyperparameters
    (``check_group``, what ``step()`` checks) and is not a sparse optimizer's; each state
    entry is keyed by a parameter index of the saved groups and holds exactly ``step`` (a
    whole number >= 0), ``exp_avg`` and ``exp_avg_sq`` (floating tensors of the parameter's
    shape, ``exp_avg_sq`` never negative; NaN passes, as a NaN gradient leaves it).
    """
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
        raise ValueError("an optimizer state dict is a dict with 'state' and 'param_groups'")
    saved_groups = state_dict["param_groups"]
    if not isinstance(saved_groups, list) or len(saved_groups) != len(param_groups):
        count = len(saved_groups) if isinstance(saved_groups, list) else saved_groups
        raise ValueError(f"state dict has {count} param groups, the optimizer {len(param_groups)}")
    index_to_param = {}
    for i, (saved, group) in enumerate(zip(saved_groups, param_groups)):
        if not isinstance(saved, dict) or not isinstance(saved.get("params"), list):
            raise ValueError(f"state dict param group {i} must be a dict with a 'params' list")
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"param group {i} has {len(group['params'])} parameters, the state dict {len(saved['params'])}"
            )
        missing = [key for key in _HYPERPARAMETERS if key not in saved]
        if missing:
            raise ValueError(f"state dict param group {i} lacks {missing}")
        sparse_keys = [key for key in _SPARSE_GROUP_KEYS if key in saved]
        if sparse_keys:
            raise ValueError(
                f"state dict param group {i} holds {sparse_keys}: it is a sparse optimizer's state dict, not AdamWTF's"
            )
        try:
            check_group(saved)
        except (TypeError, ValueError) as error:
            raise ValueError(f"state dict param group {i}: {error}") from error
        index_to_param.update(zip(saved["params"], group["params"]))
    state = {}
    for index, entry in state_dict["state"].items():
        if index not in index_to_param:
            raise ValueError(f"state dict has an entry for parameter {index!r}, which no param group holds")
        problem = _entry_problem(index_to_param[index], entry)
        if problem:
            raise ValueError(f"state dict entry {index!r} {problem}")
        step = entry["step"]
        state[index] = {**entry, "step": step if isinstance(step, torch.Tensor) else torch.tensor(float(step))}
    return {**state_dict, "state": state}
