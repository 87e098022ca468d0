"""FrequencySketch: how often each id was sighted, in fixed memory (a count-min sketch).

``depth`` rows of ``width`` int64 counters (width a power of two). Sighting an id adds
one to one counter per row, at ``mix64(id + d * golden_gamma) & (width - 1)`` for row
d; its estimate is the smallest of those counters (Cormode and Muthukrishnan, "An
improved data stream summary: the count-min sketch", 2005). An estimate never falls
below the true count, and exceeds it by more than ``e / width * N`` (N: all sightings
counted) with probability at most ``exp(-depth)``.

Counts are additive: the sketches of ranks that each counted their own ids sum to the
sketch of one process that counted them all.
"""

from __future__ import annotations

import torch

from recis.ops.hashing import GOLDEN_GAMMA, mix64


class FrequencySketch:
    """A count-min sketch of int64 ids (see the module docstring)."""

    def __init__(self, width: int, depth: int, device: torch.device) -> None:
        if width & (width - 1):
            raise ValueError(f"sketch_width must be a power of two, got {width}")
        self.counters = torch.zeros((depth, width), dtype=torch.int64, device=device)

    @property
    def width(self) -> int:
        return self.counters.shape[1]

    @property
    def depth(self) -> int:
        return self.counters.shape[0]

    def _cells(self, ids: torch.Tensor) -> torch.Tensor:
        """``(depth, len(ids))`` flat indices into ``counters`` of each id's counters."""
        salts = torch.arange(self.depth, dtype=torch.int64, device=ids.device).unsqueeze(1) * GOLDEN_GAMMA
        columns = mix64(ids.unsqueeze(0) + salts) & (self.width - 1)
        return columns + torch.arange(self.depth, device=ids.device).unsqueeze(1) * self.width

    def estimate(self, ids: torch.Tensor) -> torch.Tensor:
        """An upper bound of each id's sightings, int64."""
        if ids.numel() == 0:
            return torch.zeros(0, dtype=torch.int64, device=ids.device)
        return self.counters.reshape(-1)[self._cells(ids)].amin(dim=0)

    def add(self, ids: torch.Tensor) -> None:
        """Count one sighting of each id (repeats count again)."""
        if ids.numel() == 0:
            return
        cells = self._cells(ids).reshape(-1)
        self.counters.reshape(-1).index_add_(0, cells, torch.ones_like(cells))
