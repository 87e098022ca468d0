"""The owner's update finds its rows without probing the id map again when the gradient is for
exactly the ids it served in the last training lookup, and probes it as before when rows were
renumbered or the gradient spans several lookups: either way the update is the same."""

from __future__ import annotations

import contextlib
import gc
import weakref
from unittest import mock

import torch
from dist_harness import run_ranks

from recis.dist import ShardedHashTable, ShardedOptimizer, sharded_lookup
from recis.optim import SparseAdamW


def _ids(rank: int, step: int, part: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 * step + 10 * rank + part)
    return torch.randint(0, 40, (12, 2), generator=generator)


def _train(rank: int, reload_before_step: bool, lookups_per_step: int) -> tuple[list[int], list[torch.Tensor]]:
    """Two steps of two tables; returns the id-map probes each step made and the final rows."""
    tables = [ShardedHashTable(dim, name=f"t{dim}", seed=dim) for dim in (3, 5)]
    optimizer = ShardedOptimizer(SparseAdamW(tables, lr=0.1, weight_decay=0.01))
    probes = []
    for step in range(2):
        optimizer.zero_grad()
        for part in range(lookups_per_step):
            ids = [_ids(rank, step, part), _ids(rank, step, part) + 7]
            sum(rows.square().sum() for rows in sharded_lookup(tables, ids)).backward()
        if reload_before_step:  # renumbers nothing here, but a reload makes any kept row number stale
            for table in tables:
                table.load_state_dict(table.state_dict())
        with contextlib.ExitStack() as patches:
            finds = [patches.enter_context(mock.patch.object(t.store, "find", wraps=t.store.find)) for t in tables]
            optimizer.step()
        probes.append(sum(find.call_count for find in finds))
    return probes, [torch.cat([table.local_ids().unsqueeze(1).double(), table.weight.double()], 1) for table in tables]


def _outcomes(rank: int, world_size: int) -> dict:
    served_probes, served = _train(rank, reload_before_step=False, lookups_per_step=1)
    reloaded_probes, reloaded = _train(rank, reload_before_step=True, lookups_per_step=1)
    _, accumulated = _train(rank, reload_before_step=False, lookups_per_step=2)
    _, accumulated_reloaded = _train(rank, reload_before_step=True, lookups_per_step=2)
    return {
        "served_probes": served_probes,
        "reloaded_probes": reloaded_probes,
        "same_update": all(torch.equal(a, b) for a, b in zip(served, reloaded)),
        "same_accumulated": all(torch.equal(a, b) for a, b in zip(accumulated, accumulated_reloaded)),
    }


def test_the_update_reuses_the_rows_served_and_probes_again_only_when_they_may_be_stale():
    for outcome in run_ranks(2, _outcomes):
        assert outcome["served_probes"] == [0, 0]
        assert all(probes >= 2 for probes in outcome["reloaded_probes"])  # one probe per table at least
        assert outcome["same_update"]
        assert outcome["same_accumulated"]  # two lookups per step: the gradient is no lookup's ids


def _old_store_freed_after_a_move(rank: int, world_size: int) -> bool:
    table = ShardedHashTable(4, name="t", seed=1)
    sharded_lookup([table], [torch.arange(10)])[0].sum().backward()
    old_store = weakref.ref(table.store)
    table.double()  # a new store, in float64
    gc.collect()
    return old_store() is None


def test_the_rows_remembered_do_not_keep_a_moved_tables_old_store_alive():
    assert run_ranks(1, _old_store_freed_after_a_move) == [True]
