"""Gradient accumulation of the sparse optimizers (``set_grad_accum_steps``).

Contract: after ``set_grad_accum_steps(n)`` only every n-th ``step()`` updates, with the MEAN
of the gradients received since the last update; ``zero_grad()`` in between keeps them. So n
micro-batches of b examples with mean losses train exactly like one batch of n*b examples
with a mean loss.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from recis.nn.initializers import ConstantInitializer
from recis.nn.modules.hashtable import HashTable
from recis.optim import SparseAdam, SparseAdamW, SparseAdamWTF

OPTIMIZERS = [SparseAdam, SparseAdamW, SparseAdamWTF]
DIM = 4
VOCAB = 10
IDS_PER_EXAMPLE = 2


# ---------------------------------------------------------------------------- helpers
class _Model(nn.Module):
    """A table whose pooled rows feed a dense Linear; the dense init is fixed by ``dense_seed``."""

    def __init__(self, dense_seed: int = 0) -> None:
        super().__init__()
        self.table = HashTable(DIM, name="emb", seed=7)
        self.dense = nn.Linear(DIM, 1)
        generator = torch.Generator().manual_seed(dense_seed)
        with torch.no_grad():
            self.dense.weight.copy_(torch.randn(self.dense.weight.shape, generator=generator))
            self.dense.bias.copy_(torch.randn(self.dense.bias.shape, generator=generator))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.dense(self.table(ids).sum(dim=1)).squeeze(-1)


class _DenseEveryNth:
    """A torch optimizer that, like the sparse one, updates only on every n-th ``step()``.

    The dense ``.grad`` sums the micro-batch gradients, so the update divides it by n (the mean).
    ``zero_grad`` only clears at the start of an accumulation.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, n: int) -> None:
        self.optimizer, self.n, self.calls = optimizer, n, 0

    def zero_grad(self) -> None:
        if self.calls % self.n == 0:
            self.optimizer.zero_grad()

    def step(self) -> None:
        self.calls += 1
        if self.calls % self.n:
            return
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.grad.div_(self.n)
        self.optimizer.step()


def _batches(updates: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1234)
    return [
        (
            torch.randint(0, VOCAB, (batch, IDS_PER_EXAMPLE), generator=generator),
            torch.randn(batch, generator=generator),
        )
        for _ in range(updates)
    ]


def _by_id(table: HashTable) -> dict[str, torch.Tensor]:
    """Rows and slots of the table ordered by id (row order depends on insertion order)."""
    order = torch.argsort(table.ids())
    snapshot = {"ids": table.ids()[order], "weight": table.weight[order].clone()}
    for name in table.slot_names():
        snapshot[name] = table.slot(name)[order].clone()
    return snapshot


def _one_big_batch_run(optimizer_cls, batches):
    model = _Model()
    sparse = optimizer_cls([model.table], lr=0.05)
    dense = torch.optim.AdamW(model.dense.parameters(), lr=0.01)
    for ids, target in batches:
        sparse.zero_grad()
        dense.zero_grad()
        loss = torch.nn.functional.mse_loss(model(ids), target)
        loss.backward()
        sparse.step()
        dense.step()
    return model, sparse


def _micro_batch_run(optimizer_cls, batches, n: int, order: str):
    model = _Model()
    sparse = optimizer_cls([model.table], lr=0.05)
    sparse.set_grad_accum_steps(n)
    dense = _DenseEveryNth(torch.optim.AdamW(model.dense.parameters(), lr=0.01), n)
    for ids, target in batches:
        for micro_ids, micro_target in zip(ids.chunk(n), target.chunk(n)):
            if order == "zero_backward_step":
                sparse.zero_grad()
                dense.zero_grad()
            loss = torch.nn.functional.mse_loss(model(micro_ids), micro_target)
            loss.backward()
            sparse.step()
            dense.step()
            if order == "backward_step_zero":
                sparse.zero_grad()
                dense.zero_grad()
    return model, sparse


def _scalar_table() -> HashTable:
    return HashTable(1, initializer=ConstantInitializer(1.0), name="scalar")


def _feed(table: HashTable, ids: list[int], grads: list[float]) -> None:
    """Forward ``ids`` and backward a loss whose gradient w.r.t. each looked-up value is ``grads``."""
    out = table(torch.tensor(ids))
    (out.squeeze(-1) * torch.tensor(grads)).sum().backward()


