"""The optimizers take RecIS's constructor arguments: names, positions and meaning.

RecIS (alibaba/RecIS, recis/optim/*.py) declares
``SparseAdam/SparseAdamW(param_dict, lr, beta1, beta2, eps, weight_decay, amsgrad=False)``,
``SparseAdamWTF(param_dict, lr, beta1, beta2, eps, weight_decay, use_nesterov=False)`` and
``AdamWTF(params, lr, betas, eps, weight_decay, use_nesterov=False, *, maximize=False, fuse=True)``.
Here the first argument keeps its name ``params`` (positional, or ``params=``) and
``param_dict=`` is accepted as its RecIS spelling. ``amsgrad=True`` and ``use_nesterov=True``
raise ``ValueError`` (RecIS's sparse optimizers do the same; its AdamWTF fails at the
first step), before anything changes. ``fuse`` picks the same update path as torch's
``foreach``. Every training check compares with the float64 reference of
``tests/support/reference_adam.py``.
"""

from __future__ import annotations

import copy
import inspect
import re

import numpy as np
import pytest
import torch
from reference_adam import adamw_tf_step, lazy_table_step

from recis.nn.modules.hashtable import HashTable
from recis.optim import AdamWTF, SparseAdam, SparseAdamW, SparseAdamWTF

IDS = torch.tensor([3, -8, 2**40, 17, 5], dtype=torch.int64)
RULE = {SparseAdam: "sparse_adam", SparseAdamW: "adamw", SparseAdamWTF: "adamw_tf"}
FLAG = {SparseAdam: "amsgrad", SparseAdamW: "amsgrad", SparseAdamWTF: "use_nesterov"}
SPARSE = list(RULE)
TOL = dict(rtol=1e-5, atol=1e-6)


def make_table(name: str = "emb") -> HashTable:
    table = HashTable([3], name=name)
    table.assign(IDS, torch.linspace(-1.0, 1.0, 15).reshape(5, 3))
    return table


def batches(steps: int = 6):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        positions = torch.randint(0, len(IDS), (4,), generator=gen)  # repeats and untouched rows
        yield positions, torch.randn(4, 3, generator=gen)


def train(table: HashTable, optimizer, steps: int = 6) -> None:
    for positions, weights in batches(steps):
        optimizer.zero_grad()
        (table(IDS[positions]) * weights).sum().backward()
        optimizer.step()


def reference_rows(rule: str, steps: int = 6, **hyper) -> np.ndarray:
    weight = torch.linspace(-1.0, 1.0, 15).reshape(5, 3).double().numpy()
    m, v, t = np.zeros_like(weight), np.zeros_like(weight), 0
    for positions, weights in batches(steps):
        t = lazy_table_step(rule, weight, m, v, t, positions.numpy(), weights.double().numpy(), **hyper)
    return weight


# ---------------------------------------------------------------------------- param_dict


@pytest.mark.parametrize("cls", SPARSE, ids=lambda cls: cls.__name__)
def test_param_dict_keyword_trains_as_the_reference_and_as_the_positional_tables(cls):
    by_keyword, by_position = make_table(), make_table()
    hyper = dict(lr=0.05, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1)
    train(by_keyword, cls(param_dict={"emb": by_keyword}, **hyper))
    train(by_position, cls({"emb": by_position}, **hyper))
    assert torch.equal(by_keyword.weight, by_position.weight)
    for slot in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(by_keyword.slot(slot), by_position.slot(slot))
    expected = reference_rows(RULE[cls], **hyper)
    torch.testing.assert_close(by_keyword.lookup(IDS).double(), torch.from_numpy(expected), **TOL)


