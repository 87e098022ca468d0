"""RecIS's filter-hook tests of ``tests/hashtable``, transcribed to CPU.

Sources (alibaba/RecIS):

- ``tests/hashtable/ht_filter_hook_test.py``, ``HashTableFilterHookTest.testFilterHook``.
  Seven features on four tables, built by ``EmbeddingEngine`` from ``EmbeddingOption``s
  with ``ConstantInitializer(init_val=...)``, ``FilterHook("GlobalStepFilter",
  {"filter_step": 1 | 3 | 50})``, ``AdmitHook("ReadOnly")`` on some features and
  ``trainable=False`` on one; ``RaggedTensor`` inputs; ``split_sparse_dense_state_dict``
  and ``SparseAdamWTF``; ``HashTableFilterHook(1)`` with ``after_step(global_step=step)``
  and later ``reset_filter_interval(10)``. It checks, step by step, which ids each table
  holds, the step each row was last seen at, that trained rows and their optimizer slots
  moved, that a save and load restores rows, slots, last-seen steps and the filters'
  global steps, and that after 60 steps of random ids exactly the ids last seen more
  than 50 filter steps ago are gone.
- ``tests/hashtable/ht_filter_hook_isolation_test.py``: that each test owns its tables and
  hooks (see the last test here).

The calls and keywords above are RecIS's. Changes, and why:

- CPU instead of CUDA; the world of one process that RecIS's ``setUpClass`` initializes is
  a gloo group here (a fixture), and its ``setUp``'s patching of RecIS's singletons
  (``SingletonMeta``, ``HashtableRegister``, ``HashtableHookFactory``) is not needed: recis
  keeps the tables with a filter hook in a weak registry (``recis.nn.tables_with_filters``).
- Where RecIS reaches into its engine (``ee._fea_to_ht``, ``ee._ht[...]._hashtable``,
  ``_fea_to_group[...].encode_id``), the public ``engine.table_of(feature)`` is used.
- RecIS's engine merges every set of shared names with equal table options into one
  coalesced table (``ht1`` and ``ht2`` into "group a" here) and compares that table's ids
  with ``fused_ids_encode_gpu`` of each feature's ids and child index. recis merges tables
  only when their options say ``coalesced=True``, so ``ht1`` and ``ht2`` are two tables
  here and "group a"'s ids are compared as (shared name, id) pairs: what RecIS's child
  encoding stands for.
- RecIS's storage slots are read through the public per-row state: the ``step_filter`` slot
  is ``table.column("filter_step")``, the ``embedding`` slot ``table.weight``, and
  ``sparse_adamw_tf_exp_avg``/``_exp_avg_sq`` are ``table.slot("exp_avg")``/``("exp_avg_sq")``,
  each read for the ids present (``ids_map()``). RecIS's filters' ``_global_step`` buffers
  are ``table.lifecycle.global_step``.
- RecIS's ``Saver``/``Loader`` (``recis.serialize``, its checkpoint format) are
  ``recis.checkpoint.save``/``load`` of the engine and the optimizer; the state is
  corrupted through the same public views before loading, as RecIS does through its slots.
  RecIS's check that the filters' global steps come back is ``assertTrue(saved, now)``,
  which cannot fail; here it is an equality.
- The 60 random steps are smaller: 100 bags of 20 ids per feature and ids below 200,000
  (RecIS: 5,000 bags, ids below 10**8), drawn from a seeded generator, so that the
  read-only feature ``fea_7`` often meets present ids and the test runs in seconds.

Left out, because they assert RecIS's storage layout rather than behaviour:

- ``mmap.max() == 12``, ``<= 13``, ``<= 12`` and, at step 68, ``== ids.numel() - 1``: the
  highest storage index in use (RecIS reuses the rows a filter frees). The count of ids at
  step 68 is kept.
- The values RecIS reads from storage rows that hold no id: ``filter_slot[:14]`` includes
  the stale steps of freed rows (``[3] * 5 + [2] * 9`` etc.; here: the present rows' steps),
  ``check_emb_rows``' claim that rows outside ``ids_map`` hold the initial value and zero
  optimizer slots (here: the present rows moved), and ``group_b``'s filter slot after its
  rows were all filtered.
"""

from __future__ import annotations

import gc
import socket

import pytest
import torch
import torch.distributed as dist