# ---------------------------------------------------------------------------- equivalence to one big batch
@pytest.mark.parametrize("order", ["zero_backward_step", "backward_step_zero"])
@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_micro_batches_with_mean_losses_train_like_one_big_batch(optimizer_cls, order):
    n, b, updates = 3, 4, 3
    batches = _batches(updates, n * b)
    big_model, big_opt = _one_big_batch_run(optimizer_cls, batches)
    micro_model, micro_opt = _micro_batch_run(optimizer_cls, batches, n, order)

    big, micro = _by_id(big_model.table), _by_id(micro_model.table)
    assert torch.equal(big["ids"], micro["ids"])
    assert big.keys() == micro.keys() == {"ids", "weight", "exp_avg", "exp_avg_sq"}
    # The two runs sum the same per-example gradients in a different order: fp32 rounding only.
    for key in ("weight", "exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(micro[key], big[key], rtol=1e-5, atol=1e-7, msg=key)
    assert micro_opt.state[micro_model.table]["step"] == big_opt.state[big_model.table]["step"] == updates
    for name, param in big_model.dense.named_parameters():
        torch.testing.assert_close(dict(micro_model.dense.named_parameters())[name], param, rtol=1e-5, atol=1e-7)
    # The runs really trained: the rows moved away from their initial values.
    initial = big_model.table.initial_values(big["ids"])
    assert (big["weight"] - initial).abs().min() > 1e-3


@pytest.mark.parametrize("order", ["zero_backward_step", "backward_step_zero"])
@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_loop_orders_give_bitwise_identical_training(optimizer_cls, order):
    n, b = 2, 3
    batches = _batches(3, n * b)
    reference_model, reference_opt = _micro_batch_run(optimizer_cls, batches, n, "zero_backward_step")
    model, opt = _micro_batch_run(optimizer_cls, batches, n, order)
    expected, actual = _by_id(reference_model.table), _by_id(model.table)
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key
    assert opt.state[model.table]["step"] == reference_opt.state[reference_model.table]["step"] == 3


# ---------------------------------------------------------------------------- which steps update
@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_only_every_nth_step_changes_rows_slots_and_step_count(optimizer_cls):
    n = 3
    model = _Model()
    opt = optimizer_cls([model.table], lr=0.05)
    opt.set_grad_accum_steps(n)
    assert opt.grad_accum_steps == n
    generator = torch.Generator().manual_seed(5)
    for micro_step in range(1, 2 * n + 1):
        ids = torch.randint(0, VOCAB, (4, IDS_PER_EXAMPLE), generator=generator)
        opt.zero_grad()
        model(ids).square().mean().backward()
        before = _by_id(model.table)
        step_before = opt.state[model.table].get("step", 0)
        opt.step()
        after = _by_id(model.table)
        if micro_step % n:
            for key in before:
                assert torch.equal(after[key], before[key]), (micro_step, key)
            assert opt.state[model.table].get("step", 0) == step_before
            assert model.table.has_grad, "the pending gradient must survive a non-updating step"
        else:
            assert not torch.equal(after["weight"], before["weight"]), micro_step
            assert not torch.equal(after["exp_avg"], before["exp_avg"]), micro_step
            assert opt.state[model.table]["step"] == micro_step // n


@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_zero_grad_keeps_pending_gradient_until_the_update_then_clears_it(optimizer_cls):
    table = _scalar_table()
    opt = optimizer_cls([table], lr=0.1)
    opt.set_grad_accum_steps(2)
    _feed(table, [3], [0.25])
    opt.step()
    opt.zero_grad()
    rows, grad = table.pending_grad()
    torch.testing.assert_close(grad, torch.tensor([[0.25]]), rtol=0, atol=0)
    _feed(table, [3], [0.5])
    opt.step()  # the update
    opt.zero_grad()
    assert not table.has_grad
    assert table.pending_grad() is None


# ---------------------------------------------------------------------------- mean of summed micro-batch gradients
def test_same_id_in_several_micro_batches_is_summed_then_averaged_reference_value():
    # REFERENCE_VALUES "accumulation mean vs sum": step 1 g = 1; step 2 micro-batch grads 0.2 and 0.6,
    # TF form (SparseAdam): mean (0.4) moves the row by 0.0898574941; the sum (0.8) would move it 0.0988125560.
    table = _scalar_table()
    opt = SparseAdam([table], lr=0.1)
    _feed(table, [42], [1.0])
    opt.step()
    opt.zero_grad()
    after_first = table.lookup(torch.tensor([42])).item()
    torch.testing.assert_close(after_first, 1 - 0.0999999368, rtol=1e-6, atol=0)

    opt.set_grad_accum_steps(2)
    _feed(table, [42], [0.2])
    opt.step()
    opt.zero_grad()
    _feed(table, [42], [0.6])
    rows, grad = table.pending_grad()
    torch.testing.assert_close(grad, torch.tensor([[0.8]]), rtol=1e-7, atol=0)  # summed across micro-batches
    opt.step()
    move = after_first - table.lookup(torch.tensor([42])).item()
    torch.testing.assert_close(move, 0.0898574941, rtol=2e-6, atol=0)  # a difference of two fp32 values near 0.9
    assert opt.state[table]["step"] == 2


@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_ids_in_some_micro_batches_get_their_sum_divided_by_the_accumulation_count(optimizer_cls):
    n = 3
    table = HashTable(2, name="acc", seed=11)
    opt = optimizer_cls([table], lr=0.1)
    opt.set_grad_accum_steps(n)
    # id 1 in micro-batches 1 and 3 (twice in 3), id 2 only in micro-batch 2, id 3 in all three.
    micro = [
        ([1, 3], [[0.5, -1.0], [0.25, 0.25]]),
        ([2, 3], [[-0.75, 2.0], [0.5, 0.5]]),
        ([1, 1, 3], [[1.5, 0.5], [0.25, -0.5], [1.0, 1.0]]),
    ]
    for ids, grads in micro:
        opt.zero_grad()
        (table(torch.tensor(ids)) * torch.tensor(grads)).sum().backward()
        opt.step()

    reference = HashTable(2, name="acc", seed=11)
    reference_opt = optimizer_cls([reference], lr=0.1)
    reference(torch.tensor([1, 2, 3]))  # same ids, same deterministic initial rows
    mean = {
        1: torch.tensor([0.5 + 1.5 + 0.25, -1.0 + 0.5 - 0.5]) / n,
        2: torch.tensor([-0.75, 2.0]) / n,
        3: torch.tensor([0.25 + 0.5 + 1.0, 0.25 + 0.5 + 1.0]) / n,
    }
    reference.accept_grad(torch.tensor([1, 2, 3]), torch.stack([mean[1], mean[2], mean[3]]))
    reference_opt.step()

    ids = torch.tensor([1, 2, 3])
    torch.testing.assert_close(table.lookup(ids), reference.lookup(ids), rtol=1e-6, atol=1e-7)
    got, want = _by_id(table), _by_id(reference)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-9, msg=key)
    assert opt.state[table]["step"] == reference_opt.state[reference]["step"] == 1


