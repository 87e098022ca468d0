"""All-to-all exchanges of per-id data between ranks, packed across tables.

A *block* is a tensor whose rows are grouped by destination rank: ``counts[r][b]`` rows
of block ``b`` go to rank ``r``. ``route`` groups the ids of several tables by owner
and swaps the counts of all of them in ONE small all-to-all; ``exchange`` then sends
any number of blocks (ids, rows, gradients of mixed dims and dtypes) in ONE all-to-all
of bytes. So a lookup or an optimizer step over 26 tables makes as many collective
calls as over one. In a world of one nothing is sent: the blocks stay where they are.
``exchange_pieces`` hands what arrived over without joining it: each block as one piece
per rank, read in place by kernels that take pieces (``recis.ops.row_pieces``).

The size swap also carries failure: a rank whose input is bad sends -1 counts before it
raises, so every other rank raises a clear error naming it instead of waiting in a
collective.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from recis.dist.partition import owner_rank

_FAILED = -1


class PeerError(RuntimeError):
    """Another rank failed in the same collective call."""


class Traffic:
    """Bytes this process sent to other ranks through the exchanges."""

    def __init__(self) -> None:
        self.bytes_sent = 0


traffic = Traffic()


def group_size_and_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


def swap_sizes(send: torch.Tensor, group: dist.ProcessGroup | None, error: Exception | None = None) -> torch.Tensor:
    """All-to-all of an int64 ``(world_size, k)`` table of sizes: row r goes to rank r.

    With ``error`` given, this rank sends -1 everywhere and then raises ``error``; a rank
    that receives -1 raises ``PeerError`` naming the sender.
    """
    world_size, _ = group_size_and_rank(group)
    if world_size == 1:
        if error is not None:
            raise error
        return send
    if error is not None:
        send = torch.full_like(send, _FAILED)
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    if error is not None:
        raise error
    failed = (received < 0).any(dim=1).nonzero().flatten().tolist()
    if failed:
        raise PeerError(f"rank {failed[0]} of the process group failed in the same collective call (see its error)")
    return received


def _as_bytes(block: torch.Tensor) -> torch.Tensor:
    return block.contiguous().view(torch.uint8).reshape(-1)


def _row_bytes(block: torch.Tensor) -> int:
    return math.prod(block.shape[1:]) * block.element_size()


def exchange(
    blocks: Sequence[torch.Tensor],
    send_counts: list[list[int]],
    recv_counts: list[list[int]],
    group: dist.ProcessGroup | None,
) -> list[torch.Tensor]:
    """Send every block's rows to their ranks in one all-to-all; returns the blocks received.

    ``send_counts[r][b]`` rows of ``blocks[b]`` (consecutive, in rank order) go to rank
    r; ``recv_counts[r][b]`` rows of block b arrive from rank r. A received block holds
    the rows from rank 0 first, then rank 1, ..., with the sent block's dtype and row shape.
    This rank's own rows do not pass through the collective: they are taken from the block.
    """
    world_size, _ = group_size_and_rank(group)
    if world_size == 1:
        return list(blocks)
    return [torch.cat(pieces) for pieces in exchange_pieces(blocks, send_counts, recv_counts, group)]


def exchange_pieces(
    blocks: Sequence[torch.Tensor],
    send_counts: list[list[int]],
    recv_counts: list[list[int]],
    group: dist.ProcessGroup | None,
) -> list[list[torch.Tensor]]:
    """``exchange`` without joining what arrives: each block as one piece per rank, rank 0 first
    (``recis.ops.row_pieces``). This rank's piece is a view of the block it sent; the others are
    views of a buffer that the next exchange of this thread overwrites: read them before it.
    """
    world_size, rank = group_size_and_rank(group)
    if world_size == 1:
        return [[block] for block in blocks]
    row_bytes = [_row_bytes(block) for block in blocks]
    own, pieces, send_split = _by_rank(blocks, row_bytes, send_counts, rank)
    recv_split = [
        0 if r == rank else sum(count * row_bytes[b] for b, count in enumerate(recv_counts[r]))
        for r in range(world_size)
    ]
    payload = _workspace.buffer("send", sum(send_split), blocks[0].device)
    if pieces:
        torch.cat(pieces, out=payload)
    received = _workspace.buffer("receive", sum(recv_split), blocks[0].device)
    dist.all_to_all_single(received, payload, recv_split, send_split, group=group)
    traffic.bytes_sent += sum(send_split)
    return _received_pieces(received, blocks, row_bytes, recv_counts, rank, own)


def _by_rank(
    blocks: Sequence[torch.Tensor], row_bytes: list[int], send_counts: list[list[int]], rank: int
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
    """Each block's bytes cut by destination: the pieces this rank keeps (one per block), the
    pieces for the other ranks (rank by rank, block by block) and their size per rank."""
    flat = [_as_bytes(block) for block in blocks]
    offsets = [0] * len(blocks)
    own, pieces, send_split = [], [], []
    for r, per_block in enumerate(send_counts):
        size = 0
        for b, count in enumerate(per_block):
            piece = flat[b][offsets[b] : offsets[b] + count * row_bytes[b]]
            offsets[b] += piece.numel()
            if r == rank:
                own.append(piece)
            else:
                pieces.append(piece)
                size += piece.numel()
        send_split.append(size)
    return own, pieces, send_split


class _Workspace(threading.local):
    """Send and receive buffers kept from one exchange to the next (up to ``KEPT_BYTES`` each),
    per thread, so that exchanges made from two threads never share a buffer.

    A training step exchanges tens of MB; in freshly allocated memory every 4 KiB page
    faults on first touch, which costs more than the copy itself (a third of a CPU step
    of 26 tables on 2 ranks). Only ``exchange_pieces`` hands out views of them.
    """

    KEPT_BYTES = 128 * 2**20

    def __init__(self) -> None:
        self._kept: dict[tuple[str, torch.device], torch.Tensor] = {}

    def buffer(self, purpose: str, size: int, device: torch.device) -> torch.Tensor:
        """A uint8 buffer of ``size`` bytes for ``purpose``, valid until the next call for it."""
        if size > self.KEPT_BYTES:
            return torch.empty(size, dtype=torch.uint8, device=device)
        kept = self._kept.get((purpose, device))
        if kept is None or kept.numel() < size:
            kept = torch.empty(size, dtype=torch.uint8, device=device)
            self._kept[(purpose, device)] = kept
        return kept[:size]


_workspace = _Workspace()


def _byte_pieces(
    received: torch.Tensor,
    blocks: int,
    row_bytes: list[int],
    counts: list[list[int]],
    own: tuple[int, list[torch.Tensor]] | None = None,
) -> list[list[torch.Tensor]]:
    """Bytes laid out rank by rank, block by block, cut into each block's piece from each rank.

    With ``own = (rank, pieces)``, that rank's rows are not in ``received`` but in ``pieces``
    (one per block).
    """
    parts: list[list[torch.Tensor]] = [[] for _ in range(blocks)]
    offset = 0
    for r, per_rank in enumerate(counts):
        for b, count in enumerate(per_rank):
            if own is not None and r == own[0]:
                parts[b].append(own[1][b])
                continue
            length = count * row_bytes[b]
            parts[b].append(received[offset : offset + length])
            offset += length
    return parts


def _typed(piece: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bytes as rows of ``like``'s dtype and row shape; a piece not aligned for that dtype is copied first."""
    if piece.storage_offset() % like.element_size():
        piece = piece.clone()
    return piece.view(like.dtype).reshape(-1, *like.shape[1:])


