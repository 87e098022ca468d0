"""wrapped_named_optimizer: a torch optimizer whose state dict is keyed by parameter names.

RecIS's wrapper for dense optimizers, so that a checkpoint's optimizer state follows the
parameters by name rather than by position: it loads into a model that gained, lost or
reordered parameters, or renamed some (``load_map``).

``wrapped_named_optimizer(torch.optim.AdamW)(model.named_parameters(), lr=...)`` takes
``(name, parameter)`` pairs (or param-group dicts of them, or one such dict) and behaves
as the wrapped class, except:

- ``state_dict()`` keys ``"state"`` by name and lists names in each group's ``"params"``
  (``state_dict(origin=True)``: the wrapped class's own, keyed by index, with torch's
  ``"param_names"``).
- ``load_state_dict(state_dict, valid_names=None, load_map=None, strict=True)`` takes either
  form: a named one, or an index-keyed one (a plain torch optimizer's), whose indices are
  named by its groups' ``"param_names"`` when it has them and by position otherwise.
  ``load_map`` (``{name here: name in state_dict}``) renames entries first; with ``strict``
  a name it gives that is not in the optimizer or not in the state dict raises
  ``RuntimeError``, otherwise it is skipped with a logged warning. Then the state of each
  parameter named in ``valid_names`` (default: every parameter) and in the state dict is
  loaded; the others keep theirs, and saved entries of names the optimizer lacks are
  skipped. Each group takes the hyperparameters of the saved group holding one of its
  parameters, or keeps its own. A saved state tensor whose shape differs from its
  parameter's raises ``ValueError`` ("size mismatch"). Everything is checked before
  anything changes; the given state dict is not modified.

``NamedAdagrad``, ``NamedAdam``, ``NamedAdamW``, ``NamedSGD`` and ``NamedAdamWTF`` are the
wrapped torch optimizers and recis's AdamWTF.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from typing import Any

import torch

from recis.optim.adamw_tf import AdamWTF

logger = logging.getLogger(__name__)


def _named_groups(named_params: Any) -> list[dict[str, Any]]:
    """The param groups of ``named_params``: (name, tensor) pairs, a list of group dicts, or one dict."""
    if isinstance(named_params, dict):
        return [named_params]
    items = list(named_params)
    if items and isinstance(items[0], dict):
        return items
    return [{"params": items}]


def _pairs(params: Any) -> list[tuple[str, torch.Tensor]]:
    items = [params] if isinstance(params, tuple) else list(params)
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(
                f"a named optimizer takes (name, parameter) pairs such as model.named_parameters(), got {item!r:.80}"
            )
    return items


def wrapped_named_optimizer(optimizer_cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """``optimizer_cls`` with a state dict keyed by parameter names (module docstring)."""

    class NamedOptimizer(optimizer_cls):  # type: ignore[misc, valid-type]
        named_optimizer = True

        def __init__(self, named_params: Iterable[Any] | dict[str, Any], *args: Any, **kwargs: Any) -> None:
            self.param_index_map: dict[str, int] = {}
            self.index_param_map: dict[int, str] = {}
            super().__init__(_named_groups(named_params), *args, **kwargs)

        def add_param_group(self, param_group: dict[str, Any]) -> None:
            pairs = _pairs(param_group["params"])
            names = [name for name, _ in pairs]
            repeated = sorted({name for name in names if names.count(name) > 1 or name in self.param_index_map})
            if repeated:
                raise RuntimeError(f"parameter names must be unique in a named optimizer; repeated: {repeated}")
            super().add_param_group({**param_group, "params": pairs})
            for name in names:
                index = len(self.index_param_map)
                self.param_index_map[name] = index
                self.index_param_map[index] = name

        def state_dict(self, origin: bool = False) -> dict[str, Any]:
            state = super().state_dict()
            if origin:
                return state
            names = self.index_param_map
            return {
                "state": {names[index]: entry for index, entry in state["state"].items()},
                "param_groups": [
                    {**{k: v for k, v in group.items() if k != "params"}, "params": [names[i] for i in group["params"]]}
                    for group in state["param_groups"]
                ],
            }

        def load_state_dict(
            self,
            state_dict: dict[str, Any],
            valid_names: set[str] | None = None,
            load_map: dict[str, str] | None = None,
            strict: bool = True,
        ) -> None:
            saved_state, saved_groups = _by_name(state_dict, self.index_param_map)
            if load_map:
                saved_state, saved_groups = self._renamed(saved_state, saved_groups, load_map, strict)
            if valid_names is None:
                valid_names = set(self.param_index_map)
            unknown = sorted(set(saved_state) - set(self.param_index_map))
            if unknown:
                logger.warning("named optimizer: no parameter here for %s of the state dict; skipped", unknown)
            current = super().state_dict()
            for name, entry in saved_state.items():
                if name in valid_names and name in self.param_index_map:
                    index = self.param_index_map[name]
                    self._check_shapes(name, index, entry)
                    current["state"][index] = entry
            current["param_groups"] = [_group_from_saved(group, saved_groups) for group in current["param_groups"]]
            super().load_state_dict(current)

        def _renamed(
            self, saved_state: dict, saved_groups: list[dict], load_map: dict[str, str], strict: bool
        ) -> tuple[dict, list[dict]]:
            saved_state, saved_groups = dict(saved_state), copy.deepcopy(saved_groups)
            for name, saved_name in load_map.items():
                problem = None
                if name not in self.param_index_map:
                    problem = f"load_map names {name!r}, which this optimizer does not have"
                elif saved_name not in saved_state:
                    problem = f"load_map maps {name!r} to {saved_name!r}, which the state dict does not have"
                if problem is not None:
                    if strict:
                        raise RuntimeError(f"named optimizer: {problem}")
                    logger.warning("named optimizer: %s; skipped", problem)
                    continue
                saved_state[name] = saved_state.pop(saved_name)
                for group in saved_groups:
                    group["params"] = [name if p == saved_name else p for p in group["params"]]
            return saved_state, saved_groups

        def _check_shapes(self, name: str, index: int, entry: Any) -> None:
            param = self._param_at(index)
            for key, value in entry.items() if isinstance(entry, dict) else ():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                    raise ValueError(
                        f"size mismatch for {name}: state {key!r} has shape {tuple(value.shape)}, "
                        f"the parameter {tuple(param.shape)}"
                    )

        def _param_at(self, index: int) -> torch.Tensor:
            return [p for group in self.param_groups for p in group["params"]][index]

    NamedOptimizer.__name__ = NamedOptimizer.__qualname__ = f"Named{optimizer_cls.__name__}"
    return NamedOptimizer


def _by_name(state_dict: dict[str, Any], own_names: dict[int, str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(state by name, groups listing names)`` of either form of state dict; the input is left as it is."""
    groups = [dict(group) for group in state_dict["param_groups"]]
    if all(isinstance(p, str) for group in groups for p in group["params"]):
        return dict(state_dict["state"]), groups
    if all("param_names" in group for group in groups):
        index_names = {i: n for group in groups for i, n in zip(group["params"], group["param_names"])}
    else:
        logger.warning("named optimizer: the state dict has no param_names; its parameters are taken by position")
        index_names = own_names
    state = {index_names[index]: entry for index, entry in state_dict["state"].items() if index in index_names}
    for group in groups:
        group["params"] = [index_names[i] for i in group["params"] if i in index_names]
    return state, groups


def _group_from_saved(group: dict[str, Any], saved_groups: list[dict[str, Any]]) -> dict[str, Any]:
    """``group`` (torch's index form, with ``param_names``) with the hyperparameters of the
    saved group that holds one of its parameters, if any."""
    names = set(group.get("param_names", []))
    for saved in saved_groups:
        if names & set(saved["params"]):
            hyper = {k: v for k, v in saved.items() if k not in ("params", "param_names")}
            return {**group, **hyper}
    return group


NamedAdagrad = wrapped_named_optimizer(torch.optim.Adagrad)
NamedAdam = wrapped_named_optimizer(torch.optim.Adam)
NamedAdamW = wrapped_named_optimizer(torch.optim.AdamW)
NamedSGD = wrapped_named_optimizer(torch.optim.SGD)
NamedAdamWTF = wrapped_named_optimizer(AdamWTF)
