"""ShardedHashTable and ShardedOptimizer on 2-3 spawned gloo ranks: collectives, errors, drop-in API."""

import os
import time

import pytest
import torch
import torch.distributed as dist
from dist_harness import run_ranks, run_ranks_outcomes

from recis.dist import ShardedHashTable, ShardedOptimizer, owner_rank
from recis.nn.modules.hashtable import HashTable
from recis.optim import SparseAdam, SparseAdamW

IDS = torch.tensor([0, 1, -1, 2**63 - 1, -(2**63), 12345678901234, 7, 8, 9, 10])


def _new_ids_initialize_like_one_process(rank, world_size):
    table = ShardedHashTable([2, 3], seed=11)
    mine = IDS[rank::world_size]
    rows = table(mine)
    owned = table.local_ids()
    assert bool((owner_rank(owned, world_size) == rank).all()), "a rank stores an id it does not own"
    return mine, rows.detach(), table.ids(), table.num_ids()


def test_a_new_id_gets_the_row_a_one_process_table_with_the_same_seed_gives():
    reference = HashTable([2, 3], seed=11)
    for mine, rows, all_ids, count in run_ranks(3, _new_ids_initialize_like_one_process):
        torch.testing.assert_close(rows, reference(mine).detach(), rtol=0, atol=0)
        assert sorted(all_ids.tolist()) == sorted(IDS.tolist()) and count == len(IDS)


def _lookup_assign_and_eval(rank, world_size):
    table = ShardedHashTable(2, seed=3)
    table.assign(IDS[:4], torch.arange(8.0).reshape(4, 2) + 10 * rank)  # the highest rank wins
    looked_up = table.lookup(IDS[:4])
    try:
        table.lookup(IDS[4:5] if rank == 1 else IDS[:1])  # absent on rank 1 only
        missing_error = None
    except KeyError as error:
        missing_error = str(error)
    table.eval()
    evaluated = table(IDS[4:6]).detach()
    return looked_up, missing_error, evaluated, table.num_ids()


def test_lookup_assign_and_eval_reads_are_collective():
    results = run_ranks(2, _lookup_assign_and_eval)
    expected = torch.arange(8.0).reshape(4, 2) + 10  # rank 1's values
    initial = HashTable(2, seed=3).initial_values(IDS[4:6])
    for looked_up, _, evaluated, count in results:
        torch.testing.assert_close(looked_up, expected, rtol=0, atol=0)
        torch.testing.assert_close(evaluated, initial, rtol=0, atol=0)
        assert count == 4, "eval-mode reads must not insert"
    assert str(IDS[4].item()) in results[1][1]
    assert "other ranks" in results[0][1]


def _bad_ids_on_one_rank(rank, world_size):
    table = ShardedHashTable(2)
    ids = torch.tensor([1.5]) if rank == 0 else torch.tensor([1, 2])
    try:
        table(ids)
    except Exception as error:  # every rank must fail, none may hang
        return type(error).__name__, str(error), len(table)
    return None


def test_bad_input_on_one_rank_fails_every_rank_instead_of_hanging():
    results = run_ranks(2, _bad_ids_on_one_rank, deadline_s=60)
    assert results[0][0] == "TypeError" and "float" in results[0][1]
    assert results[1][0] == "PeerError" and "rank 0" in results[1][1]
    assert results[1][2] == 0, "the healthy rank inserted nothing"


def _mismatched_table(rank, world_size, field):
    kwargs = {"embedding_shape": 4, "dtype": torch.float32, "seed": 0}
    if rank == 1:
        kwargs[field] = {"embedding_shape": 5, "dtype": torch.bfloat16, "seed": 9}[field]
    shape = kwargs.pop("embedding_shape")
    ShardedHashTable(shape, **kwargs)


@pytest.mark.parametrize("field", ["embedding_shape", "dtype", "seed"])
def test_a_table_configured_differently_on_one_rank_fails_at_construction_naming_rank_and_field(field):
    outcomes = run_ranks_outcomes(2, _mismatched_table, field, deadline_s=60)
    for outcome in outcomes:
        assert "ConfigMismatchError" in outcome["error"]
        assert "rank 1" in outcome["error"] and field in outcome["error"]


