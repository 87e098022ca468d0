"""HashTable as RecIS spells it: positional arguments, storage knobs, children, gradient
reduction, and RecIS's method names."""

from __future__ import annotations

import pytest
import torch

from recis.nn import HashTable
from recis.nn.initializers import ConstantInitializer
from recis.nn.modules.hashtable import Slice, gen_slice
from recis.optim import SparseAdamW


def _ids(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def test_recis_positional_order_is_accepted():
    table = HashTable([4], 1024, torch.float64, "cpu", False, None, gen_slice(0, 2), ConstantInitializer(1.0), "ht")
    assert table.dtype == torch.float64 and table.name == "ht" and table.block_size == 1024
    assert torch.equal(table(_ids(3)), torch.ones(1, 4, dtype=torch.float64))
    assert table.children_hashtable == ["ht"] and not table.coalesce


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"block_size": 0}, ValueError, "block_size must be a positive int"),
        ({"grad_reduce_by": "hdmp_group_sum"}, ValueError, "grad_reduce_by must be one of"),
        ({"slice": (0, 1, 2)}, TypeError, "slice must be a recis.nn.slicing.Slice"),
        ({"children": ["a", "a"]}, ValueError, "children must be distinct"),
        ({"coalesced": "yes"}, TypeError, "coalesced must be a bool"),
    ],
)
def test_bad_recis_options_raise_a_clear_error(kwargs, error, message):
    with pytest.raises(error, match=message):
        HashTable([4], **kwargs)


def test_gen_slice_splits_the_key_space_into_near_equal_contiguous_slices():
    slices = [gen_slice(i, 3, 10) for i in range(3)]
    assert [(s.slice_begin, s.slice_end) for s in slices] == [(0, 4), (4, 7), (7, 10)]
    with pytest.raises(ValueError, match="begin <= end"):
        Slice(5, 3, 10)


def test_a_coalesced_table_keeps_the_children_ids_apart_and_serves_each_child():
    table = HashTable([2], coalesced=True, children=["user", "item"], name="shared")
    user, item = table.encode_ids(_ids(7, 8), "user"), table.encode_ids(_ids(7), "item")
    with torch.no_grad():
        table(user), table(item)
    assert len(table) == 3  # id 7 of user and id 7 of item are two rows
    assert torch.equal(table.ids("user"), _ids(7, 8)) and table.ids("item").numel() == 1
    assert int(table.ids("item")[0]) >> 52 == 1  # the child's index in the top 12 bits, as RecIS
    assert table.embeddings("item").shape == (1, 2)
    table.clear("user")
    assert torch.equal(table.ids(), item)


def test_children_of_a_table_that_is_not_coalesced_share_ids():
    table = HashTable([2], children=["a", "b"])
    assert torch.equal(table.encode_ids(_ids(5), "b"), _ids(5))


def test_grad_reduce_by_id_averages_an_ids_gradient_over_its_occurrences_in_a_lookup():
    by_worker, by_id = HashTable([2], grad_reduce_by="worker"), HashTable([2], grad_reduce_by="id")
    for table in (by_worker, by_id):
        table(_ids(1, 2, 2, 2)).sum().backward()
    assert by_worker.grad().to_dense().tolist() == [[1.0, 1.0], [3.0, 3.0]]
    assert by_id.grad().to_dense().tolist() == [[1.0, 1.0], [1.0, 1.0]]


def test_recis_method_names_insert_embeddings_ids_map_grad_initializer_and_reset():
    table = HashTable([3], initializer=ConstantInitializer(0.0))
    table.insert(_ids(10, 20), torch.ones(2, 3))
    assert torch.equal(table.embeddings(), torch.ones(2, 3))
    ids, rows = table.ids_map()
    assert ids.tolist() == [10, 20] and rows.tolist() == [0, 1]
    assert isinstance(table.initializer(), ConstantInitializer)
    table.accept_grad(_ids(20, 20), torch.full((2, 3), 2.0))
    gradient = table.grad(acc_step=2)
    assert gradient.is_sparse and gradient.to_dense().tolist() == [[0.0] * 3, [2.0] * 3]
    with pytest.raises(ValueError, match="acc_step must be a positive int"):
        table.grad(0)
    table.reset()
    assert len(table) == 0 and not table.has_grad


def test_recis_style_training_runs_with_positional_arguments_and_an_optimizer():
    table = HashTable([4], 16, torch.float32, "cpu", name="emb")
    optimizer = SparseAdamW([table], lr=0.1)
    before = table(_ids(1, 2)).detach()
    table(_ids(1, 2)).sum().backward()
    optimizer.step()
    assert not torch.equal(table(_ids(1, 2)).detach(), before)
