"""Hash partitioning: which rank owns an id.

owner(id) = mix64(id) mod world_size, with mix64 read as an unsigned 64-bit number
(``recis.ops.owner_rank``, which runs the native kernel where there is one).
"""

from __future__ import annotations

import torch

from recis import ops


def owner_rank(ids: torch.Tensor, world_size: int) -> torch.Tensor:
    """The owning rank of every int64 id, in ``[0, world_size)``."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    return ops.owner_rank(ids, world_size)
