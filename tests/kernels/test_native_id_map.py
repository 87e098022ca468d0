"""The native id map against a dict reference and the torch id map (both, side by side)."""

from __future__ import annotations

import pytest
import torch
from id_map_support import find_or_insert
from native_support import require_native

from recis.ops.hashing import mix64
from recis.ops.id_map import TorchIdMap
from recis.ops.native_id_map import NativeIdMap
from recis.ops.row_keys import RowKeys

require_native()

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
SPECIAL = [-1, 0, INT64_MIN, INT64_MAX, INT64_MIN + 1, INT64_MAX - 1, 1, -2]
MAPS = [NativeIdMap, TorchIdMap]


def _ids(values) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.int64)


def _find_or_insert_with_reference(id_map, reference: dict[int, int], batch: list[int]) -> None:
    """Find-or-insert the distinct ids of ``batch``, mirrored in ``reference``."""
    batch = list(dict.fromkeys(batch))
    expected_new = [value not in reference for value in batch]
    for value in batch:
        reference.setdefault(value, len(reference))
    rows, is_new = find_or_insert(id_map, _ids(batch))
    assert rows.tolist() == [reference[v] for v in batch]
    assert is_new.tolist() == expected_new


@pytest.mark.parametrize("map_cls", MAPS)
def test_thousands_of_inserts_with_growth_against_a_dict(map_cls):
    id_map = map_cls()
    generator = torch.Generator().manual_seed(1)
    reference: dict[int, int] = {}
    for size in [1, 7, 100, 900, 3000, 20000, 5]:
        batch = list(dict.fromkeys(torch.randint(INT64_MIN, INT64_MAX, (size,), generator=generator).tolist()))
        _find_or_insert_with_reference(id_map, reference, batch)
        assert len(id_map) == len(reference)
        assert id_map.bucket_count >= 2 * len(id_map) and id_map.bucket_count & (id_map.bucket_count - 1) == 0
    assert id_map.find(_ids(reference)).tolist() == list(reference.values())
    assert id_map.keys_by_row().tolist() == list(reference)


@pytest.mark.parametrize("map_cls", MAPS)
def test_keys_of_rows_reads_back_the_ids_of_any_rows_after_growth(map_cls):
    id_map = map_cls()
    reference: dict[int, int] = {}
    generator = torch.Generator().manual_seed(4)
    for size in [3, 50, 2000, 9000]:
        _find_or_insert_with_reference(
            id_map, reference, torch.randint(-5000, 5000, (size,), generator=generator).tolist()
        )
    ids_by_row = list(reference)
    rows = torch.randint(0, len(id_map), (500,), generator=generator)
    assert id_map.keys_of_rows(rows).tolist() == [ids_by_row[r] for r in rows.tolist()]
    with pytest.raises(IndexError):
        id_map.keys_of_rows(torch.tensor([len(id_map)]))


@pytest.mark.parametrize("map_cls", MAPS)
def test_keys_by_row_is_a_copy_writing_to_it_leaves_the_map_alone(map_cls):
    id_map = map_cls()
    id_map.insert_new(_ids([7, 8, 9]))
    keys = id_map.keys_by_row()
    keys[0] = 100
    assert id_map.keys_by_row().tolist() == [7, 8, 9]
    assert id_map.keys_of_rows(torch.tensor([0])).tolist() == [7]
    id_map.clear()
    id_map.insert_new(_ids([1]))
    assert id_map.keys_by_row().tolist() == [1]


def test_native_and_torch_maps_number_rows_identically():
    generator = torch.Generator().manual_seed(3)
    native, reference = NativeIdMap(), TorchIdMap()
    for _ in range(6):
        batch = torch.randint(-500, 500, (700,), generator=generator).unique()
        for id_map in (native, reference):
            find_or_insert(id_map, batch)
        probe = torch.randint(-600, 600, (300,), generator=generator)
        assert torch.equal(native.find(probe), reference.find(probe))
    assert torch.equal(native.keys_by_row(), reference.keys_by_row())


def test_int64_extremes_and_minus_one_are_ids():
    id_map = NativeIdMap()
    assert id_map.find(_ids(SPECIAL)).tolist() == [-1] * len(SPECIAL)
    assert id_map.insert_new(_ids(SPECIAL)).tolist() == list(range(len(SPECIAL)))
    assert id_map.find(_ids(SPECIAL)).tolist() == list(range(len(SPECIAL)))
    assert id_map.find(_ids([-3, 2, INT64_MIN + 2, INT64_MAX - 2])).tolist() == [-1] * 4
    structured = [k * 2**32 for k in range(-2000, 2000)]
    rows, _ = find_or_insert(id_map, _ids(structured))
    assert id_map.find(_ids(structured)).tolist() == rows.tolist()


def test_clear_and_empty_batches():
    id_map = NativeIdMap()
    id_map.insert_new(_ids(range(5000)))
    empty = torch.empty(0, dtype=torch.int64)
    assert id_map.find(empty).numel() == 0 and id_map.insert_new(empty).numel() == 0
    id_map.clear()
    assert len(id_map) == 0 and id_map.find(_ids([1, 2])).tolist() == [-1, -1]
    assert id_map.insert_new(_ids([2, 1])).tolist() == [0, 1]
    assert id_map.find(_ids([1, 2, 3])).tolist() == [1, 0, -1]