def _received_pieces(
    received: torch.Tensor,
    like: Sequence[torch.Tensor],
    row_bytes: list[int],
    counts: list[list[int]],
    rank: int,
    own: list[torch.Tensor],
) -> list[list[torch.Tensor]]:
    parts = _byte_pieces(received, len(like), row_bytes, counts, (rank, own))
    return [[_typed(piece, block) for piece in pieces] for block, pieces in zip(like, parts)]


def _unpack(
    received: torch.Tensor, like: Sequence[torch.Tensor], row_bytes: list[int], counts: list[list[int]]
) -> list[torch.Tensor]:
    """Split bytes laid out rank by rank, block by block, into one tensor per block (a view of
    ``received`` when the block lies whole at its start, else a copy, which starts at offset 0 and so
    is aligned for any dtype)."""
    return [
        _joined_bytes(pieces).view(block.dtype).reshape(-1, *block.shape[1:])
        for block, pieces in zip(like, _byte_pieces(received, len(like), row_bytes, counts))
    ]


def _joined_bytes(pieces: list[torch.Tensor]) -> torch.Tensor:
    if pieces[0].storage_offset() == 0:
        if all(b.storage_offset() == a.storage_offset() + a.numel() for a, b in zip(pieces, pieces[1:])):
            return pieces[0].as_strided((sum(piece.numel() for piece in pieces),), (1,), 0)
    return torch.cat(pieces)


