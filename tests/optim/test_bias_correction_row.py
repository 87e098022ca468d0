"""bias_correction="row": t counts the updates of each row, kept in the int64 ``step`` slot.

Contract: with the default "table" rule, t is the table's step count, so a row first touched late
gets bias corrections for a large t although its moments hold one gradient. With "row", t is the
row's own update count: a row's first update moves it by about lr whenever it comes, and when every
row is touched every step the two rules coincide. Reference values: /work/shared/REFERENCE_VALUES.md
("first touch at table step t").
"""

from __future__ import annotations

import pytest
import torch

from recis.nn.initializers import ConstantInitializer
from recis.nn.modules.hashtable import HashTable
from recis.optim import SparseAdam, SparseAdamW, SparseAdamWTF

OPTIMIZERS = [SparseAdam, SparseAdamW, SparseAdamWTF]
TORCH_FORM = {SparseAdam: False, SparseAdamW: True, SparseAdamWTF: False}  # eps after the sqrt(bc2) correction

# REFERENCE_VALUES "first touch at table step t": p0 = 1, g = 0.5, lr = 0.1, lazy rows, per-table t.
FIRST_TOUCH_MOVE = {  # t: (torch form, TF form)
    1: (0.0999999980, 0.0999999368),
    5: (0.0545489226, 0.0545488905),
    100: (0.0975770842, 0.0975770415),
}


def _scalar_table() -> HashTable:
    return HashTable(1, initializer=ConstantInitializer(1.0), name="scalar")


def _feed(table: HashTable, ids: list[int], grads: list[float]) -> None:
    (table(torch.tensor(ids)).squeeze(-1) * torch.tensor(grads)).sum().backward()


def _first_touch_move(optimizer_cls, bias_correction: str, t: int) -> tuple[float, HashTable, object]:
    """Id 0 is touched at steps 1..t, id 1 (a new row) first at step t; returns id 1's move."""
    table = _scalar_table()
    optimizer = optimizer_cls([table], lr=0.1, weight_decay=0.0, bias_correction=bias_correction)
    for step in range(1, t + 1):
        optimizer.zero_grad()
        _feed(table, [0, 1] if step == t else [0], [0.5, 0.5] if step == t else [0.5])
        optimizer.step()
    return 1.0 - table.lookup(torch.tensor([1])).item(), table, optimizer


# ---------------------------------------------------------------------------- first touch
@pytest.mark.parametrize("t", [1, 5, 100])
@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_table_rule_first_touch_at_table_step_t_matches_reference_values(optimizer_cls, t):
    move, table, optimizer = _first_touch_move(optimizer_cls, "table", t)
    expected = FIRST_TOUCH_MOVE[t][0 if TORCH_FORM[optimizer_cls] else 1]
    # 1 - p with p near 0.9 in fp32: the move carries the rounding of p (6e-8 absolute).
    torch.testing.assert_close(move, expected, rtol=0, atol=1e-7)
    assert optimizer.state[table]["step"] == t


@pytest.mark.parametrize("t", [1, 5, 100])
@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_row_rule_first_update_moves_a_late_row_by_about_lr(optimizer_cls, t):
    move, table, optimizer = _first_touch_move(optimizer_cls, "row", t)
    expected = FIRST_TOUCH_MOVE[1][0 if TORCH_FORM[optimizer_cls] else 1]  # the row's own t is 1
    torch.testing.assert_close(move, expected, rtol=0, atol=1e-7)
    assert optimizer.state[table]["step"] == t, "the table's step count still counts every step"
    steps = table.slot("step")
    assert steps.dtype == torch.int64 and steps.shape == (2, 1)
    rows = {int(i): r for r, i in enumerate(table.ids())}
    assert steps[rows[0], 0].item() == t and steps[rows[1], 0].item() == 1
    # The row that was touched every step has t = table step: same move as under the table rule.
    moved_every_step = 1.0 - table.lookup(torch.tensor([0])).item()
    table_rule_table = _first_touch_move(optimizer_cls, "table", t)[1]
    torch.testing.assert_close(
        moved_every_step, 1.0 - table_rule_table.lookup(torch.tensor([0])).item(), rtol=1e-6, atol=1e-7
    )


def test_row_rule_at_step_100_differs_from_table_rule_by_the_reference_gap():
    row_move = _first_touch_move(SparseAdamW, "row", 100)[0]
    table_move = _first_touch_move(SparseAdamW, "table", 100)[0]
    torch.testing.assert_close(row_move - table_move, 0.0999999980 - 0.0975770842, rtol=0, atol=2e-7)


# ---------------------------------------------------------------------------- the step slot
@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_row_step_slot_counts_the_updates_of_each_row(optimizer_cls):
    table = HashTable(2, name="counts", seed=9)
    optimizer = optimizer_cls([table], lr=0.01, bias_correction="row")
    generator = torch.Generator().manual_seed(3)
    expected: dict[int, int] = {}
    for step in range(12):
        # Ids drawn from a range that widens (rows created throughout, storage grows past its first
        # capacity), with repeats inside a batch (one update each).
        ids = torch.randint(0, 10 + 4 * step, (8,), generator=generator)
        optimizer.zero_grad()
        table(ids).sum().backward()
        optimizer.step()
        for i in set(ids.tolist()):
            expected[i] = expected.get(i, 0) + 1
    table(torch.tensor([1000]))  # present but never updated
    expected[1000] = 0

    assert len(table) > 16
    counts = {int(i): int(c) for i, c in zip(table.ids(), table.slot("step")[:, 0])}
    assert counts == expected
    assert optimizer.state[table]["step"] == 12


