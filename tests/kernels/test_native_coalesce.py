"""Native coalescing (radix grouping) against the torch kernel: duplicates, empty, extremes."""

from __future__ import annotations

import pytest
import torch
from native_support import require_native

from recis.ops import coalesce, native_kernels

require_native()

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _check(rows: torch.Tensor, grads: torch.Tensor) -> None:
    native_rows, native_sums = native_kernels.coalesce_rows(rows, grads)
    torch_rows, torch_sums = coalesce.coalesce_rows(rows, grads)
    assert torch.equal(native_rows, torch_rows)
    assert native_sums.dtype == torch_sums.dtype
    assert torch.equal(native_sums, torch_sums)  # same additions in the same order


@pytest.mark.parametrize("table_rows", [10, 1000, 3_000_000])
def test_random_rows_with_duplicates(table_rows):
    generator = torch.Generator().manual_seed(table_rows)
    rows = torch.randint(0, table_rows, (5000,), generator=generator)
    _check(rows, torch.randn(5000, 9, generator=generator))


def test_micro_batches_concatenated_sum_across_batches():
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randperm(300, generator=generator)[:200] for _ in range(4)]
    rows = torch.cat(batches)
    assert rows.unique().numel() < rows.numel()
    _check(rows, torch.randn(rows.numel(), 16, generator=generator))


def test_any_int64_key_including_extremes_and_minus_one():
    keys = torch.tensor([INT64_MAX, -1, INT64_MIN, 0, -1, INT64_MAX, 5, INT64_MIN, 2**40, -(2**50)])
    _check(keys, torch.randn(keys.numel(), 3))


def test_already_coalesced_and_single_and_empty_inputs():
    _check(torch.arange(0, 100, 3), torch.randn(34, 4))
    _check(torch.tensor([7]), torch.randn(1, 4))
    _check(torch.empty(0, dtype=torch.int64), torch.empty(0, 4))


def test_low_precision_and_float64_gradients():
    rows = torch.tensor([3, 1, 3, 2, 1, 3])
    _check(rows, torch.randn(6, 5).to(torch.bfloat16))
    _check(rows, torch.randn(6, 5, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("dim", [1, 7, 64])
def test_sum_by_index_equals_index_add_in_input_order(dtype, dim):
    generator = torch.Generator().manual_seed(dim)
    index = torch.randint(0, 40, (3000,), generator=generator)
    values = torch.randn(3000, dim, generator=generator).to(dtype)
    native = native_kernels.sum_by_index(index, values, 50)
    reference = coalesce.sum_by_index(index, values, 50)
    assert native.dtype == reference.dtype == torch.promote_types(dtype, torch.float32)
    assert torch.equal(native, reference)


def test_sum_by_index_of_no_values_is_zero_rows():
    sums = native_kernels.sum_by_index(torch.empty(0, dtype=torch.int64), torch.empty(0, 3), 4)
    assert torch.equal(sums, torch.zeros(4, 3))


@pytest.mark.parametrize("bad_index", [[0, 4], [-1, 0]])
def test_sum_by_index_rejects_an_index_outside_the_count(bad_index):
    with pytest.raises(RuntimeError, match=r"index out of range \[0, 4\)"):
        native_kernels.sum_by_index(torch.tensor(bad_index), torch.ones(2, 3), 4)
