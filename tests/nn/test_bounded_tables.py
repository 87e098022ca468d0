"""Bounded tables in one process: admission, capacity eviction, filters, their statistics,
and the promises around them (fresh restarts, pending gradients, nothing changed on error)."""

from __future__ import annotations

import pytest
import torch

from recis.hooks.filter_hook import HashTableFilterHook
from recis.nn.hashtable_hook import AdmitHook, FilterHook
from recis.nn.modules.hashtable import HashTable
from recis.optim import SparseAdamW


def _ids(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def _train_step(table: HashTable, optimizer: SparseAdamW, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    out = table(ids, **kwargs)
    out.sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    return out


def _table(**kwargs) -> HashTable:
    return HashTable(4, name="t", seed=3, **kwargs)


# ---------------------------------------------------------------------- admission
def test_read_only_lookup_inserts_nothing_reads_zeros_and_updates_only_present_rows():
    table = _table()
    optimizer = SparseAdamW([table], lr=0.1)
    _train_step(table, optimizer, _ids(1, 2))
    before = table.weight.clone()
    out = _train_step(table, optimizer, _ids(1, 5, 5), admit_hook=AdmitHook("ReadOnly"))
    assert torch.equal(table.ids(), _ids(1, 2))
    assert torch.equal(out[1], torch.zeros(4)) and torch.equal(out[2], torch.zeros(4))
    assert not torch.equal(table.weight[0], before[0]) and torch.equal(table.weight[1], before[1])
    assert table.stats()["not_admitted"] == 1


def test_frequency_admission_gives_a_row_at_the_kth_sighting_and_not_before():
    table = _table(admit_hook=AdmitHook("Frequency", {"min_count": 3}))
    optimizer = SparseAdamW([table], lr=0.1)
    for sighting in (1, 2):
        out = _train_step(table, optimizer, _ids(7, 7, 8))  # a repeat within a lookup is one sighting
        assert len(table) == 0 and torch.equal(out, torch.zeros(3, 4)), sighting
    out = _train_step(table, optimizer, _ids(7))
    assert torch.equal(table.ids(), _ids(7))
    assert torch.equal(out[0], HashTable(4, seed=3).initial_values(_ids(7))[0])  # starts at its initial value
    assert table.stats()["not_admitted"] == 4 and table.stats()["inserted"] == 1


def test_the_frequency_sketch_never_undercounts_and_its_memory_is_fixed():
    table = _table(admit_hook=AdmitHook("Frequency", {"min_count": 2, "sketch_width": 64, "sketch_depth": 2}))
    table(torch.arange(5000))  # many more ids than counters: collisions only ever admit early
    sketch = table.lifecycle.sketch
    assert sketch.counters.numel() == 128
    assert bool((sketch.estimate(torch.arange(5000)) >= 1).all())
    table(torch.arange(5000))
    assert len(table) == 5000  # every id has now been sighted twice


def test_the_default_admit_hook_applies_to_lookups_without_one_and_a_call_can_override_it():
    table = _table(admit_hook=AdmitHook("ReadOnly"))
    table(_ids(1, 2))
    assert len(table) == 0
    table(_ids(1, 2), admit_hook=AdmitHook("Frequency", {"min_count": 1}))
    assert torch.equal(table.ids(), _ids(1, 2))


# ---------------------------------------------------------------------- capacity
def test_a_full_lru_table_evicts_the_least_recently_used_rows_ties_by_smaller_id():
    table = _table(capacity=4)
    optimizer = SparseAdamW([table], lr=0.1)
    _train_step(table, optimizer, _ids(10, 11))
    _train_step(table, optimizer, _ids(13, 12))
    _train_step(table, optimizer, _ids(10))  # 11 is now the least recent; 12 and 13 tie
    _train_step(table, optimizer, _ids(20, 21))
    assert sorted(table.ids().tolist()) == [10, 13, 20, 21]
    assert len(table) == 4 and table.stats()["evicted_capacity"] == 2


def test_a_full_lfu_table_evicts_the_least_frequently_seen_rows():
    table = _table(capacity=3, eviction="lfu")
    optimizer = SparseAdamW([table], lr=0.1)
    for ids in (_ids(1, 2, 3), _ids(1, 2), _ids(1, 3), _ids(2)):
        _train_step(table, optimizer, ids)  # sightings: 1 -> 3, 2 -> 3, 3 -> 2
    _train_step(table, optimizer, _ids(9))
    assert sorted(table.ids().tolist()) == [1, 2, 9]


def test_an_evicted_id_comes_back_fresh_and_its_row_storage_is_reused():
    table = _table(capacity=2)
    optimizer = SparseAdamW([table], lr=0.1)
    for _ in range(3):
        _train_step(table, optimizer, _ids(1, 2))
    storage = table.store.capacity
    _train_step(table, optimizer, _ids(3, 4))  # evicts 1 and 2
    assert sorted(table.ids().tolist()) == [3, 4]
    out = table(_ids(1))  # 1 returns: its first value again, zero moments, per-row step 0
    assert torch.equal(out[0], table.initial_values(_ids(1))[0])
    row = int(table.store.find(_ids(1)))
    assert all(float(table.slot(name)[row].abs().sum()) == 0 for name in table.slot_names())
    assert table.store.capacity == storage


@torch.no_grad()  # lookups without grad leave no gradient to protect
def test_ids_of_the_current_lookup_are_never_evicted_for_each_other():
    table = _table(capacity=3)
    table(_ids(1, 2, 3))
    table(_ids(1, 4, 5))  # 2 and 3 go; 1 stays though it is the oldest
    assert sorted(table.ids().tolist()) == [1, 4, 5]


def test_a_lookup_with_more_new_ids_than_the_capacity_raises_and_changes_nothing():
    table = _table(capacity=3)
    table(_ids(1, 2))
    ids, weight, stats = table.ids(), table.weight.clone(), table.stats()
    with pytest.raises(ValueError, match="4 new ids, more than the capacity of 3"):
        table(_ids(5, 6, 7, 8))
    assert torch.equal(table.ids(), ids) and torch.equal(table.weight, weight) and table.stats() == stats


def test_rows_with_a_pending_gradient_are_not_evicted_and_the_error_says_why():
    table = _table(capacity=3)
    optimizer = SparseAdamW([table], lr=0.1)
    with torch.no_grad():
        table(_ids(9))  # an old row without gradient: the only one that may go
    table(_ids(1, 2)).sum().backward()  # gradient pending on 1 and 2 until zero_grad
    table(_ids(3)).sum().backward()  # evicts 9, not 1 or 2
    assert sorted(table.ids().tolist()) == [1, 2, 3]
    ids = table.ids()
    with pytest.raises(ValueError, match="only 0 rows can be evicted.*gradient pending since the last zero_grad"):
        table(_ids(4))
    assert torch.equal(table.ids(), ids)
    optimizer.step()
    optimizer.zero_grad()  # the window ends: 1, 2 and 3 may go now
    table(_ids(4))
    assert sorted(table.ids().tolist()) == [2, 3, 4]


def test_a_backward_after_its_rows_were_evicted_raises_instead_of_updating_another_id():
    table = _table(capacity=2)
    out = table(_ids(1, 2))
    table.clear_grad()  # (zero_grad between forward and backward ends the protection)
    table(_ids(3, 4)).sum().backward()
    with pytest.raises(RuntimeError, match="evicted for new ids before its backward"):
        out.sum().backward()


def test_assign_into_a_full_table_evicts_too_and_stays_within_capacity():
    table = _table(capacity=2)
    with torch.no_grad():
        table(_ids(1, 2))
    table.assign(_ids(3), torch.ones(1, 4))
    assert len(table) == 2 and 3 in table.ids().tolist()


# ---------------------------------------------------------------------- filters
def test_global_step_filter_removes_ids_not_seen_in_the_last_n_steps_as_recis_does():
    table = _table(filter_hook=FilterHook("GlobalStepFilter", {"filter_step": 2}))
    hook = HashTableFilterHook(filter_interval=1, tables=[table])
    with torch.no_grad():
        table(_ids(1, 2))  # seen at filter step 0
        for step in range(1, 4):
            table(_ids(2))
            hook.after_step(global_step=step)
    # filter step is now 3: id 1 (last seen at 0 < 3 - 2) goes, id 2 (seen at 2) stays
    assert table.ids().tolist() == [2]
    assert table.stats()["evicted_filter"] == 1 and hook.last_removed == {"t": 1}


def test_the_filter_keeps_rows_with_a_pending_gradient_and_their_gradient_follows_moved_rows():
    table = _table(filter_hook=FilterHook("GlobalStepFilter", {"filter_step": 1}))
    optimizer = SparseAdamW([table], lr=0.1)
    _train_step(table, optimizer, _ids(1, 2, 3))
    table.advance_filter_step(5)
    table(_ids(3)).sum().backward()  # 3 (last row) has a gradient pending; 1 and 2 are stale
    assert table.run_filter() == 2
    assert table.ids().tolist() == [3]
    rows, grad = table.pending_grad()
    assert rows.tolist() == [0] and torch.equal(grad, torch.ones(1, 4))


def test_the_filter_hook_rejects_a_table_without_a_filter_and_a_bad_interval():
    with pytest.raises(ValueError, match="no filter_hook"):
        HashTableFilterHook(tables=[_table()])
    with pytest.raises(ValueError, match="filter_interval"):
        HashTableFilterHook(filter_interval=0)


# ---------------------------------------------------------------------- statistics
def test_stats_count_lookups_hits_inserts_and_rows():
    table = _table(capacity=10)
    table(_ids(1, 2, 2))
    table(_ids(2, 3))
    stats = table.stats()
    assert stats == {
        "rows": 3, "capacity": 10, "inserted": 3, "evicted_capacity": 0, "evicted_filter": 0,
        "not_admitted": 0, "lookups": 4, "hits": 1, "evicted": 0,
    }  # fmt: skip


# ---------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: _table(capacity=0), "capacity must be a positive int"),
        (lambda: _table(capacity=2, eviction="fifo"), "eviction must be one of"),
        (lambda: _table(eviction="lru"), "needs a capacity"),
        (lambda: AdmitHook("Frequency", {"min_count": 0}), "min_count must be an int >= 1"),
        (lambda: AdmitHook("Sometimes"), "unknown AdmitHook 'Sometimes'"),
        (lambda: FilterHook("GlobalStepFilter", {"filter_step": 0}), "filter_step must be an int >= 1"),
        (lambda: AdmitHook("Frequency", {"min_count": 2, "sketch_width": 100}), "power of two"),
    ],
)
def test_bad_configuration_raises_a_clear_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_the_state_dict_carries_metadata_and_counters_and_resumes_bitwise():
    config = {"capacity": 8, "eviction": "lfu", "admit_hook": AdmitHook("Frequency", {"min_count": 2})}
    stream = [torch.randint(0, 16, (5,), generator=torch.Generator().manual_seed(s)) for s in range(12)]
    table, resumed = _table(**config), _table(**config)
    optimizer = SparseAdamW([table], lr=0.1)
    for ids in stream[:6]:
        _train_step(table, optimizer, ids)
    resumed.load_state_dict(table.state_dict())
    resumed_optimizer = SparseAdamW([resumed], lr=0.1)
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    for ids in stream[6:]:
        _train_step(table, optimizer, ids)
        _train_step(resumed, resumed_optimizer, ids)
    assert torch.equal(table.ids(), resumed.ids()) and torch.equal(table.weight, resumed.weight)
    for name in table.column_names():
        assert torch.equal(table.column(name), resumed.column(name)), name
    assert table.stats() == resumed.stats()


