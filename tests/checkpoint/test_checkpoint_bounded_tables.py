"""recis.checkpoint with bounded tables (capacity + LFU eviction, Frequency admission, GlobalStepFilter):
a checkpoint taken mid-stream resumes exactly as if never stopped: bitwise in one process, and across a
reshard (2 gloo ranks -> 1 process, 1 process -> 2 ranks) as one process that never stopped. Metadata
columns are ``meta.<name>`` fields; lifecycle states follow the rule of recis.checkpoint.lifecycle_states
and are checked before anything changes; checkpoints without them load as before."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch
from dist_harness import run_ranks
from torch import nn

import recis.checkpoint as ck
from recis.checkpoint import CheckpointError
from recis.checkpoint.lifecycle_states import resharded_state
from recis.checkpoint.manifest import LEGACY_FORMAT, manifest_text
from recis.checkpoint.row_file import row_bytes
from recis.dist import ShardedHashTable, ShardedOptimizer
from recis.hooks.filter_hook import HashTableFilterHook
from recis.nn.hashtable_hook import AdmitHook, FilterHook
from recis.nn.modules.hashtable import HashTable
from recis.optim import SparseAdamW

CAPACITY, DIM, BATCH = 20, 4, 20
STEPS, SAVED_AT = 16, 7  # the reshard saves after steps 1..7 and continues with 8..16
RTOL, ATOL = 1e-6, 1e-7


class Model(nn.Module):
    def __init__(self, table: HashTable) -> None:
        super().__init__()
        self.emb = table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids)


def _make(table_type: type = HashTable, accum: int = 1, capacity: int | None = CAPACITY, sharded: bool = False):
    """(model, sparse optimizer, filter hook): the three things a run saves."""
    table = table_type(
        DIM,
        name="emb",
        capacity=capacity,
        eviction="lfu" if capacity else None,
        admit_hook=AdmitHook("Frequency", {"min_count": 2, "sketch_width": 256}),
        filter_hook=FilterHook("GlobalStepFilter", {"filter_step": 3}),
    )
    optimizer = SparseAdamW(table, lr=0.05)
    optimizer.set_grad_accum_steps(accum)
    hook = HashTableFilterHook(filter_interval=2, tables=[table])
    return Model(table), ShardedOptimizer(optimizer) if sharded else optimizer, hook


def _batch(step: int, wide_from: int | None) -> torch.Tensor:
    """Popular ids in a window that drifts with the step, so rows go stale and get filtered. Steps
    before ``wide_from`` (all if None) draw from a narrow window that stays within the capacity (so a
    sharded run of them equals one process); later ones from a wide one that makes a full table evict."""
    generator = torch.Generator().manual_seed(step)
    span, drift = (12, 1) if wide_from is None or step < wide_from else (30, 3)
    return (torch.rand(BATCH, generator=generator) ** 2 * span).long() + drift * step


def _train(run, steps, wide_from: int | None = 1, rank: int = 0, world_size: int = 1) -> None:
    model, optimizer, hook = run
    local = BATCH // world_size
    for step in steps:
        ids = _batch(step, wide_from)[rank * local : (rank + 1) * local]
        optimizer.zero_grad()
        (model(ids) - torch.sin(ids.double()).float().unsqueeze(1)).square().mean().backward()
        optimizer.step()
        hook.after_step(global_step=step)


def _by_id(table: HashTable) -> dict:
    """Everything a table holds, rows sorted by id."""
    order = torch.argsort(table.local_ids())
    state = {"ids": table.local_ids()[order], "weight": table.weight[order].clone()}
    state.update({f"slot.{name}": table.slot(name)[order].clone() for name in table.slot_names()})
    state.update({f"meta.{name}": table.column(name)[order].clone() for name in table.column_names()})
    state.update({f"lifecycle.{key}": value.clone() for key, value in table.lifecycle.state().items()})
    return {**state, "stats": table.stats()}


def _state_dict(run) -> dict:
    """The table's state dict; a gradient already applied (not mid-accumulation) is not state: the
    next zero_grad drops it, and its rows' protection is in the ``grad_window`` column."""
    state = run[0].state_dict()
    return state if run[1].accumulating else {k: v for k, v in state.items() if ".pending_grad." not in k}


