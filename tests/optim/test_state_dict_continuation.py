"""Checkpoint and resume: model.state_dict() + optimizer.state_dict() (+ scheduler) through torch.save.

Contract: training k steps, saving, loading into a FRESH model and a FRESH optimizer and training m
more steps gives bitwise the same rows, slots, per-table step counts, learning rates and
accumulation phase as a run that never stopped, whichever order the model state is loaded and the
optimizer created in. Bad states raise before anything changes.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from recis.nn.modules.hashtable import HashTable, filter_out_sparse_param
from recis.optim import SparseAdam, SparseAdamW, SparseAdamWTF

OPTIMIZERS = [SparseAdam, SparseAdamW, SparseAdamWTF]
ACCUM = 2
TOTAL_MICRO_STEPS = 11
LOAD_ORDERS = ["model_then_create_optimizer", "create_optimizer_then_model", "optimizer_state_before_model_state"]


# ---------------------------------------------------------------------------- helpers
class _Model(nn.Module):
    """Two tables (the second used only in some batches) and a frozen dense head."""

    def __init__(self, dense_seed: int) -> None:
        super().__init__()
        self.user = HashTable(4, name="user", seed=1)
        self.item = HashTable([2, 3], name="item", seed=2)
        self.head = nn.Linear(4 + 6, 1)
        generator = torch.Generator().manual_seed(dense_seed)
        with torch.no_grad():
            for param in self.head.parameters():
                param.copy_(torch.randn(param.shape, generator=generator))
        self.head.requires_grad_(False)

    def forward(self, user_ids: torch.Tensor, item_ids: torch.Tensor | None) -> torch.Tensor:
        user = self.user(user_ids)
        item = self.item(item_ids).reshape(-1, 6) if item_ids is not None else torch.zeros(len(user_ids), 6)
        return self.head(torch.cat([user, item], dim=1)).squeeze(-1)


def _batches() -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
    """Micro-batches; later ones bring new ids (rows created after a resume).

    Both micro-batches of updates 1 and 4 lack items, so the item table falls behind in step count.
    """
    generator = torch.Generator().manual_seed(99)
    batches = []
    for i in range(TOTAL_MICRO_STEPS):
        users = torch.randint(0, 6 + 2 * i, (5,), generator=generator)
        items = None if (i // ACCUM) % 3 == 1 else torch.randint(100, 104 + i, (5,), generator=generator)
        batches.append((users, items, torch.randn(5, generator=generator)))
    return batches


def _make_optimizer(optimizer_cls, model: _Model, bias_correction: str):
    return optimizer_cls(
        [{"params": [model.user]}, {"params": [model.item], "lr": 0.03, "weight_decay": 0.001}],
        lr=0.05,
        bias_correction=bias_correction,
    )


def _make_scheduler(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)


def _train(model, optimizer, scheduler, batches, start: int) -> None:
    for i, (users, items, target) in enumerate(batches, start=start):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(users, items), target).backward()
        optimizer.step()
        if (i + 1) % ACCUM == 0:  # one scheduler step per update
            scheduler.step()


def _start(optimizer_cls, bias_correction):
    model = _Model(dense_seed=0)
    optimizer = _make_optimizer(optimizer_cls, model, bias_correction)
    optimizer.set_grad_accum_steps(ACCUM)
    return model, optimizer, _make_scheduler(optimizer)


def _checkpoint(model, optimizer, scheduler) -> dict:
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
        buffer,
    )
    buffer.seek(0)
    return torch.load(buffer)


def _resume(optimizer_cls, bias_correction, checkpoint, order: str):
    model = _Model(dense_seed=123)  # different head: only the checkpoint can make it equal
    if order == "model_then_create_optimizer":
        model.load_state_dict(checkpoint["model"])
        optimizer = _make_optimizer(optimizer_cls, model, bias_correction)
        scheduler = _make_scheduler(optimizer)
        optimizer.load_state_dict(checkpoint["optimizer"])
    elif order == "create_optimizer_then_model":
        optimizer = _make_optimizer(optimizer_cls, model, bias_correction)
        scheduler = _make_scheduler(optimizer)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    else:
        optimizer = _make_optimizer(optimizer_cls, model, bias_correction)
        scheduler = _make_scheduler(optimizer)
        optimizer.load_state_dict(checkpoint["optimizer"])
        model.load_state_dict(checkpoint["model"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    return model, optimizer, scheduler


def _assert_same_training_state(model, optimizer, scheduler, expected_model, expected_optimizer, expected_scheduler):
    for name in ("user", "item"):
        table, expected = getattr(model, name), getattr(expected_model, name)
        assert torch.equal(table.ids(), expected.ids()), name
        assert table.weight.dtype == expected.weight.dtype
        assert torch.equal(table.weight, expected.weight), name
        assert table.slot_names() == expected.slot_names(), name
        for slot in expected.slot_names():
            assert table.slot(slot).dtype == expected.slot(slot).dtype, (name, slot)
            assert torch.equal(table.slot(slot), expected.slot(slot)), (name, slot)
        assert optimizer.state[table]["step"] == expected_optimizer.state[expected]["step"], name
    for param, expected in zip(model.head.parameters(), expected_model.head.parameters()):
        assert torch.equal(param, expected)
    assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in expected_optimizer.param_groups]
    assert [g["initial_lr"] for g in optimizer.param_groups] == [
        g["initial_lr"] for g in expected_optimizer.param_groups
    ]
    assert optimizer.grad_accum_steps == expected_optimizer.grad_accum_steps == ACCUM
    assert optimizer.state_dict()["accum_phase"] == expected_optimizer.state_dict()["accum_phase"]
    assert scheduler.last_epoch == expected_scheduler.last_epoch
    assert scheduler.get_last_lr() == expected_scheduler.get_last_lr()


def _two_table_optimizer(optimizer_cls, names=("a", "b")):
    first, second = HashTable(3, name=names[0], seed=5), HashTable(3, name=names[1], seed=6)
    optimizer = optimizer_cls([first, second], lr=0.1)
    return first, second, optimizer


def _touch(tables, optimizer, steps: int, ids=(1, 2, 3)) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        sum(table(torch.tensor(ids)).square().sum() for table in tables).backward()
        optimizer.step()


def _table_snapshot(table: HashTable) -> dict[str, torch.Tensor]:
    snapshot = {"ids": table.ids().clone(), "weight": table.weight.clone()}
    for name in table.slot_names():
        snapshot["slots." + name] = table.slot(name).clone()
    return snapshot


def _assert_snapshot_equal(table: HashTable, snapshot: dict[str, torch.Tensor]) -> None:
    now = _table_snapshot(table)
    assert now.keys() == snapshot.keys()
    for key, value in snapshot.items():
        assert now[key].dtype == value.dtype and torch.equal(now[key], value), key


# ---------------------------------------------------------------------------- resume == never stopped
@pytest.mark.parametrize("bias_correction", ["table", "row"])
@pytest.mark.parametrize("order", LOAD_ORDERS)
@pytest.mark.parametrize(
    "saved_after", [6, 5], ids=["saved_after_an_update", "saved_mid_accumulation"]
)  # ACCUM = 2: 6 micro-steps end an accumulation, 5 leave one micro-batch pending
@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_resumed_training_is_bitwise_identical_to_uninterrupted_training(
    optimizer_cls, saved_after, order, bias_correction
):
    batches = _batches()
    straight = _start(optimizer_cls, bias_correction)
    _train(*straight, batches, start=0)

    first = _start(optimizer_cls, bias_correction)
    _train(*first, batches[:saved_after], start=0)
    checkpoint = _checkpoint(*first)
    assert checkpoint["optimizer"]["accum_phase"] == saved_after % ACCUM
    resumed = _resume(optimizer_cls, bias_correction, checkpoint, order)
    _assert_same_training_state(*resumed, *first)  # the resumed state is the saved one
    _train(*resumed, batches[saved_after:], start=saved_after)

    _assert_same_training_state(*resumed, *straight)
    model, optimizer, _ = resumed
    # The scenario exercised what it claims: two tables with different step counts, a decayed lr.
    assert optimizer.state[model.user]["step"] == TOTAL_MICRO_STEPS // ACCUM
    assert 0 < optimizer.state[model.item]["step"] < optimizer.state[model.user]["step"]
    assert optimizer.param_groups[0]["lr"] < 0.05


def test_row_bias_correction_step_slot_round_trips_as_int64_per_row_counts():
    batches = _batches()
    model, optimizer, scheduler = _start(SparseAdamW, "row")
    _train(model, optimizer, scheduler, batches[:6], start=0)
    checkpoint = _checkpoint(model, optimizer, scheduler)
    saved_steps = checkpoint["model"]["user.slots.step"]
    assert saved_steps.dtype == torch.int64
    assert saved_steps.shape == (len(model.user), 1)
    assert torch.equal(saved_steps, model.user.slot("step"))
    assert int(saved_steps.max()) == optimizer.state[model.user]["step"] == 3
    assert int(saved_steps.min()) >= 1

    fresh = _Model(dense_seed=5)
    fresh.load_state_dict(checkpoint["model"])
    assert fresh.user.slot("step").dtype == torch.int64
    assert torch.equal(fresh.user.slot("step"), saved_steps)
    assert torch.equal(fresh.item.slot("step"), model.item.slot("step"))


# ---------------------------------------------------------------------------- per-table state
@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_each_table_has_its_own_state_entry_named_after_it(optimizer_cls):
    first, second, optimizer = _two_table_optimizer(optimizer_cls)
    _touch([first, second], optimizer, 2)
    _touch([first], optimizer, 3)  # only the first table gets gradients now
    assert optimizer.state[first] is not optimizer.state[second]
    assert optimizer.state[first]["step"] == 5 and optimizer.state[second]["step"] == 2

    saved = optimizer.state_dict()
    assert sorted(saved["state"]) == [0, 1]
    assert saved["state"][0]["table"] == "a" and saved["state"][1]["table"] == "b"
    assert saved["state"][0]["step"] == 5 and saved["state"][1]["step"] == 2
    _touch([first], optimizer, 1)
    assert saved["state"][0]["step"] == 5, "state_dict() must be a snapshot, not a view of the live state"

    fresh_first, fresh_second, fresh = _two_table_optimizer(optimizer_cls)
    fresh.load_state_dict(saved)
    assert fresh.state[fresh_first]["step"] == 5 and fresh.state[fresh_second]["step"] == 2
    assert fresh.state[fresh_first] is not fresh.state[fresh_second]
    assert "table" not in fresh.state[fresh_first]
    _touch([fresh_first], fresh, 1)
    assert fresh.state[fresh_first]["step"] == 6 and fresh.state[fresh_second]["step"] == 2
    assert saved["state"][0]["step"] == 5, "loading must not alias the given state dict"


@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_loading_state_saved_for_other_table_names_raises_and_changes_nothing(optimizer_cls):
    first, second, optimizer = _two_table_optimizer(optimizer_cls)
    _touch([first, second], optimizer, 1)
    _touch([first], optimizer, 2)
    saved = optimizer.state_dict()

    other_first, other_second, swapped = _two_table_optimizer(optimizer_cls, names=("b", "a"))
    _touch([other_first], swapped, 1)
    before = swapped.state_dict()
    with pytest.raises(ValueError):
        swapped.load_state_dict(saved)
    assert swapped.state_dict() == before
    assert swapped.state[other_first]["step"] == 1 and not swapped.state[other_second]


@pytest.mark.parametrize(
    "target_groups",
    [
        pytest.param(lambda a, b, c: [{"params": [a, b, c]}], id="fewer_groups"),
        pytest.param(lambda a, b, c: [{"params": [a]}, {"params": [b]}, {"params": [c]}], id="more_groups"),
        pytest.param(lambda a, b, c: [{"params": [a]}, {"params": [b, c]}], id="tables_moved_between_groups"),
        pytest.param(lambda a, b, c: [{"params": [a, b]}, {"params": [c]}], id="same_layout_but_fewer_tables"),
    ],
)
@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_loading_state_with_wrong_number_of_groups_or_tables_raises_and_changes_nothing(optimizer_cls, target_groups):
    saved_tables = [HashTable(2, name=f"t{i}", seed=i) for i in range(4)]
    source = optimizer_cls([{"params": saved_tables[:3], "lr": 0.2}, {"params": saved_tables[3:]}], lr=0.1)
    _touch(saved_tables, source, 2)
    saved = source.state_dict()

    targets = [HashTable(2, name=f"t{i}", seed=i) for i in range(3)]
    target = optimizer_cls(target_groups(*targets), lr=0.01)
    target.set_grad_accum_steps(3)
    _touch(targets, target, 3)  # one full accumulation: one update
    snapshots = [_table_snapshot(table) for table in targets]
    before = target.state_dict()
    groups_before = [list(group["params"]) for group in target.param_groups]

    with pytest.raises(ValueError):
        target.load_state_dict(saved)

    assert target.state_dict() == before
    assert [list(group["params"]) for group in target.param_groups] == groups_before
    assert target.grad_accum_steps == 3
    for table, snapshot in zip(targets, snapshots):
        _assert_snapshot_equal(table, snapshot)


def test_optimizer_state_with_invalid_accumulation_phase_raises_and_changes_nothing():
    first, second, optimizer = _two_table_optimizer(SparseAdamW)
    _touch([first, second], optimizer, 1)
    saved = optimizer.state_dict()
    saved["grad_accum_steps"], saved["accum_phase"] = 2, 2  # phase must be < steps
    saved["param_groups"][0]["lr"] = 0.5
    before = optimizer.state_dict()
    with pytest.raises(ValueError):
        optimizer.load_state_dict(saved)
    assert optimizer.state_dict() == before
    assert optimizer.param_groups[0]["lr"] == 0.1


# ---------------------------------------------------------------------------- table state with a wrong shape
def _trained_table_model(embedding_dim: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Module()
    model.emb = HashTable(embedding_dim, name="emb", seed=3)
    optimizer = SparseAdam(filter_out_sparse_param(model), lr=0.1)
    _touch([model.emb], optimizer, 2, ids=(4, 5, 6))
    return model, optimizer


@pytest.mark.parametrize("strict", [True, False])
def test_table_state_with_wrong_embedding_dim_raises_and_leaves_the_table_unchanged(strict):
    model, _ = _trained_table_model(4)
    other, _ = _trained_table_model(3)
    snapshot = _table_snapshot(model.emb)
    wrong = other.state_dict()
    assert wrong["emb.weight"].shape == (3, 3)
    with pytest.raises(RuntimeError, match="emb"):
        model.load_state_dict(wrong, strict=strict)
    _assert_snapshot_equal(model.emb, snapshot)
    with pytest.raises(RuntimeError):
        model.emb.load_state_dict(other.emb.state_dict())
    _assert_snapshot_equal(model.emb, snapshot)


def test_table_state_whose_optimizer_slot_has_the_wrong_width_raises_and_leaves_the_table_unchanged():
    # The weight has the right dim, but exp_avg was written for a 3-wide table: loading it would leave the
    # table with a slot the optimizer cannot use (its next step() fails), so the load itself must refuse.
    model, optimizer = _trained_table_model(4)
    other, _ = _trained_table_model(3)
    snapshot = _table_snapshot(model.emb)
    wrong = model.state_dict()
    wrong["emb.slots.exp_avg"] = other.state_dict()["emb.slots.exp_avg"]
    assert wrong["emb.slots.exp_avg"].shape == (3, 3)
    with pytest.raises(RuntimeError, match="exp_avg"):
        model.load_state_dict(wrong)
    _assert_snapshot_equal(model.emb, snapshot)
    _touch([model.emb], optimizer, 1, ids=(4,))  # the table is still usable


@pytest.mark.parametrize("order", LOAD_ORDERS)
def test_checkpoint_saved_mid_accumulation_restores_the_pending_gradient(order):
    # The micro-batches already taken are part of the state: without them the next update would use
    # only the gradients that arrive after the resume (still divided by the full accumulation count).
    batches = _batches()
    first = _start(SparseAdamW, "table")
    _train(*first, batches[:5], start=0)
    checkpoint = _checkpoint(*first)
    assert checkpoint["optimizer"]["accum_phase"] == 1
    model, optimizer, _ = _resume(SparseAdamW, "table", checkpoint, order)
    for name in ("user", "item"):
        expected = getattr(first[0], name).pending_grad()
        assert expected is not None
        restored = getattr(model, name).pending_grad()
        assert restored is not None, f"{name}: pending gradient lost by the checkpoint"
        # pending rows are distinct but in no set order: compare them sorted by row
        expected_order, restored_order = expected[0].argsort(), restored[0].argsort()
        assert torch.equal(restored[0][restored_order], expected[0][expected_order]), name
        assert torch.equal(restored[1][restored_order], expected[1][expected_order]), name
