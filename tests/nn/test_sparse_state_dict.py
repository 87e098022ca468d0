"""split_sparse_dense_state_dict (RecIS's name): the tables of a state dict, keyed by name,
apart from the dense entries, which stay in the dict given."""

from __future__ import annotations

import io

import torch
from torch import nn

from recis.nn.modules.hashtable import HashTable, split_sparse_dense_state_dict
from recis.optim import SparseAdamW


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.user = HashTable([2], name="user")
        self.item = HashTable([3])
        self.dense = nn.Linear(2, 1)
        self.tower = nn.ModuleDict({"again": self.user})  # one table under two paths


def test_tables_are_keyed_by_name_or_path_and_leave_only_dense_entries():
    model = _Model()
    model.user(torch.tensor([1, 2])).sum().backward()  # a slot-less table with a pending gradient
    state = model.state_dict()
    sparse, dense = split_sparse_dense_state_dict(state)
    assert sparse == {"user": model.user, "item": model.item}
    assert dense is state and sorted(dense) == ["dense.bias", "dense.weight"]


def test_an_optimizer_takes_the_sparse_half_and_trains_the_tables():
    model = _Model()
    sparse, _ = split_sparse_dense_state_dict(model.state_dict())
    optimizer = SparseAdamW(sparse, lr=0.1)
    before = model.item(torch.tensor([4])).detach()
    model.item(torch.tensor([4])).sum().backward()
    optimizer.step()
    assert not torch.equal(model.item.lookup(torch.tensor([4])), before)


def test_a_state_dict_that_went_through_torch_save_has_no_tables():
    buffer = io.BytesIO()
    torch.save(_Model().state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)
    keys = sorted(state)
    sparse, dense = split_sparse_dense_state_dict(state)
    assert sparse == {} and sorted(dense) == keys


def test_two_tables_of_one_name_are_keyed_by_path():
    model = nn.ModuleDict({"a": HashTable([2], name="same"), "b": HashTable([2], name="same")})
    sparse, dense = split_sparse_dense_state_dict(model.state_dict())
    assert sparse == {"a": model["a"], "b": model["b"]} and dense == {}
