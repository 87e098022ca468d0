"""Bags: the ids of a feature input as flat ids, bag offsets and weights.

An embedding layer pools the rows of each bag. Inputs, as RecIS takes them:

- a dense int64 tensor ``(batch, k)`` (or with more leading dims): the last dim is the
  bag; the pooled output has shape ``ids.shape[:-1] + (dim,)``. A 1-D ``(batch,)``
  tensor is a bag of one id per sample. ``input_weights`` has the ids' shape.
- a ``RaggedTensor(values, offsets, weight)``: bag i is ``values[offsets[i]:offsets[i+1]]``,
  weighted by its ``weight``; the output has one row per bag.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from recis.ragged.tensor import RaggedTensor


@dataclass
class Bags:
    ids: torch.Tensor  # (n,) int64
    offsets: torch.Tensor  # (bags + 1,) int64
    weights: torch.Tensor | None  # (n,) or None
    shape: tuple[int, ...]  # the leading shape of the pooled output
    width: int | None = None  # every bag's length, when they are all alike (dense input)

    @property
    def count(self) -> int:
        return self.offsets.numel() - 1

    def bag_of_each_id(self) -> torch.Tensor:
        lengths = self.offsets[1:] - self.offsets[:-1]
        return torch.repeat_interleave(torch.arange(self.count, device=self.ids.device), lengths)


def as_bags(name: str, inputs: torch.Tensor | RaggedTensor, input_weights: torch.Tensor | None = None) -> Bags:
    """The bags of one feature's input, or a ``TypeError``/``ValueError`` naming the feature."""
    if isinstance(inputs, RaggedTensor):
        if input_weights is not None:
            raise ValueError(f"feature {name!r}: a RaggedTensor carries its own weight; input_weights must be None")
        offsets = inputs.offsets()[0]
        return Bags(inputs.values(), offsets, inputs.weight(), (offsets.numel() - 1,))
    if not isinstance(inputs, torch.Tensor) or inputs.is_sparse:
        raise TypeError(
            f"feature {name!r}: ids must be a dense int64 tensor or a RaggedTensor, got {type(inputs).__name__}"
        )
    if inputs.is_floating_point() or inputs.dtype == torch.bool or inputs.dim() == 0:
        raise TypeError(f"feature {name!r}: ids must be an int64 tensor of at least one dim, got {inputs.dtype}")
    shape = tuple(inputs.shape) if inputs.dim() == 1 else tuple(inputs.shape[:-1])
    grid = inputs.reshape(math.prod(shape), 1 if inputs.dim() == 1 else inputs.shape[-1])
    if input_weights is not None and tuple(input_weights.shape) != tuple(inputs.shape):
        raise ValueError(
            f"feature {name!r}: input_weights have shape {tuple(input_weights.shape)}, the ids {tuple(inputs.shape)}"
        )
    bags, width = grid.shape
    offsets = torch.arange(bags + 1, device=inputs.device) * width
    weights = None if input_weights is None else input_weights.reshape(-1)
    return Bags(grid.reshape(-1).to(torch.int64), offsets, weights, shape, width)
