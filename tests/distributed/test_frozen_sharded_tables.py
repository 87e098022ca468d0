"""Frozen ShardedHashTables (``requires_optimizer_state=False``) behave as frozen HashTables:
``accept_grad`` refuses, and lookups with grad enabled do not protect rows from eviction."""

import torch
from dist_harness import run_ranks

from recis.dist import ShardedHashTable


def _accept_grad_on_a_frozen_sharded_table(rank, world_size):
    table = ShardedHashTable(3, name="frozen", requires_optimizer_state=False)
    table(torch.tensor([1]))
    try:
        table.accept_grad(torch.tensor([1]), torch.ones(1, 3))
        error = None
    except RuntimeError as refused:
        error = str(refused)
    return error, bool(table.grad_buffer)


def test_accept_grad_on_a_frozen_sharded_table_raises_and_keeps_no_gradient():
    ((error, has_grad),) = run_ranks(1, _accept_grad_on_a_frozen_sharded_table)
    assert error is not None and "frozen" in error
    assert not has_grad


def _full_frozen_sharded_table(rank, world_size):
    table = ShardedHashTable(3, name="frozen", capacity=4, requires_optimizer_state=False)
    table(torch.tensor([0, 1, 2, 3]))
    table(torch.tensor([4, 5]))
    return sorted(table.local_ids().tolist())


def test_a_full_frozen_sharded_table_evicts_rows_of_earlier_lookups():
    assert run_ranks(1, _full_frozen_sharded_table) == [[2, 3, 4, 5]]
