"""64-bit mixing hash over int64 tensors.

``mix64`` is the splitmix64 finalizer (Steele, Lea and Flood, "Fast splittable
pseudorandom number generators", 2014). It spreads structured ids (consecutive,
strided, shifted) over all 64 bits, so the id map's buckets, the owner rank of an id
and the deterministic initial value of a row are all well distributed.

torch has no unsigned 64-bit arithmetic on every op, so the finalizer is written on
int64: multiplication wraps modulo 2**64 exactly as uint64 does, and a logical right
shift is an arithmetic shift with the sign-extended bits masked off.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _as_int64(value: int) -> int:
    """The int64 whose bit pattern equals the unsigned 64-bit ``value``."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_MUL1 = _as_int64(0xBF58476D1CE4E5B9)
_MUL2 = _as_int64(0x94D049BB133111EB)
GOLDEN_GAMMA = _as_int64(0x9E3779B97F4A7C15)


def logical_shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``x >> bits`` treating the int64 ``x`` as unsigned."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finalizer of every element of the int64 tensor ``x``."""
    x = x ^ logical_shift_right(x, 30)
    x = x * _MUL1
    x = x ^ logical_shift_right(x, 27)
    x = x * _MUL2
    return x ^ logical_shift_right(x, 31)


def mix64_(x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """``mix64`` in place on the contiguous int64 ``x``, using ``scratch`` (same shape) for the
    shifted copies; returns ``x``. The same integer operations, so the same bits, with no new tensor."""
    for bits, multiplier in ((30, _MUL1), (27, _MUL2), (31, None)):
        torch.bitwise_right_shift(x, bits, out=scratch)
        scratch.bitwise_and_((1 << (64 - bits)) - 1)
        x.bitwise_xor_(scratch)
        if multiplier is not None:
            x.mul_(multiplier)
    return x