def _mismatched_optimizer(rank, world_size, field):
    table = ShardedHashTable(4)
    kwargs = {"lr": 0.1, "eps": 1e-8, "weight_decay": 0.0}
    if rank == 1:
        kwargs[field] = {"lr": 0.2, "eps": 1e-6, "weight_decay": 0.5}[field]
    ShardedOptimizer(SparseAdam(table, **kwargs))


@pytest.mark.parametrize("field", ["lr", "eps", "weight_decay"])
def test_an_optimizer_configured_differently_on_one_rank_fails_at_construction_naming_rank_and_field(field):
    outcomes = run_ranks_outcomes(2, _mismatched_optimizer, field, deadline_s=60)
    for outcome in outcomes:
        assert "ConfigMismatchError" in outcome["error"]
        assert "rank 1" in outcome["error"] and f"param_groups[0].{field}" in outcome["error"]


def _dying_rank(rank, world_size):
    table = ShardedHashTable(2)
    table(torch.tensor([1, 2, 3]))
    if rank == 1:
        os._exit(3)  # a crash: no goodbye to the process group
    started = time.monotonic()
    try:
        table(torch.tensor([4, 5]))
    except Exception as error:
        return type(error).__name__, str(error), time.monotonic() - started
    return None


def test_a_rank_that_dies_makes_the_others_fail_within_the_timeout():
    outcomes = run_ranks_outcomes(2, _dying_rank, deadline_s=120)
    assert "result" in outcomes[0], outcomes[0]
    error_type, message, seconds = outcomes[0]["result"]
    assert error_type in ("RuntimeError", "DistBackendError"), message
    assert seconds < 90
    assert outcomes[1]["error"] == "exited with code 3 without a result"


def _scheduled_and_reloaded(rank, world_size):
    table = ShardedHashTable(3, seed=5, name="t")
    replica = HashTable(3, seed=6, name="r")
    optimizer = ShardedOptimizer(SparseAdamW([table, replica], lr=0.1))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    lrs = []
    for step in range(4):
        ids = torch.tensor([step, 100 + rank])
        optimizer.zero_grad()
        (table(ids).sum() + replica(ids).square().sum()).backward()
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    saved = optimizer.state_dict()
    fresh = ShardedOptimizer(SparseAdamW([table, replica], lr=0.1))
    fresh.load_state_dict(saved)
    restored_steps = [fresh.state[t]["step"] for t in fresh.param_groups[0]["params"]]
    shard = fresh.param_groups[0]["params"][1]
    return lrs, restored_steps, shard.slot("exp_avg").clone(), replica.slot_names(), optimizer.last_step_bytes_sent


def test_sharded_optimizer_is_a_drop_in_for_schedulers_and_state_dicts():
    for lrs, steps, exp_avg, replica_slots, bytes_sent in run_ranks(2, _scheduled_and_reloaded):
        assert lrs == pytest.approx([0.1, 0.05, 0.05, 0.025])
        assert steps == [4, 4]
        assert exp_avg.abs().sum() > 0, "the owner shard's slots came back with the state dict"
        assert replica_slots == [], "a replica keeps no slots: they live at the owners"
        assert bytes_sent > 0


def _gradients_stay_local_between_updates(rank, world_size):
    table = ShardedHashTable(2)
    optimizer = ShardedOptimizer(SparseAdam(table, lr=0.1))
    optimizer.set_grad_accum_steps(2)
    table(torch.arange(20) + 100 * rank).sum().backward()  # 20 ids: some are owned by the other rank
    optimizer.step()
    micro_step_bytes = optimizer.last_step_bytes_sent
    table(torch.arange(20) + 100 * rank).sum().backward()
    optimizer.step()
    return micro_step_bytes, optimizer.last_step_bytes_sent


def test_an_accumulation_micro_step_sends_nothing():
    for micro_step_bytes, update_bytes in run_ranks(2, _gradients_stay_local_between_updates):
        assert micro_step_bytes == 0 and update_bytes > 0


def test_the_process_group_is_really_distributed():
    # guards the harness itself: each rank sees its own rank and the world size
    ranks = run_ranks(3, lambda_rank)
    assert ranks == [(0, 3), (1, 3), (2, 3)]


def lambda_rank(rank, world_size):
    return dist.get_rank(), dist.get_world_size()


def _one_process_state_into_shards(rank, world_size, state):
    table = ShardedHashTable(3, seed=4)
    optimizer = ShardedOptimizer(SparseAdam(table, lr=0.1))
    table.load_state_dict(state)
    local = table.state_dict()
    assert torch.equal(local["ids"], table.local_ids()) and local["weight"].shape[0] == len(table)
    assert bool((owner_rank(local["ids"], world_size) == rank).all())
    looked_up = table.lookup(state["ids"])
    optimizer.zero_grad()
    return local, looked_up


