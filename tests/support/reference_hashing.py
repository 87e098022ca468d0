"""A plain-Python splitmix64 finalizer, the reference the tensor ``recis.ops.hashing.mix64`` is tested against."""

from __future__ import annotations

MASK64 = (1 << 64) - 1


def mix64_int(value: int) -> int:
    """splitmix64 finalizer of the unsigned 64-bit pattern of ``value``; returns the int64 bit pattern."""
    x = value & MASK64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & MASK64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & MASK64
    x ^= x >> 31
    return x - (1 << 64) if x >= 1 << 63 else x
