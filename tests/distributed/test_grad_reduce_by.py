"""grad_reduce_by on W gloo ranks, as RecIS means it: "worker" takes the mean over workers,
"worker_sum" the sum, "id" sums each rank's per-id mean."""

from __future__ import annotations

import pytest
import torch
from dist_harness import run_ranks

from recis.dist import ShardedHashTable, ShardedOptimizer
from recis.nn import HashTable
from recis.optim import SparseAdam

BATCHES = [torch.tensor([[1, 2, 2, 3], [2, 3, 3, 4]]), torch.tensor([[5, 1, 1, 1], [1, 5, 6, 6]])]


def _train(rank: int, world_size: int, reduce_by: str) -> dict[int, list[float]]:
    table = ShardedHashTable(2, name="t", seed=4, grad_reduce_by=reduce_by)
    optimizer = ShardedOptimizer(SparseAdam([table], lr=0.1))
    for batch in BATCHES:
        optimizer.zero_grad()
        table(batch[rank]).pow(2).sum().backward()
        optimizer.step()
    return dict(zip(table.local_ids().tolist(), table.weight.tolist()))


def _reference(reduce_by: str) -> dict[int, list[float]]:
    """One process applying, per step, what RecIS's reduction defines from the two ranks' batches."""
    table = HashTable(2, name="t", seed=4)
    optimizer = SparseAdam([table], lr=0.1)
    for batch in BATCHES:
        optimizer.zero_grad()
        ids = batch.reshape(-1)
        unique, inverse = torch.unique(ids, return_inverse=True)
        values = table(unique).detach()
        per_occurrence = 2 * values[inverse]  # d(x^2)/dx
        if reduce_by == "id":  # each rank's per-id mean, summed over ranks
            grad = torch.zeros_like(values)
            for part in batch:
                part_unique, part_inverse = torch.unique(part, return_inverse=True)
                counts = torch.bincount(part_inverse).unsqueeze(1).float()
                means = (
                    torch.zeros(len(part_unique), 2).index_add_(
                        0, part_inverse, 2 * table(part_unique).detach()[part_inverse]
                    )
                    / counts
                )
                grad.index_add_(0, torch.searchsorted(unique, part_unique), means)
        else:
            grad = torch.zeros_like(values).index_add_(0, inverse, per_occurrence)
            grad = grad / 2 if reduce_by == "worker" else grad
        table.accept_grad(unique, grad)
        optimizer.step()
    return dict(zip(table.local_ids().tolist(), table.weight.tolist()))


@pytest.mark.parametrize("reduce_by", ["worker", "worker_sum", "id"])
def test_each_reduction_on_two_ranks_matches_its_definition(reduce_by):
    per_rank = run_ranks(2, _train, reduce_by)
    got = {key: value for rows in per_rank for key, value in rows.items()}
    expected = _reference(reduce_by)
    assert sorted(got) == sorted(expected)
    for key in expected:
        torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(expected[key]), rtol=1e-6, atol=1e-7)
