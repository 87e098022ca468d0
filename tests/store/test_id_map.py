"""recis.ops.IdMap (on the backend of the ``backend`` fixture) against a Python dict reference."""

from __future__ import annotations

import torch
from id_map_support import find_or_insert

from recis.ops import IdMap

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


def _ids(values) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.int64)


def _random_distinct_ids(count: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(INT64_MIN, INT64_MAX, (count * 2,), dtype=torch.int64, generator=generator)
    seen: dict[int, None] = {}
    for value in ids.tolist():
        seen.setdefault(value, None)
        if len(seen) == count:
            break
    return list(seen)


def _insert_with_reference(id_map, reference: dict[int, int], batch: list[int]) -> torch.Tensor:
    """find_or_insert a batch of distinct ids, mirroring it in ``reference`` and checking the rows."""
    expected_new = [v not in reference for v in batch]
    for value in batch:
        reference.setdefault(value, len(reference))
    rows, is_new = find_or_insert(id_map, _ids(batch))
    assert is_new.tolist() == expected_new
    assert rows.tolist() == [reference[v] for v in batch]
    return rows


def test_new_map_is_empty_and_finds_nothing():
    id_map = IdMap()
    assert len(id_map) == 0
    assert id_map.find(_ids([0, 1, -1, INT64_MIN, INT64_MAX])).tolist() == [-1] * 5
    assert id_map.keys_by_row().tolist() == []


def test_rows_are_numbered_in_insertion_order():
    id_map = IdMap()
    rows = id_map.insert_new(_ids([50, -7, 3]))
    assert rows.tolist() == [0, 1, 2]
    rows = id_map.insert_new(_ids([1000, 8]))
    assert rows.tolist() == [3, 4]
    assert id_map.find(_ids([8, 3, 50, 1000, -7])).tolist() == [4, 2, 0, 3, 1]
    assert len(id_map) == 5


def test_thousands_of_inserts_with_growth_match_dict_reference():
    id_map = IdMap()
    initial_buckets = id_map.bucket_count
    all_ids = _random_distinct_ids(6000, seed=1)
    reference: dict[int, int] = {}
    start = 0
    for size in [1, 7, 100, 900, 1, 2000, 2991]:
        batch = all_ids[start : start + size]
        start += size
        rows = id_map.insert_new(_ids(batch))
        expected = list(range(len(reference), len(reference) + size))
        assert rows.tolist() == expected
        reference.update(zip(batch, expected))
        assert len(id_map) == len(reference)
        # Everything inserted so far is still found at its row after each growth.
        assert id_map.find(_ids(reference)).tolist() == list(reference.values())
    assert start == 6000
    assert id_map.bucket_count > initial_buckets
    assert id_map.bucket_count >= 2 * len(id_map)  # load factor kept <= 1/2
    assert id_map.bucket_count & (id_map.bucket_count - 1) == 0


def test_find_of_absent_ids_gives_minus_one_among_present_ones():
    id_map = IdMap()
    present = _random_distinct_ids(3000, seed=2)
    id_map.insert_new(_ids(present))
    reference = {v: i for i, v in enumerate(present)}
    generator = torch.Generator().manual_seed(3)
    probes = torch.randint(INT64_MIN, INT64_MAX, (2000,), dtype=torch.int64, generator=generator).tolist()
    probes += present[::3] + [0, -1, INT64_MIN, INT64_MAX]
    expected = [reference.get(v, -1) for v in probes]
    assert id_map.find(_ids(probes)).tolist() == expected
    assert expected.count(-1) > 1000  # the probe really mixes absent and present ids


def test_keys_by_row_round_trips_ids_in_insertion_order():
    id_map = IdMap()
    ids = _random_distinct_ids(2500, seed=4)
    for start in range(0, 2500, 600):
        id_map.insert_new(_ids(ids[start : start + 600]))
    keys = id_map.keys_by_row()
    assert keys.dtype == torch.int64
    assert keys.tolist() == ids
    assert id_map.find(keys).tolist() == list(range(2500))


def test_extreme_ids_and_minus_one_are_valid_ids():
    # The empty-bucket marker is a row of -1, so no id value (not even -1 or 0) is reserved.
    special = [-1, 0, INT64_MIN, INT64_MAX, INT64_MIN + 1, INT64_MAX - 1, 1, -2]
    id_map = IdMap()
    assert id_map.find(_ids(special)).tolist() == [-1] * len(special)
    rows, is_new = find_or_insert(id_map, _ids(special))
    assert rows.tolist() == list(range(len(special)))
    assert is_new.all()
    assert id_map.find(_ids(special)).tolist() == list(range(len(special)))
    assert id_map.keys_by_row().tolist() == special
    # Absent neighbours of the specials are still absent.
    assert id_map.find(_ids([-3, 2, INT64_MIN + 2, INT64_MAX - 2])).tolist() == [-1] * 4


def test_minus_one_alone_inserted_into_empty_map_is_found():
    id_map = IdMap()
    id_map.insert_new(_ids([-1]))
    assert id_map.find(_ids([-1, 0])).tolist() == [0, -1]
    assert len(id_map) == 1


def test_find_or_insert_mixes_present_and_new_ids():
    id_map = IdMap()
    reference: dict[int, int] = {}
    _insert_with_reference(id_map, reference, [10, 20, 30, -1])
    batch = [30, 40, 10, INT64_MIN, 50, -1, INT64_MAX]
    rows, is_new = find_or_insert(id_map, _ids(batch))
    assert is_new.tolist() == [False, True, False, True, True, False, True]
    # Present ids keep their rows; new ones get rows 4, 5, 6, 7 in order of appearance.
    assert rows.tolist() == [2, 4, 0, 5, 6, 3, 7]
    assert len(id_map) == 8
    assert id_map.keys_by_row().tolist() == [10, 20, 30, -1, 40, INT64_MIN, 50, INT64_MAX]


def test_find_or_insert_many_rounds_against_dict_reference():
    id_map = IdMap()
    reference: dict[int, int] = {}
    generator = torch.Generator().manual_seed(5)
    pool = _random_distinct_ids(4000, seed=6) + [-1, 0, INT64_MIN, INT64_MAX]
    for _ in range(12):
        picks = torch.randint(0, len(pool), (700,), generator=generator)
        batch = list(dict.fromkeys(pool[i] for i in picks.tolist()))  # distinct, in first-seen order
        _insert_with_reference(id_map, reference, batch)
        assert len(id_map) == len(reference)
    assert len(reference) > 2000  # later rounds really mix present and new ids
    assert id_map.keys_by_row().tolist() == list(reference)


def test_find_or_insert_and_find_of_an_empty_batch():
    id_map = IdMap()
    id_map.insert_new(_ids([1, 2]))
    rows, is_new = find_or_insert(id_map, torch.empty(0, dtype=torch.int64))
    assert rows.numel() == 0 and is_new.numel() == 0
    assert id_map.find(torch.empty(0, dtype=torch.int64)).numel() == 0
    assert id_map.insert_new(torch.empty(0, dtype=torch.int64)).numel() == 0
    assert len(id_map) == 2


def test_clear_empties_the_map_and_restarts_rows_at_zero():
    id_map = IdMap()
    ids = _random_distinct_ids(1000, seed=7)
    id_map.insert_new(_ids(ids))
    id_map.clear()
    assert len(id_map) == 0
    assert id_map.find(_ids(ids[:50])).tolist() == [-1] * 50
    assert id_map.keys_by_row().tolist() == []
    rows, is_new = find_or_insert(id_map, _ids([ids[5], -1, ids[0]]))
    assert rows.tolist() == [0, 1, 2]
    assert is_new.all()
    assert id_map.keys_by_row().tolist() == [ids[5], -1, ids[0]]


def test_structured_ids_multiples_of_2_pow_32_are_all_found():
    id_map = IdMap()
    structured = [k * 2**32 for k in range(-1500, 1500)] + [k * 2**48 for k in range(1, 200)]
    structured = list(dict.fromkeys(structured))
    for start in range(0, len(structured), 500):
        id_map.insert_new(_ids(structured[start : start + 500]))
    assert id_map.find(_ids(structured)).tolist() == list(range(len(structured)))
    assert id_map.keys_by_row().tolist() == structured
    # Neighbours (low bits set) are absent.
    neighbours = [k * 2**32 + 1 for k in range(-100, 100)]
    assert id_map.find(_ids(neighbours)).tolist() == [-1] * len(neighbours)


def test_consecutive_and_strided_ids_against_dict_reference():
    id_map = IdMap()
    reference: dict[int, int] = {}
    batches = [list(range(0, 3000)), list(range(0, 300_000, 97)), list(range(-2000, 2000, 4))]
    for batch in batches:
        batch = list(dict.fromkeys(batch))
        rows, _ = find_or_insert(id_map, _ids(batch))
        for value in batch:
            reference.setdefault(value, len(reference))
        assert rows.tolist() == [reference[v] for v in batch]
    assert len(id_map) == len(reference)
    assert id_map.find(_ids(reference)).tolist() == list(reference.values())
