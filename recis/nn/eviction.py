"""Eviction: which rows a full table gives up for new ids.

A policy scores every row from its metadata columns; the rows with the lowest scores
go first, ties broken by the smaller id (so the choice does not depend on row order):

- ``"lru"``: least recently used. Score: ``last_seen``, the table's lookup clock at the
  row's last training lookup.
- ``"lfu"``: least frequently used. Score: ``sightings`` (training lookups containing
  the id since it got its row), ties by ``last_seen``.

Only eligible rows are candidates (the table protects the rows of the current lookup
and those with a gradient pending). The choice is O(rows): a k-th value selection,
and a sort of the ties at the threshold only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

EVICTION_POLICIES = ("lru", "lfu")
LAST_SEEN = "last_seen"
SIGHTINGS = "sightings"
_CLOCK_BITS = 32
_INELIGIBLE = torch.iinfo(torch.int64).max  # the score choose_victims gives ineligible rows


def eviction_scores(policy: str, last_seen: torch.Tensor, sightings: torch.Tensor) -> torch.Tensor:
    """Each row's score under ``policy``; lower goes first."""
    if policy == "lru":
        return last_seen
    clock = last_seen.clamp(max=2**_CLOCK_BITS - 1)
    return (sightings.clamp(max=2**30) << _CLOCK_BITS) | clock


def choose_victims(
    scores: torch.Tensor, eligible: torch.Tensor, count: int, ids_of: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """The ``count`` eligible rows of lowest score (ties: smaller id first); ``ids_of`` maps rows to ids.

    The rows scoring below the ``count``-th lowest eligible score, in row order, then the
    lowest ids among the rows scoring it. Scores are below the int64 maximum, which
    stands in for the ineligible rows, so the temporaries have one entry per row of the
    table (the same sizes at every call once the table is full) or per victim: a full
    table makes no temporaries whose size varies from step to step with the number of
    eligible rows, which the allocator would keep or return unevenly.
    """
    if count >= int(eligible.sum()):
        return eligible.nonzero().squeeze(1)
    masked = torch.where(eligible, scores, _INELIGIBLE)
    threshold = masked.kthvalue(count).values
    below = (masked < threshold).nonzero().squeeze(1)
    ties = (masked == threshold).nonzero().squeeze(1)
    first_ties = ties[torch.argsort(ids_of(ties))[: count - below.numel()]]
    return torch.cat([below, first_ties])
