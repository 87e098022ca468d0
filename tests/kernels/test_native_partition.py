"""Native hash partitioning against the torch kernels: owner ranks and distinct ids grouped by owner."""

from __future__ import annotations

import pytest
import torch
from native_support import require_native

from recis.ops import native_kernels, partition

require_native()

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
EXTREME_IDS = torch.tensor([INT64_MAX, -1, INT64_MIN, 0, -1, INT64_MAX, 5, INT64_MIN, 2**40, -(2**50)])


def _check_unique_by_owner(ids: torch.Tensor, world_size: int) -> None:
    native = native_kernels.unique_by_owner(ids, world_size)
    reference = partition.unique_by_owner(ids, world_size)
    for native_part, reference_part in zip(native, reference):
        assert torch.equal(native_part, reference_part)


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_owner_rank_equals_torch_for_random_and_extreme_ids(world_size):
    random_ids = torch.randint(INT64_MIN, INT64_MAX, (50_000,), generator=torch.Generator().manual_seed(3))
    ids = torch.cat([random_ids, EXTREME_IDS])
    native = native_kernels.owner_rank(ids, world_size)
    assert torch.equal(native, partition.owner_rank(ids, world_size))
    assert int(native.min()) >= 0 and int(native.max()) < world_size


def test_owner_rank_keeps_the_shape_of_its_input():
    ids = torch.arange(12).reshape(3, 4)
    assert torch.equal(native_kernels.owner_rank(ids, 3), partition.owner_rank(ids, 3))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_unique_by_owner_equals_torch_with_many_duplicates(world_size):
    ids = torch.randint(0, 700, (5000,), generator=torch.Generator().manual_seed(world_size))
    _check_unique_by_owner(ids, world_size)


def test_unique_by_owner_of_extreme_empty_and_single_ids():
    _check_unique_by_owner(EXTREME_IDS, 3)
    _check_unique_by_owner(torch.tensor([42]), 2)
    _check_unique_by_owner(torch.empty(0, dtype=torch.int64), 2)


def test_unique_by_owner_groups_by_owner_in_order_of_first_appearance():
    ids = torch.tensor([9, 4, 9, 17, 4, 2, 30, 17, 11])
    unique, inverse, counts = native_kernels.unique_by_owner(ids, 2)
    assert torch.equal(unique[inverse], ids)
    owners = partition.owner_rank(unique, 2)
    assert torch.equal(owners, owners.sort().values)
    assert counts.tolist() == [int((owners == rank).sum()) for rank in range(2)]
    first_seen = [int((ids == id_).nonzero()[0]) for id_ in unique.tolist()]
    for rank in range(2):
        in_group = [first for first, owner in zip(first_seen, owners.tolist()) if owner == rank]
        assert in_group == sorted(in_group)


def test_partition_rejects_a_world_size_below_one_and_non_1d_ids():
    with pytest.raises(RuntimeError, match="world_size"):
        native_kernels.unique_by_owner(torch.tensor([1, 2]), 0)
    with pytest.raises(RuntimeError, match="1-D int64"):
        native_kernels.unique_by_owner(torch.tensor([[1, 2]]), 2)