@pytest.mark.parametrize(
    "first",
    [
        lambda t: ((t,), {}),
        lambda t: (([t],), {}),
        lambda t: (({"a.b": t},), {}),
        lambda t: ((iter([t]),), {}),
        lambda t: (([{"params": [t], "lr": 0.5}],), {}),
        lambda t: ((), {"params": [t]}),
        lambda t: ((), {"param_dict": {"a.b": t}}),
        lambda t: ((), {"param_dict": [t]}),
    ],
    ids=["table", "list", "dict", "iterator", "groups", "params=", "param_dict=dict", "param_dict=list"],
)
@pytest.mark.parametrize("cls", SPARSE, ids=lambda cls: cls.__name__)
def test_every_form_of_the_first_argument_still_works(cls, first):
    table = make_table()
    args, kwargs = first(table)
    optimizer = cls(*args, **kwargs)
    assert [group["params"] for group in optimizer.param_groups] == [[table]]


@pytest.mark.parametrize("cls", SPARSE, ids=lambda cls: cls.__name__)
def test_tables_given_twice_or_not_at_all_raise_and_change_nothing(cls):
    table = make_table()
    with pytest.raises(TypeError, match=r"give the tables once: as the first argument or as param_dict="):
        cls([table], param_dict={"emb": table})
    with pytest.raises(TypeError, match=r"needs its tables: pass them first or as param_dict="):
        cls(lr=0.1)
    assert table.slot_names() == []


# ---------------------------------------------------------------------------- RecIS's positions and flags


@pytest.mark.parametrize("cls", SPARSE, ids=lambda cls: cls.__name__)
def test_positional_arguments_follow_recis_order(cls):
    table = make_table()
    optimizer = cls({"emb": table}, 0.1, 0.8, 0.99, 1e-6, 0.05, False)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (0.1, (0.8, 0.99), 1e-6, 0.05)


