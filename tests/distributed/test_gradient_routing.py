"""The gradient of one lookup goes to the owners with the owner counts the lookup found: the
step hashes no id to its owner again, also after a lookup without gradients in between. A
gradient that is no single lookup's (two lookups in a step) is routed by hashing, as before.
Either way the tables train to the same bits."""

from __future__ import annotations

import contextlib
from unittest import mock

import torch
from dist_harness import run_ranks

import recis.dist.exchange
from recis.dist import ShardedHashTable, ShardedOptimizer, sharded_lookup
from recis.optim import SparseAdamW


def _ids(rank: int, step: int, part: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 * step + 10 * rank + part)
    return torch.randint(0, 40, (12, 2), generator=generator)


def _train(
    rank: int, lookups_per_step: int, known_counts: bool, evaluate_before_step: bool = False
) -> tuple[list[int], list[torch.Tensor]]:
    """Two steps of two tables; returns how many times each step hashed ids to owners, and the rows."""
    tables = [ShardedHashTable(dim, name=f"t{dim}", seed=dim) for dim in (3, 5)]
    optimizer = ShardedOptimizer(SparseAdamW(tables, lr=0.1, weight_decay=0.01))
    hashings = []
    for step in range(2):
        optimizer.zero_grad()
        for part in range(lookups_per_step):
            ids = [_ids(rank, step, part), _ids(rank, step, part) + 7]
            sum(rows.square().sum() for rows in sharded_lookup(tables, ids)).backward()
        if evaluate_before_step:  # a lookup without gradients between backward and step
            with torch.no_grad():
                sharded_lookup(tables, [_ids(rank, step, 9), _ids(rank, step, 9)])
        with contextlib.ExitStack() as patches:
            owner_rank = patches.enter_context(
                mock.patch.object(recis.dist.exchange, "owner_rank", wraps=recis.dist.exchange.owner_rank)
            )
            if not known_counts:
                for table in tables:
                    patches.enter_context(mock.patch.object(table, "owner_counts_of", return_value=None))
            optimizer.step()
        hashings.append(owner_rank.call_count)
    return hashings, [torch.cat([t.local_ids().unsqueeze(1).double(), t.weight.double()], 1) for t in tables]


def _outcomes(rank: int, world_size: int) -> dict:
    one_lookup, one_lookup_rows = _train(rank, lookups_per_step=1, known_counts=True)
    hashed, hashed_rows = _train(rank, lookups_per_step=1, known_counts=False)
    two_lookups, _ = _train(rank, lookups_per_step=2, known_counts=True)
    evaluated, _ = _train(rank, lookups_per_step=1, known_counts=True, evaluate_before_step=True)
    return {
        "one_lookup": one_lookup,
        "evaluated": evaluated,
        "hashed": hashed,
        "two_lookups": two_lookups,
        "same_rows": all(torch.equal(a, b) for a, b in zip(one_lookup_rows, hashed_rows)),
    }


def test_the_gradient_of_one_lookup_is_routed_with_its_owner_counts_and_trains_the_same():
    for outcome in run_ranks(2, _outcomes):
        assert outcome["one_lookup"] == [0, 0]
        assert outcome["evaluated"] == [0, 0]  # a lookup without gradients leaves the counts kept
        assert outcome["hashed"] == [2, 2]  # one hashing per table when the counts are not known
        assert all(count > 0 for count in outcome["two_lookups"])
        assert outcome["same_rows"]