def test_sketches_that_counted_disjoint_ids_sum_to_the_sketch_that_counted_them_all():
    from recis.nn.frequency_sketch import FrequencySketch

    ids = torch.randint(-(2**40), 2**40, (3000,), generator=torch.Generator().manual_seed(1))
    whole, even, odd = (FrequencySketch(256, 3, torch.device("cpu")) for _ in range(3))
    whole.add(ids)
    even.add(ids[ids % 2 == 0])
    odd.add(ids[ids % 2 == 1])
    assert torch.equal(even.counters + odd.counters, whole.counters)
    assert bool((whole.estimate(ids) >= 1).all())


def test_a_gradient_that_arrives_after_zero_grad_is_protected_until_the_next_zero_grad():
    table = _table(capacity=4)
    optimizer = SparseAdamW([table], lr=0.1)
    optimizer.set_grad_accum_steps(2)
    out = table(_ids(1, 2, 3, 4))
    optimizer.zero_grad()  # between forward and backward: legal in torch, ends the lookup's window
    out.sum().backward()
    optimizer.step()  # a micro-step: the gradient stays pending
    with pytest.raises(ValueError, match="only 0 rows can be evicted"):
        table(_ids(5, 6, 7, 8))  # evicting 1-4 would hand their pending gradient to 5-8
    assert sorted(table.ids().tolist()) == [1, 2, 3, 4]


