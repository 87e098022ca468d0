"""RowStore: ids to rows, rows, slots and metadata columns, and the changes that reuse or renumber rows."""

from __future__ import annotations

import pytest
import torch

from recis.store import RowStore

CPU = torch.device("cpu")


def _ids(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def _tens(ids: torch.Tensor) -> torch.Tensor:
    """First values of new rows: the id times ten, in both columns."""
    return (ids.double() * 10).reshape(-1, 1).expand(-1, 2).float()


def _store_with(*values: int) -> RowStore:
    store = RowStore(2, torch.float32, CPU)
    store.add_slot("m", 2, torch.float32)
    store.find_or_insert(_ids(*values), _tens)
    return store


def test_find_or_insert_numbers_new_rows_in_order_and_finds_present_ones():
    store = _store_with(7, -3)
    rows = store.find_or_insert(_ids(-3, 2**63 - 1, 7, -(2**63)), _tens)
    assert rows.tolist() == [1, 2, 0, 3]
    assert store.find(_ids(7, 5)).tolist() == [0, -1]
    assert torch.equal(store.ids(), _ids(7, -3, 2**63 - 1, -(2**63)))
    assert torch.equal(store.ids_of(torch.tensor([3, 0])), _ids(-(2**63), 7))


def test_new_rows_take_given_values_or_the_function_of_their_ids_and_zero_slots():
    store = _store_with(1)
    store.scatter(torch.tensor([0]), None, {"m": torch.ones(1, 2)})
    given = torch.tensor([[9.0, 9.0], [8.0, 8.0]])
    rows = store.find_or_insert(_ids(1, 4), given)
    assert torch.equal(store.gather(rows), torch.tensor([[10.0, 10.0], [8.0, 8.0]]))  # present row kept
    assert store.slot("m").tolist() == [[1.0, 1.0], [0.0, 0.0]]


def test_a_failing_initializer_changes_nothing():
    store = _store_with(1, 2)

    def failing(ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("initializer failed")

    with pytest.raises(RuntimeError, match="initializer failed"):
        store.find_or_insert(_ids(3, 1), failing)
    assert len(store) == 2 and store.find(_ids(3)).tolist() == [-1]


def test_scatter_writes_rows_and_registered_slots_only():
    store = _store_with(1, 2)
    store.scatter(
        torch.tensor([1]), torch.tensor([[5.0, 6.0]]), {"m": torch.tensor([[1.0, 2.0]]), "v": torch.ones(1, 2)}
    )
    assert store.weight.tolist() == [[10.0, 10.0], [5.0, 6.0]]
    assert store.slot("m").tolist() == [[0.0, 0.0], [1.0, 2.0]]
    assert store.slot_names() == ["m"]


def test_growth_keeps_rows_and_slots():
    store = _store_with(*range(10))
    store.scatter(torch.arange(10), None, {"m": torch.arange(20.0).reshape(10, 2)})
    store.find_or_insert(torch.arange(10, 1000), _tens)
    assert store.capacity >= 1000
    assert torch.equal(store.gather(store.find(torch.arange(1000))), _tens(torch.arange(1000)))
    assert torch.equal(store.slot("m")[:10], torch.arange(20.0).reshape(10, 2))
    assert not store.slot("m")[10:].any()


def test_remove_moves_the_last_rows_into_the_holes_and_reports_the_moves():
    store = _store_with(5, 6, 7, 8, 9)
    store.add_column("seen")
    store.scatter(torch.arange(5), None, {"m": torch.arange(10.0).reshape(5, 2)})
    store.column("seen")[:] = _ids(50, 60, 70, 80, 90)
    generation = store.generation
    moved_from, moved_to = store.remove(_ids(6, 8, 99, 6))
    assert (moved_from.tolist(), moved_to.tolist()) == ([4], [1])  # 9 fills 6's hole; 8 was in the tail
    assert torch.equal(store.ids(), _ids(5, 9, 7))
    assert store.weight.tolist() == [[50.0, 50.0], [90.0, 90.0], [70.0, 70.0]]
    assert store.slot("m").tolist() == [[0.0, 1.0], [8.0, 9.0], [4.0, 5.0]]
    assert store.column("seen").tolist() == [50, 90, 70]
    assert store.find(_ids(6, 7, 8, 9)).tolist() == [-1, 2, -1, 1]
    assert store.generation == generation + 1
    assert store.remove(_ids(99))[0].numel() == 0 and store.generation == generation + 1


def test_replace_gives_rows_to_new_ids_with_fresh_slots_and_columns_and_keeps_other_rows():
    store = _store_with(1, 2, 3)
    store.add_column("seen")
    store.scatter(torch.arange(3), None, {"m": torch.ones(3, 2)})
    store.column("seen")[:] = 7
    generation = store.generation
    store.replace(torch.tensor([0, 2]), _ids(10, 30), torch.full((2, 2), -1.0))
    assert torch.equal(store.ids(), _ids(10, 2, 30))
    assert store.find(_ids(1, 3, 10, 30, 2)).tolist() == [-1, -1, 0, 2, 1]
    assert store.weight[:, 0].tolist() == [-1.0, 20.0, -1.0]
    assert store.slot("m")[:, 0].tolist() == [0.0, 1.0, 0.0]
    assert store.column("seen").tolist() == [0, 7, 0]
    assert store.generation == generation and store.replacements == 1


def test_replacing_rows_again_and_again_keeps_memory_and_the_map_flat():
    store = _store_with(*range(8))
    capacity = store.capacity
    for round_ in range(200):  # tombstones pile up and are swept by rehashes in place
        new = _ids(*range(1000 + 4 * round_, 1004 + 4 * round_))
        store.replace(torch.arange(4), new, torch.zeros(4, 2))
    assert len(store) == 8 and store.capacity == capacity
    assert store.find(_ids(1796, 1797, 1798, 1799, 4, 1000)).tolist() == [0, 1, 2, 3, 4, -1]
    assert torch.equal(store.ids()[4:], _ids(4, 5, 6, 7))


def test_load_replaces_everything_and_starts_absent_slots_at_zero():
    store = _store_with(1, 2, 3)
    store.load(_ids(40, 50), torch.ones(2, 2), {})
    assert torch.equal(store.ids(), _ids(40, 50))
    assert store.find(_ids(1)).tolist() == [-1]
    assert store.slot("m").tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_moved_copies_to_a_dtype_and_leaves_the_original_unchanged():
    store = _store_with(1, 2)
    copy = store.moved(CPU, torch.float64)
    assert copy.dtype == torch.float64 and copy.slot("m").dtype == torch.float32
    assert torch.equal(copy.weight, store.weight.double())
    assert copy.generation > store.generation
    copy.find_or_insert(_ids(3), _tens)
    assert len(store) == 2


def test_an_incompatible_slot_is_refused_with_the_reason():
    store = _store_with(1)
    assert store.check_slot("m", 3, torch.float32) is not None
    with pytest.raises(ValueError, match="slot 'm' exists with width 2"):
        store.add_slot("m", 3, torch.float32)
    store.add_slot("m", 2, torch.float32)  # the same registration again is a no-op


def test_columns_travel_through_load_growth_and_moves_and_start_at_zero_for_new_rows():
    store = _store_with(1, 2)
    store.add_column("seen")
    store.column("seen")[:] = _ids(5, 6)
    store.reserve(100)  # growth keeps them
    store.find_or_insert(_ids(3), _tens)
    assert store.column("seen").tolist() == [5, 6, 0]
    copy = store.moved(CPU, torch.float64)
    assert copy.column("seen").tolist() == [5, 6, 0]
    store.load(_ids(7, 8), torch.zeros(2, 2), {}, {"seen": _ids(1, 2)})
    assert store.column("seen").tolist() == [1, 2] and copy.column("seen").tolist() == [5, 6, 0]
    store.load(_ids(9), torch.zeros(1, 2), {})  # a registered column absent from a load starts at zero
    assert store.column("seen").tolist() == [0]


def test_loading_no_rows_keeps_every_slot_width():
    store = _store_with(1, 2)
    store.add_slot("step", 1, torch.float32)
    store.load(_ids(), torch.empty(0, 2), {"m": torch.empty(0, 2), "step": torch.empty(0), "new": torch.empty(0, 3)})
    assert len(store) == 0
    assert [tuple(store.slot(name).shape) for name in ("m", "new", "step")] == [(0, 2), (0, 3), (0, 1)]
