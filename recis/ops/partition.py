"""Hash partitioning of ids over ranks, the torch kernels (the reference of ``csrc/cpu/partition.cpp``).

owner(id) = mix64(id) mod world_size, with mix64 read as an unsigned 64-bit number, so
consecutive or strided ids spread evenly over ranks and any implementation with uint64
arithmetic (C++, CUDA) computes the same owner.
"""

from __future__ import annotations

import torch

from recis.ops.hashing import logical_shift_right, mix64


def owner_rank(ids: torch.Tensor, world_size: int) -> torch.Tensor:
    """The owning rank of every int64 id, in ``[0, world_size)``."""
    hashed = mix64(ids)
    # unsigned h mod W == (2 * (h >>> 1) + (h & 1)) mod W, all in non-negative int64
    return (2 * (logical_shift_right(hashed, 1) % world_size) + (hashed & 1)) % world_size


def unique_by_owner(ids: torch.Tensor, world_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distinct ``ids`` grouped by owner rank, as a sharded lookup sends them.

    Returns ``(unique, inverse, counts)``: ``unique`` holds rank 0's ids, then rank 1's, ...,
    each group in order of first appearance in ``ids``; ``unique[inverse] == ids``; rank r
    owns ``counts[r]`` of them.
    """
    sorted_unique, sorted_inverse = torch.unique(ids, return_inverse=True)
    positions = torch.arange(ids.numel(), device=ids.device)
    first = torch.full_like(sorted_unique, ids.numel()).scatter_reduce_(0, sorted_inverse, positions, "amin")
    owners = owner_rank(sorted_unique, world_size)
    order = torch.argsort(owners * (ids.numel() + 1) + first)
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=ids.device)
    counts = torch.bincount(owners, minlength=world_size)
    return sorted_unique[order], position[sorted_inverse], counts
