"""Hash partitioning: which rank owns an id.

owner(id) = mix64(id) mod world_size, with mix64 read as an unsigned 64-bit number,
so consecutive or strided ids spread evenly over ranks and any implementation with
uint64 arithmetic (C++, CUDA) computes the same owner.
"""

from __future__ import annotations

import torch

from recis.ops.hashing import logical_shift_right, mix64


def owner_rank(ids: torch.Tensor, world_size: int) -> torch.Tensor:
    """The owning rank of every int64 id, in ``[0, world_size)``."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    hashed = mix64(ids)
    # unsigned h mod W == (2 * (h >>> 1) + (h & 1)) mod W, all in non-negative int64
    return (2 * (logical_shift_right(hashed, 1) % world_size) + (hashed & 1)) % world_size