from recis.checkpoint import load as load_checkpoint
from recis.checkpoint import save as save_checkpoint
from recis.hooks.filter_hook import HashTableFilterHook
from recis.nn.hashtable_hook import AdmitHook, FilterHook
from recis.nn.initializers import ConstantInitializer
from recis.nn.modules.embedding import EmbeddingOption
from recis.nn.modules.embedding_engine import EmbeddingEngine
from recis.nn.modules.hashtable import HashTable, split_sparse_dense_state_dict
from recis.optim import SparseAdamWTF
from recis.ragged.tensor import RaggedTensor

DEVICE = "cpu"
RANDOM_STEPS = range(8, 68)
BAGS, BAG_LEN, MAX_ID = 100, 20, 200_000
NEW_IDS_FROM = 100_000_000


@pytest.fixture
def world_of_one():
    """RecIS's setUpClass: a process group of one rank (gloo on localhost)."""
    if dist.is_initialized():
        yield
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _ragged(values: list[int], offsets: list[int]) -> RaggedTensor:
    return RaggedTensor(
        torch.tensor(values, dtype=torch.int64, device=DEVICE), torch.tensor(offsets, dtype=torch.int64, device=DEVICE)
    )


def _fixed_steps() -> dict[str, dict[str, RaggedTensor]]:
    """RecIS's ``setIds`` for steps 0 to 7."""
    first = {
        "fea_1": ([12, 13, 14, 15, 16], [0, 1, 2, 3, 4, 5]),
        "fea_2": ([27, 28, 29, 30, 31, 32, 33], [0, 1, 2, 3, 4, 7]),
        "fea_3": ([12, 99], [0, 1, 2, 2, 2, 2]),
        "fea_4": ([100, 101, 102], [0, 1, 2, 3]),
        "fea_6": ([200, 201, 202], [0, 1, 2, 3]),
    }
    later = {
        "step_3": {
            "fea_1": ([12, 13, 16], [0, 1, 2, 3]),
            "fea_2": ([777777, 28], [0, 1, 2, 2]),
            "fea_6": ([200, 201, 202], [0, 1, 2, 3]),
        },
        "step_4": {"fea_3": ([12, 13, 16, 999], [0, 1, 2, 3, 4]), "fea_6": ([131, 202, 203], [0, 1, 2, 3])},
        "step_5": {"fea_1": ([999], [0, 1]), "fea_2": ([12], [0, 1]), "fea_6": ([999, 200, 201, 202], [0, 4])},
        "step_6": {"fea_2": ([1111], [0, 1])},
        "step_7": {"fea_2": ([1111], [0, 1])},
    }
    steps = {f"step_{step}": first for step in range(3)} | later
    return {step: {fea: _ragged(*spec) for fea, spec in feas.items()} for step, feas in steps.items()}


def _random_bags(generator: torch.Generator) -> RaggedTensor:
    values = torch.randint(0, MAX_ID, (BAGS * BAG_LEN,), generator=generator)
    return RaggedTensor(values, torch.arange(0, BAGS * BAG_LEN + 1, BAG_LEN))


def _random_steps() -> tuple[dict, list[int], list[int]]:
    """RecIS's steps 8..67 (``fea_5`` brings ids in, read-only ``fea_7`` only marks present
    ones seen) and step 68 (as many new ids as should be filtered, plus one); the ids last
    seen at step 17 or before (filtered at step 67) and the others."""
    generator = torch.Generator().manual_seed(0)
    ids, last_seen = {}, {}
    for step in RANDOM_STEPS:
        fea_5, fea_7 = _random_bags(generator), _random_bags(generator)
        last_seen.update(dict.fromkeys(fea_5.values().tolist(), step))
        last_seen.update({value: step for value in fea_7.values().tolist() if value in last_seen})
        ids[f"step_{step}"] = {"fea_5": fea_5, "fea_7": fea_7}
    invalid_ids = [key for key, value in last_seen.items() if value <= 17]
    valid_ids = [key for key, value in last_seen.items() if value > 17]
    new = torch.arange(NEW_IDS_FROM, NEW_IDS_FROM + len(invalid_ids) + 1)
    ids["step_68"] = {"fea_5": RaggedTensor(new, torch.arange(new.numel() + 1))}
    return ids, invalid_ids, valid_ids