@pytest.mark.parametrize("cls", SPARSE, ids=lambda cls: cls.__name__)
def test_signature_has_recis_names_positions_and_defaults(cls):
    parameters = list(inspect.signature(cls).parameters.values())
    positional = [(p.name, p.default) for p in parameters if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    # RecIS's SparseAdam says weight_decay=1e-2 in its signature and "no weight decay by default"
    # in its docstring; recis keeps 0, torch.optim.SparseAdam's rule (documented on the class).
    weight_decay = 0.0 if cls is SparseAdam else 1e-2
    assert positional == [
        ("params", None),
        ("lr", 1e-3),
        ("beta1", 0.9),
        ("beta2", 0.999),
        ("eps", 1e-8),
        ("weight_decay", weight_decay),
        (FLAG[cls], False),
    ]


@pytest.mark.parametrize("cls", SPARSE, ids=lambda cls: cls.__name__)
def test_flag_false_trains_as_without_it(cls):
    with_flag, without = make_table(), make_table()
    train(with_flag, cls(param_dict={"emb": with_flag}, lr=0.05, **{FLAG[cls]: False}))
    train(without, cls({"emb": without}, lr=0.05))
    assert torch.equal(with_flag.weight, without.weight)


@pytest.mark.parametrize("cls", SPARSE, ids=lambda cls: cls.__name__)
def test_flag_true_raises_value_error_naming_it_and_changes_nothing(cls):
    table = make_table()
    before = table.weight.clone()
    with pytest.raises(ValueError, match=rf"{FLAG[cls]}=True is not supported: .*not implemented"):
        cls(param_dict={"emb": table}, lr=0.05, **{FLAG[cls]: True})
    with pytest.raises(ValueError, match=rf"{FLAG[cls]}=True"):
        cls({"emb": table}, 1e-3, 0.9, 0.999, 1e-8, 1e-2, True)  # RecIS's 7th positional argument
    assert table.slot_names() == [] and torch.equal(table.weight, before)


@pytest.mark.parametrize("value", ["yes", 1, None, torch.tensor(False)], ids=["str", "int", "None", "tensor"])
@pytest.mark.parametrize("cls", SPARSE, ids=lambda cls: cls.__name__)
def test_flag_that_is_not_a_bool_raises_type_error_naming_it(cls, value):
    with pytest.raises(TypeError, match=rf"{FLAG[cls]} must be a bool, got {re.escape(repr(value))}"):
        cls(param_dict={"emb": make_table()}, **{FLAG[cls]: value})


@pytest.mark.parametrize("cls, other", [(SparseAdamWTF, "amsgrad"), (SparseAdamW, "use_nesterov")])
def test_each_class_takes_only_its_own_recis_flag(cls, other):
    with pytest.raises(TypeError, match=other):
        cls(param_dict={"emb": make_table()}, **{other: False})


# ---------------------------------------------------------------------------- AdamWTF: use_nesterov, fuse


HYPER = dict(lr=0.05, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1, maximize=False)


def dense_params() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return [torch.randn(shape, generator=gen).requires_grad_() for shape in ((3, 4), (5,))]


def dense_steps(params, optimizer, steps: int, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        optimizer.step()


def dense_reference(steps: int, seed: int = 3) -> list[np.ndarray]:
    params = [p.detach().double().numpy() for p in dense_params()]
    moments = [(np.zeros_like(p), np.zeros_like(p)) for p in params]
    gen = torch.Generator().manual_seed(seed)
    for t in range(1, steps + 1):
        for i, p in enumerate(params):
            g = torch.randn(p.shape, generator=gen).double().numpy()
            params[i], *moment = adamw_tf_step(p, g, *moments[i], t, **HYPER)
            moments[i] = tuple(moment)
    return params


def recis_adamw_tf(params, *args, **kwargs) -> AdamWTF:
    betas = (HYPER["beta1"], HYPER["beta2"])
    return AdamWTF(params, HYPER["lr"], betas, HYPER["eps"], HYPER["weight_decay"], *args, **kwargs)


def test_adamw_tf_signature_has_recis_names_and_positions():
    parameters = inspect.signature(AdamWTF).parameters
    positional = [name for name, p in parameters.items() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert positional == ["params", "lr", "betas", "eps", "weight_decay", "use_nesterov"]
    assert parameters["use_nesterov"].default is False
    assert {"maximize", "fuse"} <= {name for name, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


@pytest.mark.parametrize(
    "kwargs, foreach",
    [({}, None), ({"fuse": True}, True), ({"fuse": False}, False), ({"fuse": False, "foreach": False}, False)],
    ids=["default", "fuse", "no_fuse", "both_agree"],
)
def test_adamw_tf_use_nesterov_false_and_fuse_train_as_the_tf_reference(kwargs, foreach):
    params = dense_params()
    optimizer = recis_adamw_tf(params, False, **kwargs)  # use_nesterov=False in RecIS's sixth position
    assert optimizer.param_groups[0]["foreach"] is foreach and "fuse" not in optimizer.param_groups[0]
    dense_steps(params, optimizer, steps=8)
    for p, expected in zip(params, dense_reference(steps=8)):
        torch.testing.assert_close(p.detach().double(), torch.from_numpy(expected), **TOL)


def test_adamw_tf_fuse_picks_the_same_path_as_foreach():
    runs = []
    for kwargs in ({"fuse": True}, {"foreach": True}, {"fuse": False}, {"foreach": False}):
        params = dense_params()
        dense_steps(params, recis_adamw_tf(params, **kwargs), steps=5)
        runs.append(params)
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    for a, b in zip(runs[2], runs[3]):
        assert torch.equal(a, b)


def test_adamw_tf_use_nesterov_true_raises_at_construction_naming_it():
    with pytest.raises(ValueError, match=r"use_nesterov=True is not supported"):
        recis_adamw_tf(dense_params(), True)
    with pytest.raises(TypeError, match=r"use_nesterov must be a bool, got 'no'"):
        recis_adamw_tf(dense_params(), "no")


def test_adamw_tf_param_group_with_use_nesterov_or_fuse_is_checked_before_it_is_added():
    params = dense_params()
    optimizer = recis_adamw_tf(params[:1])
    with pytest.raises(ValueError, match=r"use_nesterov=True"):
        optimizer.add_param_group({"params": params[1:], "use_nesterov": True})
    with pytest.raises(ValueError, match=r"foreach=True and fuse=False"):
        optimizer.add_param_group({"params": params[1:], "fuse": False, "foreach": True})
    assert len(optimizer.param_groups) == 1
    optimizer.add_param_group({"params": params[1:], "fuse": False})
    assert optimizer.param_groups[1]["foreach"] is False and "fuse" not in optimizer.param_groups[1]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"fuse": False, "foreach": True}, ValueError, r"foreach=True and fuse=False ask for different update paths"),
        ({"fuse": "yes"}, TypeError, r"fuse must be a bool or None, got 'yes'"),
        ({"foreach": 1}, TypeError, r"foreach must be a bool or None, got 1"),
    ],
)
def test_adamw_tf_bad_fuse_raises_naming_the_value(kwargs, error, message):
    with pytest.raises(error, match=message):
        recis_adamw_tf(dense_params(), **kwargs)


