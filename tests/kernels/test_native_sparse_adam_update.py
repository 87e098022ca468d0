"""The native fused Adam-family row update against the torch kernel, every rule and dtype."""

from __future__ import annotations

import itertools

import pytest
import torch
from native_support import assert_same, require_native

from recis.ops import native_kernels
from recis.ops.native_kernels import NativeLayoutError
from recis.ops.sparse_adam_update import EpsilonPlacement, WeightDecay, sparse_adam_update

require_native()

RULES = list(itertools.product(WeightDecay, EpsilonPlacement))
HYPER = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05)
FLOATING = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _table(rows: int, dim: int, dtype: torch.dtype, state_dtype: torch.dtype, seed: int):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, dim, generator=generator).to(dtype)
    exp_avg = torch.randn(rows, dim, generator=generator).to(state_dtype) * 0.1
    exp_avg_sq = torch.rand(rows, dim, generator=generator).to(state_dtype) * 0.01
    row_steps = torch.randint(0, 5, (rows, 1), generator=generator)
    return [weight, exp_avg, exp_avg_sq, row_steps]


def _run_steps(update, tensors, *, steps: int, touched: int, dim: int, per_row: bool, seed: int, **options) -> None:
    generator = torch.Generator().manual_seed(seed)
    weight, exp_avg, exp_avg_sq, row_steps = tensors
    for step in range(1, steps + 1):
        rows = torch.randperm(weight.shape[0], generator=generator)[:touched]
        grad = torch.randn(touched, dim, generator=generator).to(exp_avg.dtype)
        if step == 2:
            grad[0] = 0.0  # a zero gradient row
        update(
            weight, exp_avg, exp_avg_sq, rows, grad, step=step, row_steps=row_steps if per_row else None,
            **{**HYPER, **options},
        )  # fmt: skip


def _compare(
    dtype, state_dtype, decay, epsilon, *, per_row=False, maximize=False, dim=37, beta1=0.9, touched=40, divisor=1.0
):
    options = dict(decay=decay, epsilon=epsilon, maximize=maximize, beta1=beta1, grad_divisor=divisor)
    native = _table(64, dim, dtype, state_dtype, seed=1)
    reference = [t.clone() for t in native]
    kwargs = dict(steps=4, touched=touched, dim=dim, per_row=per_row, seed=2, **options)
    _run_steps(native_kernels.sparse_adam_update, native, **kwargs)
    _run_steps(sparse_adam_update, reference, **kwargs)
    for name, a, b in zip(("weight", "exp_avg", "exp_avg_sq", "row_steps"), native, reference):
        assert_same(a, b, f"{name} {dtype} {decay} {epsilon}")


@pytest.mark.parametrize(("decay", "epsilon"), RULES)
@pytest.mark.parametrize("per_row", [False, True], ids=["table", "row"])
def test_float32_rows_match_the_torch_kernel(decay, epsilon, per_row):
    _compare(torch.float32, torch.float32, decay, epsilon, per_row=per_row)


