"""Slice and gen_slice: RecIS's key-space partition of a table, accepted for compatibility.

RecIS partitions a table's key space ``[0, slice_size)`` into one contiguous slice per
worker. recis partitions by the owner hash ``mix64(id) % world_size``
(``recis.dist.partition``) instead, so a ``Slice`` given to a table is validated and has
no effect.
"""

from __future__ import annotations


class Slice:
    """The slice ``[slice_begin, slice_end)`` of a key space of ``slice_size``."""

    def __init__(self, slice_beg: int, slice_end: int, slice_size: int) -> None:
        values = (slice_beg, slice_end, slice_size)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise TypeError(f"Slice bounds must be ints, got {values}")
        if not 0 <= slice_beg <= slice_end <= slice_size or slice_size <= 0:
            raise ValueError(f"Slice needs 0 <= begin <= end <= size and size > 0, got {values}")
        self.slice_begin = slice_beg
        self.slice_end = slice_end
        self.slice_size = slice_size

    def __repr__(self) -> str:
        return f"Slice({self.slice_begin}, {self.slice_end}, {self.slice_size})"


def gen_slice(shard_index: int = 0, shard_num: int = 1, slice_size: int = 65536) -> Slice:
    """Shard ``shard_index`` of ``shard_num`` near-equal contiguous slices (the first
    ``slice_size % shard_num`` one key longer)."""
    if not 0 <= shard_index < shard_num:
        raise ValueError(f"gen_slice: shard_index must be in [0, {shard_num}), got {shard_index}")
    base, longer = divmod(slice_size, shard_num)
    begin = shard_index * base + min(shard_index, longer)
    return Slice(begin, begin + base + (1 if shard_index < longer else 0), slice_size)


DEFAULT_SLICE = Slice(0, 65536, 65536)
