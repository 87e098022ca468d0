"""Bounded replicated tables under ShardedOptimizer: every rank's replica stays identical, equal
to one process that sees the concatenated batch (rows, slots, metadata, counters), while ids
come and go; an evicted id comes back fresh; errors and mismatches reach every rank."""

from __future__ import annotations

import pytest
import torch
from dist_harness import run_ranks, run_ranks_outcomes
from torch import nn

from recis.dist import ShardedOptimizer
from recis.hooks.filter_hook import HashTableFilterHook
from recis.nn.hashtable_hook import AdmitHook, FilterHook
from recis.nn.modules.hashtable import HashTable
from recis.optim import SparseAdamW

GLOBAL_BATCH = 6
VOCABULARY = 14  # ids 0..13 over a capacity of 8: rows are evicted and ids come back
STEPS = 12
DIM = 3

CONFIGS = {
    "lru+frequency+filter": {
        "capacity": 8,
        "eviction": "lru",
        "admit_hook": AdmitHook("Frequency", {"min_count": 2}),
        "filter_hook": FilterHook("GlobalStepFilter", {"filter_step": 4}),
    },
    "lfu": {"capacity": 8, "eviction": "lfu"},
}


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(11)
    return [
        (
            torch.randint(0, VOCABULARY, (GLOBAL_BATCH,), generator=generator),
            torch.randn(GLOBAL_BATCH, generator=generator),
        )
        for _ in range(STEPS)
    ]


def _table(config: str) -> HashTable:
    return HashTable(DIM, name="user", seed=1, **CONFIGS[config])


def _run(table: HashTable, optimizer, rank: int, world_size: int) -> None:
    hook = HashTableFilterHook(filter_interval=2, tables=[table]) if table.lifecycle.filter_hook else None
    local = GLOBAL_BATCH // world_size
    for step, (ids, targets) in enumerate(_batches(), start=1):
        part = slice(rank * local, (rank + 1) * local)
        optimizer.zero_grad()
        nn.functional.mse_loss(table(ids[part]).sum(-1), targets[part]).backward()
        optimizer.step()
        if hook is not None:
            hook.after_step(global_step=step)


def _by_id(ids: torch.Tensor, values: torch.Tensor) -> dict[int, torch.Tensor]:
    return dict(zip(ids.tolist(), values))


def _columns(table: HashTable) -> dict[str, torch.Tensor]:
    """The metadata columns; the gradient window as whether each row is protected now (its
    numbering counts clears of the gradient, which a ShardedOptimizer step makes more of)."""
    columns = {name: table.column(name).clone() for name in table.column_names()}
    columns["grad_window"] = (columns["grad_window"] == table.lifecycle.window).long()
    return columns


def _replica_run(rank: int, world_size: int, config: str) -> dict:
    table = _table(config)
    optimizer = ShardedOptimizer(SparseAdamW([table], lr=0.05))
    _run(table, optimizer, rank, world_size)
    shard = optimizer.owner_shards()[id(table)]
    return {
        "ids": table.local_ids(),
        "weight": table.weight.clone(),
        "columns": _columns(table),
        "stats": table.stats(),
        "shard_ids": shard.local_ids(),
        "shard_exp_avg": shard.slot("exp_avg").clone(),
    }