@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_row_step_slot_counts_one_per_accumulated_update(optimizer_cls):
    table = _scalar_table()
    optimizer = optimizer_cls([table], lr=0.1, bias_correction="row")
    optimizer.set_grad_accum_steps(3)
    for micro_ids in ([5], [5, 6], [5], [6], [7], [6]):
        optimizer.zero_grad()
        _feed(table, micro_ids, [0.5] * len(micro_ids))
        optimizer.step()
    counts = {int(i): int(c) for i, c in zip(table.ids(), table.slot("step")[:, 0])}
    assert counts == {5: 1, 6: 2, 7: 1}
    assert optimizer.state[table]["step"] == 2


@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_row_step_slot_does_not_count_a_skipped_nonfinite_row(optimizer_cls):
    table = _scalar_table()
    optimizer = optimizer_cls([table], lr=0.1, bias_correction="row", skip_nonfinite=True)
    _feed(table, [1, 2], [0.5, 0.5])
    optimizer.step()
    optimizer.zero_grad()
    _feed(table, [1, 2], [float("nan"), 0.5])
    optimizer.step()
    counts = {int(i): int(c) for i, c in zip(table.ids(), table.slot("step")[:, 0])}
    assert counts == {1: 1, 2: 2}
    assert int(optimizer.state[table]["nonfinite_rows"]) == 1


def test_table_rule_registers_no_step_slot():
    table = _scalar_table()
    optimizer = SparseAdamW([table], lr=0.1)
    _feed(table, [1], [0.5])
    optimizer.step()
    assert table.slot_names() == ["exp_avg", "exp_avg_sq"]


# ---------------------------------------------------------------------------- equivalences
@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_row_rule_equals_table_rule_when_every_row_is_touched_every_step(optimizer_cls):
    generator = torch.Generator().manual_seed(8)
    grads = [torch.randn(6, 3, generator=generator) for _ in range(7)]
    ids = torch.tensor([0, 1, 2, 3, 1, 2])  # every row, some twice
    tables = {}
    for rule in ("table", "row"):
        table = HashTable(3, name="all", seed=2)
        optimizer = optimizer_cls([table], lr=0.05, weight_decay=0.02, bias_correction=rule)
        for grad in grads:
            optimizer.zero_grad()
            (table(ids) * grad).sum().backward()
            optimizer.step()
        tables[rule] = table
    row, reference = tables["row"], tables["table"]
    assert torch.equal(row.ids(), reference.ids())
    # Per-row t goes through a float64 tensor path, the table t through Python scalars: fp32 rounding.
    torch.testing.assert_close(row.weight, reference.weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(row.slot("exp_avg"), reference.slot("exp_avg"), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(row.slot("exp_avg_sq"), reference.slot("exp_avg_sq"), rtol=1e-6, atol=1e-9)
    assert torch.equal(row.slot("step"), torch.full((4, 1), 7, dtype=torch.int64))


@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_row_rule_trains_a_sometimes_touched_row_like_a_table_that_only_holds_that_row(optimizer_cls):
    # Under the row rule a row's trajectory depends only on its own gradients: id 7, touched at
    # table steps 3, 4 and 8, equals id 7 in a table-rule table that sees only those three steps.
    generator = torch.Generator().manual_seed(21)
    mixed = HashTable(2, name="mixed", seed=1)
    mixed_optimizer = optimizer_cls([mixed], lr=0.05, weight_decay=0.01, bias_correction="row")
    alone = HashTable(2, name="alone", seed=1)
    alone_optimizer = optimizer_cls([alone], lr=0.05, weight_decay=0.01, bias_correction="table")
    for step in range(1, 9):
        grad = torch.randn(1, 2, generator=generator)
        other_grad = torch.randn(1, 2, generator=generator)
        mixed_optimizer.zero_grad()
        loss = (mixed(torch.tensor([3])) * other_grad).sum()
        if step in (3, 4, 8):
            loss = loss + (mixed(torch.tensor([7])) * grad).sum()
            alone_optimizer.zero_grad()
            (alone(torch.tensor([7])) * grad).sum().backward()
            alone_optimizer.step()
        loss.backward()
        mixed_optimizer.step()
    assert mixed_optimizer.state[mixed]["step"] == 8 and alone_optimizer.state[alone]["step"] == 3
    torch.testing.assert_close(mixed.lookup(torch.tensor([7])), alone.lookup(torch.tensor([7])), rtol=1e-6, atol=1e-7)
    row_of_7 = int((mixed.ids() == 7).nonzero())
    for name in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(mixed.slot(name)[row_of_7], alone.slot(name)[0], rtol=1e-6, atol=1e-9)