def _options() -> dict[str, EmbeddingOption]:
    """RecIS's ``setFeas``, in the order of its ``ChainMap`` of the four groups."""

    def option(dim: int, shared_name: str, combiner: str, init_val: float, filter_step: int, **kwargs):
        return EmbeddingOption(
            embedding_dim=dim,
            shared_name=shared_name,
            combiner=combiner,
            initializer=ConstantInitializer(init_val=init_val),
            device=torch.device(DEVICE),
            filter_hook=FilterHook("GlobalStepFilter", {"filter_step": filter_step}),
            **kwargs,
        )

    group_a_filter_step, group_b_filter_step, group_c_filter_step = 1, 3, 50
    read_only = AdmitHook("ReadOnly")
    return {
        "fea_5": option(2, "ht4", "sum", 8.0, group_c_filter_step),
        "fea_7": option(2, "ht4", "sum", 8.0, group_c_filter_step, admit_hook=read_only),
        "fea_4": option(8, "ht3", "sum", 3.0, group_b_filter_step),
        "fea_2": option(8, "ht2", "mean", 3.0, group_a_filter_step),
        "fea_1": option(8, "ht1", "sum", 3.0, group_a_filter_step),
        "fea_3": option(8, "ht1", "mean", 3.0, group_a_filter_step, trainable=False),
        "fea_6": option(8, "ht1", "mean", 3.0, group_a_filter_step, admit_hook=read_only, trainable=True),
    }


def _pairs(table: HashTable, shared_name: str) -> set[tuple[str, int]]:
    return {(shared_name, i) for i in table.ids().tolist()}


def _expected_pairs(*parts: tuple[str, torch.Tensor]) -> set[tuple[str, int]]:
    return {(shared_name, i) for shared_name, values in parts for i in values.tolist()}


def _present(table: HashTable, per_row: torch.Tensor) -> torch.Tensor:
    """``per_row`` (a column, the rows or a slot) at the rows of the ids present."""
    _, rows = table.ids_map()
    return per_row[rows]


def _trained(table: HashTable, init_val: float) -> bool:
    """RecIS's ``check_emb_rows`` on the present rows: every element moved off its initial
    value, and both Adam slots off zero."""
    weight = _present(table, table.weight)
    exp_avg = _present(table, table.slot("exp_avg"))
    exp_avg_sq = _present(table, table.slot("exp_avg_sq"))
    return bool((weight != init_val).all() and (exp_avg != 0).all() and (exp_avg_sq != 0).all())


class _Run:
    """RecIS's ``setUp``: the engine, its sparse state, the optimizer and the hook."""

    def __init__(self) -> None:
        exec_step = 1
        self.ids = _fixed_steps()
        self.ee = EmbeddingEngine(_options())
        self.sparse_state, self.dense_state = split_sparse_dense_state_dict(self.ee.state_dict())
        self.opt = SparseAdamWTF(self.sparse_state)
        self.ht1, self.ht2 = self.ee.table_of("fea_1"), self.ee.table_of("fea_2")
        self.ht3, self.ht4 = self.ee.table_of("fea_4"), self.ee.table_of("fea_5")
        self.hook = HashTableFilterHook(exec_step)

    def train(self, step: int, *features: str) -> dict[str, torch.Tensor]:
        step_id = self.ids[f"step_{step}"]
        out = self.ee(step_id)
        sum(out[fea].sum() for fea in features).backward()
        self.opt.step()
        self.opt.zero_grad()
        return step_id

    def group_a(self) -> set[tuple[str, int]]:
        return _pairs(self.ht1, "ht1") | _pairs(self.ht2, "ht2")

    def filter_steps(self, table: HashTable) -> torch.Tensor:
        return _present(table, table.column("filter_step"))


