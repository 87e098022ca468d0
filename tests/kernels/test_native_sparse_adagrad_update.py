"""The native fused Adagrad row update (element-wise and row-wise) against the torch kernel."""

from __future__ import annotations

import pytest
import torch
from native_support import assert_same, require_native

from recis.ops import native_kernels, sparse_adagrad_update
from recis.ops.native_kernels import NativeLayoutError

require_native()

VARIANTS = ["sparse_adagrad_update", "sparse_row_wise_adagrad_update"]
HYPER = dict(lr=0.05, lr_decay=0.01, initial_accumulator_value=0.1, eps=1e-10, weight_decay=0.02, maximize=False)
FLOATING = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _table(variant: str, rows: int, dim: int, dtype: torch.dtype, slot_dtype: torch.dtype, seed: int):
    generator = torch.Generator().manual_seed(seed)
    width = 1 if "row_wise" in variant else dim
    return torch.randn(rows, dim, generator=generator).to(dtype), torch.rand(rows, width, generator=generator).to(
        slot_dtype
    )


def _run_steps(update, tensors, *, dim: int, touched: int, seed: int, **options) -> None:
    generator = torch.Generator().manual_seed(seed)
    weight, slot = tensors
    for step in range(1, 5):
        rows = torch.randperm(weight.shape[0], generator=generator)[:touched]
        grad = torch.randn(touched, dim, generator=generator)
        if step == 2:
            grad[0] = 0.0  # a zero gradient row
        update(weight, slot, rows, grad, step=step, **{**HYPER, **options})


def _compare(variant, dtype=torch.float32, slot_dtype=torch.float32, *, dim=37, touched=40, **options) -> None:
    native = _table(variant, 64, dim, dtype, slot_dtype, seed=1)
    reference = tuple(t.clone() for t in native)
    _run_steps(getattr(native_kernels, variant), native, dim=dim, touched=touched, seed=2, **options)
    _run_steps(getattr(sparse_adagrad_update, variant), reference, dim=dim, touched=touched, seed=2, **options)
    for name, a, b in zip(("weight", "slot"), native, reference):
        label = f"{variant} {name} {dtype} {slot_dtype} {options}"
        if torch.float64 in (dtype, slot_dtype):  # the math is float64: float32 math would miss this
            torch.testing.assert_close(a.double(), b.double(), rtol=1e-12, atol=1e-14, msg=label)
        else:
            assert_same(a, b, label)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dim", [1, 7, 8, 64, 129])
def test_float32_rows_of_any_width_match_the_torch_kernel(variant, dim):
    _compare(variant, dim=dim)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("slot_dtype", FLOATING, ids=str)
@pytest.mark.parametrize("dtype", FLOATING, ids=str)
def test_every_row_and_slot_dtype_matches(variant, dtype, slot_dtype):
    # Math in float64 when the rows or the slot are float64, else float32; both rounded once.
    _compare(variant, dtype, slot_dtype)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "options",
    [dict(maximize=True), dict(weight_decay=0.0), dict(lr_decay=0.0, initial_accumulator_value=0.0), dict(eps=0.1)],
    ids=["maximize", "no-decay", "no-lr-decay-no-init", "large-eps"],
)
def test_each_hyperparameter_matches(variant, options):
    _compare(variant, **options)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("divisor", [2.0, 3.0])
def test_a_gradient_divisor_matches_the_torch_kernel_dividing_first(variant, divisor):
    _compare(variant, grad_divisor=divisor)


@pytest.mark.parametrize("variant", VARIANTS)
def test_given_squares_replace_the_squared_gradient(variant):
    # The "Sum" variants: S grows by grad_sq (row-wise: its mean), not by g^2; no weight decay.
    generator = torch.Generator().manual_seed(7)
    native = _table(variant, 32, 9, torch.float32, torch.float32, seed=3)
    reference = tuple(t.clone() for t in native)
    rows, grad = torch.tensor([4, 0, 31, 12]), torch.randn(4, 9, generator=generator)
    grad_sq = grad * grad + torch.rand(4, 9, generator=generator)
    options = {**HYPER, "weight_decay": 0.0, "step": 2, "grad_sq": grad_sq}
    getattr(native_kernels, variant)(*native, rows, grad, **options)
    getattr(sparse_adagrad_update, variant)(*reference, rows, grad, **options)
    for a, b in zip(native, reference):
        assert_same(a, b, variant)
    plain = _table(variant, 32, 9, torch.float32, torch.float32, seed=3)
    getattr(native_kernels, variant)(*plain, rows, grad, **{**options, "grad_sq": None})
    assert not torch.equal(plain[1], native[1])


