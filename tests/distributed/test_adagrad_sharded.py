"""The Adagrad family under ShardedOptimizer on gloo ranks, against one process.

SparseAdagrad and SparseRowWiseAdagrad: W ranks with local batches (mean loss) equal one
process with the W*b batch, as the Adam family does (test_dist_equivalence.py), sharded
and replicated tables, with and without gradient accumulation.

The Sum variants sum over workers what the ranks sent, and grow the accumulator by the
sum of each rank's squared gradient; the reference is one process that computes each
rank's gradient of its own part of the batch (summed over the micro-batches of the
window), then applies ``sum_w g_w`` with ``grad_sq = sum_w g_w^2`` to its table.
"""

from __future__ import annotations

import pytest
import torch
from dist_harness import run_ranks
from torch import nn
from two_table_training import (
    GLOBAL_BATCH,
    UPDATES,
    TwoTables,
    assert_owned_union_equals_reference,
    assert_replicas_equal_reference,
    global_batches,
    owned_state,
    train,
    trained_results,
)

from recis.dist import ShardedHashTable, ShardedOptimizer
from recis.nn.modules.hashtable import HashTable, filter_out_sparse_param
from recis.optim import SparseAdagrad, SparseAdagradSum, SparseRowWiseAdagrad, SparseRowWiseAdagradSum

FAMILY = {
    "adagrad": SparseAdagrad,
    "row_wise": SparseRowWiseAdagrad,
    "adagrad_sum": SparseAdagradSum,
    "row_wise_sum": SparseRowWiseAdagradSum,
}
CASES = [(name, kind, accum) for name in FAMILY for kind in ("sharded", "replicated") for accum in (1, 2)]


def _optimizer(name: str, model: nn.Module, accum: int):
    optimizer_cls = FAMILY[name]
    weight_decay = 0.0 if optimizer_cls.takes_grad_sq else 0.1
    optimizer = optimizer_cls(
        filter_out_sparse_param(model), lr=0.05, lr_decay=0.1, initial_accumulator_value=0.1, weight_decay=weight_decay
    )
    optimizer.set_grad_accum_steps(accum)
    return optimizer


def _run_cases(rank: int, world_size: int) -> dict:
    results = {}
    for name, kind, accum in CASES:
        model = TwoTables(ShardedHashTable if kind == "sharded" else HashTable)
        optimizer = ShardedOptimizer(_optimizer(name, model, accum))
        train(model, optimizer, global_batches(accum), rank, world_size)
        results[(name, kind, accum)] = trained_results(model, optimizer, kind)
    return results


def _whole_batch_reference(name: str, accum: int) -> dict:
    model = TwoTables(HashTable)
    optimizer = _optimizer(name, model, accum)
    train(model, optimizer, global_batches(accum), rank=0, world_size=1)
    return {t.name: owned_state(t, optimizer.state[t]["step"]) for t in (model.user, model.item)}


def _per_rank_gradients(model: TwoTables, window: list, world_size: int) -> list[dict[str, tuple]]:
    """Each rank's gradient by id for each table, summed over the window's micro-batches."""
    local = GLOBAL_BATCH // world_size
    per_rank = []
    for rank in range(world_size):
        part = slice(rank * local, (rank + 1) * local)
        for ids, targets in window:
            nn.functional.mse_loss(model(ids[part]), targets[part]).backward()
        per_rank.append({t.name: t.grad_by_id() for t in (model.user, model.item)})
        for table in (model.user, model.item):
            table.clear_grad()
    return per_rank


def _sum_reference(name: str, accum: int, world_size: int) -> dict:
    model = TwoTables(HashTable)
    optimizer = _optimizer(name, model, accum)
    batches = global_batches(accum)
    for update in range(UPDATES):
        per_rank = _per_rank_gradients(model, batches[update * accum : (update + 1) * accum], world_size)
        for table in (model.user, model.item):
            ids = torch.cat([grads[table.name][0] for grads in per_rank])
            grads = torch.cat([grads[table.name][1] for grads in per_rank])
            unique, inverse = torch.unique(ids, return_inverse=True)
            grad = torch.zeros(len(unique), grads.shape[1]).index_add_(0, inverse, grads)
            grad_sq = torch.zeros(len(unique), grads.shape[1]).index_add_(0, inverse, grads * grads)
            optimizer.apply_gradient(table, table.rows_for(unique), grad, grad_sq=grad_sq)
    return {t.name: owned_state(t, optimizer.state[t]["step"]) for t in (model.user, model.item)}


@pytest.mark.parametrize("world_size", [2, 3])
def test_adagrad_family_on_ranks_matches_one_process(world_size):
    per_rank = run_ranks(world_size, _run_cases)
    for case in CASES:
        name, kind, accum = case
        if FAMILY[name].takes_grad_sq:
            reference = _sum_reference(name, accum, world_size)
        else:
            reference = _whole_batch_reference(name, accum)
        results = [rank_results[case] for rank_results in per_rank]
        assert_owned_union_equals_reference(results, reference, case)
        if kind == "replicated":
            assert_replicas_equal_reference(results, reference, case)


def test_the_sum_reference_differs_from_the_mean_over_workers():
    """The Sum check above could not pass by averaging: on these batches the two differ."""
    summed = _sum_reference("adagrad_sum", 1, 2)["user"]
    averaged = _whole_batch_reference("adagrad_sum", 1)["user"]
    order = torch.sort(summed["ids"]).indices, torch.sort(averaged["ids"]).indices
    assert torch.equal(summed["ids"][order[0]], averaged["ids"][order[1]])
    assert not torch.allclose(summed["weight"][order[0]], averaged["weight"][order[1]], rtol=1e-3, atol=1e-4)


def _train_with_and_without_recording(rank: int, world_size: int) -> dict:
    results = {}
    for interval in (0, 1):
        model = TwoTables(ShardedHashTable)
        optimizer = SparseRowWiseAdagrad(
            filter_out_sparse_param(model), lr=0.05, weight_decay=0.1, save_update_info_interval=interval
        )
        sharded = ShardedOptimizer(optimizer)
        train(model, sharded, global_batches(1), rank, world_size)
        results[interval] = (trained_results(model, sharded, "sharded"), optimizer.get_step_update_info())
    return results


def test_recording_update_info_on_ranks_records_distinct_rows_and_changes_no_result():
    # A recorded update sums the ranks' gradients of a row before the update (the record keeps
    # one row each); an unrecorded one sums them inside the fused kernel: the same numbers.
    for rank_results in run_ranks(2, _train_with_and_without_recording):
        (plain, _), (recorded, info) = rank_results[0], rank_results[1]
        for name, state in plain["owned"].items():
            for key, value in state.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(recorded["owned"][name][key])), (name, key)
        for name in ("user", "item"):
            rows = info[f"{name}_updated_indices"]
            assert rows.numel() > 0 and rows.unique().numel() == rows.numel()