def _assert_bitwise_equal(a, b) -> None:
    """Same table state dict (row order included: ids, weight, slots, columns, lifecycle, a pending
    gradient mid-accumulation), same stats, same optimizer and filter-hook state."""
    state_a, state_b = _state_dict(a), _state_dict(b)
    assert list(state_a) == list(state_b)
    assert any(key.startswith("emb.meta.") for key in state_a) and "emb.lifecycle.sketch" in state_a
    for key, value in state_a.items():
        assert torch.equal(state_b[key], value), key
    assert a[0].emb.stats() == b[0].emb.stats()
    assert b[1].state[b[0].emb]["step"] == a[1].state[a[0].emb]["step"]
    assert b[2].state_dict() == a[2].state_dict()


@pytest.mark.parametrize("accum", [1, 2], ids=["after_an_update", "mid_accumulation"])
def test_a_bounded_table_resumed_mid_stream_continues_bitwise_as_if_never_stopped(tmp_path, accum):
    original = _make(accum=accum)
    _train(original, range(1, SAVED_AT + 1))
    assert original[1].accumulating == (accum == 2)
    ck.save(tmp_path, *original)
    resumed = _make(accum=accum)
    _train(resumed, range(1, 3))  # a run with state of its own, all of it replaced by the load
    ck.load(tmp_path, *resumed)
    _assert_bitwise_equal(original, resumed)
    _train(original, range(SAVED_AT + 1, STEPS + 1))
    _train(resumed, range(SAVED_AT + 1, STEPS + 1))
    _assert_bitwise_equal(original, resumed)
    stats = resumed[0].emb.stats()
    assert min(stats["evicted_capacity"], stats["evicted_filter"], stats["not_admitted"]) > 0  # all policies acted


def _comparable(states: list[dict]) -> dict:
    """The rows of every rank's ``_by_id`` state sorted by id, the ranks' stats summed, and, instead of
    gradient-window numbers, what they decide: ``protected``, the rows whose ``grad_window`` is the
    window. (A ShardedOptimizer ends the window three times per step, a plain one once.)"""
    row_keys = [key for key in states[0] if key.split(".")[0] in ("ids", "weight", "slot", "meta")]
    rows = {key: torch.cat([s[key] for s in states]) for key in row_keys}
    order = torch.argsort(rows["ids"])
    clock, window, step = states[0]["lifecycle.clock_window_step"].tolist()
    assert all(s["lifecycle.clock_window_step"].tolist() == [clock, window, step] for s in states)
    rows["protected"] = rows.pop("meta.grad_window") == window
    stats = {key: sum(s["stats"][key] for s in states) for key in states[0]["stats"] if key != "capacity"}
    return {**{key: value[order] for key, value in rows.items()}, "clock, filter step": (clock, step), **stats}


def _unprotected(state: dict) -> dict:
    """``state`` without ``protected``, to compare a sharded table with a plain one after a step: the
    ShardedOptimizer's step ends the gradient window (grad_dist), a plain one's next zero_grad does."""
    return {key: value for key, value in state.items() if key != "protected"}


def _assert_same_table(got: dict, expected: dict) -> None:
    """Same ids, metadata, counters and protected rows; rows and slots equal to 1e-6."""
    assert list(got) == list(expected)
    for key, value in expected.items():
        if key in ("weight", "slot.exp_avg", "slot.exp_avg_sq"):
            torch.testing.assert_close(got[key], value, rtol=RTOL, atol=ATOL, msg=lambda m, k=key: f"{k}: {m}")
        elif isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value), key
        else:
            assert got[key] == value, key


