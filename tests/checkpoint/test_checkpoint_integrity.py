"""A checkpoint that is damaged or does not fit is refused before anything changes, and a load that
fails later (an optimizer or a table refusing, on any rank) puts everything back: every live table
(ids in row order, rows, slots, metadata, pending gradient, lifecycle), dense parameter and optimizer
state dict is bitwise as it was.

Bit flips, one at a time, each loaded into one target run mid-accumulation: every bit of
``manifest.json`` is refused that way unless the flip changes no value (the last digit of a float
that rounds to the same double); every bit of a manifest written before manifests held their
checksum is refused unless it changes only a description (the time, the step in the name, a table's
class), and those load the saved state exactly; a seeded sample of 2,000 bits of each of
``rank00000.pt`` and ``rank00000.bin`` is refused (CRC-32 catches every single-bit error; all bits
would take about 30 s per file and backend).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from dist_harness import run_ranks
from torch import nn

import recis.checkpoint as ck
from recis.checkpoint import CheckpointError
from recis.checkpoint.manifest import LEGACY_FORMAT, manifest_text
from recis.dist import ShardedHashTable, ShardedOptimizer
from recis.nn.modules.hashtable import HashTable, filter_out_sparse_param
from recis.optim import SparseAdamW

SAMPLED_BITS = 2000  # of each per-rank file (all of the manifest's bits are flipped)


class Model(nn.Module):
    def __init__(self, table_type: type = HashTable, tables: int = 1) -> None:
        super().__init__()
        self.emb = table_type(4, name="emb", seed=3)
        self.other = table_type(4, name="other", seed=4) if tables == 2 else None
        self.lin = nn.Linear(4, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.emb(ids) if self.other is None else self.emb(ids) * self.other(ids)
        return self.lin(rows).squeeze(-1)


def _make(accum: int = 2, bias_correction: str = "row", tables: int = 1, sharded: bool = False):
    torch.manual_seed(0)
    model = Model(ShardedHashTable if sharded else HashTable, tables)
    sparse = SparseAdamW(filter_out_sparse_param(model), lr=0.1, bias_correction=bias_correction)
    sparse.set_grad_accum_steps(accum)
    return model, ShardedOptimizer(sparse) if sharded else sparse, torch.optim.AdamW(model.parameters(), lr=0.01)


def _train(run, steps, seed: int = 0) -> None:
    model, sparse, dense = run
    for step in steps:
        ids = torch.randint(0, 40, (12,), generator=torch.Generator().manual_seed(1000 * seed + step))
        sparse.zero_grad()
        dense.zero_grad()
        model(ids).square().mean().backward()
        sparse.step()
        dense.step()


def _flat(value, path: str = "") -> list:
    """``value`` as a list of (path, leaf): a tensor's leaf is its dtype, shape and bytes (bitwise)."""
    if isinstance(value, dict):
        return [leaf for key in value for leaf in _flat(value[key], f"{path}.{key}")]
    if isinstance(value, list | tuple):
        return [leaf for i, item in enumerate(value) for leaf in _flat(item, f"{path}[{i}]")]
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous().reshape(-1)
        return [(path, str(value.dtype), tuple(value.shape), bytes(data.view(torch.uint8).numpy()))]
    return [(path, repr(value))]


def _state(run) -> list:
    """Everything a load may change: the model's state dict (a table's ids in row order, rows, slots,
    metadata columns, lifecycle state and pending gradient; the dense parameters) and the optimizers'."""
    model, *optimizers = run
    inner = [o.optimizer if isinstance(o, ShardedOptimizer) else o for o in optimizers]
    return _flat({"model": model.state_dict(), "optimizers": [o.state_dict() for o in inner]})


def _target():
    """A run whose state differs from the saved one, mid-accumulation (so it holds a pending gradient)."""
    target = _make()
    _train(target, range(3), seed=1)
    assert target[0].emb.has_grad and target[1].accumulating
    return target


@pytest.fixture
def saved(tmp_path):
    """(checkpoint directory, the saved run's state): mid-accumulation, with row step slots."""
    run = _make()
    _train(run, range(5))
    assert run[1].accumulating
    return ck.save(tmp_path / "run", *run, extra={"step": 5}), _state(run)