def test_a_one_process_table_state_dict_loads_into_shards_each_keeping_what_it_owns():
    source = HashTable(3, seed=4)
    optimizer = SparseAdam(source, lr=0.1)
    source(IDS).square().sum().backward()
    optimizer.step()
    state = {key: value.clone() for key, value in source.state_dict().items()}
    results = run_ranks(2, _one_process_state_into_shards, state)
    union = {}
    for local, looked_up in results:
        torch.testing.assert_close(looked_up, state["weight"], rtol=0, atol=0)
        for i, key in enumerate(local["ids"].tolist()):
            union[key] = (local["weight"][i], local["slots.exp_avg"][i], local["slots.exp_avg_sq"][i])
    assert sorted(union) == sorted(state["ids"].tolist())
    for i, key in enumerate(state["ids"].tolist()):
        for got, field in zip(union[key], ("weight", "slots.exp_avg", "slots.exp_avg_sq")):
            torch.testing.assert_close(got, state[field][i], rtol=0, atol=0)


def _replica_loss(table: HashTable, ids: torch.Tensor) -> torch.Tensor:
    return (table(ids) * torch.linspace(-1, 1, 4)).square().sum()


_WARMUP_IDS = torch.tensor([0, 1, 2, 3, 40, 41])
_RANK_IDS = [torch.tensor([0, 2, 40, 50]), torch.tensor([1, 2, 41, 60])]


def _train_replica_then_wrap(rank, world_size):
    replica = HashTable(4, seed=3, name="r")
    plain = SparseAdamW([replica], lr=0.05)
    for _ in range(3):  # every rank trains the same rows alone: replicas stay identical
        plain.zero_grad()
        _replica_loss(replica, _WARMUP_IDS).backward()
        plain.step()
    optimizer = ShardedOptimizer(plain)
    for _ in range(2):
        optimizer.zero_grad()
        _replica_loss(replica, _RANK_IDS[rank]).backward()
        optimizer.step()
    return replica.local_ids(), replica.weight.clone()