def recis_layout(state_dict: dict, fuse: bool, use_nesterov: bool = False) -> dict:
    """``state_dict`` as RecIS's AdamWTF writes it: groups hold use_nesterov, fuse and differentiable, no foreach."""
    groups = []
    for group in state_dict["param_groups"]:
        group = {key: value for key, value in group.items() if key != "foreach"}
        groups.append({**group, "use_nesterov": use_nesterov, "fuse": fuse, "differentiable": False})
    return {"state": state_dict["state"], "param_groups": groups}


@pytest.mark.parametrize("fuse", [True, False])
def test_adamw_tf_loads_a_recis_state_dict_and_continues_as_if_never_saved(fuse):
    params = dense_params()
    optimizer = recis_adamw_tf(params)
    dense_steps(params, optimizer, steps=4)
    saved = recis_layout(copy.deepcopy(optimizer.state_dict()), fuse)  # as torch.save would keep it
    resumed = [p.detach().clone().requires_grad_() for p in params]
    loaded = recis_adamw_tf(resumed)
    loaded.load_state_dict(saved)
    assert loaded.param_groups[0]["foreach"] is fuse and "fuse" not in loaded.param_groups[0]
    dense_steps(params, optimizer, steps=3, seed=9)
    dense_steps(resumed, loaded, steps=3, seed=9)
    for p, q in zip(params, resumed):
        torch.testing.assert_close(q, p, rtol=0, atol=0)


def test_adamw_tf_state_dict_with_use_nesterov_true_is_refused_at_load_and_changes_nothing():
    params = dense_params()
    optimizer = recis_adamw_tf(params)
    dense_steps(params, optimizer, steps=1)
    saved = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(ValueError, match=r"param group 0: use_nesterov=True is not supported"):
        optimizer.load_state_dict(recis_layout(copy.deepcopy(saved), fuse=True, use_nesterov=True))
    assert optimizer.param_groups[0]["foreach"] is None and "use_nesterov" not in optimizer.param_groups[0]
    for i, p in enumerate(params):
        for key, value in saved["state"][i].items():
            assert torch.equal(optimizer.state[p][key], value)
    before = [p.detach().clone() for p in params]
    dense_steps(params, optimizer, steps=1)  # still steps with its own, valid group
    assert not all(torch.equal(p.detach(), b) for p, b in zip(params, before))


def test_lr_as_a_one_element_tensor_trains_as_the_float_it_holds():
    # RecIS's AdamWTF declares lr: Union[float, Tensor]; the sparse optimizers accept it too.
    lr = torch.tensor(0.05)  # float32: 0.0500000007...
    params, reference = dense_params(), dense_params()
    dense_steps(params, AdamWTF(params, lr, weight_decay=0.1), steps=3)
    dense_steps(reference, AdamWTF(reference, lr.item(), weight_decay=0.1), steps=3)
    for p, q in zip(params, reference):
        assert torch.equal(p, q)
    by_tensor, by_float = make_table(), make_table()
    train(by_tensor, SparseAdamW(param_dict={"emb": by_tensor}, lr=lr))
    train(by_float, SparseAdamW(param_dict={"emb": by_float}, lr=lr.item()))
    assert torch.equal(by_tensor.weight, by_float.weight)
