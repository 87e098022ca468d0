"""GradientBuffer: a table's gradient since its last update, as values keyed by row or id.

Backward adds one part per lookup (keys distinct within it); ``summed()`` returns one
coalesced ``(keys, float32 gradient)``, summing keys that repeat across parts (several
lookups, or the micro-batches of a gradient-accumulation window). The sum is kept, so
reading it again costs nothing.
"""

from __future__ import annotations

import torch

from recis.ops import coalesce_rows


class GradientBuffer:
    def __init__(self) -> None:
        self._parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._summed = False  # one part whose keys are distinct

    def __bool__(self) -> bool:
        """Whether a gradient (possibly of zero keys) arrived since the last ``clear``."""
        return bool(self._parts)

    def add(self, keys: torch.Tensor, grad: torch.Tensor, *, distinct: bool) -> None:
        """Add ``grad`` rows for ``keys`` (``distinct`` when no key repeats within this part)."""
        grad = grad.to(torch.promote_types(grad.dtype, torch.float32))
        self._summed = distinct and not self._parts
        self._parts.append((keys, grad))

    def summed(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(distinct keys, gradient rows)`` summed per key, or None if nothing arrived.

        Do not modify the result in place: it is the stored sum itself.
        """
        if not self._parts:
            return None
        if not self._summed:
            keys = torch.cat([keys for keys, _ in self._parts])
            grads = torch.cat([grad for _, grad in self._parts])
            self._parts = [coalesce_rows(keys, grads)]
            self._summed = True
        return self._parts[0]

    def clear(self) -> None:
        self._parts = []
        self._summed = False

    def renumber(self, moved_from: torch.Tensor, moved_to: torch.Tensor) -> None:
        """Rows renumbered ``moved_from[i] -> moved_to[i]`` (row keys only): follow them."""
        if not self._parts or moved_from.numel() == 0:
            return
        renumbered = []
        for keys, grad in self._parts:
            order = torch.argsort(moved_from)
            sorted_from = moved_from[order]
            position = torch.searchsorted(sorted_from, keys).clamp(max=sorted_from.numel() - 1)
            moved = sorted_from[position] == keys
            renumbered.append((torch.where(moved, moved_to[order][position], keys), grad))
        self._parts = renumbered

    def to(self, device: torch.device) -> None:
        self._parts = [(keys.to(device), grad.to(device)) for keys, grad in self._parts]
