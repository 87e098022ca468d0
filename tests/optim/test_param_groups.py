"""Param groups of the sparse optimizers: per-group hyperparameters, add_param_group, accepted params.

Contract: ``params`` is the dict of ``filter_out_sparse_param``, an iterable of HashTables, or a list
of group dicts whose entries override the defaults for their tables; each table is updated with its
own group's values; a table may appear only once (ValueError, optimizer unchanged); dense tensors
are refused with TypeError; ``betas`` and ``beta1``/``beta2`` are alternative spellings, never both.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from recis.nn.modules.hashtable import HashTable, filter_out_sparse_param
from recis.optim import SparseAdam, SparseAdamW, SparseAdamWTF

OPTIMIZERS = [SparseAdam, SparseAdamW, SparseAdamWTF]
DIM = 3
STEPS = 3


# ---------------------------------------------------------------------------- helpers
def _table(name: str, seed: int) -> HashTable:
    return HashTable(DIM, name=name, seed=seed)


def _grad(seed: int, step: int) -> torch.Tensor:
    return torch.randn(4, DIM, generator=torch.Generator().manual_seed(1000 * seed + step))


def _ids(seed: int) -> torch.Tensor:
    return torch.tensor([seed, seed + 1, seed + 2, seed])  # a repeated id too


def _train(tables_and_seeds: list[tuple[HashTable, int]], optimizer, steps: int = STEPS) -> None:
    """Each table sees its own ids and gradients, the same whatever else the optimizer holds."""
    for step in range(steps):
        optimizer.zero_grad()
        loss = sum((table(_ids(seed)) * _grad(seed, step)).sum() for table, seed in tables_and_seeds)
        loss.backward()
        optimizer.step()


def _alone(optimizer_cls, seed: int, **hyper) -> HashTable:
    """The table of ``seed`` trained by an optimizer holding it alone, with ``hyper``."""
    table = _table(f"t{seed}", seed)
    _train([(table, seed)], optimizer_cls([table], **hyper))
    return table


def _assert_tables_equal(table: HashTable, expected: HashTable) -> None:
    assert torch.equal(table.ids(), expected.ids())
    assert torch.equal(table.weight, expected.weight)
    assert table.slot_names() == expected.slot_names()
    for name in expected.slot_names():
        assert torch.equal(table.slot(name), expected.slot(name)), name


def _optimizer_summary(optimizer) -> list:
    return [
        ([id(t) for t in group["params"]], {k: v for k, v in group.items() if k != "params"})
        for group in optimizer.param_groups
    ]


# ---------------------------------------------------------------------------- per-group hyperparameters
@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_each_table_is_updated_with_its_own_groups_lr_and_weight_decay(optimizer_cls):
    first, second = _table("t1", 1), _table("t20", 20)
    optimizer = optimizer_cls(
        [{"params": [first], "lr": 0.2, "weight_decay": 0.05}, {"params": [second], "weight_decay": 0.3}],
        lr=0.01,
    )
    assert [g["lr"] for g in optimizer.param_groups] == [0.2, 0.01]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.3]
    _train([(first, 1), (second, 20)], optimizer)

    _assert_tables_equal(first, _alone(optimizer_cls, 1, lr=0.2, weight_decay=0.05))
    _assert_tables_equal(second, _alone(optimizer_cls, 20, lr=0.01, weight_decay=0.3))
    # The groups' values matter: with the defaults, the first table would end elsewhere.
    assert not torch.equal(first.weight, _alone(optimizer_cls, 1, lr=0.01).weight)
    assert optimizer.state[first]["step"] == optimizer.state[second]["step"] == STEPS


@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_lr_edited_in_one_group_changes_only_that_groups_table(optimizer_cls):
    first, second = _table("t1", 1), _table("t20", 20)
    optimizer = optimizer_cls([{"params": [first]}, {"params": [second]}], lr=0.05)
    optimizer.param_groups[1]["lr"] = 0.3
    _train([(first, 1), (second, 20)], optimizer)
    _assert_tables_equal(first, _alone(optimizer_cls, 1, lr=0.05))
    _assert_tables_equal(second, _alone(optimizer_cls, 20, lr=0.3))


# ---------------------------------------------------------------------------- add_param_group
@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_add_param_group_adds_a_table_trained_with_the_groups_values(optimizer_cls):
    first, second = _table("t1", 1), _table("t20", 20)
    optimizer = optimizer_cls([first], lr=0.05, eps=1e-6)
    optimizer.add_param_group({"params": second, "lr": 0.15, "betas": (0.8, 0.99)})
    assert len(optimizer.param_groups) == 2
    group = optimizer.param_groups[1]
    assert group["params"] == [second]
    assert group["lr"] == 0.15 and tuple(group["betas"]) == (0.8, 0.99)
    assert group["eps"] == 1e-6, "missing entries come from the optimizer's defaults"
    assert {"exp_avg", "exp_avg_sq"} <= set(second.slot_names())

    _train([(first, 1), (second, 20)], optimizer)
    _assert_tables_equal(first, _alone(optimizer_cls, 1, lr=0.05, eps=1e-6))
    _assert_tables_equal(second, _alone(optimizer_cls, 20, lr=0.15, betas=(0.8, 0.99), eps=1e-6))


# ---------------------------------------------------------------------------- a table only once
@pytest.mark.parametrize(
    "make_params",
    [
        pytest.param(lambda a, b: [a, a], id="twice_in_a_list"),
        pytest.param(lambda a, b: [{"params": [a, b, a]}], id="twice_in_one_group"),
        pytest.param(lambda a, b: [{"params": [a]}, {"params": [b, a]}], id="in_two_groups"),
        pytest.param(lambda a, b: {"x": a, "y": b, "z": a}, id="twice_in_a_dict"),
    ],
)
@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_the_same_table_twice_in_the_constructor_raises_value_error(optimizer_cls, make_params):
    first, second = _table("t1", 1), _table("t20", 20)
    with pytest.raises(ValueError, match="t1"):
        optimizer_cls(make_params(first, second))
    assert first.slot_names() == [] and second.slot_names() == [], "a refused optimizer must not touch its tables"


@pytest.mark.parametrize(
    "make_group",
    [
        pytest.param(lambda known, new: {"params": [known]}, id="already_in_the_optimizer"),
        pytest.param(lambda known, new: {"params": [new, known], "lr": 0.5}, id="new_and_already_in"),
        pytest.param(lambda known, new: {"params": [new, new]}, id="twice_in_the_new_group"),
    ],
)
@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_add_param_group_with_a_repeated_table_raises_and_leaves_the_optimizer_unchanged(optimizer_cls, make_group):
    known, other, new = _table("t1", 1), _table("t20", 20), _table("t40", 40)
    optimizer = optimizer_cls([{"params": [known]}, {"params": [other], "lr": 0.02}], lr=0.05)
    _train([(known, 1), (other, 20)], optimizer, steps=1)
    before = _optimizer_summary(optimizer)
    state_before = optimizer.state_dict()

    with pytest.raises(ValueError):
        optimizer.add_param_group(make_group(known, new))

    assert _optimizer_summary(optimizer) == before
    assert optimizer.state_dict() == state_before
    assert new.slot_names() == [], "a refused table must not get optimizer slots"
    assert new not in optimizer.state
    # And the optimizer goes on training exactly as one that never saw the failed call.
    _train([(known, 1), (other, 20)], optimizer, steps=STEPS)
    reference = _table("t1", 1)
    reference_optimizer = optimizer_cls([reference], lr=0.05)
    _train([(reference, 1)], reference_optimizer, steps=1)
    _train([(reference, 1)], reference_optimizer, steps=STEPS)
    _assert_tables_equal(known, reference)
    assert optimizer.state[known]["step"] == 1 + STEPS


# ---------------------------------------------------------------------------- betas spellings
@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"betas": (0.8, 0.99), "beta1": 0.8}, id="betas_and_beta1"),
        pytest.param({"betas": (0.8, 0.99), "beta2": 0.99}, id="betas_and_beta2"),
        pytest.param({"betas": (0.9, 0.999), "beta1": 0.9, "beta2": 0.999}, id="both_spellings_agreeing"),
    ],
)
@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_betas_and_beta1_beta2_together_raise_value_error(optimizer_cls, kwargs):
    with pytest.raises(ValueError):
        optimizer_cls([_table("t1", 1)], **kwargs)
    optimizer = optimizer_cls([_table("t1", 1)])
    new = _table("t20", 20)
    with pytest.raises(ValueError):
        optimizer.add_param_group({"params": [new], **kwargs})
    assert len(optimizer.param_groups) == 1 and new.slot_names() == []
    with pytest.raises(ValueError):
        optimizer_cls([{"params": [_table("t3", 3)], **kwargs}])


@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_beta1_beta2_keywords_equal_the_betas_keyword(optimizer_cls):
    table = _table("t1", 1)
    optimizer = optimizer_cls([table], lr=0.1, beta1=0.7, beta2=0.95)
    assert tuple(optimizer.param_groups[0]["betas"]) == (0.7, 0.95)
    _train([(table, 1)], optimizer)
    _assert_tables_equal(table, _alone(optimizer_cls, 1, lr=0.1, betas=(0.7, 0.95)))


@pytest.mark.parametrize(
    "group_betas, expected",
    [
        pytest.param({"beta1": 0.5}, (0.5, 0.98), id="beta1_only"),
        pytest.param({"beta2": 0.9}, (0.85, 0.9), id="beta2_only"),
        pytest.param({"beta1": 0.5, "beta2": 0.9}, (0.5, 0.9), id="beta1_and_beta2"),
        pytest.param({"betas": (0.5, 0.9)}, (0.5, 0.9), id="betas"),
    ],
)
@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_group_dict_may_spell_betas_as_beta1_beta2(optimizer_cls, group_betas, expected):
    first, second = _table("t1", 1), _table("t20", 20)
    optimizer = optimizer_cls([{"params": [first], **group_betas}, {"params": [second]}], lr=0.1, betas=(0.85, 0.98))
    assert tuple(optimizer.param_groups[0]["betas"]) == expected
    assert tuple(optimizer.param_groups[1]["betas"]) == (0.85, 0.98)
    assert "beta1" not in optimizer.param_groups[0] and "beta2" not in optimizer.param_groups[0]
    _train([(first, 1), (second, 20)], optimizer)
    _assert_tables_equal(first, _alone(optimizer_cls, 1, lr=0.1, betas=expected))
    _assert_tables_equal(second, _alone(optimizer_cls, 20, lr=0.1, betas=(0.85, 0.98)))


# ---------------------------------------------------------------------------- accepted forms of params
class _TwoTables(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = _table("t1", 1)
        self.second = _table("t20", 20)
        self.dense = nn.Linear(2, 2)


PARAM_FORMS = {
    "dict_from_filter_out_sparse_param": lambda model: filter_out_sparse_param(model),
    "list": lambda model: [model.first, model.second],
    "tuple": lambda model: (model.first, model.second),
    "generator": lambda model: (table for table in [model.first, model.second]),
    "one_group_dict": lambda model: [{"params": [model.first, model.second]}],
    "two_group_dicts": lambda model: [{"params": [model.first]}, {"params": model.second}],
    "group_dict_with_a_dict": lambda model: [{"params": filter_out_sparse_param(model)}],
}


@pytest.mark.parametrize("form", list(PARAM_FORMS))
@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_params_as_dict_list_or_group_dicts_train_the_same(optimizer_cls, form):
    model = _TwoTables()
    optimizer = optimizer_cls(PARAM_FORMS[form](model), lr=0.05)
    tables = [table for group in optimizer.param_groups for table in group["params"]]
    assert tables == [model.first, model.second]
    assert all(group["lr"] == 0.05 for group in optimizer.param_groups)
    _train([(model.first, 1), (model.second, 20)], optimizer)
    _assert_tables_equal(model.first, _alone(optimizer_cls, 1, lr=0.05))
    _assert_tables_equal(model.second, _alone(optimizer_cls, 20, lr=0.05))


def test_filter_out_sparse_param_finds_every_table_once_keyed_by_table_name():
    model = _TwoTables()
    model.alias = model.first  # the same table under a second path
    tables = filter_out_sparse_param(model)
    assert list(tables.values()) == [model.first, model.second]
    assert list(tables) == [model.first.name, model.second.name]
    SparseAdam(tables)  # no duplicate error: a shared table appears once


# ---------------------------------------------------------------------------- dense params refused
@pytest.mark.parametrize(
    "make_params",
    [
        pytest.param(lambda t: [t, torch.zeros(2, 3)], id="tensor_in_a_list"),
        pytest.param(lambda t: [nn.Parameter(torch.zeros(2, 3))], id="parameter_in_a_list"),
        pytest.param(lambda t: torch.zeros(2, 3), id="a_tensor"),
        pytest.param(lambda t: nn.Parameter(torch.zeros(2, 3)), id="a_parameter"),
        pytest.param(lambda t: nn.Linear(2, 2).parameters(), id="module_parameters"),
        pytest.param(lambda t: {"table": t, "w": nn.Parameter(torch.zeros(2))}, id="parameter_in_a_dict"),
        pytest.param(lambda t: [{"params": [t, nn.Parameter(torch.zeros(2))]}], id="parameter_in_a_group"),
        pytest.param(lambda t: [{"params": [t]}, {"params": torch.zeros(2, 3)}], id="tensor_as_a_groups_params"),
    ],
)
@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_dense_tensors_or_parameters_in_params_raise_type_error(optimizer_cls, make_params):
    table = _table("t1", 1)
    with pytest.raises(TypeError):
        optimizer_cls(make_params(table))
    assert table.slot_names() == [], "a refused optimizer must not touch its tables"


@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_add_param_group_with_a_dense_parameter_raises_type_error_and_changes_nothing(optimizer_cls):
    table, new = _table("t1", 1), _table("t20", 20)
    optimizer = optimizer_cls([table])
    before = _optimizer_summary(optimizer)
    with pytest.raises(TypeError):
        optimizer.add_param_group({"params": [new, nn.Parameter(torch.zeros(2))]})
    assert _optimizer_summary(optimizer) == before
    assert new.slot_names() == []
