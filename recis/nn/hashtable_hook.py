"""AdmitHook and FilterHook: which new ids get rows, and which rows a filter removes.

The configuration objects of RecIS's ``recis.nn.hashtable_hook``, with its names:

- ``AdmitHook("ReadOnly")``: absent ids get no row; they read zeros and get no update.
- ``AdmitHook("Frequency", {"min_count": k})``: an absent id gets a row at its k-th
  sighting (a sighting: a training lookup that contains the id, however often);
  until then it reads zeros and gets no update. Sightings are counted in a count-min
  sketch of ``sketch_depth`` rows of ``sketch_width`` counters (defaults 4 and 2**18,
  8 MiB), see ``recis.nn.frequency_sketch``. recis only (RecIS has no counter admission).
- ``FilterHook("GlobalStepFilter", {"filter_step": N})``: each run of the filter (see
  ``recis.hooks.filter_hook.HashTableFilterHook``) removes the rows whose id was last
  seen more than N filter steps ago, as RecIS does: ``last_seen < global_step - N``.

Unlike RecIS, a bad name or parameter raises ``ValueError`` here, when the hook is made.
"""

from __future__ import annotations

import json
from typing import Any

_ADMIT_PARAMS = {"ReadOnly": {}, "Frequency": {"min_count": None, "sketch_width": 2**18, "sketch_depth": 4}}
_FILTER_PARAMS = {"GlobalStepFilter": {"filter_step": 100}}


def _positive_int(kind: str, name: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'{kind}("{name}"): {key} must be an int >= 1, got {value!r}')
    return value


class BaseHook:
    """A named policy with parameters; equal hooks have equal names and parameters."""

    _kind = "hook"
    _known: dict[str, dict[str, Any]] = {}

    def __init__(self, name: str, params: dict[str, Any] | None = None) -> None:
        if name not in self._known:
            raise ValueError(f"unknown {self._kind} {name!r}; known: {sorted(self._known)}")
        params = dict(params or {})
        unknown = sorted(set(params) - set(self._known[name]))
        if unknown:
            known = sorted(self._known[name])
            raise ValueError(f'{self._kind}("{name}"): unknown parameters {unknown}; known: {known}')
        resolved = {**self._known[name], **params}
        for key, value in resolved.items():
            if value is None:
                raise ValueError(f'{self._kind}("{name}") needs the parameter {key!r}')
            _positive_int(self._kind, name, key, value)
        self._name = name
        self._params = params
        self._resolved = resolved

    @property
    def name(self) -> str:
        return self._name

    @property
    def params(self) -> dict[str, Any]:
        """The parameters as given."""
        return self._params

    @property
    def settings(self) -> dict[str, Any]:
        """Every parameter, defaults included."""
        return dict(self._resolved)

    def param(self, key: str) -> int:
        """A parameter, or its default when not given."""
        return self._resolved[key]

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and (other.name, other.settings) == (self._name, self._resolved)

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._name, tuple(sorted(self._resolved.items()))))

    def __str__(self) -> str:
        return json.dumps({"name": self._name, "params": self._params}, sort_keys=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._name!r}, {self._params!r})"


class AdmitHook(BaseHook):
    """Which absent ids a training lookup gives rows to (see the module docstring)."""

    _kind = "AdmitHook"
    _known = _ADMIT_PARAMS

    def __init__(self, name: str, params: dict[str, Any] | None = None) -> None:
        super().__init__(name, params)
        width = self._resolved.get("sketch_width", 1)
        if width & (width - 1):
            raise ValueError(f'AdmitHook("{name}"): sketch_width must be a power of two, got {width}')

    @property
    def type(self) -> str:
        return "admit"


class FilterHook(BaseHook):
    """Which rows a table's filter runs remove (see the module docstring)."""

    _kind = "FilterHook"
    _known = _FILTER_PARAMS

    @property
    def type(self) -> str:
        return "filter"
