"""The Adagrad family as a recis sparse optimizer: param groups, schedulers, accumulation,
state dicts (validated: a bad one raises and changes nothing), checkpoints, update info.

Every behaviour runs for the four classes; the formulas themselves are pinned down
against torch and torchrec in test_sparse_adagrad_matches_torch.py and
test_sparse_row_wise_adagrad_matches_torchrec.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import recis.checkpoint as ck
from recis.nn.modules.hashtable import HashTable, filter_out_sparse_param
from recis.optim import SparseAdagrad, SparseAdagradSum, SparseAdamW, SparseRowWiseAdagrad, SparseRowWiseAdagradSum

FAMILY = [SparseAdagrad, SparseRowWiseAdagrad, SparseAdagradSum, SparseRowWiseAdagradSum]
SLOT = {SparseAdagrad: "grad_sq_sum", SparseAdagradSum: "grad_sq_sum"}
HYPER = dict(lr=0.1, lr_decay=0.05, initial_accumulator_value=0.2, eps=1e-6)


def _batch(step: int, n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return torch.randint(0, 20, (n,), generator=generator), torch.randn(n, 3, generator=generator)


def _train(table: HashTable, optimizer, steps: range) -> None:
    for step in steps:
        ids, upstream = _batch(step)
        optimizer.zero_grad()
        (table(ids) * upstream).mean(0).sum().backward()
        optimizer.step()


def _snapshot(table: HashTable, optimizer) -> dict:
    return {
        "ids": table.ids().clone(),
        "weight": table.weight.clone(),
        "slots": {name: table.slot(name).clone() for name in table.slot_names()},
        "pending": None if table.pending_grad() is None else [t.clone() for t in table.pending_grad()],
        "optimizer": copy.deepcopy(optimizer.state_dict()),
    }


def _assert_equal(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# --------------------------------------------------------------------------- bad hyperparameters
_BAD = {
    "lr_negative": (dict(lr=-0.5), ValueError, r"-0\.5"),
    "lr_nan": (dict(lr=float("nan")), ValueError, r"nan"),
    "lr_decay_negative": (dict(lr_decay=-0.25), ValueError, r"-0\.25"),
    "initial_accumulator_negative": (dict(initial_accumulator_value=-0.125), ValueError, r"-0\.125"),
    "initial_accumulator_nan": (dict(initial_accumulator_value=float("nan")), ValueError, r"nan"),
    "eps_negative": (dict(eps=-0.001), ValueError, r"-0\.001"),
    "weight_decay_negative": (dict(weight_decay=-0.5), ValueError, r"-0\.5"),
    "state_dtype_int32": (dict(state_dtype=torch.int32), TypeError, r"int32"),
    "update_info_interval_negative": (dict(save_update_info_interval=-1), ValueError, r"-1"),
}


@pytest.mark.parametrize("optimizer_cls", FAMILY)
@pytest.mark.parametrize("bad", list(_BAD))
def test_a_bad_hyperparameter_raises_naming_it_and_gives_no_table_a_slot(optimizer_cls, bad):
    kwargs, error, pattern = _BAD[bad]
    table = HashTable(3, name="emb")
    with pytest.raises(error, match=pattern):
        optimizer_cls(table, **kwargs)
    assert table.slot_names() == []


@pytest.mark.parametrize("optimizer_cls", [SparseAdagradSum, SparseRowWiseAdagradSum])
def test_the_sum_variants_refuse_weight_decay_in_construction_groups_and_edits(optimizer_cls):
    table, other = HashTable(3, name="emb"), HashTable(3, name="other")
    with pytest.raises(ValueError, match="does not support weight_decay; got 0.01"):
        optimizer_cls(table, weight_decay=0.01)
    optimizer = optimizer_cls(table)
    with pytest.raises(ValueError, match="does not support weight_decay"):
        optimizer.add_param_group({"params": [other], "weight_decay": 0.5})
    assert len(optimizer.param_groups) == 1 and other.slot_names() == []
    table(torch.tensor([1])).sum().backward()
    optimizer.param_groups[0]["weight_decay"] = 0.5
    with pytest.raises(ValueError, match="does not support weight_decay"):
        optimizer.step()
    assert table.has_grad and not optimizer.state[table]


@pytest.mark.parametrize("optimizer_cls", FAMILY)
def test_no_tables_at_all_is_an_error(optimizer_cls):
    with pytest.raises(ValueError, match="empty parameter list"):
        optimizer_cls({})


# --------------------------------------------------------------------------- param groups, schedulers
@pytest.mark.parametrize("optimizer_cls", FAMILY)
def test_each_param_group_trains_its_table_as_an_optimizer_of_its_own_would(optimizer_cls):
    settings = [dict(lr=0.3, initial_accumulator_value=0.5), dict(lr=0.05, lr_decay=0.2, eps=1e-3)]
    tables = [HashTable(3, name=f"t{i}", seed=i) for i in range(2)]
    grouped = optimizer_cls([{"params": [t], **s} for t, s in zip(tables, settings)], lr=1.0)
    alone_tables = [HashTable(3, name=f"t{i}", seed=i) for i in range(2)]
    alone = [optimizer_cls(t, **s) for t, s in zip(alone_tables, settings)]
    for step in range(4):
        ids, upstream = _batch(step)
        grouped.zero_grad()
        sum((t(ids) * upstream).sum() for t in tables).backward()
        grouped.step()
        for table, optimizer in zip(alone_tables, alone):
            optimizer.zero_grad()
            (table(ids) * upstream).sum().backward()
            optimizer.step()
    for table, twin, optimizer in zip(tables, alone_tables, alone):
        assert torch.equal(table.weight, twin.weight)
        assert torch.equal(grouped.state_sum(table), optimizer.state_sum(twin))


@pytest.mark.parametrize("optimizer_cls", FAMILY)
def test_an_lr_scheduler_sets_the_lr_of_each_update(optimizer_cls):
    table = HashTable(2, name="emb", seed=3)
    optimizer = optimizer_cls(table, lr=0.4, initial_accumulator_value=1.0, eps=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.5**epoch)
    theta = table.initial_values(torch.tensor([7])).double()
    total = 1.0
    for step in range(3):
        optimizer.zero_grad()
        table(torch.tensor([7])).sum().backward()  # gradient 1 on every element
        optimizer.step()
        schedule.step()
        total += 1.0  # the mean and the element of g^2 = 1 alike
        theta = theta - 0.4 * 0.5**step / total**0.5
    torch.testing.assert_close(table.lookup(torch.tensor([7])).double(), theta)


@pytest.mark.parametrize("optimizer_cls", FAMILY)
def test_micro_batches_accumulated_equal_one_batch_of_all_of_them(optimizer_cls):
    whole_table, micro_table = HashTable(3, name="emb", seed=1), HashTable(3, name="emb", seed=1)
    whole, micro = optimizer_cls(whole_table, **HYPER), optimizer_cls(micro_table, **HYPER)
    micro.set_grad_accum_steps(3)
    for step in range(4):
        ids, upstream = _batch(step, n=12)
        whole.zero_grad()
        (whole_table(ids) * upstream).mean(0).sum().backward()
        whole.step()
        for part in range(3):
            rows = slice(4 * part, 4 * part + 4)
            micro.zero_grad()
            (micro_table(ids[rows]) * upstream[rows]).mean(0).sum().backward()
            micro.step()
    ids = whole_table.ids()
    torch.testing.assert_close(micro_table.lookup(ids), whole_table.lookup(ids), rtol=1e-6, atol=1e-7)
    assert micro.state[micro_table]["step"] == whole.state[whole_table]["step"] == 4


# --------------------------------------------------------------------------- state dicts and checkpoints
@pytest.mark.parametrize("optimizer_cls", FAMILY)
def test_state_dicts_resume_training_bitwise(optimizer_cls):
    table = HashTable(3, name="emb", seed=2)
    optimizer = optimizer_cls(table, **HYPER)
    optimizer.set_grad_accum_steps(2)
    _train(table, optimizer, range(5))  # ends mid-accumulation: a gradient is pending
    saved = copy.deepcopy((table.state_dict(), optimizer.state_dict()))
    _train(table, optimizer, range(5, 9))

    resumed = HashTable(3, name="emb", seed=2)
    resumed_optimizer = optimizer_cls(resumed, lr=0.9)
    resumed.load_state_dict(saved[0])
    resumed_optimizer.load_state_dict(saved[1])
    _train(resumed, resumed_optimizer, range(5, 9))
    assert torch.equal(resumed.lookup(table.ids()), table.lookup(table.ids()))
    assert torch.equal(resumed_optimizer.state_sum(resumed)[resumed.rows_for(table.ids())], optimizer.state_sum(table))
    assert resumed_optimizer.param_groups[0]["lr"] == HYPER["lr"]


def _damaged(kind: str, state: dict) -> dict:
    state = copy.deepcopy(state)
    group, entry = state["param_groups"][0], state["state"][0]
    if kind == "lr_decay_missing":
        del group["lr_decay"]
    elif kind == "initial_accumulator_negative":
        group["initial_accumulator_value"] = -1.0
    elif kind == "step_negative":
        entry["step"] = -1
    elif kind == "another_table":
        entry["table"] = "someone_else"
    elif kind == "unknown_table_index":
        state["state"][5] = copy.deepcopy(entry)
    return state


@pytest.mark.parametrize("optimizer_cls", FAMILY)
@pytest.mark.parametrize(
    "kind",
    ["lr_decay_missing", "initial_accumulator_negative", "step_negative", "another_table", "unknown_table_index"],
)
def test_a_bad_state_dict_raises_and_changes_nothing(optimizer_cls, kind):
    table = HashTable(3, name="emb", seed=2)
    optimizer = optimizer_cls(table, **HYPER)
    _train(table, optimizer, range(2))
    table(torch.tensor([3, 4])).sum().backward()
    before = _snapshot(table, optimizer)
    with pytest.raises(ValueError):
        optimizer.load_state_dict(_damaged(kind, optimizer.state_dict()))
    _assert_equal(before, _snapshot(table, optimizer))


@pytest.mark.parametrize("optimizer_cls", FAMILY)
def test_an_adam_state_dict_is_refused_and_changes_nothing(optimizer_cls):
    table = HashTable(3, name="emb", seed=2)
    optimizer = optimizer_cls(table, **HYPER)
    _train(table, optimizer, range(2))
    adam_table = HashTable(3, name="emb", seed=2)
    adam = SparseAdamW(adam_table)
    _train(adam_table, adam, range(2))
    before = _snapshot(table, optimizer)
    with pytest.raises(ValueError, match="lr_decay"):
        optimizer.load_state_dict(adam.state_dict())
    _assert_equal(before, _snapshot(table, optimizer))


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = HashTable(3, name="emb", seed=4)
        self.head = nn.Linear(3, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids)).squeeze(-1)


def _train_model(model: _Model, sparse, dense, steps: range) -> None:
    for step in steps:
        ids, upstream = _batch(step)
        sparse.zero_grad()
        dense.zero_grad()
        (model(ids) - upstream[:, 0]).square().mean().backward()
        sparse.step()
        dense.step()


def _model_run(optimizer_cls):
    torch.manual_seed(0)
    model = _Model()
    return model, optimizer_cls(filter_out_sparse_param(model), **HYPER), torch.optim.SGD(model.head.parameters(), 0.1)


@pytest.mark.parametrize("optimizer_cls", FAMILY)
def test_a_checkpoint_carries_the_accumulators_and_training_resumes_bitwise(optimizer_cls, tmp_path):
    model, sparse, dense = _model_run(optimizer_cls)
    _train_model(model, sparse, dense, range(3))
    ck.save(tmp_path, model, sparse, dense)
    _train_model(model, sparse, dense, range(3, 6))

    resumed, resumed_sparse, resumed_dense = _model_run(optimizer_cls)
    ck.load(tmp_path, resumed, resumed_sparse, resumed_dense)
    assert resumed.emb.slot_names() == model.emb.slot_names() == [sparse.slot_name]
    _train_model(resumed, resumed_sparse, resumed_dense, range(3, 6))
    ids = model.emb.ids()
    assert torch.equal(resumed.emb.lookup(ids), model.emb.lookup(ids))
    rows = resumed.emb.rows_for(ids)
    assert torch.equal(resumed_sparse.state_sum(resumed.emb)[rows], sparse.state_sum(model.emb))
    assert resumed_sparse.state[resumed.emb]["step"] == sparse.state[model.emb]["step"] == 6


# --------------------------------------------------------------------------- accumulators, update info, RecIS methods
@pytest.mark.parametrize("optimizer_cls", FAMILY)
def test_a_new_row_starts_at_the_initial_accumulator_and_an_evicted_one_starts_again(optimizer_cls):
    table = HashTable(2, name="emb", capacity=2)
    optimizer = optimizer_cls(table, initial_accumulator_value=0.75)
    (table(torch.tensor([1, 2])) * torch.tensor([[1.0, 2.0], [3.0, 4.0]])).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    assert bool((optimizer.state_sum(table) > 0.75).all())  # trained rows grew
    table(torch.tensor([1000, 1001])).sum()  # two new ids evict both rows
    assert torch.equal(optimizer.state_sum(table), torch.full_like(optimizer.state_sum(table), 0.75))


@pytest.mark.parametrize("optimizer_cls", FAMILY)
def test_update_info_records_every_nth_update_of_a_table(optimizer_cls):
    table = HashTable(3, name="emb", seed=1)
    optimizer = optimizer_cls(table, **HYPER, save_update_info_interval=2)
    _train(table, optimizer, range(1))
    assert optimizer.get_step_update_info() == {}
    ids, upstream = _batch(1)
    optimizer.zero_grad()
    (table(ids) * upstream).mean(0).sum().backward()
    rows, grad = (t.clone() for t in table.pending_grad())
    weight_before, sums_before = table.weight.clone(), optimizer.state_sum(table)
    optimizer.step()
    info = optimizer.get_step_update_info()
    assert int(info["emb_last_saved_step"]) == 2
    assert torch.equal(info["emb_updated_indices"], rows)
    assert torch.equal(info["emb_updated_ids"], table.ids_of_rows(rows))
    assert torch.equal(info["emb_updated_grad"], grad)
    assert torch.equal(info["emb_updated_params_before"], weight_before[rows])
    assert torch.equal(info["emb_updated_params_after"], table.weight[rows])
    assert torch.equal(info["emb_updated_state_sum"], sums_before[rows])
    optimizer.clear_step_update_info()
    assert optimizer.get_step_update_info() == {}
    optimizer.set_save_update_info_interval(0)
    assert optimizer.save_update_info_interval() == 0


@pytest.mark.parametrize("optimizer_cls", FAMILY)
def test_add_params_puts_tables_in_the_first_group_and_refuses_one_it_has(optimizer_cls):
    first, second = HashTable(3, name="first"), HashTable(3, name="second")
    optimizer = optimizer_cls(filter_out_sparse_param(first), lr=0.3)
    optimizer.add_params(filter_out_sparse_param(second))
    assert optimizer.param_groups[0]["params"] == [first, second] and second.slot_names() == [optimizer.slot_name]
    with pytest.raises(RuntimeError, match="second"):
        optimizer.add_params({"again": second})
    with pytest.raises(RuntimeError, match="first"):
        optimizer.add_params({"first": HashTable(3, name="first")})
    assert optimizer.param_groups[0]["params"] == [first, second]


@pytest.mark.parametrize("optimizer_cls", FAMILY)
def test_super_param_state_round_trips_the_live_hyperparameters(optimizer_cls):
    optimizer = optimizer_cls(HashTable(3, name="emb"), lr=0.1, lr_decay=0.2, initial_accumulator_value=0.3, eps=1e-4)
    optimizer.param_groups[0]["lr"] = 0.5  # as a scheduler would
    assert optimizer.super_param_state_dict()["lr"] == 0.5
    new = dict(lr=0.25, lr_decay=0.4, initial_accumulator_value=0.6, eps=1e-6, save_update_info_interval=8)
    optimizer.load_super_param_state_dict(new)
    assert optimizer.super_param_state_dict() == new
    with pytest.raises(ValueError, match="-1.0"):
        optimizer.load_super_param_state_dict({"lr_decay": -1.0})
    assert optimizer.super_param_state_dict() == new


@pytest.mark.parametrize("optimizer_cls", [SparseAdagrad, SparseRowWiseAdagrad, SparseAdamW])  # Sum variants ignore it
@pytest.mark.parametrize("interval", [0, 1], ids=["plain", "recording"])  # recording divides before the kernel
@pytest.mark.parametrize("workers", [0, -1, 1.5, True])
def test_a_workers_count_that_is_not_a_positive_int_raises_and_changes_nothing(optimizer_cls, interval, workers):
    table = HashTable(3, name="t")
    options = {} if optimizer_cls is SparseAdamW else dict(HYPER, save_update_info_interval=interval)
    optimizer = optimizer_cls([table], lr=0.1) if optimizer_cls is SparseAdamW else optimizer_cls([table], **options)
    _train(table, optimizer, range(2))
    rows = table.rows_for(torch.tensor([1, 2]))
    before = _snapshot(table, optimizer)
    with pytest.raises(ValueError, match="workers must be an int >= 1"):
        optimizer.apply_gradient(table, rows, torch.ones(2, 3), workers=workers)
    _assert_equal(_snapshot(table, optimizer), before)