@pytest.mark.parametrize(("decay", "epsilon"), RULES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_rows_with_float32_state_match(decay, epsilon, dtype):
    _compare(dtype, torch.float32, decay, epsilon)


@pytest.mark.parametrize(("decay", "epsilon"), RULES)
def test_float64_rows_and_state_match(decay, epsilon):
    _compare(torch.float64, torch.float64, decay, epsilon, per_row=True)


@pytest.mark.parametrize("dim", [1, 7, 8, 64, 129])
def test_row_widths_around_the_vector_width_match(dim):
    _compare(torch.float32, torch.float32, WeightDecay.DECOUPLED, EpsilonPlacement.CORRECTED, dim=dim)


def test_maximize_and_a_beta1_below_one_half_match():
    # beta1 < 0.5 takes the other branch of torch's lerp.
    _compare(torch.float32, torch.float32, WeightDecay.L2, EpsilonPlacement.UNCORRECTED, maximize=True, beta1=0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("divisor", [2.0, 3.0])
def test_a_gradient_divisor_matches_the_torch_kernel_dividing_first(dtype, divisor):
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    _compare(dtype, state_dtype, WeightDecay.DECOUPLED, EpsilonPlacement.CORRECTED, per_row=True, divisor=divisor)


def test_a_gradient_divisor_of_three_is_the_update_of_the_divided_gradient():
    divided, reference = (
        _table(64, 9, torch.float32, torch.float32, seed=8),
        _table(64, 9, torch.float32, torch.float32, seed=8),
    )
    rows, grad = torch.tensor([5, 0, 63, 17]), torch.randn(4, 9, generator=torch.Generator().manual_seed(9))
    options = dict(decay=WeightDecay.DECOUPLED, epsilon=EpsilonPlacement.CORRECTED, maximize=False, **HYPER)
    native_kernels.sparse_adam_update(*divided[:3], rows, grad, step=1, grad_divisor=3.0, **options)
    native_kernels.sparse_adam_update(*reference[:3], rows, grad / 3, step=1, **options)
    for a, b in zip(divided, reference):
        assert torch.equal(a, b)


def test_empty_gradient_changes_nothing():
    native = _table(16, 8, torch.float32, torch.float32, seed=5)
    before = [t.clone() for t in native]
    weight, exp_avg, exp_avg_sq, row_steps = native
    for per_row in (False, True):
        native_kernels.sparse_adam_update(
            weight, exp_avg, exp_avg_sq, torch.empty(0, dtype=torch.int64), torch.empty(0, 8), step=1,
            row_steps=row_steps if per_row else None, decay=WeightDecay.DECOUPLED,
            epsilon=EpsilonPlacement.CORRECTED, maximize=False, **HYPER,
        )  # fmt: skip
    for a, b in zip(native, before):
        assert torch.equal(a, b)


def test_untouched_rows_are_not_written():
    native = _table(32, 8, torch.bfloat16, torch.float32, seed=6)
    before = [t.clone() for t in native]
    rows = torch.tensor([3, 17, 30])
    native_kernels.sparse_adam_update(
        *native[:3], rows, torch.ones(3, 8), step=1, row_steps=native[3], decay=WeightDecay.DECOUPLED_NO_LR,
        epsilon=EpsilonPlacement.UNCORRECTED, maximize=False, **HYPER,
    )  # fmt: skip
    untouched = torch.ones(32, dtype=torch.bool)
    untouched[rows] = False
    for a, b in zip(native, before):
        assert torch.equal(a[untouched], b[untouched])
        assert not torch.equal(a[rows], b[rows])


@pytest.mark.parametrize("state_dtype", FLOATING, ids=str)
@pytest.mark.parametrize("dtype", FLOATING, ids=str)
def test_every_row_and_slot_dtype_matches(dtype, state_dtype):
    # Math in float64 when rows or slots are float64, else float32; rows and slots rounded once.
    _compare(dtype, state_dtype, WeightDecay.DECOUPLED, EpsilonPlacement.CORRECTED, per_row=True)


def test_a_layout_the_kernel_does_not_take_is_an_error_that_names_the_torch_backend():
    weight, exp_avg, exp_avg_sq = (torch.zeros(8, 4).t() for _ in range(3))  # non-contiguous tables
    with pytest.raises(NativeLayoutError, match="non-contiguous tables; RECIS_BACKEND=torch runs it"):
        native_kernels.sparse_adam_update(
            weight, exp_avg, exp_avg_sq, torch.tensor([0]), torch.ones(1, 8), step=1, decay=WeightDecay.L2,
            epsilon=EpsilonPlacement.CORRECTED, maximize=False, **HYPER,
        )  # fmt: skip


def _repeated_rows_and_pieces(dim: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Rows as two ranks would send them (each distinct, repeats across), the gradient in two pieces."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.cat([torch.randperm(64, generator=generator)[:30], torch.randperm(64, generator=generator)[:25]])
    return rows, [torch.randn(30, dim, generator=generator), torch.randn(25, dim, generator=generator)]


@pytest.mark.parametrize(
    ("dtype", "state_dtype"), [(torch.float32,) * 2, (torch.bfloat16, torch.float32), (torch.float64,) * 2]
)
@pytest.mark.parametrize("per_row", [False, True], ids=["table", "row"])
def test_repeated_rows_summed_inside_the_update_equal_coalescing_first(dtype, state_dtype, per_row):
    rows, pieces = _repeated_rows_and_pieces(11, seed=3)
    assert rows.unique().numel() < rows.numel()
    options = dict(decay=WeightDecay.DECOUPLED, epsilon=EpsilonPlacement.CORRECTED, maximize=False, **HYPER)
    fused, coalesced_first, torch_kernel = (_table(64, 11, dtype, state_dtype, seed=4) for _ in range(3))
    compute = torch.promote_types(torch.promote_types(dtype, state_dtype), torch.float32)
    pieces = [piece.to(compute) for piece in pieces]
    for tensors in (fused, coalesced_first, torch_kernel):
        tensors[3] = tensors[3] if per_row else None
    native_kernels.sparse_adam_update(
        *fused[:3], rows, pieces, step=3, row_steps=fused[3], grad_divisor=2.0, sum_repeated_rows=True, **options
    )
    unique_rows, sums = native_kernels.coalesce_rows(rows, pieces)
    native_kernels.sparse_adam_update(
        *coalesced_first[:3], unique_rows, sums, step=3, row_steps=coalesced_first[3], grad_divisor=2.0, **options
    )
    sparse_adam_update(
        *torch_kernel[:3], rows, pieces, step=3, row_steps=torch_kernel[3], grad_divisor=2.0, sum_repeated_rows=True,
        **options,
    )  # fmt: skip
    for name, a, b, c in zip(("weight", "exp_avg", "exp_avg_sq", "row_steps"), fused, coalesced_first, torch_kernel):
        if a is not None:
            assert torch.equal(a, b), name  # the same additions and the same update, in the same order
            assert_same(a, c, f"{name} against the torch kernel")


@pytest.mark.parametrize("sum_repeated_rows", [False, True])
@pytest.mark.parametrize("bad_row", [32, -1, 10**6])
def test_a_row_outside_the_table_raises_index_error_and_changes_nothing(sum_repeated_rows, bad_row):
    native = _table(32, 8, torch.float32, torch.float32, seed=10)
    before = [t.clone() for t in native]
    rows = torch.tensor([3, 3, bad_row]) if sum_repeated_rows else torch.tensor([3, bad_row])
    with pytest.raises(IndexError, match=r"rows out of range \[0, 32\)"):
        native_kernels.sparse_adam_update(
            *native[:3], rows, torch.ones(rows.numel(), 8), step=1, row_steps=native[3], decay=WeightDecay.L2,
            epsilon=EpsilonPlacement.CORRECTED, maximize=False, sum_repeated_rows=sum_repeated_rows, **HYPER,
        )  # fmt: skip
    for a, b in zip(native, before):
        assert torch.equal(a, b)


@pytest.mark.parametrize("update", [sparse_adam_update, native_kernels.sparse_adam_update], ids=["torch", "native"])
@pytest.mark.parametrize("divisor", [0.0, -2.0])
def test_a_divisor_that_is_not_positive_raises_value_error_on_both_backends_and_changes_nothing(update, divisor):
    tensors = _table(32, 8, torch.float32, torch.float32, seed=11)
    before = [t.clone() for t in tensors]
    with pytest.raises(ValueError, match="grad_divisor must be positive"):
        update(
            *tensors[:3], torch.tensor([3, 5]), torch.ones(2, 8), step=1, grad_divisor=divisor, decay=WeightDecay.L2,
            epsilon=EpsilonPlacement.CORRECTED, maximize=False, **HYPER,
        )  # fmt: skip
    for a, b in zip(tensors, before):
        assert torch.equal(a, b)
