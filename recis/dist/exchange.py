"""All-to-all routing of ids (and rows) to their owner ranks, and back.

Every exchange first swaps sizes (one small all-to-all), then the payloads with
``torch.distributed.all_to_all_single`` (gloo on CPU, NCCL on GPU). The size swap also
carries failure: a rank whose input is bad sends -1 sizes before it raises, so every
other rank raises a clear error naming it instead of waiting in a collective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from recis.dist.partition import owner_rank

_FAILED = -1


class PeerError(RuntimeError):
    """Another rank failed in the same collective call."""


class Traffic:
    """Bytes this process sent to other ranks through the row exchanges."""

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


def all_to_all_rows(
    send: torch.Tensor, send_sizes: list[int], recv_sizes: list[int], group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Send ``send[...]`` in consecutive blocks of ``send_sizes`` rows to ranks 0, 1, ..."""
    received = send.new_empty((sum(recv_sizes), *send.shape[1:]))
    dist.all_to_all_single(received, send.contiguous(), recv_sizes, send_sizes, group=group)
    _, rank = group_size_and_rank(group)
    row_bytes = send[:1].numel() * send.element_size()
    traffic.bytes_sent += (sum(send_sizes) - send_sizes[rank]) * row_bytes
    return received


def all_gather_rows(local: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Concatenate every rank's ``local`` rows (rank 0's first); ranks may hold different counts."""
    world_size, _ = group_size_and_rank(group)
    count = torch.tensor([local.shape[0]], dtype=torch.int64, device=local.device)
    counts = [torch.zeros_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count, group=group)
    longest = max(int(c) for c in counts)
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[: local.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded, group=group)
    traffic.bytes_sent += (world_size - 1) * padded.numel() * padded.element_size()
    return torch.cat([part[: int(c)] for part, c in zip(gathered, counts)])


@dataclass
class Routing:
    """Where each of a rank's ids went, so answers can come back in the original order.

    ``order`` sorts this rank's ids by owner; ``send_sizes[r]`` of them go to rank r and
    ``recv_sizes[r]`` ids arrive from rank r.
    """

    order: torch.Tensor
    send_sizes: list[int]
    recv_sizes: list[int]
    group: dist.ProcessGroup | None

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        """Send per-id ``values`` (in this rank's original order) to the owners."""
        return all_to_all_rows(values.index_select(0, self.order), self.send_sizes, self.recv_sizes, self.group)

    def backward(self, answers: torch.Tensor) -> torch.Tensor:
        """Return the owners' per-received-id ``answers``; result is in this rank's original order."""
        back = all_to_all_rows(answers, self.recv_sizes, self.send_sizes, self.group)
        result = torch.empty_like(back)
        result[self.order] = back
        return result


def route_to_owners(
    ids: torch.Tensor, group: dist.ProcessGroup | None, error: Exception | None = None
) -> tuple[Routing, torch.Tensor]:
    """Send every id to its owner: returns the routing and the ids this rank received.

    With ``error`` (this rank's input was bad; ``ids`` should then be empty), the others
    are told and ``error`` is raised.
    """
    world_size, _ = group_size_and_rank(group)
    owners = owner_rank(ids, world_size)
    order = torch.argsort(owners, stable=True)
    send_sizes = torch.bincount(owners, minlength=world_size).reshape(world_size, 1)
    recv_sizes = swap_sizes(send_sizes, group, error)
    routing = Routing(order, send_sizes.flatten().tolist(), recv_sizes.flatten().tolist(), group)
    return routing, routing.forward(ids)
