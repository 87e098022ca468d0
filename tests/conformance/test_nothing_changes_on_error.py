"""An error leaves tables and optimizers as they were, by defect class (issue: transactional changes).

1. validation before mutation; 2. ``load_state_dict`` checks what it is given; 3. moves
that fail leave the table as it was.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from recis.nn.modules.hashtable import HashTable
from recis.optim import AdamWTF, SparseAdamW


def _trained_table(name: str = "t", dim: int = 4) -> tuple[HashTable, SparseAdamW]:
    table = HashTable(dim, name=name, seed=1)
    optimizer = SparseAdamW(table, lr=0.1)
    table(torch.arange(5)).square().sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    return table, optimizer


def _table_snapshot(table: HashTable) -> dict:
    return {
        "ids": table.ids().clone(),
        "weight": table.weight.clone(),
        **{n: table.slot(n).clone() for n in table.slot_names()},
    }


def _assert_same(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


# ---------------------------------------------------------------------- 1. validation before mutation
def test_adamw_tf_with_a_bad_lr_in_a_later_group_updates_no_group():
    first, second = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    optimizer = AdamWTF([{"params": [first]}, {"params": [second]}], lr=0.1)
    (first.sum() + second.sum()).backward()
    optimizer.param_groups[1]["lr"] = -1.0  # as a buggy scheduler would
    with pytest.raises(ValueError, match="learning rate: -1.0"):
        optimizer.step()
    assert torch.equal(first, torch.ones(3)) and not optimizer.state


def test_adamw_tf_with_a_sparse_grad_in_a_later_group_updates_no_group():
    first, second = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    optimizer = AdamWTF([{"params": [first]}, {"params": [second]}], lr=0.1)
    first.grad = torch.ones(3)
    second.grad = torch.ones(2).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        optimizer.step()
    assert torch.equal(first, torch.ones(3)) and not optimizer.state


def test_a_later_groups_incompatible_slot_gives_no_earlier_table_a_slot():
    fresh, clashing = HashTable(4, name="fresh"), HashTable(4, name="clashing")
    clashing.add_slot("exp_avg", 3, torch.float32)
    with pytest.raises(ValueError, match="slot 'exp_avg' exists with width 3"):
        SparseAdamW([{"params": [fresh]}, {"params": [clashing]}])
    assert fresh.slot_names() == []


# ---------------------------------------------------------------------- 2. load_state_dict checks its input
def _state_with(entry: dict) -> dict:
    _, optimizer = _trained_table()
    state = optimizer.state_dict()
    state["state"][0] = entry
    return state


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"step": -1, "nonfinite_rows": torch.tensor(0)}, "step=-1"),
        ({"step": "x", "nonfinite_rows": torch.tensor(0)}, "step='x'"),
        ({"step": None, "nonfinite_rows": torch.tensor(0)}, "step=None"),
        ({"step": float("nan"), "nonfinite_rows": torch.tensor(0)}, "step=nan"),
        ({"step": True, "nonfinite_rows": torch.tensor(0)}, "step=True"),
        ({"step": 2}, r"holds \['step'\]"),
        ({"step": 2, "nonfinite_rows": 0}, "nonfinite_rows=0"),
        ({"step": 2, "nonfinite_rows": torch.tensor(-3)}, "nonfinite_rows=-3"),
    ],
)
def test_a_bad_table_entry_is_refused_and_changes_nothing(entry, message):
    table, optimizer = _trained_table()
    before, optimizer_before = _table_snapshot(table), copy.deepcopy(optimizer.state_dict())
    with pytest.raises(ValueError, match=message):
        optimizer.load_state_dict(_state_with(entry))
    _assert_same(before, _table_snapshot(table))
    assert optimizer.state_dict()["state"][0]["step"] == optimizer_before["state"][0]["step"]


def test_a_dense_adamw_tf_state_dict_is_refused_by_a_sparse_optimizer():
    param = nn.Parameter(torch.ones(3))
    dense = AdamWTF([param], lr=0.1)
    param.sum().backward()
    dense.step()
    table, optimizer = _trained_table()
    with pytest.raises(ValueError, match="another optimizer's state dict"):
        optimizer.load_state_dict(dense.state_dict())
    assert optimizer.state[table]["step"] == 1


def test_an_entry_for_a_table_that_does_not_exist_names_it():
    _, optimizer = _trained_table()
    state = optimizer.state_dict()
    state["state"][7] = state["state"].pop(0)
    with pytest.raises(ValueError, match="entry for table 7; the optimizer has tables 0..0"):
        optimizer.load_state_dict(state)


def test_a_table_of_another_dim_does_not_load_even_when_both_are_empty():
    source, target = HashTable(3), HashTable(5)
    with pytest.raises(RuntimeError, match=r"'weight' has shape \(0, 3\), expected \(0, 5\)"):
        target.load_state_dict(source.state_dict())


# ---------------------------------------------------------------------- 3. moves and casts
def test_a_move_that_fails_leaves_the_table_as_it_was():
    table, _ = _trained_table()
    before = _table_snapshot(table)
    with pytest.raises(Exception):  # noqa: B017 (whatever the meta device refuses first)
        table.to("meta")
    assert table.device == torch.device("cpu")
    _assert_same(before, _table_snapshot(table))
    assert table.lookup(torch.arange(5)).shape == (5, 4)
