"""The union of every rank's lookup: how bounded replicas stay identical.

A replicated ``HashTable`` under ``ShardedOptimizer`` holds a full copy of its rows on
every rank. When its lifecycle decides which ids hold rows (a capacity, a filter, an
admit hook), each rank deciding on its own batch would evict, admit and filter
differently. Instead every training lookup shares its distinct ids: each rank then
inserts, admits, evicts and counts the same union, in the same order, and the replicas
stay identical (ids, rows, metadata, counters), equal to one process that looked up the
concatenated batch. Two collective calls per lookup: a gather of (count, admit hook)
and one of the ids.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from recis.dist.exchange import PeerError, group_size_and_rank, traffic
from recis.dist.sharded_lookup import hook_code
from recis.nn.hashtable_hook import AdmitHook

_FAILED = -1


class LookupUnion:
    """``union(unique_ids, admit_hook, error)``: every rank's distinct ids, sorted (a collective).

    With ``error`` (this rank's input was bad) this rank raises it and the others raise
    ``PeerError``; admit hooks that differ across ranks make every rank raise ``ValueError``.
    Nothing changes on any rank before those checks.
    """

    def __init__(self, process_group: dist.ProcessGroup | None) -> None:
        self.process_group = process_group
        self.world_size, self.rank = group_size_and_rank(process_group)

    def __call__(
        self, unique_ids: torch.Tensor, admit_hook: AdmitHook | None, error: Exception | None = None
    ) -> torch.Tensor:
        if self.world_size == 1:
            if error is not None:
                raise error
            return unique_ids
        counts = self._gather_counts(unique_ids, admit_hook, error)
        longest = max(counts)
        padded = torch.zeros(longest, dtype=torch.int64, device=unique_ids.device)
        padded[: unique_ids.numel()] = unique_ids
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded, group=self.process_group)
        traffic.bytes_sent += (self.world_size - 1) * longest * 8
        return torch.unique(torch.cat([part[:count] for part, count in zip(gathered, counts)]))

    def _gather_counts(
        self, unique_ids: torch.Tensor, admit_hook: AdmitHook | None, error: Exception | None
    ) -> list[int]:
        """Every rank's id count, after checking that no rank failed and that the admit hooks agree."""
        mine = [_FAILED, 0] if error is not None else [unique_ids.numel(), hook_code(admit_hook)]
        header = torch.tensor(mine, dtype=torch.int64, device=unique_ids.device)
        headers = [torch.empty_like(header) for _ in range(self.world_size)]
        dist.all_gather(headers, header, group=self.process_group)
        if error is not None:
            raise error
        counts, codes = zip(*(h.tolist() for h in headers))
        failed = [rank for rank, count in enumerate(counts) if count == _FAILED]
        if failed:
            raise PeerError(f"rank {failed[0]} of the process group failed in the same lookup (see its error)")
        if len(set(codes)) > 1:
            raise ValueError(
                f"a replicated table's lookup got different admit hooks across ranks (rank {self.rank}: {admit_hook}); "
                "every rank must pass the same admit_hook"
            )
        return list(counts)
