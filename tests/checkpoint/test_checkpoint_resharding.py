"""A checkpoint written by W ranks loads on W' ranks (W' = 1 included) and training continues
as if never stopped: same global batches, mean loss, compared with one uninterrupted process."""

import pytest
from dist_harness import run_ranks
from two_table_training import (
    TwoTables,
    assert_owned_union_equals_reference,
    assert_replicas_equal_reference,
    global_batches,
    make_optimizer,
    reference_state,
    train,
    trained_results,
)

import recis.checkpoint as ck
from recis.dist import ShardedHashTable, ShardedOptimizer, owner_rank
from recis.nn.modules.hashtable import HashTable

SAVED_AT = 2  # of the 5 updates of the reference run


def _build(kind: str, distributed: bool):
    model = TwoTables(ShardedHashTable if kind == "sharded" else HashTable)
    optimizer = make_optimizer("adamw", model, "row", 1)
    return model, (ShardedOptimizer(optimizer) if distributed else optimizer)


def _train_and_save(rank, world_size, root, kind):
    model, optimizer = _build(kind, distributed=True)
    train(model, optimizer, global_batches(1)[:SAVED_AT], rank, world_size)
    ck.save(root, model, optimizer, extra={"step": SAVED_AT})


def _load_and_continue(rank, world_size, root, kind):
    model, optimizer = _build(kind, distributed=True)
    assert ck.load(root, model, optimizer) == {"step": SAVED_AT}
    train(model, optimizer, global_batches(1)[SAVED_AT:], rank, world_size)
    return trained_results(model, optimizer, kind)


def _assert_matches_uninterrupted(per_rank, kind, case):
    reference = reference_state("adamw", 1, "row")
    assert_owned_union_equals_reference(per_rank, reference, case)
    if kind == "replicated":
        assert_replicas_equal_reference(per_rank, reference, case)


@pytest.mark.parametrize(
    "kind, saved_on, loaded_on",
    [("sharded", 2, 1), ("sharded", 2, 3), ("sharded", 3, 2), ("replicated", 2, 3), ("replicated", 3, 1)],
)
def test_a_checkpoint_from_w_ranks_continues_on_w_prime_ranks_as_if_never_stopped(tmp_path, kind, saved_on, loaded_on):
    run_ranks(saved_on, _train_and_save, str(tmp_path), kind)
    per_rank = run_ranks(loaded_on, _load_and_continue, str(tmp_path), kind)
    _assert_matches_uninterrupted(per_rank, kind, (kind, saved_on, loaded_on))


def test_a_sharded_checkpoint_continues_in_one_plain_process_and_back(tmp_path):
    run_ranks(2, _train_and_save, str(tmp_path / "sharded"), "sharded")
    model, optimizer = _build("plain", distributed=False)  # no process group at all
    assert ck.load(tmp_path / "sharded", model, optimizer) == {"step": SAVED_AT}
    train(model, optimizer, global_batches(1)[SAVED_AT:], rank=0, world_size=1)
    _assert_matches_uninterrupted([trained_results(model, optimizer, "plain")], "sharded", "2 ranks -> 1 process")

    model, optimizer = _build("plain", distributed=False)
    train(model, optimizer, global_batches(1)[:SAVED_AT], rank=0, world_size=1)
    ck.save(tmp_path / "plain", model, optimizer, extra={"step": SAVED_AT})
    per_rank = run_ranks(2, _load_and_continue, str(tmp_path / "plain"), "sharded")
    _assert_matches_uninterrupted(per_rank, "sharded", "1 process -> 2 ranks")


def test_each_rank_keeps_only_the_ids_it_owns_after_resharding(tmp_path):
    run_ranks(2, _train_and_save, str(tmp_path), "sharded")
    per_rank = run_ranks(3, _load_and_continue, str(tmp_path), "sharded")
    for rank, result in enumerate(per_rank):
        for state in result["owned"].values():
            assert len(state["ids"]) > 0
            assert bool((owner_rank(state["ids"], 3) == rank).all())
