"""recis.checkpoint in one process: continuation, atomicity, verification, keep=N, streaming."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

import recis.checkpoint as ck
from recis.checkpoint import CheckpointError, row_file, saved_tables
from recis.nn.modules.hashtable import HashTable, filter_out_sparse_param
from recis.optim import SparseAdam, SparseAdamW


class Model(nn.Module):
    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.emb = HashTable(dim, name="emb", dtype=torch.float32)
        self.lin = nn.Linear(dim, 1)

    def forward(self, ids):
        return self.lin(self.emb(ids)).squeeze(-1)


def _make(dim: int = 4, accum: int = 1):
    torch.manual_seed(0)
    model = Model(dim)
    sparse = SparseAdamW(filter_out_sparse_param(model), lr=0.1, bias_correction="row")
    sparse.set_grad_accum_steps(accum)
    dense = torch.optim.AdamW(model.parameters(), lr=0.01)
    schedule = torch.optim.lr_scheduler.StepLR(sparse, step_size=3, gamma=0.5)
    return model, sparse, dense, schedule


def _train(model, sparse, dense, schedule, steps):
    for step in steps:
        ids = torch.randint(0, 60, (16,), generator=torch.Generator().manual_seed(step))
        sparse.zero_grad()
        dense.zero_grad()
        model(ids).square().mean().backward()
        sparse.step()
        dense.step()
        schedule.step()


def _assert_same_run(a, b):
    ids = a[0].emb.ids()
    torch.testing.assert_close(b[0].emb.lookup(ids), a[0].emb.lookup(ids), rtol=0, atol=0)
    rows_b = b[0].emb.store.find(ids)
    for name in a[0].emb.slot_names():
        torch.testing.assert_close(b[0].emb.slot(name)[rows_b], a[0].emb.slot(name), rtol=0, atol=0)
    torch.testing.assert_close(b[0].lin.weight, a[0].lin.weight, rtol=0, atol=0)
    assert b[1].param_groups[0]["lr"] == a[1].param_groups[0]["lr"]
    assert b[1].state[b[0].emb]["step"] == a[1].state[a[0].emb]["step"]


@pytest.mark.parametrize("accum, stop", [(1, 5), (2, 5)], ids=["after_an_update", "mid_accumulation"])
def test_training_resumed_from_a_checkpoint_equals_training_never_stopped(tmp_path, accum, stop):
    uninterrupted = _make(accum=accum)
    _train(*uninterrupted, range(12))
    first = _make(accum=accum)
    _train(*first, range(stop))
    ck.save(tmp_path, *first, extra={"step": stop})
    resumed = _make(accum=accum)
    extra = ck.load(tmp_path, *resumed)
    assert extra == {"step": stop}
    _train(*resumed, range(stop, 12))
    _assert_same_run(uninterrupted, resumed)


def test_rows_are_streamed_in_chunks_and_round_trip_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(row_file, "CHUNK_BYTES", 64)  # a few rows per chunk
    run = _make(dim=8)
    _train(*run, range(4))
    assert len(run[0].emb) > 10
    ck.save(tmp_path, *run)
    fresh = _make(dim=8)
    ck.load(tmp_path, *fresh)
    _assert_same_run(run, fresh)


def test_a_table_named_unlike_its_module_path_is_saved_once_and_older_checkpoints_holding_it_twice_load(
    tmp_path, monkeypatch
):
    run = _make()
    run[0].emb.name = "user"  # its module path stays "emb"
    _train(*run, range(3))
    new = ck.save(tmp_path / "new", *run)
    assert sorted(torch.load(new / "rank00000.pt", weights_only=False)["dense"]) == ["lin.bias", "lin.weight"]
    # as recis saved it while a table's state-dict prefix was taken from its name: the rows in the dense state too
    monkeypatch.setattr(saved_tables, "table_prefixes", lambda model: ["user."])
    old = ck.save(tmp_path / "old", *run)
    monkeypatch.undo()
    assert "emb.weight" in torch.load(old / "rank00000.pt", weights_only=False)["dense"]
    for directory in (new, old):
        fresh = _make()
        fresh[0].emb.name = "user"
        ck.load(directory, *fresh)
        _assert_same_run(run, fresh)


def test_latest_names_the_newest_and_keep_removes_only_older_complete_checkpoints(tmp_path):
    run = _make()
    for step in range(1, 5):
        _train(*run, [step])
        ck.save(tmp_path, *run, extra={"step": step}, keep=2)
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ckpt-"))
    assert names == ["ckpt-000003-step3", "ckpt-000004-step4"]
    assert (tmp_path / "latest").read_text() == "ckpt-000004-step4"
    assert ck.load(tmp_path, *_make()) == {"step": 4}
    assert ck.load(tmp_path / "ckpt-000003-step3", *_make()) == {"step": 3}


def test_only_an_int_step_names_a_checkpoint(tmp_path):
    run = _make()
    for step in (True, "7", 2.0, 5):
        ck.save(tmp_path, *run, extra={"step": step})
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ckpt-"))
    assert names == ["ckpt-000001", "ckpt-000002", "ckpt-000003", "ckpt-000004-step5"]


def _snapshot(run):
    return {key: value.clone() for key, value in run[0].state_dict().items()}


def _assert_unchanged(run, snapshot):
    for key, value in run[0].state_dict().items():
        torch.testing.assert_close(value, snapshot[key], rtol=0, atol=0)


@pytest.mark.parametrize("damage, field", [("flip", "crc32"), ("truncate", "bytes")])
def test_a_damaged_file_is_refused_naming_file_and_field_and_the_model_is_unchanged(tmp_path, damage, field):
    run = _make()
    _train(*run, range(3))
    directory = ck.save(tmp_path, *run)
    data = bytearray((directory / "rank00000.bin").read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[:-8]
    (directory / "rank00000.bin").write_bytes(bytes(data))
    target = _make()
    _train(*target, range(2))
    before = _snapshot(target)
    with pytest.raises(CheckpointError, match=rf"rank00000\.bin.*'{field}'"):
        ck.load(tmp_path, *target)
    _assert_unchanged(target, before)


def test_a_checkpoint_that_does_not_fit_the_model_is_refused_naming_table_and_field(tmp_path):
    ck.save(tmp_path, *_make(dim=4))
    target = _make(dim=5)
    before = _snapshot(target)
    with pytest.raises(CheckpointError, match=r"table 'emb'.*embedding_shape"):
        ck.load(tmp_path, *target)
    _assert_unchanged(target, before)


def test_a_directory_without_manifest_is_never_loaded(tmp_path):
    (tmp_path / ".tmp-ckpt-000001").mkdir()
    with pytest.raises(CheckpointError, match="incomplete"):
        ck.load(tmp_path / ".tmp-ckpt-000001", *_make())
    with pytest.raises(FileNotFoundError):
        ck.load(tmp_path, *_make())


SAVER = textwrap.dedent(
    """
    import sys, torch
    import recis.checkpoint as ck
    from recis.nn.modules.hashtable import HashTable
    from recis.optim import SparseAdam
    table = HashTable(64, name="big")
    optimizer = SparseAdam(table)
    table.assign(torch.arange(1000), torch.ones(1000, 64))
    ck.save(sys.argv[1], table, optimizer, extra={"step": 1})
    table.assign(torch.arange(1000, 400_000), torch.zeros(399_000, 64))
    print("first saved", flush=True)
    while True:  # keep saving until killed
        ck.save(sys.argv[1], table, optimizer, extra={"step": 2})
    """
)


def test_a_save_killed_mid_write_leaves_the_previous_checkpoint_latest_and_loadable(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", SAVER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "first saved"
        deadline = time.monotonic() + 60
        while not any(p.name.startswith(".tmp-") and any(p.iterdir()) for p in tmp_path.iterdir()):
            assert time.monotonic() < deadline, "the second save never started writing"
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    # the killed save never became latest: latest is a complete checkpoint (step 1, or a step-2 save
    # that had completed before the kill), and it loads
    table = HashTable(64, name="big")
    extra = ck.load(tmp_path, table, SparseAdam(table))
    assert len(table) == {1: 1000, 2: 400_000}[extra["step"]]
    torch.testing.assert_close(table.lookup(torch.arange(1000)), torch.ones(1000, 64), rtol=0, atol=0)
    staging = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert staging, "the kill was meant to interrupt a save"
    for directory in staging:
        with pytest.raises(CheckpointError, match="incomplete"):
            ck.load(directory, table, SparseAdam(HashTable(64)))


def test_a_checkpoint_keys_tables_by_module_path_so_a_renamed_table_still_loads(tmp_path):
    from recis.nn.modules.hashtable import HashTable

    model = torch.nn.ModuleDict({"user": HashTable(4, name="first_name", seed=1)})
    with torch.no_grad():
        model["user"](torch.arange(5))
    ck.save(tmp_path, model)
    renamed = torch.nn.ModuleDict({"user": HashTable(4, name="another_name", seed=1)})
    ck.load(tmp_path, renamed)
    assert torch.equal(renamed["user"].ids(), model["user"].ids())
    assert torch.equal(renamed["user"].weight, model["user"].weight)