def _sharded_steps(rank: int, world_size: int, root: str, load: bool, steps: range, wide_from: int | None) -> dict:
    """On a gloo rank: a bounded sharded run that loads from ``root`` (or saves there after ``steps``)."""
    run = _make(ShardedHashTable, sharded=True)
    if load:
        ck.load(root, *run)
    _train(run, steps, wide_from, rank, world_size)
    if not load:
        ck.save(root, *run)
    return _by_id(run[0].emb)


def test_a_bounded_sharded_checkpoint_continues_in_one_process_as_one_process_never_stopped(tmp_path):
    reference = _make()
    _train(reference, range(1, SAVED_AT + 1), wide_from=SAVED_AT + 1)
    saved = run_ranks(2, _sharded_steps, str(tmp_path), False, range(1, SAVED_AT + 1), SAVED_AT + 1)
    assert reference[0].emb.stats()["evicted_capacity"] == 0  # so 2 ranks of capacity 20 equal one process
    expected = _by_id(reference[0].emb)
    _assert_same_table(_unprotected(_comparable(saved)), _unprotected(_comparable([expected])))
    assert torch.equal(saved[0]["lifecycle.sketch"] + saved[1]["lifecycle.sketch"], expected["lifecycle.sketch"])
    resumed = _make()
    ck.load(tmp_path, *resumed)
    _train(reference, range(SAVED_AT + 1, STEPS + 1))
    _train(resumed, range(SAVED_AT + 1, STEPS + 1))
    expected, got = _by_id(reference[0].emb), _by_id(resumed[0].emb)
    assert expected["stats"]["evicted_capacity"] > 0
    _assert_same_table(_comparable([got]), _comparable([expected]))
    assert torch.equal(got["lifecycle.sketch"], expected["lifecycle.sketch"])


def test_a_bounded_checkpoint_of_one_process_continues_on_two_ranks_as_one_process_never_stopped(tmp_path):
    reference = _make()
    _train(reference, range(1, SAVED_AT + 1), wide_from=None)
    ck.save(tmp_path, *reference)
    _train(reference, range(SAVED_AT + 1, STEPS + 1), wide_from=None)
    per_rank = run_ranks(2, _sharded_steps, str(tmp_path), True, range(SAVED_AT + 1, STEPS + 1), None)
    assert all(len(state["ids"]) > 0 for state in per_rank)
    expected = _unprotected(_comparable([_by_id(reference[0].emb)]))
    _assert_same_table(_unprotected(_comparable(per_rank)), expected)  # stats summed: counters not duplicated


def _replicated_steps(rank: int, world_size: int, root: str, load: bool, steps: range) -> dict:
    """On a gloo rank: a bounded replicated run (a plain table under ShardedOptimizer) that loads
    from ``root`` (or saves there after ``steps``); its replica, with its owner shard's slots."""
    run = _make(HashTable, sharded=True)
    if load:
        ck.load(root, *run)
    _train(run, steps, rank=rank, world_size=world_size)
    if not load:
        ck.save(root, *run)
    shard = run[1].owner_shards()[id(run[0].emb)]
    return {"replica": _by_id(run[0].emb), "shard": _by_id(shard)}


