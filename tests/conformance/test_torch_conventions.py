"""Behaviour a PyTorch user relies on: devices, Module casts, hooks, all-or-nothing errors."""

import pytest
import torch
from torch import nn

from recis.nn.modules.hashtable import HashTable
from recis.optim import SparseAdam, SparseAdamW


def _trained_table(dtype=torch.float32):
    table = HashTable(4, dtype=dtype, name="t")
    optimizer = SparseAdamW(table, lr=0.1)
    table(torch.tensor([1, 2, 3])).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    return table, optimizer


def test_a_device_given_without_index_accepts_ids_on_that_device():
    # "cuda" vs "cuda:0" is the case users hit; "cpu" vs "cpu:0" exercises the same normalisation here.
    table = HashTable(4, device="cpu:0")
    assert table(torch.tensor([5])).shape == (1, 4)


def test_model_double_casts_the_rows_and_keeps_float32_slots():
    table, _ = _trained_table()
    before = table.lookup(torch.tensor([1, 2, 3]))
    nn.Sequential(table).double()
    assert table.dtype == torch.float64 and table.weight.dtype == torch.float64
    assert table.slot("exp_avg").dtype == torch.float32
    torch.testing.assert_close(table.lookup(torch.tensor([1, 2, 3])), before.double(), rtol=0, atol=0)


def test_model_to_the_same_device_keeps_every_row():
    table, _ = _trained_table()
    before = table.lookup(torch.tensor([1, 2, 3]))
    nn.Sequential(table).to("cpu")
    torch.testing.assert_close(table.lookup(torch.tensor([1, 2, 3])), before, rtol=0, atol=0)


def test_backward_after_a_reload_that_renumbered_rows_raises_instead_of_updating_the_wrong_id():
    table = HashTable(2)
    table(torch.tensor([10, 20]))
    out = table(torch.tensor([10]))
    table.load_state_dict({"ids": torch.tensor([20, 10]), "weight": torch.zeros(2, 2)})
    with pytest.raises(RuntimeError, match="reloaded between forward and backward"):
        out.sum().backward()
    assert table.pending_grad() is None


def test_failed_optimizer_load_leaves_groups_state_and_slots_unchanged():
    source = SparseAdam(HashTable(4), lr=0.5, state_dtype=torch.bfloat16)
    table, optimizer = _trained_table()
    groups_before = [dict(g) for g in optimizer.param_groups]
    state_before = dict(optimizer.state[table])
    with pytest.raises(ValueError, match="exp_avg"):
        optimizer.load_state_dict(source.state_dict())
    assert [dict(g) for g in optimizer.param_groups] == groups_before
    assert optimizer.state[table] == state_before
    assert table.slot("exp_avg").dtype == torch.float32


def test_failed_add_param_group_leaves_the_optimizer_unchanged():
    table, optimizer = _trained_table()
    other = HashTable(4)
    other.add_slot("exp_avg", 4, torch.bfloat16)
    with pytest.raises(ValueError, match="exp_avg"):
        optimizer.add_param_group({"params": [other]})
    assert len(optimizer.param_groups) == 1
    assert other.slot_names() == ["exp_avg"]


def test_optimizer_state_dict_hooks_run():
    _, optimizer = _trained_table()
    calls = []
    optimizer.register_state_dict_pre_hook(lambda opt: calls.append("pre"))
    optimizer.register_state_dict_post_hook(lambda opt, sd: {**sd, "extra": 1})
    optimizer.register_load_state_dict_pre_hook(lambda opt, sd: {k: v for k, v in sd.items() if k != "extra"})
    optimizer.register_load_state_dict_post_hook(lambda opt: calls.append("post-load"))
    state = optimizer.state_dict()
    assert state["extra"] == 1
    optimizer.load_state_dict(state)
    assert calls == ["pre", "post-load"]


def test_assign_accepts_what_lookup_returns_for_multi_dimensional_ids():
    table = HashTable([2, 3])
    ids = torch.tensor([[1, 2], [3, 4]])
    table(ids)
    values = table.lookup(ids) + 1
    table.assign(ids, values)
    torch.testing.assert_close(table.lookup(ids), values, rtol=0, atol=0)


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1])
def test_a_seed_outside_int64_is_rejected_at_construction(seed):
    with pytest.raises(ValueError, match="seed"):
        HashTable(4, seed=seed)
