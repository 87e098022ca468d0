"""Non-finite gradients: propagated like torch by default, skipped per row with skip_nonfinite=True."""

from __future__ import annotations

import pytest
import torch

from recis.nn.modules.hashtable import HashTable
from recis.optim import SparseAdam, SparseAdamW, SparseAdamWTF

OPTIMIZERS = [SparseAdam, SparseAdamW, SparseAdamWTF]
FP32 = dict(rtol=1e-6, atol=1e-7)
NAN, INF = float("nan"), float("inf")
ROW_IDS = [10, 20, 30, 40, 50, 60]  # rows 0..5 in this order
DIM = 3


def _ids(values) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.int64)


def _table(seed: int = 0) -> HashTable:
    table = HashTable(DIM, seed=seed, name="emb")
    generator = torch.Generator().manual_seed(seed)
    for value in ROW_IDS:  # one at a time: rows follow ROW_IDS
        table.assign(_ids([value]), torch.randn(1, DIM, generator=generator))
    assert table.ids().tolist() == ROW_IDS
    return table


def _grads(step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randn(len(ROW_IDS), DIM, generator=generator)


def _slots(table: HashTable) -> dict[str, torch.Tensor]:
    return {name: table.slot(name).clone() for name in table.slot_names()}


def _row(value: int) -> int:
    return ROW_IDS.index(value)


# --------------------------------------------------------------------------- default: like torch


@pytest.mark.parametrize("bad_value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_default_nonfinite_gradient_propagates_to_its_row_like_torch_sparse_adam(bad_value):
    table = _table()
    finite_rows = [i for i in range(len(ROW_IDS)) if i != _row(20)]
    reference = torch.nn.Parameter(table.weight.clone())
    optimizer = SparseAdam(table, lr=0.1)
    torch_optimizer = torch.optim.SparseAdam([reference], lr=0.1)
    assert optimizer.param_groups[0]["skip_nonfinite"] is False
    for step in range(3):
        grad = _grads(step)
        if step == 1:
            grad[_row(20), 1] = bad_value
        used = [0, 1, 2, 4] if step != 2 else list(range(6))
        ids = _ids([ROW_IDS[i] for i in used])
        table.accept_grad(ids, grad[used])
        reference.grad = torch.sparse_coo_tensor(
            torch.tensor([used]), grad[used], reference.shape, check_invariants=True
        )
        optimizer.step()
        torch_optimizer.step()
        optimizer.zero_grad()
        torch_optimizer.zero_grad()
        torch.testing.assert_close(table.weight, reference.detach(), equal_nan=True, **FP32)
        torch_state = torch_optimizer.state[reference]
        for name in ("exp_avg", "exp_avg_sq"):
            ours, theirs = table.slot(name), torch_state[name]
            if bad_value != bad_value:  # NaN: identical to torch, NaN for NaN
                torch.testing.assert_close(ours, theirs, equal_nan=True, **FP32)
            else:
                # With an Inf gradient torch's incremental form v += (1-b2)*(g^2 - v) later gives
                # inf - inf = NaN where v = b2*v + (1-b2)*g^2 keeps Inf; both are non-finite at the
                # same places, and the rows themselves agree (NaN) below.
                torch.testing.assert_close(ours[finite_rows], theirs[finite_rows], **FP32)
                assert torch.equal(ours.isfinite(), theirs.isfinite())
    # The non-finite value really reached the row, and only that row.
    assert not table.weight[_row(20)].isfinite().all()
    assert table.weight[finite_rows].isfinite().all()
    assert optimizer.state[table]["step"] == 3


@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS)
def test_default_nan_gradient_makes_the_row_nan_for_every_optimizer(optimizer_cls):
    table = _table()
    optimizer = optimizer_cls(table, lr=0.1)
    grad = _grads(0)
    grad[_row(30)] = NAN
    table.accept_grad(_ids(ROW_IDS), grad)
    optimizer.step()
    assert table.weight[_row(30)].isnan().all()
    assert table.slot("exp_avg")[_row(30)].isnan().all()
    assert table.weight[[0, 1, 3, 4, 5]].isfinite().all()


# --------------------------------------------------------------------------- skip_nonfinite=True


def _good_and_bad_step(
    optimizer_cls, *, bias_correction: str = "table", weight_decay: float = 0.05
) -> tuple[HashTable, HashTable, object, object, dict, dict]:
    """Two equal tables; A gets good and bad rows, B only the good rows. Returns both after the bad step."""
    kwargs = dict(lr=0.1, weight_decay=weight_decay, bias_correction=bias_correction, skip_nonfinite=True)
    a, b = _table(), _table()
    opt_a, opt_b = optimizer_cls(a, **kwargs), optimizer_cls(b, **kwargs)
    # Step 1: everything finite, every row touched, so the slots are nonzero.
    for table, opt in ((a, opt_a), (b, opt_b)):
        table.accept_grad(_ids(ROW_IDS), _grads(0))
        opt.step()
        opt.zero_grad()
    weight_before, slots_before = a.weight.clone(), _slots(a)
    # Step 2: rows of 20 (one NaN element), 40 (+Inf) and 60 (-Inf) are bad in A.
    grad = _grads(1)
    grad[_row(20), 2] = NAN
    grad[_row(40)] = INF
    grad[_row(60), 0] = -INF
    a.accept_grad(_ids(ROW_IDS), grad)
    good = [_row(10), _row(30), _row(50)]
    b.accept_grad(_ids([ROW_IDS[i] for i in good]), grad[good])
    opt_a.step()
    opt_b.step()
    return a, b, opt_a, opt_b, {"weight": weight_before, **slots_before}, {"good": good, "bad": [1, 3, 5]}


@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS)
def test_skip_nonfinite_leaves_bad_rows_and_their_slots_untouched(optimizer_cls):
    a, _, _, _, before, rows = _good_and_bad_step(optimizer_cls)
    bad = rows["bad"]
    assert torch.equal(a.weight[bad], before["weight"][bad])  # no decay, no Adam update
    for name in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(a.slot(name)[bad], before[name][bad])
    assert a.weight.isfinite().all()
    for name in a.slot_names():
        assert a.slot(name).isfinite().all()