def _flip(path: Path, bit: int) -> int:
    """Flip ``bit`` of the file in place; returns the original byte."""
    with open(path, "r+b") as file:
        file.seek(bit // 8)
        original = file.read(1)[0]
        file.seek(bit // 8)
        file.write(bytes([original ^ (1 << (bit % 8))]))
    return original


def _restore_byte(path: Path, bit: int, original: int) -> None:
    with open(path, "r+b") as file:
        file.seek(bit // 8)
        file.write(bytes([original]))


def _load_each_flip(directory: Path, name: str, bits, target, saved_state, target_root: Path) -> list[int]:
    """Flip each of ``bits`` of ``directory/name`` in turn and load into ``target``: a refused load
    must leave it bitwise as it was; one that loads must give the saved state exactly (``target`` is
    then put back from ``target_root``). Returns the bits whose flip loaded."""
    before, loaded = _state(target), []
    path = directory / name
    for bit in bits:
        original = _flip(path, bit)
        try:
            ck.load(directory, *target)
        except CheckpointError:
            assert _state(target) == before, f"{name}: bit {bit} was refused after the load changed state"
        else:
            assert _state(target) == saved_state, f"{name}: bit {bit} loaded a state that differs from the saved one"
            loaded.append(bit)
            ck.load(target_root, *target)
            assert _state(target) == before
        finally:
            _restore_byte(path, bit, original)
    return loaded


def _differences(before, after, path: str = "") -> set[str]:
    """The paths (``tables.emb.class``) of the leaves where two parsed JSON values differ."""
    if isinstance(before, dict) and isinstance(after, dict):
        keys = before.keys() | after.keys()
        return {p for key in keys for p in _differences(before.get(key), after.get(key), f"{path}.{key}".strip("."))}
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        return {p for i, (b, a) in enumerate(zip(before, after)) for p in _differences(b, a, f"{path}[{i}]")}
    return set() if before == after else {path}


def _changed_fields(text: bytes, bit: int) -> set[str]:
    """Where flipping ``bit`` of the JSON ``text`` changes a value (the flipped text must be JSON)."""
    flipped = bytearray(text)
    flipped[bit // 8] ^= 1 << (bit % 8)
    return _differences(json.loads(text), json.loads(flipped.decode()))


def _same_values(text: bytes, bit: int) -> bool:
    """Whether flipping ``bit`` of the JSON ``text`` leaves it JSON with every value as it was (say, the
    last digit of a float that rounds to the same double)."""
    try:
        return not _changed_fields(text, bit)
    except ValueError:
        return False


def test_every_bit_flip_of_the_manifest_is_refused_before_anything_changes_unless_it_changes_no_value(saved, tmp_path):
    directory, saved_state = saved
    target = _target()
    ck.save(tmp_path / "target", *target)
    text = (directory / "manifest.json").read_bytes()
    bits = range(8 * len(text))
    loaded = _load_each_flip(directory, "manifest.json", bits, target, saved_state, tmp_path / "target")
    # the checksum covers every value; the indentation (spaces, newlines) has no single-bit whitespace twin
    assert loaded == [bit for bit in bits if _same_values(text, bit)]
    assert ck.load(directory, *target) == {"step": 5} and _state(target) == saved_state  # the file is intact


def test_every_bit_flip_of_a_manifest_written_before_checksums_is_refused_or_changes_no_data(saved, tmp_path):
    directory, saved_state = saved
    _reseal(directory, lambda manifest: None, legacy=True)
    target = _target()
    ck.save(tmp_path / "target", *target)
    text = (directory / "manifest.json").read_bytes()
    loaded = _load_each_flip(directory, "manifest.json", range(8 * len(text)), target, saved_state, tmp_path / "target")
    # the schema alone refuses every flip of a value that says where or what the data is; what loads
    # changed only a description (the time, the step in the name, a table's class) and (checked in
    # _load_each_flip) loaded the saved state
    assert loaded and all(_changed_fields(text, bit) <= {"created", "name", "tables.emb.class"} for bit in loaded)


@pytest.mark.parametrize("name", ["rank00000.pt", "rank00000.bin"])
def test_sampled_bit_flips_of_a_rank_file_are_refused_before_anything_changes(saved, tmp_path, name):
    directory, saved_state = saved
    target = _target()
    ck.save(tmp_path / "target", *target)
    size_bits = 8 * (directory / name).stat().st_size
    bits = sorted(random.Random(name).sample(range(size_bits), min(SAMPLED_BITS, size_bits)))
    loaded = _load_each_flip(directory, name, bits, target, saved_state, tmp_path / "target")
    assert loaded == []  # CRC-32 catches every single-bit error


def _reseal(directory: Path, edit, legacy: bool = False) -> None:
    """Edit the manifest and write it back with a true checksum (or as a format-1 manifest, without)."""
    manifest = json.loads((directory / "manifest.json").read_text())
    del manifest["sha256"]
    edit(manifest)
    text = json.dumps({**manifest, "format": LEGACY_FORMAT}) if legacy else manifest_text(manifest)
    (directory / "manifest.json").write_text(text)


def _set(*path_and_value):
    """An edit setting the manifest entry at ``path`` (keys and indices) to ``value`` (the last argument)."""
    *path, value = path_and_value

    def edit(manifest):
        holder = manifest
        for key in path[:-1]:
            holder = holder[key]
        holder[path[-1]] = value

    return edit


def _rename_field(old: str, new: str):
    def edit(manifest):
        fields = manifest["row_sets"][0]["fields"]
        fields[new] = fields.pop(old)

    return edit


@pytest.mark.parametrize("legacy", [False, True], ids=["checksummed", "legacy"])
@pytest.mark.parametrize(
    "edit, match",
    [
        (_set("row_sets", 0, "count", 3), r"field 'row_sets\[0\]\.fields\.\S+\.offset': is \d+; the fields before"),
        (_set("row_sets", 0, "fields", "weight", "width", 5), r"'row_sets\[0\]\.fields\.weight\.width': must be in"),
        (_set("row_sets", 0, "fields", "ids", "dtype", "int32"), r"'row_sets\[0\]\.fields\.ids\.dtype': must be one"),
        (_set("row_sets", 0, "rank", 1), r"'row_sets\[0\]\.rank': must be in \[0, 1\)"),
        (_set("row_sets", 0, "key", "emc"), r"'row_sets\[0\]\.key': must be one of \['emb'\]"),
        (_set("files", "rank00000.bin", "bytes", 1), r"'files\.rank00000\.bin\.bytes': is 1; its fields end at"),
        (_set("world_size", 2), r"field 'files\.rank00001\.bin': missing"),
        (_set("extra_field", 1), r"field 'extra_field': unknown field"),
        (_set("mid_accumulation", 0), r"field 'mid_accumulation': must be true or false"),
        (_rename_field("ids", "idz"), r"field 'row_sets\[0\]\.fields\.ids': missing"),
        (_rename_field("slot.exp_avg", "slot.exp_avf"), r"field 'slot\.exp_avf', a slot the table does not keep"),
    ],
    ids=[
        "count",
        "width",
        "dtype",
        "rank",
        "table",
        "file_size",
        "world_size",
        "unknown",
        "type",
        "no_ids",
        "slot_name",
    ],
)
def test_a_consistent_looking_manifest_that_breaks_the_schema_is_refused_naming_the_field(saved, edit, match, legacy):
    directory, _ = saved
    _reseal(directory, edit, legacy)
    target = _target()
    before = _state(target)
    with pytest.raises(CheckpointError, match=match):
        ck.load(directory, *target)
    assert _state(target) == before


def test_a_manifest_written_before_checksums_loads_exactly(saved):
    directory, saved_state = saved
    _reseal(directory, lambda manifest: None, legacy=True)
    target = _target()
    assert ck.load(directory, *target) == {"step": 5}
    assert _state(target) == saved_state


@pytest.mark.parametrize(
    "text, match",
    [
        (lambda text: text.replace('\n "sha256": ', '\n "sha256": "00",\n "sha256": ', 1), r"'sha256' appears twice"),
        (lambda text: text.replace('"created": ', '"created": NaN, "x": ', 1), r"NaN is not a number"),
        (lambda text: "\n".join(line for line in text.split("\n") if '"sha256"' not in line), r"'sha256': missing"),
    ],
    ids=["repeated_key", "nan", "no_checksum"],
)
def test_a_manifest_that_is_not_strict_json_or_lacks_its_checksum_is_refused(saved, text, match):
    directory, _ = saved
    path = directory / "manifest.json"
    path.write_text(text(path.read_text()))
    target = _target()
    before = _state(target)
    with pytest.raises(CheckpointError, match=match):
        ck.load(directory, *target)
    assert _state(target) == before


def test_an_optimizer_refusing_its_state_puts_back_the_optimizers_and_the_slots_they_registered(saved, monkeypatch):
    directory, _ = saved  # its sparse optimizer keeps a per-row step slot ("row" bias correction)
    target = _make(bias_correction="table")
    _train(target, range(3), seed=1)
    assert target[0].emb.slot_names() == ["exp_avg", "exp_avg_sq"]
    before = _state(target)

    load_state_dict, calls = torch.optim.AdamW.load_state_dict, []

    def refuse_the_checkpoints(self, state_dict):
        calls.append(state_dict)
        if len(calls) == 1:
            raise ValueError("refused")
        load_state_dict(self, state_dict)

    monkeypatch.setattr(torch.optim.AdamW, "load_state_dict", refuse_the_checkpoints)  # after the sparse one
    with pytest.raises(CheckpointError, match=r"rank00000\.pt: optimizer 1 \(AdamW\) refused its state: refused"):
        ck.load(directory, *target)
    assert len(calls) == 1  # the checkpoint's state, refused; the former state is put back without loading it
    assert target[0].emb.slot_names() == ["exp_avg", "exp_avg_sq"]
    assert _state(target) == before


def test_a_table_failing_to_take_its_rows_puts_back_every_table_optimizer_and_dense_parameter(tmp_path, monkeypatch):
    run = _make(tables=2)
    _train(run, range(5))
    ck.save(tmp_path, *run)
    target = _make(tables=2)
    _train(target, range(3), seed=1)
    before = _state(target)
    load_rows, calls = HashTable.load_rows, []

    def fail_second(self, *args, **kwargs):
        calls.append(self.name)
        if len(calls) == 2:
            raise MemoryError("no room for the rows")
        return load_rows(self, *args, **kwargs)

    monkeypatch.setattr(HashTable, "load_rows", fail_second)
    with pytest.raises(MemoryError, match="no room"):
        ck.load(tmp_path, *target)
    assert calls[:2] == ["emb", "other"]  # the first table was replaced, then put back
    assert _state(target) == before


def _load_refused_on_every_rank(rank: int, world_size: int, root: str) -> dict:
    """On 2 ranks: a flipped bit of rank 1's small-state file, then an optimizer refusing on rank 1
    only (after rank 0 has loaded everything): every rank raises and keeps its state."""
    run = _make(accum=1, sharded=True)
    _train(run, range(3), seed=rank)
    ck.save(root, *run)
    target = _make(accum=1, sharded=True)
    _train(target, range(2), seed=10 + rank)
    before, errors = _state(target), []
    path = Path(root) / (Path(root) / "latest").read_text() / "rank00001.pt"
    if rank == 0:
        _flip(path, 8 * (path.stat().st_size // 2) + 3)
    torch.distributed.barrier()
    try:
        ck.load(root, *target)
    except CheckpointError as error:
        errors.append(str(error))
    torch.distributed.barrier()
    if rank == 0:
        _flip(path, 8 * (path.stat().st_size // 2) + 3)  # flipped back
    torch.distributed.barrier()
    if rank == 1:  # refuses the checkpoint's state, accepts the one it had
        load_state_dict, calls = torch.optim.AdamW.load_state_dict, []

        def refuse_first(self, state):
            calls.append(state)
            if len(calls) == 1:
                raise ValueError("refused")
            load_state_dict(self, state)

        torch.optim.AdamW.load_state_dict = refuse_first
    try:
        ck.load(root, *target)
    except CheckpointError as error:
        errors.append(str(error))
    return {"errors": errors, "unchanged": _state(target) == before}


def test_on_two_ranks_a_load_refused_by_any_rank_changes_nothing_on_every_rank(tmp_path):
    per_rank = run_ranks(2, _load_refused_on_every_rank, str(tmp_path))
    for rank, result in enumerate(per_rank):
        assert result["unchanged"], rank
        assert len(result["errors"]) == 2, result["errors"]
        assert "rank00001.pt" in result["errors"][0] and "'crc32'" in result["errors"][0]
    assert "another rank could not load" in per_rank[0]["errors"][1]
    assert "optimizer 1 (AdamW) refused its state: refused" in per_rank[1]["errors"][1]
