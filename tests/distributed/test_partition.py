import pytest
import torch
from reference_hashing import mix64_int

from recis.dist import owner_rank


def test_owner_is_unsigned_mix64_modulo_world_size():
    ids = torch.cat([torch.tensor([0, -1, 2**63 - 1, -(2**63)]), torch.randint(-(2**63), 2**63 - 1, (2000,))])
    for world_size in (1, 2, 3, 7, 1000):
        expected = [(mix64_int(i) % 2**64) % world_size for i in ids.tolist()]
        assert owner_rank(ids, world_size).tolist() == expected


def test_consecutive_ids_spread_evenly_over_ranks():
    counts = torch.bincount(owner_rank(torch.arange(100_000) * 1024, 4), minlength=4)
    assert counts.min() > 0.95 * 25_000 and counts.max() < 1.05 * 25_000


@pytest.mark.parametrize("world_size", [0, -2, 2.0, True])
def test_invalid_world_size_is_rejected(world_size):
    with pytest.raises(ValueError, match="world_size"):
        owner_rank(torch.tensor([1]), world_size)