def test_a_bounded_replicated_checkpoint_resumes_on_ranks_as_one_process_never_stopped(tmp_path):
    reference = _make()
    _train(reference, range(1, STEPS + 1))
    assert reference[0].emb.stats()["evicted_capacity"] > 0
    run_ranks(2, _replicated_steps, str(tmp_path), False, range(1, SAVED_AT + 1))
    per_rank = run_ranks(2, _replicated_steps, str(tmp_path), True, range(SAVED_AT + 1, STEPS + 1))
    expected = _unprotected(_comparable([_by_id(reference[0].emb)]))
    slots = [key for key in expected if key.startswith("slot.")]
    for result in per_rank:  # every replica holds the whole table of one process
        got = _unprotected(_comparable([result["replica"]]))
        _assert_same_table(got, {key: value for key, value in expected.items() if key not in slots})
    owners = {key: torch.cat([result["shard"][key] for result in per_rank]) for key in ["ids", *slots]}
    order = torch.argsort(owners["ids"])
    trained = torch.isin(expected["ids"], owners["ids"])
    assert bool(trained[expected["slot.exp_avg"].ne(0).any(1)].all())  # every trained row has its owner's slots
    assert torch.equal(owners["ids"][order], expected["ids"][trained])  # no slots of rows the replicas gave up
    for key in slots:
        torch.testing.assert_close(owners[key][order], expected[key][trained], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "settings, columns",
    [
        ({"capacity": CAPACITY, "filter_hook": FilterHook("GlobalStepFilter")}, 4),
        ({"filter_hook": FilterHook("GlobalStepFilter")}, 2),
        ({}, 0),
    ],
    ids=["capacity_and_filter", "filter", "plain"],
)
def test_each_metadata_column_is_an_int64_meta_field_and_a_table_without_columns_saves_none(
    tmp_path, settings, columns
):
    table = HashTable(DIM, name="emb", **settings)
    table(torch.arange(5)).sum().backward()
    manifest = json.loads((ck.save(tmp_path, Model(table)) / "manifest.json").read_text())
    (row_set,) = manifest["row_sets"]
    meta = {name: field for name, field in row_set["fields"].items() if name.startswith("meta.")}
    assert sorted(meta) == [f"meta.{name}" for name in table.column_names()] and len(meta) == columns
    assert all((field["dtype"], field["width"]) == ("int64", 1) for field in meta.values())
    resumed = HashTable(DIM, name="emb", **settings)
    ck.load(tmp_path, Model(resumed))
    for name in table.column_names():
        assert torch.equal(resumed.column(name), table.column(name)), name


def _rewrite(directory: Path, edit_manifest=None, edit_state=None, legacy: bool = False) -> None:
    """Edit rank 0's manifest entries or small-state file, keeping the manifest's checksums true
    (``legacy``: write it as recis wrote manifests before they held their own checksum)."""
    manifest = json.loads((directory / "manifest.json").read_text())
    del manifest["sha256"]
    if edit_manifest:
        edit_manifest(manifest)
    if edit_state:
        state = torch.load(directory / "rank00000.pt", weights_only=False)
        edit_state(state)
        torch.save(state, directory / "rank00000.pt")
        payload = (directory / "rank00000.pt").read_bytes()
        manifest["files"]["rank00000.pt"] = {"bytes": len(payload), "crc32": zlib.crc32(payload)}
    if legacy:
        text = json.dumps({**manifest, "format": LEGACY_FORMAT})
    else:
        text = manifest_text(manifest)
    (directory / "manifest.json").write_text(text)


def _without_meta_fields(directory: Path):
    """A manifest edit that also rewrites rank 0's row file without its ``meta.`` fields."""

    def edit(manifest: dict) -> None:
        data, kept = (directory / "rank00000.bin").read_bytes(), bytearray()
        for row_set in manifest["row_sets"]:
            fields = {}
            for name, field in row_set["fields"].items():  # in the order they were written
                if not name.startswith("meta."):
                    fields[name] = {**field, "offset": len(kept)}
                    kept += data[field["offset"] : field["offset"] + row_set["count"] * row_bytes(field)]
            row_set["fields"] = fields
        (directory / "rank00000.bin").write_bytes(bytes(kept))
        manifest["files"]["rank00000.bin"] = {"bytes": len(kept), "crc32": zlib.crc32(kept)}

    return edit


