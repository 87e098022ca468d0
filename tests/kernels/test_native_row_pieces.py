"""Rows in pieces (``recis.ops.row_pieces``): the native gather and coalescing read the pieces
where they lie and give what the torch kernels give on their concatenation."""

from __future__ import annotations

import pytest
import torch
from native_support import require_native

from recis.ops import coalesce, gather, native_kernels
from recis.ops.row_pieces import joined

require_native()


def _pieces(sizes: list[int], width: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, width, generator=generator) * 100).to(dtype) for size in sizes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.uint8])
@pytest.mark.parametrize("sizes", [[5], [3, 0, 4], [0, 6], [2, 2, 2, 2]])
def test_native_gather_equals_index_select_of_the_concatenation(dtype, sizes):
    pieces = _pieces(sizes, 7, dtype)
    index = torch.randint(0, sum(sizes), (50,), generator=torch.Generator().manual_seed(1))
    native = native_kernels.gather_rows(pieces, index)
    assert native.dtype == dtype
    assert torch.equal(native, gather.gather_rows(pieces, index))
    assert torch.equal(native, torch.cat(pieces)[index])


@pytest.mark.parametrize(("dtype", "width"), [(torch.uint8, 7), (torch.float32, 1), (torch.float32, 129)])
def test_native_gather_of_many_scattered_rows_equals_index_select(dtype, width):
    """Long enough that rows are prefetched ahead, with rows of under one cache line and of several."""
    pieces = _pieces([3000, 1, 2000], width, dtype)
    index = torch.randint(0, 5001, (20_000,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(native_kernels.gather_rows(pieces, index), torch.cat(pieces)[index])


def test_native_gather_of_no_index_and_of_non_contiguous_pieces():
    pieces = _pieces([4, 3], 6, torch.float32)
    assert native_kernels.gather_rows(pieces, torch.empty(0, dtype=torch.int64)).shape == (0, 6)
    assert native_kernels.gather_rows([torch.empty(5, 0)], torch.tensor([4, 0])).shape == (2, 0)
    strided = [piece[:, ::2] for piece in pieces]
    index = torch.tensor([6, 0, 3, 4])
    assert torch.equal(native_kernels.gather_rows(strided, index), torch.cat(strided)[index])


@pytest.mark.parametrize("bad_index", [[0, 7], [-1]])
def test_gather_rejects_an_index_past_the_pieces_with_index_error_on_both_backends(bad_index):
    pieces = _pieces([4, 3], 2, torch.float32)
    with pytest.raises(IndexError, match=r"index out of range \[0, 7\)"):
        native_kernels.gather_rows(pieces, torch.tensor(bad_index))
    with pytest.raises(IndexError, match="index out of range"):
        gather.gather_rows(pieces, torch.tensor(bad_index))


def test_native_gather_rejects_pieces_of_different_widths_or_dtypes():
    with pytest.raises(RuntimeError, match="pieces of one width"):
        native_kernels.gather_rows([torch.ones(2, 3), torch.ones(2, 4)], torch.tensor([0]))
    with pytest.raises(RuntimeError, match="pieces of one dtype"):
        native_kernels.gather_rows([torch.ones(2, 3), torch.ones(2, 3, dtype=torch.float64)], torch.tensor([0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_native_coalescing_of_pieces_equals_coalescing_their_concatenation(dtype):
    pieces = _pieces([300, 0, 500, 200], 9, dtype)
    rows = torch.randint(0, 400, (1000,), generator=torch.Generator().manual_seed(2))
    native_rows, native_sums = native_kernels.coalesce_rows(rows, pieces)
    torch_rows, torch_sums = coalesce.coalesce_rows(rows, torch.cat(pieces))
    assert torch.equal(native_rows, torch_rows)
    assert torch.equal(native_sums, torch_sums)  # same additions in the same order
    assert torch.equal(coalesce.coalesce_rows(rows, pieces)[1], torch_sums)


def test_native_coalescing_rejects_pieces_that_do_not_match_the_rows():
    with pytest.raises(RuntimeError, match="7 rows for 8"):
        native_kernels.coalesce_rows(torch.arange(8), _pieces([4, 3], 2, torch.float32))


def test_joined_hands_back_a_lone_filled_piece_without_copying():
    piece = torch.ones(3, 2)
    assert joined([torch.empty(0, 2), piece, torch.empty(0, 2)]) is piece
    assert joined(piece) is piece
    assert torch.equal(joined([piece, piece]), torch.ones(6, 2))
    with pytest.raises(ValueError, match="at least one piece"):
        joined([])
