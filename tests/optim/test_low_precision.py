"""bf16 / fp16 tables: rows in the low dtype, optimizer slots and all update math in float32.

Contract (DESIGN.md: "All math in fp32 (or wider) even for bf16/fp16 rows"): a step on a bf16 row
reads the row into fp32, does the whole update with fp32 slots (``state_dtype`` default) and an
fp32 gradient, and rounds only the result. So it equals the same step on an fp32 table holding the
same values, rounded to bf16. ``state_dtype=torch.float64`` gives float64 slots and float64 math.
"""

from __future__ import annotations

import math

import pytest
import torch

from recis.nn.modules.hashtable import HashTable
from recis.optim import SparseAdam, SparseAdamW, SparseAdamWTF

OPTIMIZERS = [SparseAdam, SparseAdamW, SparseAdamWTF]
LOW = [torch.bfloat16, torch.float16]
DIM = 4
IDS = torch.tensor([3, 7, 11, 7, 20])  # id 7 twice: its two gradients are summed in fp32


def _grads(steps: int) -> list[torch.Tensor]:
    """Gradients that bf16/fp16 cannot hold exactly: rounding them would show."""
    generator = torch.Generator().manual_seed(31)
    return [torch.randn(len(IDS), DIM, generator=generator) * (1 + 1e-3 * step) for step in range(steps)]


def _optimizer(optimizer_cls, table, **kwargs):
    return optimizer_cls([table], lr=0.01, weight_decay=0.05, **kwargs)


