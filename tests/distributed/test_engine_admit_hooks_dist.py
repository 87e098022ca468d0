"""Lookups that may miss, on gloo ranks: features of one sharded table with different admit
hooks, and eval-mode lookups, train the table one process would with the whole batch: ids
without a row at their lookup receive no gradient and never enter the table."""

from __future__ import annotations

import pytest
import torch
from dist_harness import run_ranks, run_ranks_outcomes

from recis.dist import ShardedHashTable, ShardedOptimizer
from recis.nn import EmbeddingEngine, EmbeddingOption
from recis.nn.hashtable_hook import AdmitHook
from recis.nn.modules.hashtable import HashTable
from recis.optim import SparseAdamW

GLOBAL_BATCH, STEPS, DIM = 8, 6, 2


def _engine() -> EmbeddingEngine:
    return EmbeddingEngine(
        {
            "writer": EmbeddingOption(embedding_dim=DIM, shared_name="t"),
            "reader": EmbeddingOption(embedding_dim=DIM, shared_name="t", admit_hook=AdmitHook("ReadOnly")),
        }
    )


def _batches() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    return [
        {
            "writer": torch.randint(0, 12, (GLOBAL_BATCH, 1), generator=generator),
            "reader": torch.randint(0, 20, (GLOBAL_BATCH, 2), generator=generator),
        }
        for _ in range(STEPS)
    ]


def _train_engine(engine: EmbeddingEngine, optimizer, rank: int, world_size: int) -> dict:
    local = GLOBAL_BATCH // world_size
    for batch in _batches():
        part = {name: ids[rank * local : (rank + 1) * local] for name, ids in batch.items()}
        optimizer.zero_grad()
        out = engine(part)
        ((out["writer"] - 1).square().sum() + (out["reader"] + 1).square().sum()).backward()
        optimizer.step()
    table = engine.table_of("reader")
    return {"ids": table.local_ids(), "weight": table.weight.clone()}


def _engine_on_ranks(rank: int, world_size: int) -> dict:
    engine = _engine()
    return _train_engine(
        engine, ShardedOptimizer(SparseAdamW(list(engine.tables().values()), lr=0.05)), rank, world_size
    )


def _assert_same_rows(per_rank: list[dict], reference: dict) -> None:
    ids = torch.cat([result["ids"] for result in per_rank])
    weight = torch.cat([result["weight"] for result in per_rank])
    order, expected_order = torch.argsort(ids), torch.argsort(reference["ids"])
    assert torch.equal(ids[order], reference["ids"][expected_order])
    torch.testing.assert_close(weight[order], reference["weight"][expected_order], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("world_size", [2])
def test_features_of_a_sharded_table_with_different_admit_hooks_train_the_table_of_one_process(world_size):
    per_rank = run_ranks(world_size, _engine_on_ranks)
    engine = _engine()
    reference = _train_engine(engine, SparseAdamW(list(engine.tables().values()), lr=0.05), 0, 1)
    reader_ids = torch.cat([batch["reader"].reshape(-1) for batch in _batches()])
    assert not bool(torch.isin(reader_ids, reference["ids"]).all())  # some ids only the reader saw: left out
    _assert_same_rows(per_rank, reference)


def _eval_then_train(table: HashTable, optimizer, rank: int, world_size: int) -> dict:
    """A training lookup inserts ids 0-3; an eval-mode lookup of 0-7 with backward trains only 0-3."""
    table(torch.arange(4)[rank::world_size]).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    table.eval()
    table(torch.arange(8)[rank::world_size]).square().sum().backward()
    optimizer.step()
    return {"ids": table.local_ids(), "weight": table.weight.clone()}


def _sharded_eval(rank: int, world_size: int) -> dict:
    table = ShardedHashTable(DIM, name="t", seed=2)
    return _eval_then_train(table, ShardedOptimizer(SparseAdamW([table], lr=0.05)), rank, world_size)


def test_an_eval_mode_lookup_of_a_sharded_table_trains_present_ids_only_as_one_process_does():
    per_rank = run_ranks(2, _sharded_eval)
    table = HashTable(DIM, name="t", seed=2)
    reference = _eval_then_train(table, SparseAdamW([table], lr=0.05), 0, 1)
    assert sorted(reference["ids"].tolist()) == [0, 1, 2, 3]
    _assert_same_rows(per_rank, reference)


def _modes_that_differ(rank: int, world_size: int) -> None:
    table = ShardedHashTable(DIM, name="t")
    table.train(rank == 0)
    table(torch.arange(3))


def test_ranks_in_different_modes_raise_on_every_rank():
    outcomes = run_ranks_outcomes(2, _modes_that_differ, deadline_s=120)
    assert all("training mode on some ranks" in outcome.get("error", "") for outcome in outcomes), outcomes
