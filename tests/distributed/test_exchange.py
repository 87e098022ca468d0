"""The all-to-all of blocks: every rank receives exactly the rows sent to it, in rank order,
for blocks of mixed dtypes and widths; this rank's own rows skip the collective; results
stay valid after the next exchange reuses its buffers; received in pieces, each rank's rows
are one piece, this rank's a view of what it sent."""

from __future__ import annotations

import threading
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from dist_harness import run_ranks

from recis.dist.exchange import _workspace, exchange, exchange_pieces

DTYPES = (torch.float32, torch.int64, torch.bfloat16, torch.uint8)
WIDTHS = (3, 1, 5, 7)  # odd widths and counts: blocks start at offsets unaligned for the next dtype


def _count(sender: int, receiver: int, block: int) -> int:
    return (3 * sender + 5 * receiver + block) % 4


def _rows(sender: int, receiver: int, block: int, round_: int) -> torch.Tensor:
    """The rows ``sender`` sends ``receiver`` in ``block``: values that name all three."""
    count, width = _count(sender, receiver, block), WIDTHS[block]
    base = 1000 * round_ + 100 * sender + 10 * receiver + block
    values = base + torch.arange(count * width).reshape(count, width) % 7
    return values.to(DTYPES[block])


def _blocks(rank: int, world_size: int, round_: int) -> list[torch.Tensor]:
    return [torch.cat([_rows(rank, r, b, round_) for r in range(world_size)]) for b in range(len(DTYPES))]


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _exchange_twice(rank: int, world_size: int) -> dict:
    send = [[_count(rank, r, b) for b in range(len(DTYPES))] for r in range(world_size)]
    recv = [[_count(r, rank, b) for b in range(len(DTYPES))] for r in range(world_size)]
    splits = []
    original = dist.all_to_all_single

    def recording(output, input, output_split_sizes=None, input_split_sizes=None, **kwargs):
        splits.append(list(input_split_sizes))
        return original(output, input, output_split_sizes, input_split_sizes, **kwargs)

    with mock.patch.object(dist, "all_to_all_single", recording):
        first = exchange(_blocks(rank, world_size, 0), send, recv, None)
    first_copy = [block.clone() for block in first]
    second = exchange(_blocks(rank, world_size, 1), send, recv, None)
    expected = [
        [torch.cat([_rows(r, rank, b, round_) for r in range(world_size)]) for b in range(len(DTYPES))]
        for round_ in (0, 1)
    ]
    to_each = [
        0 if r == rank else sum(_count(rank, r, b) * WIDTHS[b] * _bytes(DTYPES[b]) for b in range(len(DTYPES)))
        for r in range(world_size)
    ]
    return {
        "first": all(torch.equal(got, want) for got, want in zip(first, expected[0])),
        "dtypes": [block.dtype for block in first] == list(DTYPES),
        "unchanged": all(torch.equal(a, b) for a, b in zip(first, first_copy)),
        "second": all(torch.equal(got, want) for got, want in zip(second, expected[1])),
        "splits": (splits, [to_each]),
    }


@pytest.mark.parametrize("world_size", [2, 3])
def test_every_rank_receives_the_rows_sent_to_it_and_results_outlive_the_next_exchange(world_size):
    for outcome in run_ranks(world_size, _exchange_twice):
        assert outcome["first"] and outcome["dtypes"] and outcome["second"]
        assert outcome["unchanged"]  # the second exchange reused the buffers, not the results
        splits, expected = outcome["splits"]
        assert splits == expected  # one collective; this rank's own rows never enter it


def test_buffers_are_kept_per_thread_and_large_ones_are_not_kept():
    cpu = torch.device("cpu")
    first = _workspace.buffer("send", 64, cpu)
    assert _workspace.buffer("send", 32, cpu).data_ptr() == first.data_ptr()  # reused, no new pages
    other_thread = []
    worker = threading.Thread(target=lambda: other_thread.append(_workspace.buffer("send", 64, cpu).data_ptr()))
    worker.start()
    worker.join()
    assert other_thread[0] != first.data_ptr()
    large = _workspace.KEPT_BYTES + 1
    one, another = _workspace.buffer("receive", large, cpu), _workspace.buffer("receive", large, cpu)
    assert one.data_ptr() != another.data_ptr()  # both alive: a kept buffer would be the same one


def _exchange_in_pieces(rank: int, world_size: int) -> dict:
    send = [[_count(rank, r, b) for b in range(len(DTYPES))] for r in range(world_size)]
    recv = [[_count(r, rank, b) for b in range(len(DTYPES))] for r in range(world_size)]
    blocks = _blocks(rank, world_size, 0)
    pieces = exchange_pieces(blocks, send, recv, None)
    own_start = [sum(_count(rank, r, b) for r in range(rank)) for b in range(len(DTYPES))]
    return {
        "per_rank": all(
            torch.equal(pieces[b][r], _rows(r, rank, b, 0)) for b in range(len(DTYPES)) for r in range(world_size)
        ),
        "own_is_a_view": all(
            pieces[b][rank].numel() == 0 or pieces[b][rank].data_ptr() == blocks[b][own_start[b] :].data_ptr()
            for b in range(len(DTYPES))
        ),
    }


@pytest.mark.parametrize("world_size", [2, 3])
def test_pieces_are_each_ranks_rows_and_this_ranks_own_are_not_copied(world_size):
    for outcome in run_ranks(world_size, _exchange_in_pieces):
        assert outcome["per_rank"]
        assert outcome["own_is_a_view"]