@pytest.mark.parametrize("map_cls", MAPS)
def test_an_insert_that_fails_for_memory_changes_nothing(map_cls, monkeypatch):
    id_map = map_cls()
    id_map.insert_new(_ids(range(100)))

    def no_memory(self, count):
        raise MemoryError("no room for the row keys")

    monkeypatch.setattr(RowKeys, "room_for", no_memory)
    with pytest.raises(MemoryError):
        find_or_insert(id_map, _ids([5, 1000, 1001]))
    with pytest.raises(MemoryError):
        id_map.insert_new(_ids([2000]))
    monkeypatch.undo()
    assert len(id_map) == 100
    assert id_map.find(_ids([1000, 1001, 2000, 5])).tolist() == [-1, -1, -1, 5]
    assert find_or_insert(id_map, _ids([1001, 5]))[0].tolist() == [100, 5]
    assert id_map.keys_by_row().tolist() == [*range(100), 1001]


@pytest.mark.parametrize("map_cls", MAPS)
def test_erased_ids_are_absent_their_rows_take_new_ids_and_probes_pass_the_tombstones(map_cls):
    generator = torch.Generator().manual_seed(11)
    id_map = map_cls()
    reference = {value: row for row, value in enumerate(range(0, 400, 3))}
    id_map.insert_new(_ids(reference))
    next_id = 10_000
    for _ in range(40):  # erase some ids, give their rows to new ones: many tombstones, rehashes in place
        chosen = torch.randperm(len(reference), generator=generator)[:7].tolist()
        erased = [list(reference)[i] for i in chosen]
        rows = id_map.erase(_ids(erased + [-12345]))
        assert rows.tolist() == [reference.pop(value) for value in erased] + [-1]
        new = list(range(next_id, next_id + 7))
        next_id += 7
        id_map.insert_new(_ids(new), rows[:7])
        reference.update(zip(new, rows[:7].tolist()))
        assert id_map.find(_ids(erased)).tolist() == [-1] * 7
    assert len(id_map) == len(reference)
    assert id_map.find(_ids(reference)).tolist() == list(reference.values())
    keys = id_map.keys_by_row()
    assert all(int(keys[row]) == value for value, row in reference.items())


def _bucket_rows(id_map) -> torch.Tensor:
    """The row column of a map's buckets (-1 empty, -2 erased)."""
    return id_map._buckets[:, 1] if isinstance(id_map, NativeIdMap) else id_map._bucket_rows


@pytest.mark.parametrize("map_cls", MAPS)
def test_a_rehash_at_the_same_bucket_count_drops_the_tombstones_in_place(map_cls):
    # 55 ids in 128 buckets, 30 of them at home in the last 4 buckets, so probe sequences wrap
    # around to bucket 0; erasing 10 and inserting 10 passes the load limit (live + erased <= 64).
    candidates = torch.arange(1, 200_000, dtype=torch.int64)
    homes = mix64(candidates) & 127
    wrapping, elsewhere = candidates[homes >= 124][:30], candidates[homes < 100][:40]
    id_map = map_cls()
    reference = dict(zip([*wrapping.tolist(), *elsewhere[:25].tolist()], range(55)))
    id_map.insert_new(_ids(reference))
    rows_before = _bucket_rows(id_map)
    assert id_map.bucket_count == 128
    erased = [*wrapping[::3].tolist()]  # 10 ids of the wrapping cluster
    rows = id_map.erase(_ids(erased))
    new = elsewhere[25:35].tolist()
    id_map.insert_new(_ids(new), rows)
    for value in erased:
        reference.pop(value)
    reference.update(zip(new, rows.tolist()))
    bucket_rows = _bucket_rows(id_map)
    assert bucket_rows.data_ptr() == rows_before.data_ptr() and id_map.bucket_count == 128  # the same array
    assert int((bucket_rows == -2).sum()) == 0 and int((bucket_rows >= 0).sum()) == 55
    assert id_map.find(_ids(reference)).tolist() == list(reference.values())
    assert id_map.find(_ids(erased + elsewhere[35:].tolist())).tolist() == [-1] * 15


def test_native_and_torch_maps_agree_after_erasing_and_truncating():
    native, torch_map = NativeIdMap(), TorchIdMap()
    for id_map in (native, torch_map):
        id_map.insert_new(_ids(range(100)))
        id_map.erase(_ids([98, 99, 5]))
        id_map.erase(_ids([97]))
        id_map.insert_new(_ids([97]), torch.tensor([5]))
        id_map.truncate(97)
    probe = _ids(range(-5, 105))
    assert torch.equal(native.find(probe), torch_map.find(probe))
    assert torch.equal(native.keys_by_row(), torch_map.keys_by_row())
    assert len(native) == 97 and native.find(_ids([97, 5])).tolist() == [5, -1]
