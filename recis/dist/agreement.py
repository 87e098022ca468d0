"""Checks that every rank was configured alike, made once at construction.

A table or optimizer configured differently on two ranks would silently diverge or
hang in a collective later; instead every rank gathers every rank's configuration
and raises the same error, naming the first rank and field that differ from rank 0.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


class ConfigMismatchError(ValueError):
    """Ranks were configured differently."""


def require_same_config(what: str, config: dict[str, Any], group: dist.ProcessGroup | None) -> None:
    """Raise ``ConfigMismatchError`` on every rank unless ``config`` is equal on all ranks."""
    configs: list[dict[str, Any] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(configs, config, group=group)
    reference = configs[0]
    for rank, other in enumerate(configs[1:], start=1):
        for field in sorted(set(reference) | set(other)):
            if reference.get(field) != other.get(field):
                raise ConfigMismatchError(
                    f"{what}: rank {rank} has {field}={other.get(field)!r} but rank 0 has "
                    f"{field}={reference.get(field)!r}; every rank must be configured alike"
                )