@dataclass
class Routing:
    """Ids of several tables grouped by owner rank, and the counts swapped with every rank.

    ``orders[t]`` sorts table t's ids by owner; ``send_counts[r][t]`` of them go to rank
    r and ``recv_counts[r][t]`` ids of table t arrive from rank r. ``flags`` are the
    per-table integers every rank sent along (see ``route``), as ``received_flags[r][t]``.
    """

    orders: list[torch.Tensor | None]
    send_counts: list[list[int]]
    recv_counts: list[list[int]]
    received_flags: list[list[int]]
    group: dist.ProcessGroup | None

    def sources(self, table: int) -> int:
        """How many ranks sent ids of ``table`` to this one."""
        return sum(1 for per_rank in self.recv_counts if per_rank[table] > 0)

    def by_owner(self, table: int, values: torch.Tensor) -> torch.Tensor:
        """``values`` of table ``table``'s ids, in the owner order of the sent ids."""
        order = self.orders[table]
        return values if order is None else values.index_select(0, order)

    def forward(self, blocks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Send per-id blocks (rows in owner order) to the owners, in one exchange.

        ``blocks`` holds one block per table, or several: block ``b`` belongs to table
        ``b % tables`` (ids of every table, then gradients of every table, say).
        """
        return exchange(
            blocks, _tiled(self.send_counts, len(blocks)), _tiled(self.recv_counts, len(blocks)), self.group
        )

    def forward_pieces(self, blocks: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
        """``forward``, each block received in pieces (see ``exchange_pieces``: valid until the next exchange)."""
        return exchange_pieces(
            blocks, _tiled(self.send_counts, len(blocks)), _tiled(self.recv_counts, len(blocks)), self.group
        )

    def backward(self, answers: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Return the owners' per-received-id answers (blocks as in ``forward``) to the ranks that asked."""
        return exchange(
            answers, _tiled(self.recv_counts, len(answers)), _tiled(self.send_counts, len(answers)), self.group
        )

    def backward_pieces(self, answers: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
        """``backward``, each block received in pieces (see ``exchange_pieces``: valid until the next exchange)."""
        return exchange_pieces(
            answers, _tiled(self.recv_counts, len(answers)), _tiled(self.send_counts, len(answers)), self.group
        )


def _tiled(counts: list[list[int]], blocks: int) -> list[list[int]]:
    """Per-rank counts of ``blocks`` blocks, block ``b`` counted like table ``b % tables``."""
    tables = len(counts[0]) if counts else 0
    if blocks == tables:
        return counts
    if tables == 0 or blocks % tables:
        raise ValueError(f"{blocks} blocks do not divide among {tables} tables")
    return [row * (blocks // tables) for row in counts]


def _owner_order(ids: torch.Tensor, world_size: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The order that sorts ``ids`` by owner rank (None: already sorted), and how many each rank owns."""
    if world_size == 1:
        return None, torch.tensor([ids.numel()], dtype=torch.int64, device=ids.device)
    owners = owner_rank(ids, world_size)
    counts = torch.bincount(owners, minlength=world_size)
    if bool((owners[1:] >= owners[:-1]).all()):  # already in owner order (a gradient of a lookup's ids)
        return None, counts
    return torch.argsort(owners, stable=True), counts


def route(
    ids: Sequence[torch.Tensor],
    group: dist.ProcessGroup | None,
    error: Exception | None = None,
    flags: Sequence[int] | None = None,
    owner_counts: Sequence[torch.Tensor | None] | None = None,
) -> tuple[Routing, list[torch.Tensor]]:
    """Group each table's ids by owner and swap the counts, in one collective for all tables.

    Returns the routing and each table's ids in owner order (what ``Routing.forward``
    sends); a tensor given for several tables (the same object: equal ids) is grouped once.
    ``flags`` (one int >= 0 per table) reach every rank with the counts. ``owner_counts[t]``,
    where given, says table t's ids are in owner order already, that many per rank: they are
    not hashed again. With ``error`` (this rank's input was bad; ``ids`` should then be
    empty) the other ranks are told and ``error`` is raised.
    """
    world_size, _ = group_size_and_rank(group)
    orders: list[torch.Tensor | None] = []
    sorted_ids, counts = [], []
    done: dict[int, int] = {}  # a tensor given for several tables (the same object) is routed once
    for t, table_ids in enumerate(ids):
        first = done.setdefault(id(table_ids), t)
        if first != t:
            orders.append(orders[first])
            sorted_ids.append(sorted_ids[first])
            counts.append(counts[first])
            continue
        known = owner_counts[t] if owner_counts is not None else None
        order, table_counts = (None, known) if known is not None else _owner_order(table_ids, world_size)
        orders.append(order)
        sorted_ids.append(table_ids if order is None else table_ids.index_select(0, order))
        counts.append(table_counts)
    return _swapped(orders, counts, group, error, flags), sorted_ids


def route_grouped(
    counts: Sequence[torch.Tensor],
    group: dist.ProcessGroup | None,
    error: Exception | None = None,
    flags: Sequence[int] | None = None,
) -> Routing:
    """``route`` of ids already in owner order (``recis.ops.unique_by_owner``): rank r owns
    ``counts[t][r]`` of table t's. One collective for all tables, as ``route``."""
    return _swapped([None] * len(counts), counts, group, error, flags)


def _swapped(
    orders: list[torch.Tensor | None],
    counts: Sequence[torch.Tensor],
    group: dist.ProcessGroup | None,
    error: Exception | None,
    flags: Sequence[int] | None,
) -> Routing:
    """The routing of tables whose ids go ``counts[t][r]`` to rank r, once the counts (and flags) are swapped."""
    world_size, _ = group_size_and_rank(group)
    tables = len(counts)
    flags = list(flags) if flags is not None else [0] * tables
    if tables:
        send = torch.stack([*counts, *(torch.full_like(counts[0], flag) for flag in flags)], dim=1)
    else:
        send = torch.zeros((world_size, 0), dtype=torch.int64)
    received = swap_sizes(send, group, error).tolist()
    sent = send.tolist()
    return Routing(
        orders,
        [row[:tables] for row in sent],
        [row[:tables] for row in received],
        [row[tables:] for row in received],
        group,
    )


def all_gather_blocks(blocks: Sequence[torch.Tensor], group: dist.ProcessGroup | None) -> list[torch.Tensor]:
    """Every rank's blocks, concatenated rank 0 first: one gather of counts, one of bytes."""
    world_size, _ = group_size_and_rank(group)
    if world_size == 1:
        return list(blocks)
    device = blocks[0].device
    counts = torch.tensor([block.shape[0] for block in blocks], dtype=torch.int64, device=device)
    gathered_counts = [torch.empty_like(counts) for _ in range(world_size)]
    dist.all_gather(gathered_counts, counts, group=group)
    per_rank = [c.tolist() for c in gathered_counts]
    row_bytes = [_row_bytes(block) for block in blocks]
    sizes = [sum(n * row_bytes[b] for b, n in enumerate(counts_of_rank)) for counts_of_rank in per_rank]
    longest = max(sizes)
    payload = torch.zeros(longest, dtype=torch.uint8, device=device)
    mine = torch.cat([_as_bytes(block) for block in blocks])
    payload[: mine.numel()] = mine
    gathered = [torch.empty_like(payload) for _ in range(world_size)]
    dist.all_gather(gathered, payload, group=group)
    traffic.bytes_sent += (world_size - 1) * longest
    received = torch.cat([part[:size] for part, size in zip(gathered, sizes)])
    return _unpack(received, blocks, row_bytes, per_rank)