def test_a_checkpoint_without_meta_fields_or_lifecycle_state_loads_rows_and_counts_no_inserts(tmp_path):
    run = _make()
    _train(run, range(1, SAVED_AT + 1))
    directory = ck.save(tmp_path, *run)
    _rewrite(directory, _without_meta_fields(directory), lambda state: state.pop("lifecycle"), legacy=True)
    fresh = _make()
    before = fresh[0].emb.lifecycle.state()
    ck.load(tmp_path, *fresh)
    saved, loaded = _by_id(run[0].emb), _by_id(fresh[0].emb)
    for key in ("ids", "weight", "slot.exp_avg", "slot.exp_avg_sq"):
        assert torch.equal(loaded[key], saved[key]), key
    assert all(int(loaded[f"meta.{name}"].abs().sum()) == 0 for name in fresh[0].emb.column_names())
    counters = ("inserted", "evicted_capacity", "evicted_filter", "not_admitted", "lookups", "hits", "evicted")
    assert fresh[0].emb.stats() == {"rows": len(saved["ids"]), "capacity": CAPACITY, **dict.fromkeys(counters, 0)}
    after = fresh[0].emb.lifecycle.state()
    assert before["clock_window_step"].tolist() == [0, 1, 0] and "sketch" not in after
    assert after["clock_window_step"].tolist() == [0, 2, 0]  # as before, but the load's clear ended the window


@pytest.mark.parametrize("problem", ["bad_counters", "over_capacity"])
def test_a_bad_lifecycle_state_or_too_many_rows_is_refused_before_anything_changes(tmp_path, problem):
    run = _make()
    _train(run, range(1, SAVED_AT + 1))
    directory = ck.save(tmp_path, *run)
    rows = len(run[0].emb)
    if problem == "bad_counters":
        _rewrite(directory, edit_state=lambda state: state["lifecycle"]["emb"].update(counters=torch.zeros(2)))
        target, match = _make(), r"table 'emb': lifecycle state of rank 0 .*'lifecycle\.counters'"
    else:
        target, match = _make(capacity=rows - 1), rf"table 'emb': rank 0 of 1 would keep {rows} rows, over its capacity"
    _train(target, range(1, 4))
    assert len(target[0].emb) > 0
    before = {key: value.clone() for key, value in target[0].state_dict().items()}
    with pytest.raises(CheckpointError, match=match):
        ck.load(tmp_path, *target)
    after = target[0].state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[key], value) for key, value in before.items())


def _lifecycle(clock: int, counters: list[int], sketch: list[list[int]] | None) -> dict:
    state = {"clock_window_step": torch.tensor([clock, 2 * clock, 3], dtype=torch.int64)}
    state["counters"] = torch.tensor(counters, dtype=torch.int64)
    return state if sketch is None else {**state, "sketch": torch.tensor(sketch, dtype=torch.int64)}


def test_resharding_takes_rank_0s_clock_gives_summed_counters_to_rank_0_and_the_summed_sketch_to_all():
    table = _make()[0].emb
    saved = [_lifecycle(5, [1, 2, 3, 4, 5, 6], [[1, 0], [0, 2]]), _lifecycle(5, [10] * 6, None)]
    saved.append(_lifecycle(5, [100] * 6, [[0, 3], [4, 0]]))
    for rank in range(4):
        state = resharded_state(table, "emb", saved, rank)
        assert state["clock_window_step"].tolist() == [5, 10, 3]
        assert state["counters"].tolist() == ([111, 112, 113, 114, 115, 116] if rank == 0 else [0] * 6)
        assert state["sketch"].tolist() == [[1, 3], [4, 2]]
    assert resharded_state(table, "emb", [None, None], 0) is None  # an older checkpoint: left as it is
    assert "sketch" not in resharded_state(table, "emb", [_lifecycle(1, [0] * 6, None)] * 2, 1)
    with pytest.raises(CheckpointError, match=r"table 'emb': saved ranks \[1\] have no lifecycle state"):
        resharded_state(table, "emb", [saved[0], None], 0)
    with pytest.raises(CheckpointError, match=r"sketches of different shapes \[\(1, 2\), \(2, 2\)\]"):
        resharded_state(table, "emb", [saved[0], _lifecycle(5, [0] * 6, [[1, 1]])], 0)
    with pytest.raises(CheckpointError, match=r"lifecycle state of saved rank 1 .*'lifecycle\.counters'"):
        resharded_state(table, "emb", [saved[0], _lifecycle(5, [0] * 5, None)], 0)