def test_wrapping_a_trained_replicated_table_keeps_its_slots_at_the_owners():
    reference = HashTable(4, seed=3)
    optimizer = SparseAdamW([reference], lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        _replica_loss(reference, _WARMUP_IDS).backward()
        optimizer.step()
    for _ in range(2):  # the sharded optimizer averages the ranks' gradients
        optimizer.zero_grad()
        (sum(_replica_loss(reference, ids) for ids in _RANK_IDS) / 2).backward()
        optimizer.step()
    for ids, weight in run_ranks(2, _train_replica_then_wrap):
        torch.testing.assert_close(weight, reference.lookup(ids), rtol=0, atol=1e-6)


def _replicas_trained_on_different_rows(rank, world_size):
    replica = HashTable(4, seed=3, name="r")
    plain = SparseAdamW([replica], lr=0.05)
    plain.zero_grad()
    _replica_loss(replica, _RANK_IDS[rank]).backward()  # each rank alone, on its own rows
    plain.step()
    ShardedOptimizer(plain)


def test_replicas_whose_trained_rows_differ_across_ranks_are_refused_naming_the_table():
    outcomes = run_ranks_outcomes(2, _replicas_trained_on_different_rows, deadline_s=60)
    for outcome in outcomes:
        assert "ConfigMismatchError" in outcome["error"]
        assert "tables[0].trained" in outcome["error"]


def _wrapping_that_fails_midway(rank, world_size):
    trained, preloaded = HashTable(4, seed=1, name="trained"), HashTable(4, seed=2, name="preloaded")
    preloaded.assign(torch.arange(50), torch.ones(50, 4))
    plain = SparseAdamW([trained, preloaded], lr=0.05)
    plain.zero_grad()
    _replica_loss(trained, _WARMUP_IDS).backward()
    plain.step()
    exp_avg_before, state_before = trained.slot("exp_avg").clone(), set(plain.state)

    def out_of_memory(self, replica, group):
        raise MemoryError(f"no room for the shard of {replica.name}")

    real = ShardedOptimizer._owner_shard_for
    ShardedOptimizer._owner_shard_for = lambda self, replica, group: (
        out_of_memory(self, replica, group) if replica is preloaded else real(self, replica, group)
    )
    try:
        ShardedOptimizer(plain)
    except MemoryError:
        pass
    finally:
        ShardedOptimizer._owner_shard_for = real
    unchanged = (
        plain.param_groups[0]["params"] == [trained, preloaded],
        set(plain.state) == state_before,
        torch.equal(trained.slot("exp_avg"), exp_avg_before),
    )
    wrapped = ShardedOptimizer(plain)
    shards = wrapped.owner_shards()
    return unchanged, len(shards[id(trained)]), len(shards[id(preloaded)])


def test_a_wrap_that_fails_midway_changes_nothing_and_untrained_rows_are_not_copied():
    ((unchanged, trained_rows, preloaded_rows),) = run_ranks(1, _wrapping_that_fails_midway)
    assert unchanged == (True, True, True), "a failed wrap left tables swapped, state moved or slots dropped"
    assert trained_rows == len(_WARMUP_IDS), "the trained rows moved into the owner shard"
    assert preloaded_rows == 0, "rows no optimizer step touched stay out of the shard"


def _bad_lr_on_one_rank(rank, world_size):
    table = ShardedHashTable(4, name="item")
    optimizer = ShardedOptimizer(SparseAdamW([table], lr=0.1))
    optimizer.zero_grad()
    table(torch.arange(6)).sum().backward()
    before = table.weight.clone()
    if rank == 1:
        optimizer.param_groups[0]["lr"] = -1.0  # as a buggy scheduler would, on one rank only
    start = time.monotonic()
    try:
        optimizer.step()
    except Exception as error:  # noqa: BLE001 (the test reports which error each rank saw)
        return type(error).__name__, str(error), time.monotonic() - start, torch.equal(table.weight, before)
    return "no error", "", 0.0, False


def test_a_bad_lr_on_one_rank_makes_every_rank_raise_at_the_step_and_changes_nothing():
    results = run_ranks(2, _bad_lr_on_one_rank, deadline_s=60)
    assert results[0][0] == "PeerError" and "rank 1" in results[0][1]
    assert results[1][0] == "ValueError" and "learning rate" in results[1][1]
    assert all(seconds < 10 and unchanged for _, _, seconds, unchanged in results)


def _bad_lr_mid_accumulation(rank, world_size):
    table = ShardedHashTable(4, name="item")
    optimizer = ShardedOptimizer(SparseAdamW([table], lr=0.1))
    optimizer.set_grad_accum_steps(2)
    optimizer.zero_grad()
    table(torch.arange(6)).sum().backward()
    if rank == 1:
        optimizer.param_groups[0]["lr"] = -1.0
    optimizer.step()  # a micro-step: nothing applied, nothing raised on one rank alone
    table(torch.arange(6)).sum().backward()  # the next forward is collective: both ranks get here
    before = table.weight.clone()
    start = time.monotonic()
    try:
        optimizer.step()
    except Exception as error:  # noqa: BLE001 (the test reports which error each rank saw)
        return type(error).__name__, str(error), time.monotonic() - start, torch.equal(table.weight, before)
    return "no error", "", 0.0, False


def test_a_bad_lr_set_mid_accumulation_on_one_rank_reaches_every_rank_at_the_update():
    results = run_ranks(2, _bad_lr_mid_accumulation, deadline_s=60)
    assert results[0][0] == "PeerError" and results[1][0] == "ValueError"
    assert all(seconds < 10 and unchanged for _, _, seconds, unchanged in results)


def _different_accumulation(rank, world_size):
    optimizer = ShardedOptimizer(SparseAdamW([ShardedHashTable(4, name="item")], lr=0.1))
    start = time.monotonic()
    try:
        optimizer.set_grad_accum_steps(2 + rank)
    except Exception as error:  # noqa: BLE001 (the test reports which error each rank saw)
        return type(error).__name__, str(error), time.monotonic() - start, optimizer.grad_accum_steps
    return "no error", "", 0.0, optimizer.grad_accum_steps


def test_ranks_asking_for_different_accumulation_steps_all_raise_naming_them():
    results = run_ranks(2, _different_accumulation, deadline_s=60)
    assert all(name == "ConfigMismatchError" and "steps=3" in text for name, text, _, _ in results)
    assert all(seconds < 10 and steps == 1 for _, _, seconds, steps in results)
