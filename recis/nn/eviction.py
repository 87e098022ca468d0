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


def eviction_scores(policy: str, last_seen: torch.Tensor, sightings: torch.Tensor) -> torch.Tensor:
    """Each row's score under ``policy``; lower goes first."""
    if policy == "lru":
        return last_seen
    clock = last_seen.clamp(max=2**_CLOCK_BITS - 1)
    return (sightings.clamp(max=2**30) << _CLOCK_BITS) | clock


def choose_victims(
    scores: torch.Tensor, eligible: torch.Tensor, count: int, ids_of: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """The ``count`` eligible rows of lowest score (ties: smaller id first); ``ids_of`` maps rows to ids."""
    candidates = eligible.nonzero().squeeze(1)
    if count >= candidates.numel():
        return candidates
    candidate_scores = scores.index_select(0, candidates)
    threshold = candidate_scores.kthvalue(count).values
    below = candidates[candidate_scores < threshold]
    ties = candidates[candidate_scores == threshold]
    first_ties = ties[torch.argsort(ids_of(ties))[: count - below.numel()]]
    return torch.cat([below, first_ties])
