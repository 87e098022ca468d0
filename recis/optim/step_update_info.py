"""StepUpdateInfo: what an Adagrad update did to the rows it touched, kept every N-th step on request.

RecIS's ``save_update_info_interval`` feature, for debugging an optimizer: with interval
N > 0, an update that is the table's step t with t % N == 0 records, under the table's
name, the rows it updated and their ids, the accumulator before the update, the rows
before and after, and the gradient it received (after the mean over the accumulation
window, before weight decay and before the sign flip of ``maximize``). Each optimizer
update replaces what the previous one recorded, so the info describes the last update.
"""

from __future__ import annotations

import torch

SUFFIXES = (
    "updated_indices",
    "updated_ids",
    "updated_state_sum",
    "updated_params_before",
    "updated_params_after",
    "updated_grad",
    "last_saved_step",
)


def check_interval(interval: object) -> int:
    """``interval`` if it is an int >= 0 (0: never record), else a clear error."""
    if isinstance(interval, bool) or not isinstance(interval, int):
        raise TypeError(f"save_update_info_interval must be an int >= 0, got {interval!r}")
    if interval < 0:
        raise ValueError(f"save_update_info_interval must be >= 0, got {interval}")
    return interval


class StepUpdateInfo:
    """The records of the last update (see the module docstring)."""

    def __init__(self, interval: int = 0) -> None:
        self.interval = check_interval(interval)
        self._records: dict[str, torch.Tensor] = {}

    def due(self, step: int) -> bool:
        """Whether the update that is a table's step ``step`` is recorded."""
        return self.interval > 0 and step % self.interval == 0

    def start_update(self) -> None:
        """An optimizer update begins: forget the previous one's records."""
        self._records = {}

    def record(self, name: str, step: int, fields: dict[str, torch.Tensor]) -> None:
        """Keep ``fields`` (keyed by the suffixes above, less ``last_saved_step``) of table ``name``."""
        for suffix, value in fields.items():
            self._records[f"{name}_{suffix}"] = value.detach().clone()
        self._records[f"{name}_last_saved_step"] = torch.tensor(step, dtype=torch.int64)

    def snapshot(self) -> dict[str, torch.Tensor]:
        return dict(self._records)

    def clear(self) -> None:
        self._records = {}
