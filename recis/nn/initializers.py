"""Initial values of new rows, deterministic in (seed, id).

A row's first value depends only on the table's seed, the id and the element index,
never on insertion order, batch composition, device or world size: the distributed
layer relies on this so that any rank creating an id creates the same row.

Each element draws a counter-based random number: ``mix64`` of (id, seed, element
index) gives 64 random bits, whose top 53 become a float64 uniform in [0, 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch

from recis.ops.hashing import GOLDEN_GAMMA, mix64

_INV_2_POW_53 = 1.0 / (1 << 53)
_MASK64 = (1 << 64) - 1


class Initializer(Protocol):
    """Anything that maps ids to initial rows.

    Called as ``initializer(ids, embedding_shape, seed)`` with 1-D int64 ``ids``; returns
    a floating tensor of shape ``ids.shape + embedding_shape``. It must be a pure
    function of its arguments for sharded tables to agree across ranks.
    """

    def __call__(self, ids: torch.Tensor, embedding_shape: Sequence[int], seed: int) -> torch.Tensor: ...


def _as_int64(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _stream_key(seed: int, stream: int) -> int:
    """An int64 key per (seed, stream), one-to-one in the seed for each stream.

    ``2 * seed + stream * 0x10001`` for seeds in [-2**62, 2**62); larger seeds take the odd
    keys (wrapped to int64), which the doubled smaller seeds leave free.
    """
    odd = 0 if -(2**62) <= seed < 2**62 else 1
    return _as_int64(2 * seed + odd + stream * 0x10001)


def uniform_bits(ids: torch.Tensor, width: int, seed: int, stream: int = 0) -> torch.Tensor:
    """Float64 uniforms in [0, 1) of shape ``(len(ids), width)``, a pure function of the inputs."""
    key = mix64(ids.reshape(-1, 1) ^ mix64(torch.tensor(_stream_key(seed, stream), dtype=torch.int64)))
    counters = torch.arange(1, width + 1, dtype=torch.int64, device=ids.device) * GOLDEN_GAMMA
    bits = mix64(key + counters)
    return ((bits >> 11) & ((1 << 53) - 1)).to(torch.float64) * _INV_2_POW_53


class ConstantInitializer:
    """Every element of a new row equals ``value``."""

    def __init__(self, value: float = 0.0) -> None:
        self.value = float(value)

    def __call__(self, ids: torch.Tensor, embedding_shape: Sequence[int], seed: int) -> torch.Tensor:
        return torch.full((ids.numel(), *embedding_shape), self.value, dtype=torch.float64, device=ids.device)

    def __repr__(self) -> str:
        return f"ConstantInitializer({self.value})"


class UniformInitializer:
    """Elements uniform in [low, high), deterministic in (seed, id, element)."""

    def __init__(self, low: float = -0.01, high: float = 0.01) -> None:
        if not low <= high:
            raise ValueError(f"UniformInitializer needs low <= high, got low={low}, high={high}")
        self.low, self.high = float(low), float(high)

    def __call__(self, ids: torch.Tensor, embedding_shape: Sequence[int], seed: int) -> torch.Tensor:
        width = math.prod(embedding_shape)
        u = uniform_bits(ids, width, seed)
        return (self.low + (self.high - self.low) * u).reshape(ids.numel(), *embedding_shape)

    def __repr__(self) -> str:
        return f"UniformInitializer({self.low}, {self.high})"


class NormalInitializer:
    """Elements from N(mean, std^2) by the Box-Muller transform, deterministic in (seed, id, element)."""

    def __init__(self, mean: float = 0.0, std: float = 0.01) -> None:
        if std < 0:
            raise ValueError(f"NormalInitializer needs std >= 0, got std={std}")
        self.mean, self.std = float(mean), float(std)

    def __call__(self, ids: torch.Tensor, embedding_shape: Sequence[int], seed: int) -> torch.Tensor:
        width = math.prod(embedding_shape)
        radius_u = 1.0 - uniform_bits(ids, width, seed, stream=1)  # in (0, 1]: log is finite
        angle_u = uniform_bits(ids, width, seed, stream=2)
        z = torch.sqrt(-2.0 * torch.log(radius_u)) * torch.cos(2.0 * math.pi * angle_u)
        return (self.mean + self.std * z).reshape(ids.numel(), *embedding_shape)

    def __repr__(self) -> str:
        return f"NormalInitializer({self.mean}, {self.std})"


def default_initializer(embedding_shape: Sequence[int]) -> Initializer:
    """Uniform in +-1/sqrt(dim), dim the row's element count.

    Zero rows would leave factorization-machine style interactions without gradient,
    so the default is random, and scaled so a row's norm stays near 1/sqrt(3).
    """
    bound = 1.0 / math.sqrt(math.prod(embedding_shape))
    return UniformInitializer(-bound, bound)
