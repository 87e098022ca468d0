"""One exchange for all tables: collective calls per forward and per step do not grow with the
number of tables, a world of one makes none, and the grouped lookup trains like one process."""

from __future__ import annotations

import pytest
import torch
from collective_counter import counting_collectives
from dist_harness import run_ranks

from recis.dist import ShardedHashTable, ShardedOptimizer, sharded_lookup
from recis.nn.modules.hashtable import HashTable
from recis.optim import SparseAdamW

MIXED_DIMS = [8 + (56 * t) // 25 for t in range(26)]  # 26 tables, dims 8 ... 64
BATCH = 16


def _batch(table: int, rank: int, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * step + 10 * table + rank)
    return torch.randint(0, 50, (BATCH, 2), generator=generator)


def _collectives_per_forward_and_step(rank: int, world_size: int, dims: list[int], replicated: int) -> tuple:
    tables = [ShardedHashTable(dim, name=f"t{t}", seed=t) for t, dim in enumerate(dims)]
    replicas = [HashTable(4, name=f"r{r}", seed=100 + r) for r in range(replicated)]
    optimizer = ShardedOptimizer(SparseAdamW([*tables, *replicas], lr=0.1))
    counts = []
    for step in range(2):
        optimizer.zero_grad()
        ids = [_batch(t, rank, step) for t in range(len(tables))]
        with counting_collectives() as forward:
            outputs = sharded_lookup(tables, ids)
        loss = sum(out.square().sum() for out in outputs) + sum(r(_batch(99, rank, step)).sum() for r in replicas)
        loss.backward()
        with counting_collectives() as update:
            optimizer.step()
        counts.append((sum(forward.values()), sum(update.values())))
    return counts


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_forward_and_a_step_make_as_many_collective_calls_for_26_tables_as_for_one(world_size):
    one = run_ranks(world_size, _collectives_per_forward_and_step, [16], 0)
    many = run_ranks(world_size, _collectives_per_forward_and_step, MIXED_DIMS, 0)
    assert one == many
    expected = (0, 0) if world_size == 1 else (3, 2)  # counts, ids, rows / counts, ids and gradients
    assert all(counts == expected for rank_counts in many for counts in rank_counts)


def test_replicated_tables_share_the_gradient_exchange_and_add_one_row_gather():
    few = run_ranks(2, _collectives_per_forward_and_step, [8, 16], 1)
    many = run_ranks(2, _collectives_per_forward_and_step, [8, 16], 3)
    assert few == many
    assert all(counts == (3, 2 + 2) for rank_counts in many for counts in rank_counts)


def _grouped_training(rank: int, world_size: int) -> dict:
    dims, dtypes = [3, 8, 5], [torch.float32, torch.float64, torch.float32]
    tables = [
        ShardedHashTable(dim, dtype=dtype, name=f"t{t}", seed=t) if world_size else HashTable(dim, dtype=dtype, seed=t)
        for t, (dim, dtype) in enumerate(zip(dims, dtypes))
    ]
    optimizer = SparseAdamW(tables, lr=0.05)
    optimizer = ShardedOptimizer(optimizer) if world_size else optimizer
    for step in range(4):
        optimizer.zero_grad()
        global_ids = [torch.cat([_batch(t, r, step) for r in range(2)]) for t in range(len(tables))]
        if world_size:
            mine = [ids[rank * BATCH : (rank + 1) * BATCH] for ids in global_ids]
            outputs = sharded_lookup(tables, mine)
            scale = world_size
        else:
            outputs = [table(ids) for table, ids in zip(tables, global_ids)]
            scale = 1
        loss = sum((out.double() * torch.linspace(-1, 1, out.shape[-1], dtype=torch.float64)).sum() for out in outputs)
        (loss * scale / (2 * BATCH)).backward()  # the mean over the global batch, as DDP averages
        optimizer.step()
    return {
        t: {
            int(i): (row.clone(), m.clone())
            for i, row, m in zip(table.local_ids(), table.weight, table.slot("exp_avg"))
        }
        for t, table in enumerate(tables)
    }


def test_a_grouped_lookup_of_tables_of_mixed_dims_and_dtypes_trains_like_one_process():
    reference = _grouped_training(0, 0)
    per_rank = run_ranks(2, _grouped_training)
    for t, expected in reference.items():
        merged = {i: state for rank_state in per_rank for i, state in rank_state[t].items()}
        assert merged.keys() == expected.keys()
        for i, (row, exp_avg) in expected.items():
            torch.testing.assert_close(merged[i][0], row, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(merged[i][1], exp_avg, rtol=1e-6, atol=1e-7)


def _bad_ids_in_one_table(rank: int, world_size: int) -> str:
    tables = [ShardedHashTable(4, name="a"), ShardedHashTable(4, name="b")]
    ids = [torch.arange(4), torch.arange(4.0) if rank == 1 else torch.arange(4)]
    try:
        sharded_lookup(tables, ids)
    except Exception as error:  # noqa: BLE001 (the test reports which error each rank saw)
        return type(error).__name__
    return "no error"


def test_bad_ids_of_one_table_on_one_rank_make_every_rank_raise():
    assert run_ranks(2, _bad_ids_in_one_table) == ["PeerError", "TypeError"]


def _plain_optimizer_on_a_sharded_table(rank: int, world_size: int) -> str:
    table = ShardedHashTable(4, name="item")
    optimizer = SparseAdamW([table], lr=0.1)
    table(torch.arange(3)).sum().backward()
    before = table.weight.clone()
    try:
        optimizer.step()
    except RuntimeError as error:
        assert torch.equal(table.weight, before)
        return str(error)
    return "no error"


def test_a_sharded_tables_gradient_is_applied_only_through_the_sharded_optimizer():
    (message,) = run_ranks(1, _plain_optimizer_on_a_sharded_table)
    assert "wrap the sparse optimizer in ShardedOptimizer" in message