def test_a_bounded_tables_storage_stops_growing_at_its_capacity():
    table = _table(capacity=600)
    with torch.no_grad():
        for start in range(0, 1200, 100):
            table(torch.arange(start, start + 100))
    assert len(table) == 600 and table.store.capacity == 600


# ---------------------------------------------------------------------- removal and its hook
def test_remove_drops_present_ids_ignores_absent_ones_and_the_pending_gradient_follows_moved_rows():
    table = _table()
    table(_ids(1, 2, 3, 4)).sum().backward()  # a gradient pending on every row
    table.clear_grad()
    table(_ids(4)).sum().backward()  # id 4, the last row, has a gradient pending
    assert table.remove(_ids(1, 9, 1)) == 1
    assert sorted(table.ids().tolist()) == [2, 3, 4]
    rows, grad = table.pending_grad()
    assert table.ids_of_rows(rows).tolist() == [4] and torch.equal(grad, torch.ones(1, 4))


def test_the_row_removal_hook_hears_of_every_row_given_up_until_its_handle_is_removed():
    table = _table(capacity=2, filter_hook=FilterHook("GlobalStepFilter", {"filter_step": 1}))
    heard: list[list[int]] = []
    handle = table.register_row_removal_hook(lambda ids: heard.append(sorted(ids.tolist())))
    with torch.no_grad():
        table(_ids(1, 2))
        table(_ids(3))  # evicts 1, the least recently used
        table.remove(_ids(2, 7))
        table.advance_filter_step(5)
        assert table.run_filter() == 1  # 3 is stale
        table(_ids(5, 6))
        table.clear()
        handle.remove()
        table(_ids(8))
        table.clear()
    assert heard == [[1], [2], [3], [5, 6]]