def _reference(config: str) -> dict:
    table = _table(config)
    _run(table, SparseAdamW([table], lr=0.05), rank=0, world_size=1)
    return {
        "ids": table.local_ids(),
        "weight": table.weight.clone(),
        "columns": _columns(table),
        "stats": table.stats(),
        "exp_avg": table.slot("exp_avg").clone(),
    }


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("world_size", [2, 3])
def test_bounded_replicas_stay_identical_and_equal_one_process_with_the_whole_batch(world_size, config):
    per_rank = run_ranks(world_size, _replica_run, config)
    reference = _reference(config)
    assert reference["stats"]["evicted_capacity"] > 0  # the stream exercises eviction
    first = per_rank[0]
    for other in per_rank[1:]:  # bitwise identical replicas, row for row
        assert torch.equal(other["ids"], first["ids"]) and torch.equal(other["weight"], first["weight"])
        assert all(torch.equal(other["columns"][n], first["columns"][n]) for n in first["columns"])
        assert other["stats"] == first["stats"]
    assert first["stats"] == reference["stats"]
    assert sorted(first["ids"].tolist()) == sorted(reference["ids"].tolist())
    replica, expected = _by_id(first["ids"], first["weight"]), _by_id(reference["ids"], reference["weight"])
    for id_, row in expected.items():
        torch.testing.assert_close(replica[id_], row, rtol=1e-6, atol=1e-7)
    for name, column in reference["columns"].items():
        if name == "grad_window":  # ShardedOptimizer.step consumes the gradient; one process keeps it to zero_grad
            continue
        assert _by_id(first["ids"], first["columns"][name]) == _by_id(reference["ids"], column), name


@pytest.mark.parametrize("world_size", [2])
def test_owners_keep_slots_only_for_rows_the_replicas_still_hold(world_size):
    per_rank = run_ranks(world_size, _replica_run, "lfu")
    reference = _reference("lfu")
    held = set(per_rank[0]["ids"].tolist())
    slots = {}
    for result in per_rank:
        shard_ids = set(result["shard_ids"].tolist())
        assert shard_ids <= held, "slots of evicted ids must be dropped"
        slots.update(_by_id(result["shard_ids"], result["shard_exp_avg"]))
    # Every id the reference trained has its slots at exactly one owner, equal to the reference's:
    # an id evicted and seen again restarted from zero slots at its owner too.
    trained = _by_id(reference["ids"], reference["exp_avg"])
    for id_, exp_avg in trained.items():
        if exp_avg.abs().sum() > 0:
            torch.testing.assert_close(slots[id_], exp_avg, rtol=1e-6, atol=1e-7)


def _bad_ids_on_rank_0(rank: int, world_size: int) -> dict:
    table = _table("lfu")
    optimizer = ShardedOptimizer(SparseAdamW([table], lr=0.05))
    table(torch.arange(4)).sum().backward()
    optimizer.step()
    before = (table.local_ids().clone(), table.weight.clone(), table.stats())
    ids = torch.tensor([1.5, 2.5]) if rank == 0 else torch.arange(2, 6)
    try:
        table(ids)
        outcome = "no error"
    except Exception as error:  # every rank must raise, none may hang
        outcome = type(error).__name__
    after = (table.local_ids(), table.weight, table.stats())
    unchanged = torch.equal(before[0], after[0]) and torch.equal(before[1], after[1]) and before[2] == after[2]
    return {"outcome": outcome, "unchanged": unchanged}


def test_bad_ids_on_one_rank_make_every_rank_raise_and_change_nothing():
    outcomes = run_ranks(2, _bad_ids_on_rank_0, deadline_s=120)
    assert [outcome["outcome"] for outcome in outcomes] == ["TypeError", "PeerError"]
    assert all(outcome["unchanged"] for outcome in outcomes)


def _different_admit_hooks(rank: int, world_size: int) -> None:
    table = _table("lfu")
    ShardedOptimizer(SparseAdamW([table], lr=0.05))
    hook = AdmitHook("Frequency", {"min_count": 2 + rank})
    table(torch.arange(3), admit_hook=hook)


def test_admit_hooks_that_differ_across_ranks_raise_on_every_rank():
    outcomes = run_ranks_outcomes(2, _different_admit_hooks, deadline_s=120)
    assert all("admit hooks" in outcome.get("error", "") for outcome in outcomes)


def _replicas_that_differ(rank: int, world_size: int) -> None:
    table = _table("lfu")
    table(torch.arange(3 + rank))  # rank 1's replica holds one more row
    ShardedOptimizer(SparseAdamW([table], lr=0.05))


def test_bounded_replicas_that_differ_when_wrapped_raise_on_every_rank():
    outcomes = run_ranks_outcomes(2, _replicas_that_differ, deadline_s=120)
    assert all("rows_digest" in outcome.get("error", "") for outcome in outcomes)
