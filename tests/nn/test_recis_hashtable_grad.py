"""RecIS's gradient tests of ``tests/hashtable``, transcribed to CPU.

Sources (alibaba/RecIS):

- ``tests/hashtable/ht_grad_ga_test.py``, ``HashTableGradAccumulateTest.test_grad``: three
  ``accept_grad`` calls accumulate, and ``grad()`` is a sparse tensor whose coalesced
  indices are the rows and values the summed gradients.
- ``tests/hashtable/sparse_grad_group_reduce_test.py``, ``SparseGradGroupReduceTest``: the
  gradients of 8 occurrences of ids 1, 1, 2, 1, 3, 1, 1, 2 arriving from three source
  groups, reduced per ``group_reduce_by``.

Changes, and why:

- ``accept_grad`` takes ids here and storage indices in RecIS (a deliberate difference,
  see the README's "Coming from RecIS"); ids must be present. RecIS's test accumulates
  into indices 1, 2, 3 of an empty table; here the table first holds ids 1, 2, 3
  (``insert``), and ``grad()``'s rows are mapped to ids with ``ids_map()``.
- ``sparse_grad_group_reduce_test`` calls RecIS's private functions
  ``_sparse_grad_group_reduce``, ``_sparse_grad_group_reduce_compact`` and
  ``_sparse_grad_group_reduce_dense`` of ``grad_reduce_by="hdmp_group_sum"``, which recis
  does not have (refused with a clear error). Its public counterpart here is a table's
  ``grad_reduce_by``, with each source group one lookup:
  ``test_id_reduce_semantics`` becomes three lookups into a ``grad_reduce_by="id"`` table
  (the mean over an id's occurrences in each lookup, summed over lookups), with RecIS's
  expected sum for id 1 (and the same rule for ids 2 and 3);
  ``test_compact_matches_dense_for_all_reduce_modes`` becomes the table's gradient
  against a dense reduction written in the test, for every ``grad_reduce_by``.
  Left out: ``grad_sq_sum`` (the per-group squared gradients that ``hdmp_group_sum``
  stores for SparseAdagradSum, neither of which recis has); the ``worker`` mode's division
  by the HDMP group size (two workers per group in RecIS's test; one process is one worker
  here); and ``test_chunk_compact_matches_dense_for_all_reduce_modes``, which compares two
  of RecIS's private implementations (chunked and whole) of that reduction.
"""

from __future__ import annotations

import pytest
import torch

from recis.nn.modules.hashtable import HashTable

INDEX = torch.tensor([1, 1, 2, 1, 3, 1, 1, 2], dtype=torch.long)
SOURCE_GROUP = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2], dtype=torch.long)
GRAD_OUTPUTS = torch.tensor(
    [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0], [9.0, 10.0], [11.0, 12.0], [13.0, 14.0], [15.0, 16.0]]
)
NUM_GROUPS = 3


def _grad_by_id(table: HashTable) -> dict[int, list[float]]:
    """The table's ``grad()`` as id -> gradient row."""
    grad = table.grad().coalesce()
    ids, rows = table.ids_map()
    id_of_row = dict(zip(rows.tolist(), ids.tolist()))
    return {id_of_row[row]: value for row, value in zip(grad.indices()[0].tolist(), grad.values().tolist())}


def test_grad():
    ht = HashTable(embedding_shape=[4], dtype=torch.float32)
    ht.insert(torch.LongTensor([1, 2, 3]), torch.zeros(3, 4))  # accept_grad takes present ids here
    grad_index = torch.LongTensor([1, 2, 3])
    grad = torch.ones([3, 4], dtype=torch.float32)
    ht.accept_grad(grad_index, grad)
    grad_index = torch.LongTensor([1, 1, 1])
    grad = torch.ones([3, 4], dtype=torch.float32) * 2
    ht.accept_grad(grad_index, grad)
    grad_index = torch.LongTensor([2, 2, 2])
    grad = torch.ones([3, 4], dtype=torch.float32) * 3
    ht.accept_grad(grad_index, grad)
    ga_mean = ht.grad()
    assert ga_mean.is_sparse and ga_mean.dtype == torch.float32
    assert ga_mean.coalesce().indices().shape == (1, 3)
    values_true = {1: [7.0] * 4, 2: [10.0] * 4, 3: [1.0] * 4}
    assert _grad_by_id(ht) == values_true


def _group_lookups(grad_reduce_by: str) -> HashTable:
    """One lookup per source group of RecIS's occurrences; each occurrence receives its gradient row."""
    table = HashTable([2], grad_reduce_by=grad_reduce_by)
    loss = torch.zeros(())
    for group in range(NUM_GROUPS):
        in_group = SOURCE_GROUP == group
        loss = loss + (table(INDEX[in_group]) * GRAD_OUTPUTS[in_group]).sum()
    loss.backward()
    return table


def _dense_reduction(grad_reduce_by: str) -> dict[int, list[float]]:
    """Per id: the sum over groups of the group's sum (``worker``, ``worker_sum``: one worker) or mean (``id``)."""
    num_ids = int(INDEX.max()) + 1
    total = torch.zeros(num_ids, 2)
    for group in range(NUM_GROUPS):
        in_group = SOURCE_GROUP == group
        summed = torch.zeros(num_ids, 2).index_add_(0, INDEX[in_group], GRAD_OUTPUTS[in_group])
        if grad_reduce_by == "id":
            counts = torch.bincount(INDEX[in_group], minlength=num_ids).clamp(min=1)
            summed = summed / counts.unsqueeze(1)
        total += summed
    return {i: total[i].tolist() for i in torch.unique(INDEX).tolist()}


def test_id_reduce_semantics():
    table = _group_lookups("id")
    expected_group0 = torch.tensor([2.0, 3.0])
    expected_group1 = torch.tensor([7.0, 8.0])
    expected_group2 = torch.tensor([12.0, 13.0])
    expected_sum = expected_group0 + expected_group1 + expected_group2
    grads = _grad_by_id(table)
    torch.testing.assert_close(torch.tensor(grads[1]), expected_sum)
    torch.testing.assert_close(torch.tensor(grads[2]), torch.tensor([5.0, 6.0]) + torch.tensor([15.0, 16.0]))
    torch.testing.assert_close(torch.tensor(grads[3]), torch.tensor([9.0, 10.0]))


@pytest.mark.parametrize("group_reduce_by", ["id", "worker", "worker_sum"])
def test_compact_matches_dense_for_all_reduce_modes(group_reduce_by):
    grads = _grad_by_id(_group_lookups(group_reduce_by))
    expected = _dense_reduction(group_reduce_by)
    assert grads.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(torch.tensor(grads[key]), torch.tensor(value))
