"""Bounded sharded tables on W gloo ranks: admission and filters give one process's table
for the concatenated batch; capacity holds per rank; bad configurations and refusals reach
every rank."""

from __future__ import annotations

import pytest
import torch
from dist_harness import run_ranks, run_ranks_outcomes
from torch import nn

from recis.dist import ShardedHashTable, ShardedOptimizer
from recis.hooks.filter_hook import HashTableFilterHook
from recis.nn.hashtable_hook import AdmitHook, FilterHook
from recis.nn.modules.hashtable import HashTable
from recis.optim import SparseAdamW

GLOBAL_BATCH = 12
STEPS = 10
DIM = 3


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A vocabulary that drifts by one id per step, so old ids go stale."""
    generator = torch.Generator().manual_seed(5)
    batches = []
    for step in range(STEPS):
        ids = (torch.rand(GLOBAL_BATCH, generator=generator) ** 2 * 10).long() + step
        batches.append((ids, torch.randn(GLOBAL_BATCH, generator=generator)))
    return batches


def _bounded_table(table_type: type, **kwargs) -> HashTable:
    return table_type(
        DIM,
        name="user",
        seed=1,
        admit_hook=AdmitHook("Frequency", {"min_count": 2}),
        filter_hook=FilterHook("GlobalStepFilter", {"filter_step": 3}),
        **kwargs,
    )


def _train(rank: int, world_size: int) -> dict:
    table = _bounded_table(ShardedHashTable)
    return _run(table, ShardedOptimizer(SparseAdamW([table], lr=0.05)), rank, world_size)


def _run(table: HashTable, optimizer, rank: int, world_size: int) -> dict:
    hook = HashTableFilterHook(filter_interval=2, tables=[table])
    local = GLOBAL_BATCH // world_size
    for step, (ids, targets) in enumerate(_batches(), start=1):
        part = slice(rank * local, (rank + 1) * local)
        optimizer.zero_grad()
        nn.functional.mse_loss(table(ids[part]).sum(-1), targets[part]).backward()
        optimizer.step()
        hook.after_step(global_step=step)
    return {"ids": table.local_ids(), "weight": table.weight.clone(), "stats": table.stats()}


def _reference() -> dict:
    table = _bounded_table(HashTable)
    return _run(table, SparseAdamW([table], lr=0.05), rank=0, world_size=1)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_admission_and_filters_on_ranks_give_one_process_table_for_the_whole_batch(world_size):
    per_rank = run_ranks(world_size, _train)
    reference = _reference()
    ids = torch.cat([result["ids"] for result in per_rank])
    weight = torch.cat([result["weight"] for result in per_rank])
    order, reference_order = torch.argsort(ids), torch.argsort(reference["ids"])
    assert torch.equal(ids[order], reference["ids"][reference_order])
    torch.testing.assert_close(weight[order], reference["weight"][reference_order], rtol=1e-6, atol=1e-7)
    for counter in ("inserted", "not_admitted", "evicted_filter", "lookups", "hits"):
        assert sum(result["stats"][counter] for result in per_rank) == reference["stats"][counter], counter
    assert reference["stats"]["evicted_filter"] > 0 and reference["stats"]["not_admitted"] > 0


def _capacity_run(rank: int, world_size: int) -> dict:
    table = ShardedHashTable(DIM, name="user", seed=1, capacity=8, eviction="lru")
    optimizer = ShardedOptimizer(SparseAdamW([table], lr=0.05))
    sizes = []
    for step in range(6):
        ids = torch.arange(3) + 2 * step + 100 * rank  # at most 6 ids of a lookup per owner
        optimizer.zero_grad()
        table(ids).sum().backward()
        optimizer.step()
        sizes.append(len(table))
    return {"sizes": sizes, "evicted": table.stats()["evicted_capacity"]}


def test_capacity_holds_per_rank_and_each_owner_evicts_its_own_rows():
    per_rank = run_ranks(2, _capacity_run)
    assert all(max(result["sizes"]) <= 8 for result in per_rank)
    assert sum(result["evicted"] for result in per_rank) > 0


def _refused_lookup(rank: int, world_size: int) -> str:
    table = ShardedHashTable(DIM, name="user", seed=1, capacity=2)
    ids = torch.arange(8) if rank == 0 else torch.empty(0, dtype=torch.int64)  # 8 ids: one owner gets > 2
    try:
        table(ids)
    except Exception as error:  # every rank must raise, none may hang
        return f"{type(error).__name__}: {error}"
    return "no error"


def test_an_owner_that_cannot_make_room_makes_every_rank_raise():
    outcomes = run_ranks(2, _refused_lookup, deadline_s=120)
    assert all(outcome != "no error" for outcome in outcomes)
    assert any("more than the capacity of 2" in outcome for outcome in outcomes)


def _mismatched_hooks(rank: int, world_size: int) -> None:
    ShardedHashTable(DIM, name="user", seed=1, capacity=8 if rank == 0 else 9)


def test_tables_configured_differently_across_ranks_raise_on_every_rank():
    outcomes = run_ranks_outcomes(2, _mismatched_hooks, deadline_s=120)
    assert all("error" in outcome and "capacity" in outcome["error"] for outcome in outcomes)
