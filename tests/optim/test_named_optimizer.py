"""wrapped_named_optimizer: state dicts keyed by parameter names, loaded by name.

The reference is the wrapped torch optimizer itself: a named optimizer trains exactly as
the plain one, and a state dict loaded by name continues training exactly as the
optimizer that saved it would have, whichever form (named, torch's index form with or
without ``param_names``) it was saved in.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from recis.optim import AdamWTF
from recis.optim.named_optimizer import NamedAdagrad, NamedAdamW, NamedAdamWTF, NamedSGD, wrapped_named_optimizer


def _model(extra: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(4, 3), nn.Linear(3, 1)]
    if extra:
        layers.append(nn.Linear(1, 1))
    return nn.Sequential(*layers)


def _train(model: nn.Module, optimizer, steps: range) -> None:
    for step in steps:
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


@pytest.mark.parametrize(
    "named_cls, plain_cls, hyper",
    [
        (NamedAdamW, torch.optim.AdamW, dict(lr=0.01)),
        (NamedAdagrad, torch.optim.Adagrad, dict(lr=0.1)),
        (NamedSGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
        (NamedAdamWTF, AdamWTF, dict(lr=0.01)),
    ],
    ids=["AdamW", "Adagrad", "SGD", "AdamWTF"],
)
def test_a_named_optimizer_trains_as_the_plain_one_and_keys_its_state_by_name(named_cls, plain_cls, hyper):
    named_model, plain_model = _model(), _model()
    named, plain = named_cls(named_model.named_parameters(), **hyper), plain_cls(plain_model.parameters(), **hyper)
    _train(named_model, named, range(3))
    _train(plain_model, plain, range(3))
    for a, b in zip(named_model.parameters(), plain_model.parameters()):
        assert torch.equal(a, b)
    state = named.state_dict()
    names = [name for name, _ in named_model.named_parameters()]
    assert list(state["state"]) == names
    assert state["param_groups"][0]["params"] == names == state["param_groups"][0]["param_names"]
    assert list(named.state_dict(origin=True)["state"]) == [0, 1, 2, 3]
    assert type(named).__name__ == f"Named{plain_cls.__name__}" and named.named_optimizer


def _resumed_equals_uninterrupted(saved: dict, **load_kwargs) -> None:
    model = _model()
    optimizer = NamedAdamW(model.named_parameters(), lr=0.01)
    _train(model, optimizer, range(3))
    model_state = copy.deepcopy(model.state_dict())
    _train(model, optimizer, range(3, 6))

    resumed_model = _model()
    resumed_model.load_state_dict(model_state)
    resumed = NamedAdamW(resumed_model.named_parameters(), lr=0.5)
    before = copy.deepcopy(saved)
    resumed.load_state_dict(saved, **load_kwargs)
    _assert_same(saved, before)  # the given state dict is left as it was
    assert resumed.param_groups[0]["lr"] == 0.01
    _train(resumed_model, resumed, range(3, 6))
    for a, b in zip(resumed_model.parameters(), model.parameters()):
        assert torch.equal(a, b)


def _saved_by(make_optimizer) -> dict:
    model = _model()
    optimizer = make_optimizer(model)
    _train(model, optimizer, range(3))
    return copy.deepcopy(optimizer.state_dict())


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda m: NamedAdamW(m.named_parameters(), lr=0.01),
        lambda m: torch.optim.AdamW(m.named_parameters(), lr=0.01),  # torch's form with param_names
        lambda m: torch.optim.AdamW(m.parameters(), lr=0.01),  # torch's form without: by position
    ],
    ids=["named", "torch_with_param_names", "torch_by_position"],
)
def test_a_state_dict_of_either_form_resumes_training_exactly(make_optimizer):
    _resumed_equals_uninterrupted(_saved_by(make_optimizer))


def test_a_model_with_more_or_fewer_parameters_loads_the_state_of_those_it_shares():
    saved = _saved_by(lambda m: NamedAdamW(m.named_parameters(), lr=0.01))
    larger = _model(extra=True)
    optimizer = NamedAdamW(larger.named_parameters(), lr=0.5)
    optimizer.load_state_dict(saved)
    state = optimizer.state_dict()["state"]
    assert set(state) == set(saved["state"])  # the new layer has no state yet
    for name, entry in saved["state"].items():
        assert torch.equal(state[name]["exp_avg"], entry["exp_avg"])
    assert optimizer.param_groups[0]["lr"] == 0.01

    smaller = nn.Sequential(nn.Linear(4, 3))
    optimizer = NamedAdamW(smaller.named_parameters(), lr=0.5)
    optimizer.load_state_dict(saved)  # entries of 1.weight and 1.bias are skipped
    assert set(optimizer.state_dict()["state"]) == {"0.weight", "0.bias"}


def test_valid_names_limits_which_states_are_loaded():
    saved = _saved_by(lambda m: NamedAdamW(m.named_parameters(), lr=0.01))
    model = _model()
    optimizer = NamedAdamW(model.named_parameters(), lr=0.01)
    optimizer.load_state_dict(saved, valid_names={"0.weight"})
    assert set(optimizer.state_dict()["state"]) == {"0.weight"}


def test_load_map_renames_saved_entries():
    saved = _saved_by(lambda m: NamedAdamW(m.named_parameters(), lr=0.01))
    renamed = nn.Sequential()
    renamed.add_module("first", nn.Linear(4, 3))
    optimizer = NamedAdamW(renamed.named_parameters(), lr=0.5)
    optimizer.load_state_dict(saved, load_map={"first.weight": "0.weight", "first.bias": "0.bias"})
    state = optimizer.state_dict()["state"]
    assert torch.equal(state["first.weight"]["exp_avg"], saved["state"]["0.weight"]["exp_avg"])
    assert torch.equal(state["first.bias"]["exp_avg_sq"], saved["state"]["0.bias"]["exp_avg_sq"])


def _assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize(
    "load_map, pattern",
    [({"nope.weight": "0.weight"}, "nope.weight"), ({"0.weight": "missing.weight"}, "missing.weight")],
    ids=["unknown_here", "unknown_in_state_dict"],
)
def test_a_strict_load_map_naming_an_unknown_parameter_raises_and_changes_nothing(load_map, pattern):
    saved = _saved_by(lambda m: NamedAdamW(m.named_parameters(), lr=0.01))
    model = _model()
    optimizer = NamedAdamW(model.named_parameters(), lr=0.5)
    _train(model, optimizer, range(1))
    before = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(RuntimeError, match=pattern):
        optimizer.load_state_dict(saved, load_map=load_map)
    _assert_same(optimizer.state_dict(), before)
    optimizer.load_state_dict(saved, load_map=load_map, strict=False)  # skipped, the rest loads
    assert optimizer.param_groups[0]["lr"] == 0.01


def test_a_state_of_another_shape_raises_size_mismatch_and_changes_nothing():
    saved = _saved_by(lambda m: NamedAdamW(m.named_parameters(), lr=0.01))
    wider = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 1))
    optimizer = NamedAdamW(wider.named_parameters(), lr=0.5)
    before = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(ValueError, match="size mismatch for 0.weight"):
        optimizer.load_state_dict(saved)
    _assert_same(optimizer.state_dict(), before)


def test_repeated_names_are_refused():
    layer = nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="weight"):
        NamedAdamW([("weight", layer.weight), ("weight", layer.bias)])
    optimizer = NamedAdamW([("weight", layer.weight)])
    with pytest.raises(RuntimeError, match="weight"):
        optimizer.add_param_group({"params": [("weight", layer.bias)]})
    with pytest.raises(TypeError, match="named_parameters"):
        NamedAdamW(layer.parameters())


def test_param_groups_keep_their_own_hyperparameters_by_name():
    model = _model()
    groups = [
        {"params": list(model[0].named_parameters(prefix="0")), "lr": 0.1},
        {"params": list(model[1].named_parameters(prefix="1")), "lr": 0.2},
    ]
    optimizer = wrapped_named_optimizer(torch.optim.SGD)(groups, lr=1.0)
    _train(model, optimizer, range(1))
    saved = copy.deepcopy(optimizer.state_dict())
    saved["param_groups"].reverse()  # the order of the saved groups does not matter: names do
    fresh = _model()
    loaded = NamedSGD(
        [
            {"params": list(fresh[0].named_parameters(prefix="0"))},
            {"params": list(fresh[1].named_parameters(prefix="1"))},
        ],
        lr=1.0,
    )
    loaded.load_state_dict(saved)
    assert [group["lr"] for group in loaded.param_groups] == [0.1, 0.2]


def test_param_names_in_a_torch_state_dict_name_its_indices_whatever_their_order():
    model = _model()
    plain = torch.optim.AdamW(list(reversed(list(model.named_parameters()))), lr=0.01)
    _train(model, plain, range(2))
    saved = plain.state_dict()
    optimizer = NamedAdamW(model.named_parameters(), lr=0.01)
    optimizer.load_state_dict(saved)
    state = optimizer.state_dict()["state"]
    for index, name in enumerate(saved["param_groups"][0]["param_names"]):
        assert torch.equal(state[name]["exp_avg"], saved["state"][index]["exp_avg"])