def test_filter_hook(world_of_one, tmp_path):
    run = _Run()
    assert set(run.sparse_state) == {"ht1", "ht2", "ht3", "ht4"} and run.dense_state == {}

    for step in range(3):
        step_id = run.train(step, "fea_1", "fea_2", "fea_6")
        run.hook.after_step(global_step=step)  # run filter
        assert run.group_a() == _expected_pairs(
            ("ht1", step_id["fea_1"].values()), ("ht2", step_id["fea_2"].values()), ("ht1", torch.tensor([99]))
        )
        assert set(run.ht3.ids().tolist()) == {100, 101, 102}
        assert bool((run.filter_steps(run.ht1) == step).all() and (run.filter_steps(run.ht2) == step).all())
        assert bool((run.filter_steps(run.ht3) == step).all())

    step_id = run.train(3, "fea_1", "fea_2", "fea_6")
    run.hook.after_step(global_step=3)  # run filter: ht1 and ht2 drop the ids not seen at step 3
    assert run.group_a() == _expected_pairs(("ht1", step_id["fea_1"].values()), ("ht2", step_id["fea_2"].values()))
    assert set(run.ht3.ids().tolist()) == {100, 101, 102}  # filter_step 3: kept
    assert run.filter_steps(run.ht1).tolist() == [3, 3, 3] and run.filter_steps(run.ht2).tolist() == [3, 3]
    assert bool((run.filter_steps(run.ht3) == 2).all())

    step_id = run.train(4, "fea_3", "fea_6")
    run.hook.after_step(global_step=4)  # run filter hook
    assert run.group_a() == _expected_pairs(("ht1", step_id["fea_3"].values()))  # the untrainable fea_3 inserts
    assert set(run.ht3.ids().tolist()) == {100, 101, 102}
    assert bool((run.filter_steps(run.ht1) == 4).all())
    assert bool((run.filter_steps(run.ht3) == 2).all())

    step_id = run.train(5, "fea_1", "fea_2", "fea_6")
    run.hook.after_step(global_step=5)  # run hook
    assert run.group_a() == _expected_pairs(("ht1", step_id["fea_1"].values()), ("ht2", step_id["fea_2"].values()))
    assert run.ht3.ids().numel() == 0

    # check embedding and optimizer slot
    assert _trained(run.ht1, 3.0) and _trained(run.ht2, 3.0)

    save_checkpoint(tmp_path, run.ee, run.opt)
    filter_save_gstep = {}
    for table in (run.ht1, run.ht2, run.ht3, run.ht4):
        filter_save_gstep[table.name] = table.lifecycle.global_step
        table.lifecycle.global_step = 0
    for table in (run.ht1, run.ht2, run.ht3):
        table.column("filter_step").fill_(0)
        table.weight.fill_(3)
        table.slot("exp_avg").fill_(0)
        table.slot("exp_avg_sq").fill_(0)
    assert not _trained(run.ht1, 3.0)

    load_checkpoint(tmp_path, run.ee, run.opt)
    for table in (run.ht1, run.ht2, run.ht3, run.ht4):
        assert table.lifecycle.global_step == filter_save_gstep[table.name]
    assert run.group_a() == {("ht1", 999), ("ht2", 12)}
    assert run.filter_steps(run.ht1).tolist() == [5] and run.filter_steps(run.ht2).tolist() == [5]
    assert _trained(run.ht1, 3.0) and _trained(run.ht2, 3.0)

    for step in range(6, 8):
        run.train(step, "fea_2")
        if step == 6:
            assert run.group_a() == {("ht2", 12), ("ht2", 1111), ("ht1", 999)}
        else:
            assert run.group_a() == {("ht2", 1111)}
        run.hook.after_step(global_step=step)  # run hook

    random_ids, invalid_ids, valid_ids = _random_steps()
    run.ids.update(random_ids)
    assert invalid_ids and valid_ids  # both kinds occur, so the check at step 67 can fail either way
    run.hook.reset_filter_interval(10)
    last_step_id_numel = 0
    after_filter_numel = 0
    for step in range(8, 69):
        if step != 68:
            run.train(step, "fea_5", "fea_7")
        else:
            run.train(step, "fea_5")
        run.hook.after_step(global_step=step)

        ids = run.ht4.ids()
        last_step_id_numel = after_filter_numel
        after_filter_numel = ids.numel()
        if step == 66:
            assert bool(torch.isin(torch.tensor(invalid_ids), ids).all())  # not yet filtered
        if step == 67:
            assert not bool(torch.isin(ids, torch.tensor(invalid_ids)).any())
            assert sorted(ids.tolist()) == sorted(valid_ids)
            assert bool((_present(run.ht4, run.ht4.slot("exp_avg")) != 0).all())
        elif step == 68:
            insert_numel = run.ids[f"step_{step}"]["fea_5"].values().numel()
            assert ids.numel() == last_step_id_numel + insert_numel

    save_checkpoint(tmp_path, run.ee, run.opt)


def test_setup_preserves_implementations_and_restores_instances_on_failure():
    """RecIS's isolation test checks that its test's ``setUp`` gives each test its own
    ``HashtableRegister`` and hook instances (mocking its singletons) and restores them when
    ``setUp`` fails. recis has no such singletons; what it guards is that a test's tables do
    not leak into a later test's ``HashTableFilterHook``: a table nothing uses any more is
    no longer served, and a hook given ``tables=`` serves only those."""
    filter_hook = FilterHook("GlobalStepFilter", {"filter_step": 1})
    mine = HashTable([2], name="mine", filter_hook=filter_hook)
    gone = HashTable([2], name="gone", filter_hook=filter_hook)
    assert mine in HashTableFilterHook().tables() and gone in HashTableFilterHook().tables()
    del gone
    gc.collect()
    assert [table.name for table in HashTableFilterHook().tables()].count("gone") == 0
    assert HashTableFilterHook(tables=[mine]).tables() == [mine]