def _repeated_rows_and_pieces(dim: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Rows as two ranks would send them (each distinct, repeats across), the gradient in two pieces."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.cat([torch.randperm(64, generator=generator)[:30], torch.randperm(64, generator=generator)[:25]])
    return rows, [torch.randn(30, dim, generator=generator), torch.randn(25, dim, generator=generator)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("dtype", "slot_dtype"), [(torch.float32,) * 2, (torch.bfloat16, torch.float32)])
def test_repeated_rows_summed_inside_the_update_equal_coalescing_first(variant, dtype, slot_dtype):
    rows, pieces = _repeated_rows_and_pieces(11, seed=3)
    assert rows.unique().numel() < rows.numel()
    fused, coalesced_first, torch_kernel = (_table(variant, 64, 11, dtype, slot_dtype, seed=4) for _ in range(3))
    options = {**HYPER, "step": 3, "grad_divisor": 2.0}
    getattr(native_kernels, variant)(*fused, rows, pieces, sum_repeated_rows=True, **options)
    unique_rows, sums = native_kernels.coalesce_rows(rows, pieces)
    getattr(native_kernels, variant)(*coalesced_first, unique_rows, sums, **options)
    getattr(sparse_adagrad_update, variant)(*torch_kernel, rows, pieces, sum_repeated_rows=True, **options)
    for name, a, b, c in zip(("weight", "slot"), fused, coalesced_first, torch_kernel):
        assert torch.equal(a, b), name  # the same additions and the same update, in the same order
        assert_same(a, c, f"{name} against the torch kernel")


@pytest.mark.parametrize("variant", VARIANTS)
def test_untouched_rows_are_not_written_and_an_empty_gradient_changes_nothing(variant):
    weight, slot = _table(variant, 32, 8, torch.float32, torch.float32, seed=6)
    before = (weight.clone(), slot.clone())
    update = getattr(native_kernels, variant)
    update(weight, slot, torch.empty(0, dtype=torch.int64), torch.empty(0, 8), step=1, **HYPER)
    assert torch.equal(weight, before[0]) and torch.equal(slot, before[1])
    rows = torch.tensor([3, 17, 30])
    update(weight, slot, rows, torch.ones(3, 8), step=1, **HYPER)
    untouched = torch.ones(32, dtype=torch.bool)
    untouched[rows] = False
    for a, b in zip((weight, slot), before):
        assert torch.equal(a[untouched], b[untouched])
        assert not torch.equal(a[rows], b[rows])


def test_a_layout_the_kernel_does_not_take_is_an_error_that_names_the_torch_backend():
    weight, slot = torch.zeros(8, 4).t(), torch.zeros(4, 8)  # a non-contiguous table
    with pytest.raises(NativeLayoutError, match="contiguous 2-D CPU tables only.*RECIS_BACKEND=torch runs it"):
        native_kernels.sparse_adagrad_update(weight, slot, torch.tensor([0]), torch.ones(1, 8), step=1, **HYPER)


@pytest.mark.parametrize(
    ("slot_width", "grad_rows", "extra", "error", "message"),
    [
        (4, 1, {}, RuntimeError, r"slot must be a contiguous \(rows, 1\)"),
        (1, 2, {}, RuntimeError, "one row per touched row"),
        (1, 1, {"grad_divisor": 0.0}, ValueError, "grad_divisor must be positive"),
        (1, 1, {"grad_sq": torch.ones(1, 4), "sum_repeated_rows": True}, ValueError, "grad_sq needs distinct rows"),
    ],
    ids=["slot-width", "grad-rows", "divisor", "grad-sq-with-repeats"],
)
def test_bad_arguments_raise_and_change_nothing(slot_width, grad_rows, extra, error, message):
    weight, slot = torch.randn(8, 4), torch.rand(8, slot_width)
    before = (weight.clone(), slot.clone())
    with pytest.raises(error, match=message):
        native_kernels.sparse_row_wise_adagrad_update(
            weight, slot, torch.tensor([2]), torch.ones(grad_rows, 4), step=1, **{**HYPER, **extra}
        )
    assert torch.equal(weight, before[0]) and torch.equal(slot, before[1])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("sum_repeated_rows", [False, True])
@pytest.mark.parametrize("bad_row", [8, -1, 10**6])
def test_a_row_outside_the_table_raises_index_error_and_changes_nothing(variant, sum_repeated_rows, bad_row):
    weight, slot = _table(variant, 8, 4, torch.float32, torch.float32, seed=9)
    before = (weight.clone(), slot.clone())
    rows = torch.tensor([1, 1, bad_row]) if sum_repeated_rows else torch.tensor([1, bad_row])
    with pytest.raises(IndexError, match=r"rows out of range \[0, 8\)"):
        getattr(native_kernels, variant)(
            weight, slot, rows, torch.ones(rows.numel(), 4), step=1, sum_repeated_rows=sum_repeated_rows, **HYPER
        )
    assert torch.equal(weight, before[0]) and torch.equal(slot, before[1])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", [sparse_adagrad_update, native_kernels], ids=["torch", "native"])
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"grad_divisor": 0.0}, "grad_divisor must be positive"),
        ({"grad_divisor": -1.0}, "grad_divisor must be positive"),
        ({"grad_sq": torch.ones(2, 4), "sum_repeated_rows": True}, "grad_sq needs distinct rows"),
    ],
    ids=["zero-divisor", "negative-divisor", "grad-sq-with-repeats"],
)
def test_bad_values_raise_value_error_on_both_backends_and_change_nothing(variant, backend, extra, message):
    weight, slot = _table(variant, 8, 4, torch.float32, torch.float32, seed=12)
    before = (weight.clone(), slot.clone())
    with pytest.raises(ValueError, match=message):
        getattr(backend, variant)(weight, slot, torch.tensor([2, 5]), torch.ones(2, 4), step=1, **{**HYPER, **extra})
    assert torch.equal(weight, before[0]) and torch.equal(slot, before[1])