@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS)
def test_skip_nonfinite_updates_other_rows_as_if_bad_rows_were_absent(optimizer_cls):
    a, b, _, _, before, rows = _good_and_bad_step(optimizer_cls)
    good = rows["good"]
    assert not torch.equal(a.weight[good], before["weight"][good])  # the good rows really moved
    torch.testing.assert_close(a.weight, b.weight, **FP32)  # bad rows of B were untouched too
    for name in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(a.slot(name), b.slot(name), **FP32)


@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS)
def test_skip_nonfinite_counts_bad_rows_and_still_increments_the_step(optimizer_cls):
    a, b, opt_a, opt_b, _, _ = _good_and_bad_step(optimizer_cls)
    assert int(opt_a.state[a]["nonfinite_rows"]) == 3
    assert int(opt_b.state[b]["nonfinite_rows"]) == 0
    assert opt_a.state[a]["step"] == 2
    assert opt_b.state[b]["step"] == 2
    # The count accumulates over steps.
    opt_a.zero_grad()
    grad = _grads(2)
    grad[_row(50), 1] = NAN
    a.accept_grad(_ids([50, 10]), grad[[_row(50), _row(10)]])
    opt_a.step()
    assert int(opt_a.state[a]["nonfinite_rows"]) == 4
    assert opt_a.state[a]["step"] == 3


