"""Bad inputs: each raises a clear error naming the bad value, and changes nothing.

"Nothing" is checked on both sides: the table (ids, rows, len, slots, pending gradient)
and the optimizer (state, param groups, accumulation phase) are compared before/after.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from recis.nn.modules.hashtable import HashTable
from recis.optim import SparseAdam, SparseAdamW, SparseAdamWTF

OPTIMIZERS = [SparseAdam, SparseAdamW, SparseAdamWTF]


def _ids(values) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.int64)


# --------------------------------------------------------------------------- snapshots


def _assert_nested_equal(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _assert_nested_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_nested_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _table_snapshot(table: HashTable) -> dict:
    pending = table.pending_grad()
    return {
        "ids": table.ids().clone(),
        "weight": table.weight.clone(),
        "len": len(table),
        "slots": {name: table.slot(name).clone() for name in table.slot_names()},
        "has_grad": table.has_grad,
        "pending": None if pending is None else tuple(t.clone() for t in pending),
        "training": table.training,
    }


def _optimizer_snapshot(optimizer) -> dict:
    return {
        "state_dict": copy.deepcopy(optimizer.state_dict()),
        "tables": [[id(t) for t in group["params"]] for group in optimizer.param_groups],
        "group_keys": [sorted(group) for group in optimizer.param_groups],
        "grad_accum_steps": optimizer.grad_accum_steps,
    }


def _setup(optimizer_cls=SparseAdam):
    """A named table with trained rows and slots, a step count, and a pending gradient."""
    table = HashTable([2, 3], name="user_emb", seed=3)
    optimizer = optimizer_cls(table, lr=0.1)
    out = table(_ids([1, 2, 3, 2]))
    (out * torch.arange(out.numel(), dtype=torch.float32).reshape(out.shape)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    table(_ids([2, 4])).sum().backward()  # pending for the next step
    assert table.has_grad and optimizer.state[table]["step"] == 1
    return table, optimizer


def _fresh_table(name: str = "item_emb") -> HashTable:
    """A table with rows and a pending gradient but no optimizer slots yet."""
    table = HashTable([2, 3], name=name, seed=4)
    table(_ids([10, 11])).sum().backward()
    return table


# --------------------------------------------------------------------------- bad ids

_TABLE_CALLS = {
    "forward_train": lambda t, ids: t.train()(ids),
    "forward_eval": lambda t, ids: t.eval()(ids),
    "lookup": lambda t, ids: t.lookup(ids),
    # Every bad ids value below has two elements.
    "assign": lambda t, ids: t.assign(ids, torch.zeros(2, 2, 3)),
    "accept_grad": lambda t, ids: t.accept_grad(ids, torch.zeros(2, 2, 3)),
}

_BAD_IDS = {
    "float32": (lambda: torch.tensor([1.0, 2.0]), TypeError, r"float32"),
    "float64": (lambda: torch.tensor([1.0, 2.0], dtype=torch.float64), TypeError, r"float64"),
    "bool": (lambda: torch.tensor([True, False]), TypeError, r"torch\.bool"),
    "meta_device": (lambda: torch.tensor([1, 2], dtype=torch.int64, device="meta"), ValueError, r"meta"),
    "python_list": (lambda: [1, 2], TypeError, r"list"),
}


@pytest.mark.parametrize("call", list(_TABLE_CALLS))
@pytest.mark.parametrize("bad", list(_BAD_IDS))
def test_bad_ids_raise_naming_the_problem_and_change_nothing(bad, call):
    table, optimizer = _setup()
    make_ids, error, pattern = _BAD_IDS[bad]
    table_before, optimizer_before = _table_snapshot(table), _optimizer_snapshot(optimizer)
    with pytest.raises(error, match=pattern) as info:
        _TABLE_CALLS[call](table, make_ids())
    assert "user_emb" in str(info.value)  # the message names the table too
    table.train(table_before["training"])
    _assert_nested_equal(table_before, _table_snapshot(table))
    _assert_nested_equal(optimizer_before, _optimizer_snapshot(optimizer))


# --------------------------------------------------------------------------- assign


@pytest.mark.parametrize(
    "shape, pattern",
    [((2, 5), r"\(2, 5\)"), ((3, 6), r"\(3, 6\)"), ((2, 3, 2), r"\(2, 3, 2\)"), ((6,), r"\(6,\)")],
)
def test_assign_with_values_of_wrong_shape_raises_naming_the_shape_and_changes_nothing(shape, pattern):
    table, optimizer = _setup()
    table_before, optimizer_before = _table_snapshot(table), _optimizer_snapshot(optimizer)
    with pytest.raises(ValueError, match=pattern) as info:
        table.assign(_ids([2, 99]), torch.ones(shape))  # 99 is new: it must not be inserted
    assert "(2, 2, 3)" in str(info.value)  # and names the shape it expected
    _assert_nested_equal(table_before, _table_snapshot(table))
    _assert_nested_equal(optimizer_before, _optimizer_snapshot(optimizer))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64], ids=str)
def test_assign_with_non_float_values_raises_naming_the_dtype_and_changes_nothing(dtype):
    table, optimizer = _setup()
    table_before, optimizer_before = _table_snapshot(table), _optimizer_snapshot(optimizer)
    with pytest.raises(TypeError) as info:
        table.assign(_ids([2, 99]), torch.ones(2, 2, 3).to(dtype))
    assert str(dtype).removeprefix("torch.") in str(info.value)
    _assert_nested_equal(table_before, _table_snapshot(table))
    _assert_nested_equal(optimizer_before, _optimizer_snapshot(optimizer))


# --------------------------------------------------------------------------- accept_grad


@pytest.mark.parametrize(
    "make_grad, ids, error, pattern",
    [
        (lambda: torch.ones(2, 6), [1, 2], ValueError, r"\(2, 6\)"),
        (lambda: torch.ones(3, 2, 3), [1, 2], ValueError, r"\(3, 2, 3\)"),
        (lambda: torch.ones(2, 2, 3, dtype=torch.int64), [1, 2], TypeError, r"int64"),
        (lambda: torch.ones(2, 2, 3, dtype=torch.int32), [1, 2], TypeError, r"int32"),
        (lambda: torch.ones(2, 2, 3, device="meta"), [1, 2], ValueError, r"meta"),
        (lambda: torch.ones(2, 2, 3), [1, 424242], KeyError, r"424242"),
        (lambda: torch.ones(2, 2, 3), [-1, 2], KeyError, r"-1"),
    ],
    ids=["flat_rows", "too_many_rows", "int64", "int32", "meta_device", "absent_id", "absent_minus_one"],
)
def test_accept_grad_bad_input_raises_naming_it_and_changes_nothing(make_grad, ids, error, pattern):
    table, optimizer = _setup()
    table_before, optimizer_before = _table_snapshot(table), _optimizer_snapshot(optimizer)
    with pytest.raises(error, match=pattern):
        table.accept_grad(_ids(ids), make_grad())
    _assert_nested_equal(table_before, _table_snapshot(table))
    _assert_nested_equal(optimizer_before, _optimizer_snapshot(optimizer))
    assert len(table) == 4  # ids 1, 2, 3, 4: an absent id is not inserted by accept_grad


# --------------------------------------------------------------------------- hyperparameters

_BAD_HYPERPARAMETERS = {
    "lr_negative": (dict(lr=-0.25), ValueError, r"-0\.25"),
    "lr_nan": (dict(lr=float("nan")), ValueError, r"nan"),
    "betas_beta1_is_1": (dict(betas=(1.0, 0.999)), ValueError, r"1\.0"),
    "betas_beta1_negative": (dict(betas=(-0.125, 0.999)), ValueError, r"-0\.125"),
    "betas_beta2_is_1": (dict(betas=(0.9, 1.0)), ValueError, r"1\.0"),
    "betas_beta2_above_1": (dict(betas=(0.9, 1.375)), ValueError, r"1\.375"),
    "beta1_kw_is_1": (dict(beta1=1.0), ValueError, r"1\.0"),
    "beta1_kw_negative": (dict(beta1=-0.5), ValueError, r"-0\.5"),
    "beta2_kw_is_1": (dict(beta2=1.0), ValueError, r"1\.0"),
    "beta2_kw_above_1": (dict(beta2=1.625), ValueError, r"1\.625"),
    "eps_negative": (dict(eps=-0.001), ValueError, r"-0\.001"),
    "weight_decay_negative": (dict(weight_decay=-0.5), ValueError, r"-0\.5"),
    "bias_correction_bogus": (dict(bias_correction="bogus"), ValueError, r"bogus"),
    "state_dtype_int32": (dict(state_dtype=torch.int32), TypeError, r"int32"),
}


@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS)
@pytest.mark.parametrize("bad", list(_BAD_HYPERPARAMETERS))
def test_bad_hyperparameter_in_constructor_raises_naming_it_and_leaves_tables_alone(optimizer_cls, bad):
    kwargs, error, pattern = _BAD_HYPERPARAMETERS[bad]
    table = _fresh_table()
    before = _table_snapshot(table)
    with pytest.raises(error, match=pattern):
        optimizer_cls(table, **kwargs)
    _assert_nested_equal(before, _table_snapshot(table))
    assert table.slot_names() == []


@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS)
@pytest.mark.parametrize("bad", list(_BAD_HYPERPARAMETERS))
def test_bad_hyperparameter_in_add_param_group_raises_and_changes_nothing(optimizer_cls, bad):
    kwargs, error, pattern = _BAD_HYPERPARAMETERS[bad]
    table, optimizer = _setup(optimizer_cls)
    other = _fresh_table()
    table_before, other_before = _table_snapshot(table), _table_snapshot(other)
    optimizer_before = _optimizer_snapshot(optimizer)
    with pytest.raises(error, match=pattern):
        optimizer.add_param_group({"params": [other], **kwargs})
    _assert_nested_equal(table_before, _table_snapshot(table))
    _assert_nested_equal(other_before, _table_snapshot(other))
    _assert_nested_equal(optimizer_before, _optimizer_snapshot(optimizer))
    assert len(optimizer.param_groups) == 1


@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS)
def test_betas_and_beta1_together_raise(optimizer_cls):
    table = _fresh_table()
    with pytest.raises(ValueError, match="betas"):
        optimizer_cls(table, betas=(0.8, 0.99), beta1=0.7)
    assert table.slot_names() == []


# --------------------------------------------------------------------------- params


def test_same_table_twice_in_one_list_raises_naming_it_and_changes_nothing():
    table = _fresh_table("shared_emb")
    before = _table_snapshot(table)
    with pytest.raises(ValueError, match="shared_emb"):
        SparseAdam([table, table])
    _assert_nested_equal(before, _table_snapshot(table))


def test_same_table_under_two_names_in_a_dict_raises():
    table = _fresh_table("shared_emb")
    before = _table_snapshot(table)
    with pytest.raises(ValueError, match="shared_emb"):
        SparseAdamW({"a": table, "b": table})
    _assert_nested_equal(before, _table_snapshot(table))


def test_same_table_in_two_param_groups_raises_and_changes_nothing():
    table = _fresh_table("shared_emb")
    before = _table_snapshot(table)
    with pytest.raises(ValueError, match="shared_emb"):
        SparseAdam([{"params": [table]}, {"params": [table], "lr": 0.5}])
    _assert_nested_equal(before, _table_snapshot(table))


def test_add_param_group_with_a_table_already_present_raises_and_changes_nothing():
    table, optimizer = _setup()
    other = _fresh_table()
    table_before, optimizer_before = _table_snapshot(table), _optimizer_snapshot(optimizer)
    other_before = _table_snapshot(other)
    with pytest.raises(ValueError, match="user_emb"):
        optimizer.add_param_group({"params": [other, table], "lr": 0.5})
    _assert_nested_equal(table_before, _table_snapshot(table))
    _assert_nested_equal(other_before, _table_snapshot(other))
    _assert_nested_equal(optimizer_before, _optimizer_snapshot(optimizer))


@pytest.mark.parametrize(
    "params, pattern",
    [
        (lambda: [torch.zeros(3, requires_grad=True)], r"Tensor"),
        (lambda: torch.zeros(3, requires_grad=True), r"Tensor"),
        (lambda: [nn.Linear(2, 2)], r"Linear"),
    ],
    ids=["list_of_tensors", "tensor", "module"],
)
def test_non_table_params_raise_naming_what_was_given(params, pattern):
    with pytest.raises(TypeError, match=pattern):
        SparseAdam(params())


# --------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize("steps", [0, -1, 1.5, True, "2"])
def test_set_grad_accum_steps_invalid_raises_naming_it_and_changes_nothing(steps):
    table, optimizer = _setup()
    table_before, optimizer_before = _table_snapshot(table), _optimizer_snapshot(optimizer)
    with pytest.raises(ValueError, match=re.escape(repr(steps))):
        optimizer.set_grad_accum_steps(steps)
    assert optimizer.grad_accum_steps == 1
    _assert_nested_equal(table_before, _table_snapshot(table))
    _assert_nested_equal(optimizer_before, _optimizer_snapshot(optimizer))


def test_set_grad_accum_steps_mid_accumulation_raises_and_changes_nothing():
    table, optimizer = _setup()
    optimizer.set_grad_accum_steps(3)
    optimizer.step()  # one micro-step of three taken
    table_before, optimizer_before = _table_snapshot(table), _optimizer_snapshot(optimizer)
    with pytest.raises(RuntimeError, match="1 of 3"):
        optimizer.set_grad_accum_steps(2)
    assert optimizer.grad_accum_steps == 3
    _assert_nested_equal(table_before, _table_snapshot(table))
    _assert_nested_equal(optimizer_before, _optimizer_snapshot(optimizer))


# --------------------------------------------------------------------------- hand-edited groups


@pytest.mark.parametrize(
    "key, value, error, pattern",
    [
        ("lr", -1, ValueError, r"-1"),
        ("lr", -1e-3, ValueError, r"-0\.001"),
        ("betas", (0.9, 1.0), ValueError, r"1\.0"),
        ("betas", (1.5, 0.999), ValueError, r"1\.5"),
        ("eps", -1.0, ValueError, r"-1\.0"),
        ("weight_decay", -0.25, ValueError, r"-0\.25"),
        ("bias_correction", "bogus", ValueError, r"bogus"),
    ],
)
@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS)
def test_group_edited_by_hand_to_a_bad_value_makes_step_raise_and_change_nothing(
    optimizer_cls, key, value, error, pattern
):
    table, optimizer = _setup(optimizer_cls)
    good = optimizer.param_groups[0][key]
    optimizer.param_groups[0][key] = value
    table_before, optimizer_before = _table_snapshot(table), _optimizer_snapshot(optimizer)
    with pytest.raises(error, match=pattern):
        optimizer.step()
    _assert_nested_equal(table_before, _table_snapshot(table))
    _assert_nested_equal(optimizer_before, _optimizer_snapshot(optimizer))
    assert optimizer.state[table]["step"] == 1
    # Fixing the group lets the very same pending gradient be applied.
    optimizer.param_groups[0][key] = good
    optimizer.step()
    assert optimizer.state[table]["step"] == 2
    assert not torch.equal(table.weight, table_before["weight"])


def test_group_lr_edited_to_minus_one_does_not_advance_the_accumulation_phase():
    table, optimizer = _setup()
    optimizer.set_grad_accum_steps(2)
    optimizer.param_groups[0]["lr"] = -1
    for _ in range(3):
        with pytest.raises(ValueError, match="-1"):
            optimizer.step()
    optimizer.param_groups[0]["lr"] = 0.1
    optimizer.step()  # the first micro-step of two: no update yet
    assert optimizer.state[table]["step"] == 1
    optimizer.step()
    assert optimizer.state[table]["step"] == 2


# --------------------------------------------------------------------------- table construction


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(embedding_shape=0), ValueError, r"\b0\b"),
        (dict(embedding_shape=-4), ValueError, r"-4"),
        (dict(embedding_shape=[2, 0]), ValueError, r"\[2, 0\]"),
        (dict(embedding_shape=[]), ValueError, r"\[\]"),
        (dict(embedding_shape=[2.5]), ValueError, r"2\.5"),
        (dict(embedding_shape=4, dtype=torch.int64), TypeError, r"int64"),
        (dict(embedding_shape=4, seed=1.5), TypeError, r"1\.5"),
    ],
)
def test_hashtable_constructor_rejects_bad_arguments_naming_them(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        HashTable(**kwargs)
