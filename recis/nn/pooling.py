"""Pooling of the rows of bags: RecIS's combiners "sum", "mean" and "tile".

With rows ``e_j`` of the ids of bag b and weights ``w_j`` (1 without weights):

- ``sum``:  ``sum_j w_j e_j``
- ``mean``: ``sum_j w_j e_j / sum_j w_j`` (TensorFlow's ``embedding_lookup_sparse``
  convention); an empty bag, or one whose weights sum to 0, pools to zeros
- ``tile``: the first ``tile_len`` rows of the bag side by side, ``(tile_len * dim)``,
  zero-padded when the bag is shorter; weights are not applied

Everything is differentiable: the gradient of a pooled row reaches each id's row
(times its weight), without a padded ``(bags, length, dim)`` tensor for sum and mean.
"""

from __future__ import annotations

import torch

from recis.nn.bags import Bags

COMBINERS = ("sum", "mean", "tile")


def pool(rows: torch.Tensor, bags: Bags, combiner: str, tile_len: int | None = None) -> torch.Tensor:
    """The pooled ``(bags, dim)`` (``(bags, tile_len * dim)`` for tile) rows of ``bags``."""
    if bags.width and combiner != "tile":
        return _pool_equal_bags(rows, bags, combiner)
    bag_of = bags.bag_of_each_id()
    if combiner == "tile":
        return _tile(rows, bags, bag_of, tile_len)
    weighted = rows if bags.weights is None else rows * bags.weights.to(rows.dtype).unsqueeze(1)
    pooled = torch.zeros((bags.count, rows.shape[1]), dtype=rows.dtype, device=rows.device).index_add(
        0, bag_of, weighted
    )
    if combiner == "sum":
        return pooled
    if bags.weights is None:
        total = (bags.offsets[1:] - bags.offsets[:-1]).to(rows.dtype)
    else:
        total = torch.zeros(bags.count, dtype=rows.dtype, device=rows.device).index_add(
            0, bag_of, bags.weights.to(rows.dtype)
        )
    return pooled / torch.where(total == 0, torch.ones_like(total), total).unsqueeze(1)


def _pool_equal_bags(rows: torch.Tensor, bags: Bags, combiner: str) -> torch.Tensor:
    """Sum or mean of bags of one length (dense input): a reshape and a sum, no scatter."""
    if bags.weights is None and bags.width == 1:  # one id per bag: its row is the pooled row, as it is
        return rows
    grid = rows.reshape(bags.count, bags.width, rows.shape[1])
    if bags.weights is None:
        return grid.sum(dim=1) if combiner == "sum" else grid.mean(dim=1)
    weights = bags.weights.to(rows.dtype).reshape(bags.count, bags.width, 1)
    pooled = (grid * weights).sum(dim=1)
    if combiner == "sum":
        return pooled
    total = weights.sum(dim=1)
    return pooled / torch.where(total == 0, torch.ones_like(total), total)


def _tile(rows: torch.Tensor, bags: Bags, bag_of: torch.Tensor, tile_len: int) -> torch.Tensor:
    position = torch.arange(rows.shape[0], device=rows.device) - bags.offsets[bag_of]
    kept = position < tile_len
    tiled = torch.zeros((bags.count * tile_len, rows.shape[1]), dtype=rows.dtype, device=rows.device)
    tiled = tiled.index_add(0, bag_of[kept] * tile_len + position[kept], rows[kept])
    return tiled.reshape(bags.count, tile_len * rows.shape[1])