def _step_with_accept_grad(table: HashTable, optimizer, grad: torch.Tensor) -> None:
    optimizer.zero_grad()
    table(IDS)  # inserts the ids (training mode)
    table.accept_grad(IDS, grad)
    optimizer.step()


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_slots_of_a_low_precision_table_are_float32_by_default(optimizer_cls, dtype):
    table = HashTable(DIM, dtype=dtype, name="low")
    optimizer = _optimizer(optimizer_cls, table)
    _step_with_accept_grad(table, optimizer, _grads(1)[0])
    assert table.weight.dtype == dtype
    assert table.slot("exp_avg").dtype == torch.float32
    assert table.slot("exp_avg_sq").dtype == torch.float32
    assert table.state_dict()["slots.exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_low_precision_step_equals_fp32_step_rounded_to_the_table_dtype(optimizer_cls, dtype):
    low = HashTable(DIM, dtype=dtype, name="low", seed=5)
    low_optimizer = _optimizer(optimizer_cls, low)
    full = HashTable(DIM, dtype=torch.float32, name="full", seed=5)
    full_optimizer = _optimizer(optimizer_cls, full)
    low(IDS)
    full.assign(low.ids(), low.weight.float())  # the fp32 table starts from the low-precision values, cast

    for grad in _grads(3):
        _step_with_accept_grad(low, low_optimizer, grad)
        _step_with_accept_grad(full, full_optimizer, grad)
        assert torch.equal(low.ids(), full.ids())
        # The only rounding is the final cast of each row to the table dtype.
        torch.testing.assert_close(low.weight, full.weight.to(dtype), rtol=0, atol=0)
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(low.weight.float(), full.weight, rtol=eps / 2, atol=0)
        # Slots are fp32 computed from the same fp32 inputs: identical, not merely close.
        torch.testing.assert_close(low.slot("exp_avg"), full.slot("exp_avg"), rtol=0, atol=0)
        torch.testing.assert_close(low.slot("exp_avg_sq"), full.slot("exp_avg_sq"), rtol=0, atol=0)
        full.assign(low.ids(), low.weight.float())  # next step again from the same (rounded) rows
    assert low_optimizer.state[low]["step"] == 3


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_low_precision_step_through_forward_and_backward_uses_fp32_gradients(optimizer_cls, dtype):
    # Through autograd the output gradient arrives in the table dtype; per-id sums are still formed
    # in fp32. With output gradients exactly representable in the dtype, the fp32 table must agree.
    low = HashTable(DIM, dtype=dtype, name="low", seed=8)
    full = HashTable(DIM, dtype=torch.float32, name="full", seed=8)
    low(IDS)
    full.assign(low.ids(), low.weight.float())
    upstream = (torch.arange(len(IDS) * DIM, dtype=torch.float32).reshape(len(IDS), DIM) - 9) / 8  # k/8: exact
    results = []
    for table in (low, full):
        optimizer = _optimizer(optimizer_cls, table)
        optimizer.zero_grad()
        out = table(IDS)
        assert out.dtype == table.dtype
        (out.float() * upstream).sum().backward()
        rows, grad = table.pending_grad()
        assert grad.dtype == torch.float32
        results.append(grad)
        optimizer.step()
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    torch.testing.assert_close(low.weight, full.weight.to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_forward_output_has_the_table_dtype_in_train_and_eval(dtype):
    table = HashTable([2, 3], dtype=dtype, name="low")
    out = table(torch.tensor([[1, 2], [3, 1]]))
    assert out.dtype == dtype and out.shape == (2, 2, 2, 3)
    table.eval()
    assert table(torch.tensor([1, 99])).dtype == dtype  # 99 absent: read as its initial value
    assert table.lookup(torch.tensor([1])).dtype == dtype


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_pending_gradient_of_a_low_precision_table_is_float32_and_not_rounded(dtype):
    table = HashTable(DIM, dtype=dtype, name="low")
    table(IDS)
    grad = torch.full((len(IDS), DIM), 1.0 + 2**-20)  # not representable in bf16 / fp16
    table.accept_grad(IDS, grad)
    rows, pending = table.pending_grad()
    assert pending.dtype == torch.float32
    summed = {int(i): row for i, row in zip(table.ids()[rows], pending)}
    torch.testing.assert_close(summed[3], torch.full((DIM,), 1.0 + 2**-20), rtol=0, atol=0)
    torch.testing.assert_close(summed[7], torch.full((DIM,), 2 * (1.0 + 2**-20)), rtol=0, atol=0)

    table.clear_grad()
    out = table(IDS)
    (out * torch.ones_like(out)).sum().backward()  # an output gradient in the table dtype
    rows, pending = table.pending_grad()
    assert pending.dtype == torch.float32


# ---------------------------------------------------------------------------- state_dtype
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_state_dtype_float64_gives_float64_slots_and_float64_math(optimizer_cls, dtype):
    table = HashTable(DIM, dtype=dtype, name="t", seed=2)
    optimizer = _optimizer(optimizer_cls, table, state_dtype=torch.float64)
    assert optimizer.param_groups[0]["state_dtype"] == torch.float64
    reference = HashTable(DIM, dtype=torch.float64, name="ref", seed=2)
    reference_optimizer = _optimizer(optimizer_cls, reference, state_dtype=torch.float64)
    table(IDS)
    reference.assign(table.ids(), table.weight.double())
    for grad in _grads(2):
        _step_with_accept_grad(table, optimizer, grad)
        _step_with_accept_grad(reference, reference_optimizer, grad)
        assert table.slot("exp_avg").dtype == table.slot("exp_avg_sq").dtype == torch.float64
        assert table.weight.dtype == dtype
        torch.testing.assert_close(table.slot("exp_avg"), reference.slot("exp_avg"), rtol=0, atol=0)
        torch.testing.assert_close(table.slot("exp_avg_sq"), reference.slot("exp_avg_sq"), rtol=0, atol=0)
        torch.testing.assert_close(table.weight, reference.weight.to(dtype), rtol=0, atol=0)
        reference.assign(table.ids(), table.weight.double())


@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_float64_table_is_not_rounded_to_float32_by_an_update(optimizer_cls):
    # "Math in fp32 or wider": wider than the rows, never narrower. A float64 row must keep float64
    # precision through a step even with the default float32 slots.
    table = HashTable(1, dtype=torch.float64, name="f64")
    optimizer = optimizer_cls([table], lr=1e-3, weight_decay=0.0)
    value = 1.0 + 2**-40  # not a float32: float32 math would round it to 1.0 (float32 spacing there: 1.2e-7)
    table.assign(torch.tensor([0]), torch.tensor([[value]], dtype=torch.float64))
    table.accept_grad(torch.tensor([0]), torch.tensor([[0.5]], dtype=torch.float64))
    optimizer.step()
    # First step, t = 1: m = 0.1 * g, v = 0.001 * g^2, bc1 = 0.1, bc2 = 0.001 (float64 by hand).
    lr, g, eps = 1e-3, 0.5, 1e-8
    m, v, bc1, bc2 = 0.1 * g, 0.001 * g * g, 0.1, 0.001
    if optimizer_cls is SparseAdamW:  # torch form
        move = lr / bc1 * m / (math.sqrt(v) / math.sqrt(bc2) + eps)
    else:  # TF form
        move = lr * math.sqrt(bc2) / bc1 * m / (math.sqrt(v) + eps)
    torch.testing.assert_close(table.lookup(torch.tensor([0])).item(), value - move, rtol=0, atol=1e-14)
