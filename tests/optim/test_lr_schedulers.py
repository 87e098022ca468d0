"""torch.optim.lr_scheduler drives the sparse optimizers.

Contract: the sparse optimizers are torch.optim.Optimizers whose hyperparameters live in
``param_groups`` (``lr``, ``betas``), read afresh at every step. So any torch scheduler changes
them exactly as it does for a dense torch optimizer, and the update uses the values it set.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, OneCycleLR, StepLR

from recis.nn.modules.hashtable import HashTable
from recis.optim import AdamWTF, SparseAdam, SparseAdamW, SparseAdamWTF

STEPS = 8
ROWS, DIM = 5, 3
LR = 0.1

# (sparse optimizer, dense reference on an nn.Embedding whose every row gets a gradient every step)
PAIRS = [
    pytest.param(
        SparseAdam, lambda params, **kw: torch.optim.SparseAdam(params, **kw), True, id="SparseAdam-vs-torch.SparseAdam"
    ),
    pytest.param(
        SparseAdamW,
        lambda params, **kw: torch.optim.AdamW(params, weight_decay=0.01, **kw),
        False,
        id="SparseAdamW-vs-torch.AdamW",
    ),
    pytest.param(
        SparseAdamWTF,
        lambda params, **kw: AdamWTF(params, weight_decay=0.01, **kw),
        False,
        id="SparseAdamWTF-vs-AdamWTF",
    ),
]
SPARSE = [SparseAdam, SparseAdamW, SparseAdamWTF]

SCHEDULERS = {
    "StepLR": lambda opt: StepLR(opt, step_size=2, gamma=0.5),
    "LambdaLR": lambda opt: LambdaLR(opt, lambda epoch: 1.0 / (1.0 + epoch)),
    "OneCycleLR": lambda opt: OneCycleLR(
        opt, max_lr=0.2, total_steps=STEPS, cycle_momentum=True, base_momentum=0.8, max_momentum=0.95
    ),
    "CosineAnnealingLR": lambda opt: CosineAnnealingLR(opt, T_max=STEPS, eta_min=0.001),
}


# ---------------------------------------------------------------------------- helpers
def _grads() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(17)
    return [torch.randn(ROWS + 2, DIM, generator=generator) for _ in range(STEPS)]


# Every row every step; rows 1 and 3 twice (duplicates are summed, in both the sparse and the dense run).
IDS = torch.tensor([0, 1, 2, 3, 4, 1, 3])


def _table() -> HashTable:
    table = HashTable(DIM, name="t", seed=4)
    table(torch.arange(ROWS))  # rows 0..ROWS-1 hold ids 0..ROWS-1
    assert torch.equal(table.ids(), torch.arange(ROWS))
    return table


def _sparse_step(table: HashTable, optimizer, grad: torch.Tensor) -> None:
    optimizer.zero_grad()
    (table(IDS) * grad).sum().backward()
    optimizer.step()


def _hyper(optimizer) -> tuple[float, tuple[float, float]]:
    group = optimizer.param_groups[0]
    return group["lr"], tuple(group["betas"])


def _scheduled_run(optimizer_cls, scheduler_name: str):
    table = _table()
    optimizer = optimizer_cls([table], lr=LR)
    scheduler = SCHEDULERS[scheduler_name](optimizer)
    used = []
    for grad in _grads():
        used.append(_hyper(optimizer))
        _sparse_step(table, optimizer, grad)
        scheduler.step()
    return table, optimizer, used


def _assert_tables_equal(table: HashTable, expected: HashTable) -> None:
    assert torch.equal(table.ids(), expected.ids())
    assert torch.equal(table.weight, expected.weight)
    for name in expected.slot_names():
        assert torch.equal(table.slot(name), expected.slot(name)), name


# ---------------------------------------------------------------------------- the schedule reaches param_groups
@pytest.mark.parametrize("scheduler_name", list(SCHEDULERS))
@pytest.mark.parametrize("optimizer_cls", SPARSE, ids=lambda cls: cls.__name__)
def test_scheduler_sets_the_same_lr_and_betas_as_on_a_dense_torch_optimizer(optimizer_cls, scheduler_name):
    _, _, used = _scheduled_run(optimizer_cls, scheduler_name)

    dense_param = nn.Parameter(torch.zeros(2))
    dense = torch.optim.Adam([dense_param], lr=LR)
    dense_scheduler = SCHEDULERS[scheduler_name](dense)
    expected = []
    for _ in range(STEPS):
        expected.append(_hyper(dense))
        dense_param.grad = torch.ones(2)
        dense.step()
        dense_scheduler.step()

    assert used == expected
    assert len({lr for lr, _ in used}) > 2, "the schedule must actually change the lr"
    if scheduler_name == "OneCycleLR":
        assert len({betas[0] for _, betas in used}) > 2, "cycle_momentum must change beta1"
        assert {betas[1] for _, betas in used} == {0.999}


def test_step_lr_and_lambda_lr_values_in_param_groups():
    _, _, step_used = _scheduled_run(SparseAdamW, "StepLR")
    assert [lr for lr, _ in step_used] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025, 0.0125, 0.0125])
    _, _, lambda_used = _scheduled_run(SparseAdam, "LambdaLR")
    assert [lr for lr, _ in lambda_used] == pytest.approx([LR / (1 + epoch) for epoch in range(STEPS)])


# ---------------------------------------------------------------------------- the update uses the scheduled values
@pytest.mark.parametrize("scheduler_name", list(SCHEDULERS))
@pytest.mark.parametrize("optimizer_cls", SPARSE, ids=lambda cls: cls.__name__)
def test_scheduled_run_equals_run_with_lr_and_betas_set_by_hand(optimizer_cls, scheduler_name):
    scheduled, _, used = _scheduled_run(optimizer_cls, scheduler_name)

    by_hand = _table()
    optimizer = optimizer_cls([by_hand], lr=LR)
    for (lr, betas), grad in zip(used, _grads()):
        optimizer.param_groups[0]["lr"] = lr
        optimizer.param_groups[0]["betas"] = betas
        _sparse_step(by_hand, optimizer, grad)
    _assert_tables_equal(scheduled, by_hand)

    constant = _table()
    constant_optimizer = optimizer_cls([constant], lr=LR)
    for grad in _grads():
        _sparse_step(constant, constant_optimizer, grad)
    assert (constant.weight - scheduled.weight).abs().max() > 1e-3, "the scheduled lr must change the update"


@pytest.mark.parametrize("scheduler_name", list(SCHEDULERS))
@pytest.mark.parametrize("optimizer_cls, dense_cls, sparse_grad", PAIRS)
def test_scheduled_sparse_optimizer_matches_its_dense_reference_under_the_same_schedule(
    optimizer_cls, dense_cls, sparse_grad, scheduler_name
):
    table, _, _ = _scheduled_run(optimizer_cls, scheduler_name)

    embedding = nn.Embedding(ROWS, DIM, sparse=sparse_grad)
    with torch.no_grad():
        embedding.weight.copy_(_table().weight)
    dense = dense_cls(embedding.parameters(), lr=LR)
    scheduler = SCHEDULERS[scheduler_name](dense)
    for grad in _grads():
        dense.zero_grad()
        (embedding(IDS) * grad).sum().backward()
        dense.step()
        scheduler.step()

    # Same formulas, different operation order in places (sparse vs dense kernels): fp32 rounding over 8 steps.
    torch.testing.assert_close(table.weight, embedding.weight.detach(), rtol=1e-6, atol=2e-7)
    state = dense.state[embedding.weight]
    torch.testing.assert_close(table.slot("exp_avg"), state["exp_avg"].to_dense(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(table.slot("exp_avg_sq"), state["exp_avg_sq"].to_dense(), rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------- scheduler state
@pytest.mark.parametrize("scheduler_name", list(SCHEDULERS))
@pytest.mark.parametrize("optimizer_cls", SPARSE, ids=lambda cls: cls.__name__)
def test_scheduler_state_dict_round_trip_continues_the_schedule_and_the_training(optimizer_cls, scheduler_name):
    straight, _, straight_used = _scheduled_run(optimizer_cls, scheduler_name)

    grads, k = _grads(), 3
    table = _table()
    optimizer = optimizer_cls([table], lr=LR)
    scheduler = SCHEDULERS[scheduler_name](optimizer)
    for grad in grads[:k]:
        _sparse_step(table, optimizer, grad)
        scheduler.step()
    buffer = io.BytesIO()
    torch.save(
        {"table": table.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
        buffer,
    )
    buffer.seek(0)
    checkpoint = torch.load(buffer)

    resumed = HashTable(DIM, name="t", seed=4)
    resumed.load_state_dict(checkpoint["table"])
    resumed_optimizer = optimizer_cls([resumed], lr=0.5)  # a different lr: the checkpoint must win
    resumed_scheduler = SCHEDULERS[scheduler_name](resumed_optimizer)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    resumed_scheduler.load_state_dict(checkpoint["scheduler"])
    assert resumed_scheduler.last_epoch == k
    used = []
    for grad in grads[k:]:
        used.append(_hyper(resumed_optimizer))
        _sparse_step(resumed, resumed_optimizer, grad)
        resumed_scheduler.step()

    assert used == straight_used[k:]
    _assert_tables_equal(resumed, straight)