def test_skip_nonfinite_with_row_bias_correction_does_not_advance_row_steps_of_bad_rows():
    a, b, _, _, _, rows = _good_and_bad_step(SparseAdamW, bias_correction="row")
    steps = a.slot("step").reshape(-1)
    assert steps[rows["good"]].tolist() == [2, 2, 2]
    assert steps[rows["bad"]].tolist() == [1, 1, 1]
    assert torch.equal(a.slot("step"), b.slot("step"))
    torch.testing.assert_close(a.weight, b.weight, **FP32)


@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS)
def test_skip_nonfinite_step_with_only_bad_rows_counts_like_an_empty_step(optimizer_cls):
    kwargs = dict(lr=0.1, weight_decay=0.05, skip_nonfinite=True)
    a, c = _table(), _table()
    opt_a, opt_c = optimizer_cls(a, **kwargs), optimizer_cls(c, **kwargs)
    before = a.weight.clone()
    # Step 1: A gets only NaN rows, C an empty gradient (a batch that touched no rows).
    a.accept_grad(_ids([20, 30]), torch.full((2, DIM), NAN))
    c.accept_grad(_ids([]), torch.zeros(0, DIM))
    opt_a.step()
    opt_c.step()
    assert torch.equal(a.weight, before)
    for name in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(a.slot(name), torch.zeros(len(ROW_IDS), DIM))
    assert opt_a.state[a]["step"] == opt_c.state[c]["step"] == 1
    assert int(opt_a.state[a]["nonfinite_rows"]) == 2
    # Step 2: both get the same finite gradient; t = 2 in both.
    for table, opt in ((a, opt_a), (c, opt_c)):
        opt.zero_grad()
        table.accept_grad(_ids([20, 40]), _grads(3)[:2])
        opt.step()
    assert opt_a.state[a]["step"] == 2
    torch.testing.assert_close(a.weight, c.weight, **FP32)
    torch.testing.assert_close(a.slot("exp_avg_sq"), c.slot("exp_avg_sq"), **FP32)


def test_skip_nonfinite_judges_the_summed_gradient_of_duplicated_ids():
    a, b = _table(), _table()
    opt_a = SparseAdam(a, lr=0.1, skip_nonfinite=True)
    opt_b = SparseAdam(b, lr=0.1, skip_nonfinite=True)
    big = torch.finfo(torch.float32).max
    # id 10: finite + NaN; id 20: +Inf + (-Inf); id 30: two finite halves that overflow fp32 when summed;
    # id 40: finite duplicates (kept).
    ids = _ids([10, 10, 20, 20, 30, 30, 40, 40])
    grad = torch.tensor(
        [[1.0, 1, 1], [NAN, 0, 0], [INF, 0, 0], [-INF, 0, 0], [big, 0, 0], [big, 0, 0], [0.5, 1, 2], [0.25, 1, 2]]
    )
    a.accept_grad(ids, grad)
    b.accept_grad(_ids([40]), torch.tensor([[0.75, 2, 4]]))
    opt_a.step()
    opt_b.step()
    assert int(opt_a.state[a]["nonfinite_rows"]) == 3
    torch.testing.assert_close(a.weight, b.weight, **FP32)
    torch.testing.assert_close(a.slot("exp_avg"), b.slot("exp_avg"), **FP32)


def test_skip_nonfinite_through_backward_of_a_nan_loss_term():
    table = _table()
    optimizer = SparseAdam(table, lr=0.1, skip_nonfinite=True)
    before = table.weight.clone()
    out = table(_ids([10, 20, 30]))
    scale = torch.tensor([[1.0], [NAN], [2.0]])
    (out * scale).sum().backward()
    optimizer.step()
    assert torch.equal(table.weight[_row(20)], before[_row(20)])
    assert not torch.equal(table.weight[_row(10)], before[_row(10)])
    assert not torch.equal(table.weight[_row(30)], before[_row(30)])
    assert torch.equal(table.weight[[3, 4, 5]], before[[3, 4, 5]])  # untouched rows stay
    assert int(optimizer.state[table]["nonfinite_rows"]) == 1
    assert optimizer.state[table]["step"] == 1
