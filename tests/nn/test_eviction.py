"""recis.nn.eviction.choose_victims against a sort of every eligible row by (score, id)."""

from __future__ import annotations

import pytest
import torch

from recis.nn.eviction import choose_victims, eviction_scores


def _reference_victims(scores: torch.Tensor, eligible: torch.Tensor, ids: torch.Tensor, count: int) -> list[int]:
    """The rows of the ``count`` lowest (score, id) among eligible rows: those below the last chosen
    score in row order, then the chosen ones at that score in id order."""
    rows = [r for r in range(scores.numel()) if eligible[r]]
    chosen = sorted(rows, key=lambda r: (int(scores[r]), int(ids[r])))[:count]
    if len(chosen) == len(rows):
        return rows
    threshold = int(scores[chosen[-1]])
    below = [r for r in rows if int(scores[r]) < threshold]
    ties = sorted((r for r in chosen if int(scores[r]) == threshold), key=lambda r: int(ids[r]))
    return below + ties


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("seed", range(6))
def test_victims_are_the_lowest_scores_in_row_order_then_ties_by_smaller_id(policy, seed):
    generator = torch.Generator().manual_seed(seed)
    rows = 300
    last_seen = torch.randint(0, 8, (rows,), generator=generator)  # few values: many ties
    sightings = torch.randint(0, 4, (rows,), generator=generator)
    eligible = torch.rand(rows, generator=generator) < 0.7
    ids = torch.randperm(10 * rows, generator=generator)[:rows] - 5 * rows
    scores = eviction_scores(policy, last_seen, sightings)
    available = int(eligible.sum())
    for count in (1, 2, 17, available // 2, available - 1, available, available + 5):
        got = choose_victims(scores, eligible, count, lambda r: ids[r])
        assert got.tolist() == _reference_victims(scores, eligible, ids, count), count


def test_ineligible_rows_are_never_chosen_even_with_the_lowest_scores():
    scores = torch.tensor([0, 0, 5, 3, 0, 9])
    eligible = torch.tensor([False, False, True, True, False, True])
    ids = torch.arange(6)
    assert choose_victims(scores, eligible, 2, lambda r: ids[r]).tolist() == [3, 2]