# ---------------------------------------------------------------------------- the setting itself
@pytest.mark.parametrize("bad", [0, -1, 1.5, True], ids=["zero", "negative", "float", "bool"])
@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_invalid_grad_accum_steps_raise_and_leave_the_setting_unchanged(optimizer_cls, bad):
    table = _scalar_table()
    opt = optimizer_cls([table], lr=0.1)
    opt.set_grad_accum_steps(2)
    with pytest.raises((ValueError, TypeError)):
        opt.set_grad_accum_steps(bad)
    assert opt.grad_accum_steps == 2
    assert opt.state_dict()["grad_accum_steps"] == 2
    # Still accumulating over 2 steps: the first step leaves the row alone, the second updates it.
    _feed(table, [0], [1.0])
    opt.step()
    assert table.lookup(torch.tensor([0])).item() == 1.0
    opt.zero_grad()
    _feed(table, [0], [1.0])
    opt.step()
    assert table.lookup(torch.tensor([0])).item() < 1.0


@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_changing_grad_accum_steps_mid_accumulation_raises_and_keeps_the_accumulation(optimizer_cls):
    table = _scalar_table()
    opt = optimizer_cls([table], lr=0.1, weight_decay=0.0)
    opt.set_grad_accum_steps(3)
    _feed(table, [0], [0.3])
    opt.step()
    opt.zero_grad()
    for new_value in (1, 2, 4):
        with pytest.raises(RuntimeError):
            opt.set_grad_accum_steps(new_value)
        assert opt.grad_accum_steps == 3
    assert opt.state_dict()["accum_phase"] == 1
    _feed(table, [0], [0.6])
    opt.step()
    opt.zero_grad()
    assert table.lookup(torch.tensor([0])).item() == 1.0, "the failed calls must not shorten the accumulation"
    _feed(table, [0], [0.9])
    opt.step()
    opt.zero_grad()

    reference = _scalar_table()
    reference_opt = optimizer_cls([reference], lr=0.1, weight_decay=0.0)
    _feed(reference, [0], [(0.3 + 0.6 + 0.9) / 3])
    reference_opt.step()
    torch.testing.assert_close(table.lookup(torch.tensor([0])), reference.lookup(torch.tensor([0])), rtol=1e-6, atol=0)

    opt.set_grad_accum_steps(1)  # allowed again right after an update
    assert opt.grad_accum_steps == 1
