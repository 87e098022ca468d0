"""An error leaves tables and optimizers as they were, by defect class (issue: transactional changes).

1. validation before mutation; 2. ``load_state_dict`` checks what it is given; 3. moves
that fail leave the table as it was; 4. a checkpoint load that fails puts everything back.
Last, what stays outside the guarantee: torch's ``nn.Module`` calls over a model that holds
tables (``load_state_dict``, ``to``) go module by module. Several of these cases were found
by the random call sequences of ``test_random_call_sequences.py``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

import recis.checkpoint as ck
from recis.checkpoint import CheckpointError
from recis.nn.hashtable_hook import FilterHook
from recis.nn.modules.hashtable import HashTable
from recis.optim import AdamWTF, SparseAdamW


def _trained_table(name: str = "t", dim: int = 4) -> tuple[HashTable, SparseAdamW]:
    table = HashTable(dim, name=name, seed=1)
    optimizer = SparseAdamW(table, lr=0.1)
    table(torch.arange(5)).square().sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    return table, optimizer


def _table_snapshot(table: HashTable) -> dict:
    return {
        "ids": table.ids().clone(),
        "weight": table.weight.clone(),
        **{n: table.slot(n).clone() for n in table.slot_names()},
    }


def _assert_same(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


# ---------------------------------------------------------------------- 1. validation before mutation
def test_adamw_tf_with_a_bad_lr_in_a_later_group_updates_no_group():
    first, second = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    optimizer = AdamWTF([{"params": [first]}, {"params": [second]}], lr=0.1)
    (first.sum() + second.sum()).backward()
    optimizer.param_groups[1]["lr"] = -1.0  # as a buggy scheduler would
    with pytest.raises(ValueError, match="learning rate: -1.0"):
        optimizer.step()
    assert torch.equal(first, torch.ones(3)) and not optimizer.state


def test_adamw_tf_with_a_sparse_grad_in_a_later_group_updates_no_group():
    first, second = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    optimizer = AdamWTF([{"params": [first]}, {"params": [second]}], lr=0.1)
    first.grad = torch.ones(3)
    second.grad = torch.ones(2).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        optimizer.step()
    assert torch.equal(first, torch.ones(3)) and not optimizer.state


def test_a_later_groups_incompatible_slot_gives_no_earlier_table_a_slot():
    fresh, clashing = HashTable(4, name="fresh"), HashTable(4, name="clashing")
    clashing.add_slot("exp_avg", 3, torch.float32)
    with pytest.raises(ValueError, match="slot 'exp_avg' exists with width 3"):
        SparseAdamW([{"params": [fresh]}, {"params": [clashing]}])
    assert fresh.slot_names() == []


# ---------------------------------------------------------------------- 2. load_state_dict checks its input
def _state_with(entry: dict) -> dict:
    _, optimizer = _trained_table()
    state = optimizer.state_dict()
    state["state"][0] = entry
    return state


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"step": -1, "nonfinite_rows": torch.tensor(0)}, "step=-1"),
        ({"step": "x", "nonfinite_rows": torch.tensor(0)}, "step='x'"),
        ({"step": None, "nonfinite_rows": torch.tensor(0)}, "step=None"),
        ({"step": float("nan"), "nonfinite_rows": torch.tensor(0)}, "step=nan"),
        ({"step": True, "nonfinite_rows": torch.tensor(0)}, "step=True"),
        ({"step": 2}, r"holds \['step'\]"),
        ({"step": 2, "nonfinite_rows": 0}, "nonfinite_rows=0"),
        ({"step": 2, "nonfinite_rows": torch.tensor(-3)}, "nonfinite_rows=-3"),
    ],
)
def test_a_bad_table_entry_is_refused_and_changes_nothing(entry, message):
    table, optimizer = _trained_table()
    before, optimizer_before = _table_snapshot(table), copy.deepcopy(optimizer.state_dict())
    with pytest.raises(ValueError, match=message):
        optimizer.load_state_dict(_state_with(entry))
    _assert_same(before, _table_snapshot(table))
    assert optimizer.state_dict()["state"][0]["step"] == optimizer_before["state"][0]["step"]


def test_a_dense_adamw_tf_state_dict_is_refused_by_a_sparse_optimizer():
    param = nn.Parameter(torch.ones(3))
    dense = AdamWTF([param], lr=0.1)
    param.sum().backward()
    dense.step()
    table, optimizer = _trained_table()
    with pytest.raises(ValueError, match="another optimizer's state dict"):
        optimizer.load_state_dict(dense.state_dict())
    assert optimizer.state[table]["step"] == 1


def test_an_entry_for_a_table_that_does_not_exist_names_it():
    _, optimizer = _trained_table()
    state = optimizer.state_dict()
    state["state"][7] = state["state"].pop(0)
    with pytest.raises(ValueError, match="entry for table 7; the optimizer has tables 0..0"):
        optimizer.load_state_dict(state)


def test_a_table_of_another_dim_does_not_load_even_when_both_are_empty():
    source, target = HashTable(3), HashTable(5)
    with pytest.raises(RuntimeError, match=r"'weight' has shape \(0, 3\), expected \(0, 5\)"):
        target.load_state_dict(source.state_dict())


def _trained_adamw_tf() -> tuple[list[nn.Parameter], AdamWTF]:
    weight, bias = nn.Parameter(torch.ones(2, 3)), nn.Parameter(torch.ones(2))
    optimizer = AdamWTF([{"params": [weight]}, {"params": [bias], "lr": 0.02}], lr=0.1)
    (weight.square().sum() + bias.square().sum()).backward()
    optimizer.step()
    return [weight, bias], optimizer


def _set_entry(index: int, key: str, value) -> Callable[[dict], None]:
    return lambda state: state["state"][index].__setitem__(key, value)


@pytest.mark.parametrize(
    "damage, message",
    [
        (_set_entry(0, "step", torch.tensor(-1.0)), r"entry 0 has step=tensor\(-1\.\)"),
        (_set_entry(0, "step", torch.tensor(math.nan)), r"entry 0 has step=tensor\(nan\)"),
        (_set_entry(1, "step", torch.tensor(1.5)), r"entry 1 has step=tensor\(1\.5000\)"),
        (_set_entry(1, "step", "x"), r"entry 1 has step='x'"),
        (_set_entry(1, "step", None), r"entry 1 has step=None"),
        (lambda state: state["state"][1].pop("exp_avg"), r"entry 1 holds \['exp_avg_sq', 'step'\]"),
        (_set_entry(0, "exp_avg", torch.zeros(3, 3)), r"exp_avg of shape \(3, 3\); its parameter has shape \(2, 3\)"),
        (_set_entry(1, "exp_avg_sq", -torch.ones(2)), r"entry 1 has negative values in exp_avg_sq"),
        (lambda state: state["state"].__setitem__(7, state["state"].pop(1)), r"entry for parameter 7"),
        (
            lambda state: state["param_groups"][1].__setitem__("lr", -1.0),
            r"param group 1: Invalid learning rate: -1\.0",
        ),
        (lambda state: state["param_groups"].pop(), r"1 param groups, the optimizer 2"),
    ],
    ids=[
        "step_-1",
        "step_nan",
        "step_1.5",
        "step_x",
        "step_none",
        "no_exp_avg",
        "exp_avg_shape",
        "negative_exp_avg_sq",
        "absent_parameter",
        "bad_lr",
        "group_missing",
    ],
)
def test_adamw_tf_refuses_a_state_dict_its_step_could_not_use_and_changes_nothing(damage, message):
    # torch's load takes any entry; a step of -1 then wrote NaN, a bad entry in the second
    # group failed in step() after the first group was updated.
    params, optimizer = _trained_adamw_tf()
    state = copy.deepcopy(optimizer.state_dict())
    damage(state)
    before = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(ValueError, match=message):
        optimizer.load_state_dict(state)
    after = optimizer.state_dict()
    assert [g["lr"] for g in after["param_groups"]] == [0.1, 0.02]
    for index, entry in before["state"].items():
        assert all(torch.equal(after["state"][index][key], value) for key, value in entry.items())
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in params)


def test_adamw_tf_loads_a_step_count_saved_as_a_number_as_torch_lays_it_out():
    params, optimizer = _trained_adamw_tf()
    state = copy.deepcopy(optimizer.state_dict())
    state["state"][0]["step"] = 1  # torch < 1.12 saved plain numbers
    optimizer.load_state_dict(state)
    assert torch.equal(optimizer.state[params[0]]["step"], torch.tensor(1.0))
    optimizer.step()
    assert float(optimizer.state[params[0]]["step"]) == 2


def test_a_sparse_optimizer_refuses_an_adamw_tf_state_dict_even_before_any_step():
    dense = AdamWTF([nn.Parameter(torch.ones(3))], lr=0.5)  # no state entries yet
    table, optimizer = _trained_table()
    with pytest.raises(ValueError, match=r"param group 0 lacks \['bias_correction', 'state_dtype', 'skip_nonfinite'\]"):
        optimizer.load_state_dict(dense.state_dict())
    assert optimizer.param_groups[0]["lr"] == 0.1 and "foreach" not in optimizer.param_groups[0]


def test_adamw_tf_refuses_a_sparse_optimizers_state_dict_even_before_any_step():
    sparse = SparseAdamW(HashTable(4), lr=0.5)
    param = nn.Parameter(torch.ones(3))
    optimizer = AdamWTF([param], lr=0.1)
    with pytest.raises(ValueError, match=r"it is a sparse optimizer's state dict, not AdamWTF's"):
        optimizer.load_state_dict(sparse.state_dict())
    assert optimizer.param_groups[0]["lr"] == 0.1 and "bias_correction" not in optimizer.param_groups[0]


def _bounded_with_a_loaded_gradient() -> HashTable:
    """A bounded table (capacity 4, a step filter) that loaded an unbounded table's state
    holding rows 1, 2, 3 and their pending gradient (no metadata columns)."""
    source = HashTable(4, name="source", seed=1)
    source(torch.tensor([1, 2, 3])).sum().backward()
    bounded = HashTable(
        4, name="bounded", seed=2, capacity=4, filter_hook=FilterHook("GlobalStepFilter", {"filter_step": 3})
    )
    bounded.load_state_dict(source.state_dict())
    return bounded


def test_a_loaded_pending_gradient_keeps_its_rows_from_the_filter():
    # Its rows were left unprotected: the filter removed them, and the gradient pointed at rows
    # that no longer existed (state_dict() then raised IndexError).
    bounded = _bounded_with_a_loaded_gradient()
    bounded.advance_filter_step(10)
    assert bounded.run_filter() == 0
    assert bounded.state_dict()["pending_grad.ids"].tolist() == [1, 2, 3]


def test_a_loaded_pending_gradient_keeps_its_rows_from_eviction():
    # Its rows were evictable: ids 7 and 8 took rows of ids 1 and 2 and inherited their gradient.
    bounded = _bounded_with_a_loaded_gradient()
    with pytest.raises(ValueError, match="only 0 rows can be evicted"):
        bounded(torch.tensor([7, 8, 9]))
    assert bounded.ids().tolist() == [1, 2, 3]
    assert bounded.grad_by_id()[0].tolist() == [1, 2, 3]


# ---------------------------------------------------------------------- 3. moves and casts
def test_a_move_that_fails_leaves_the_table_as_it_was():
    table, _ = _trained_table()
    before = _table_snapshot(table)
    with pytest.raises(Exception):  # noqa: B017 (whatever the meta device refuses first)
        table.to("meta")
    assert table.device == torch.device("cpu")
    _assert_same(before, _table_snapshot(table))
    assert table.lookup(torch.arange(5)).shape == (5, 4)


def test_an_empty_table_refuses_the_meta_device_too():
    # An empty table moved to meta used to succeed, and was then stuck there: stats() and
    # lookups raised, and it could not move back.
    table = HashTable(4, name="empty")
    with pytest.raises(ValueError, match="HashTable 'empty' cannot live on the meta device"):
        table.to("meta")
    assert table.device == torch.device("cpu") and table.stats()["rows"] == 0
    with pytest.raises(ValueError, match="meta device"):
        HashTable(4, device="meta")


# ---------------------------------------------------------------------- 4. checkpoint loads
class _TwoOptimizerModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = HashTable(4, name="emb", seed=1)
        self.lin = nn.Linear(4, 1)


def test_a_failed_checkpoint_load_puts_back_an_optimizer_whose_live_group_was_edited_to_an_invalid_value(tmp_path):
    # load used to undo an optimizer through its own load_state_dict, which refuses the NaN lr
    # the live group held: undoing failed and left the checkpoint's groups in place.
    torch.manual_seed(0)
    model = _TwoOptimizerModel()
    sparse, dense = SparseAdamW(model.emb, lr=0.1), AdamWTF(model.lin.parameters(), lr=0.1)
    model.lin(model.emb(torch.arange(4))).sum().backward()
    sparse.step()
    dense.step()
    dense.param_groups[0]["lr"] = -1.0  # saved as it is; AdamWTF refuses it when loading
    ck.save(tmp_path, model, sparse, dense)
    sparse.param_groups[0]["lr"] = math.nan  # as a buggy scheduler would
    sparse_state = copy.deepcopy(sparse.state_dict())
    with pytest.raises(CheckpointError, match=r"optimizer 1 \(AdamWTF\) refused its state: .*-1\.0"):
        ck.load(tmp_path, model, sparse, dense)
    assert math.isnan(sparse.param_groups[0]["lr"])
    assert sparse.state_dict()["state"][0]["step"] == sparse_state["state"][0]["step"] == 1
    assert sparse.param_groups[0]["params"] == [model.emb]


# ---------------------------------------------------------------------- outside the guarantee: nn.Module calls
class _DenseTableDense(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 1)
        self.emb = HashTable(4, name="emb", seed=1)
        self.last = nn.Linear(1, 1)


@pytest.mark.parametrize("strict", [True, False])
def test_module_load_state_dict_loads_the_valid_modules_and_leaves_a_bad_table_as_it_was(strict):
    """torch's ``Module.load_state_dict`` visits every module, collects the errors, then raises
    (strict or not); the modules before and after the table are loaded. The table's own check
    refuses its entry before changing anything. (``recis.checkpoint.load`` is all or nothing.)"""
    torch.manual_seed(0)
    source = _DenseTableDense()
    source.emb(torch.arange(3))
    torch.manual_seed(1)
    target = _DenseTableDense()
    target.emb(torch.arange(5))
    table_before = target.emb.state_dict()
    state = copy.deepcopy(source.state_dict())
    state["emb.weight"] = torch.zeros(3, 5)
    with pytest.raises(RuntimeError, match=r"HashTable 'emb' at emb\.: 'weight' has shape \(3, 5\), expected \(3, 4\)"):
        target.load_state_dict(state, strict=strict)
    assert torch.equal(target.first.weight, source.first.weight)  # loaded, before the table
    assert torch.equal(target.last.weight, source.last.weight)  # loaded, after it
    after = target.emb.state_dict()
    assert after.keys() == table_before.keys()
    assert all(torch.equal(after[key], value) for key, value in table_before.items())


def test_module_to_meta_moves_the_dense_layers_before_a_table_refuses():
    """torch's ``Module.to`` applies itself module by module: the layer before the table has moved."""
    model = _DenseTableDense()
    with pytest.raises(ValueError, match="cannot live on the meta device"):
        model.to("meta")
    assert model.first.weight.device.type == "meta"
    assert model.emb.device == torch.device("cpu") and model.last.weight.device.type == "cpu"
