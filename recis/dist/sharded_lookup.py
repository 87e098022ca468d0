"""Grouped sharded lookup: the rows of many ShardedHashTables in one exchange of ids and one of rows.

    input_dist   each table's ids, deduplicated and grouped by owner; ONE swap of counts
                 and ONE all-to-all of ids for all tables
    lookup       each owner finds (in training: inserts) and gathers the rows asked of it
    output_dist  ONE all-to-all of rows back for all tables; each table's rows are
                 expanded to its batch, differentiably

So a forward over 26 tables makes three collective calls, as over one, and a world of
one makes none. Backward keeps each table's gradient local, keyed by id (see
``ShardedHashTable``): accumulation costs no communication.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from recis.dist.exchange import PeerError, Routing, route_grouped
from recis.nn.hashtable_hook import AdmitHook
from recis.ops import unique_by_owner

if TYPE_CHECKING:
    from recis.dist.sharded_hashtable import ShardedHashTable


@dataclass
class _Request:
    """One table's part of a lookup: its distinct ids in owner order, and where each batch entry reads."""

    table: ShardedHashTable
    shape: torch.Size
    ids: torch.Tensor  # distinct, in owner order (first appearance within an owner's)
    inverse: torch.Tensor  # batch position -> index into ids
    owner_counts: torch.Tensor  # owner_counts[r]: how many of ids rank r owns


def hook_code(hook: AdmitHook | None) -> int:
    """A number equal on every rank for equal admit hooks (0: none), sent along with the sizes."""
    return 0 if hook is None else 1 + zlib.crc32(str(hook).encode()) % (2**30)


def input_dist(
    tables: Sequence[ShardedHashTable],
    ids: Sequence[torch.Tensor],
    admit_hooks: Sequence[AdmitHook | None] | None = None,
    error: Exception | None = None,
) -> tuple[Routing, list, list]:
    """Send each table's distinct ids to their owners; returns the routing, the requests and the ids received.

    Bad ids on any rank make every rank raise (the bad rank its own error, the others ``PeerError``);
    so do admit hooks that differ across ranks, before anything changes. A caller whose own
    input was bad passes it as ``error``: this rank raises it, the others ``PeerError``.
    """
    if len(tables) != len(ids):
        raise ValueError(f"sharded_lookup: {len(tables)} tables but {len(ids)} id tensors")
    group = _common_group(tables)
    hooks = list(admit_hooks) if admit_hooks is not None else [None] * len(tables)
    if error is None:
        try:
            if len(hooks) != len(tables) or not all(hook is None or isinstance(hook, AdmitHook) for hook in hooks):
                raise TypeError(f"sharded_lookup: admit_hooks must be one AdmitHook or None per table, got {hooks!r}")
            flat = [table.checked_ids(table_ids).reshape(-1) for table, table_ids in zip(tables, ids)]
        except (TypeError, ValueError) as bad_input:
            error = bad_input
    if error is not None:  # take part with no ids, so that every rank learns of it and raises
        hooks = [None] * len(tables)
        flat = [torch.empty(0, dtype=torch.int64, device=table.device) for table in tables]
    uniques = _grouped_once_per_tensor(ids, flat, tables[0].world_size)
    modes = [_mode(table, hook) for table, hook in zip(tables, hooks)]
    routing = route_grouped([counts for _, _, counts in uniques], group, error, flags=modes)
    _require_same_modes(tables, routing)
    requests = [
        _Request(table, table_ids.shape, unique, inverse, counts)
        for table, table_ids, (unique, inverse, counts) in zip(tables, ids, uniques)
    ]
    return routing, requests, routing.forward([request.ids for request in requests])


def _grouped_once_per_tensor(
    given: Sequence[torch.Tensor], flat: list[torch.Tensor], world_size: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each table's distinct ids in owner order, the inverse index and the per-rank counts
    (``recis.ops.unique_by_owner``), made once for tables given the same tensor object (equal
    ids: several tables looked up with one input), and shared."""
    done: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    grouped = []
    for table_given, table_flat in zip(given, flat):
        if id(table_given) not in done:
            done[id(table_given)] = unique_by_owner(table_flat, world_size)
        grouped.append(done[id(table_given)])
    return grouped


def _mode(table: ShardedHashTable, hook: AdmitHook | None) -> int:
    """The admit hook and training mode of a table's lookup, as a number every rank sends along:
    they decide what owners do and whether rows come back with presence flags."""
    return 2 * hook_code(hook) + int(table.training)


def _require_same_modes(tables: Sequence[ShardedHashTable], routing: Routing) -> None:
    for t, table in enumerate(tables):
        modes = {flags[t] for flags in routing.received_flags}
        if len({mode // 2 for mode in modes}) > 1:
            raise ValueError(f"sharded_lookup: the ranks passed different admit hooks for {table.describe()}")
        if len(modes) > 1:
            raise ValueError(
                f"sharded_lookup: {table.describe()} is in training mode on some ranks and in eval mode on others; "
                "call train() or eval() on every rank alike"
            )


def lookup(
    tables: Sequence[ShardedHashTable],
    asked: Sequence[torch.Tensor],
    admit_hooks: Sequence[AdmitHook | None] | None = None,
) -> list[torch.Tensor]:
    """At each owner: the rows of the ids other ranks asked for, in the order asked.

    A table with a capacity can refuse a lookup at one owner (no room); then every rank
    learns it through one small all-reduce (made only for such tables) and raises: the
    refusing owner its ``ValueError`` (its table unchanged), the others ``PeerError``.
    Other owners may have inserted their new ids by then, as a lookup would.
    """
    hooks = list(admit_hooks) if admit_hooks is not None else [None] * len(tables)
    if not any(table.capacity is not None for table in tables):
        return [_answer(table, table_asked, hook) for table, table_asked, hook in zip(tables, asked, hooks)]
    answers, refusal = [], None
    for table, table_asked, hook in zip(tables, asked, hooks):
        try:
            answers.append(_answer(table, table_asked, hook) if refusal is None else None)
        except ValueError as error:
            refusal = error
    _raise_on_every_rank_if_refused(refusal, tables[0])
    return answers


def _answer(table: ShardedHashTable, asked: torch.Tensor, hook: AdmitHook | None) -> torch.Tensor:
    """The rows an owner sends back; for a lookup that may miss, with a last column: 1 where the id has a row."""
    values, present = table.serve(asked, hook)
    return values if present is None else torch.cat([values, present.to(values.dtype).unsqueeze(1)], dim=1)


def _raise_on_every_rank_if_refused(refusal: ValueError | None, table: ShardedHashTable) -> None:
    refused = torch.tensor([int(refusal is not None)], dtype=torch.int64, device=table.device)
    if table.world_size > 1:
        dist.all_reduce(refused, op=dist.ReduceOp.MAX, group=table.process_group)
    if refusal is not None:
        raise refusal
    if int(refused):
        raise PeerError("another rank refused its part of this lookup (see its error); nothing was returned")


def output_dist(routing: Routing, requests: Sequence[_Request], answers: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Bring the rows back and expand each table's to its batch: ``ids.shape + embedding_shape``.

    Each table's rows are read where they arrived, one piece per rank (``Routing.backward_pieces``).
    """
    rows = routing.backward_pieces(answers)
    outputs = []
    for request, table_rows in zip(requests, rows):
        table = request.table
        present = None
        if table_rows[0].shape[1] > table.embedding_dim:  # the lookup may miss: presence flags came back
            flagged = torch.cat(table_rows)
            table_rows, present = flagged[:, :-1], flagged[:, -1] > 0.5
        receiver = table.gradient_receiver(request.ids, present, request.owner_counts)
        expanded = table.differentiable(table_rows, request.inverse, receiver)
        outputs.append(expanded.reshape(*request.shape, *table.embedding_shape))
    return outputs


def sharded_lookup(
    tables: Sequence[ShardedHashTable],
    ids: Sequence[torch.Tensor],
    admit_hooks: Sequence[AdmitHook | None] | None = None,
    *,
    error: Exception | None = None,
) -> list[torch.Tensor]:
    """``[table(ids, hook) for table, ids, hook in zip(tables, ids, admit_hooks)]`` in one exchange
    of ids and one of rows. ``error``: this rank's input was bad; every rank raises (see ``input_dist``).

    Collective: every rank of the tables' process group calls it with the same tables and
    admit hooks, in the same order (each with its own ids).
    """
    routing, requests, asked = input_dist(tables, ids, admit_hooks, error)
    answers = lookup(tables, asked, admit_hooks)
    return output_dist(routing, requests, answers)


def _common_group(tables: Sequence[ShardedHashTable]):  # noqa: ANN202 (a ProcessGroup or None)
    if not tables:
        raise ValueError("sharded_lookup needs at least one table")
    groups = {id(table.process_group) for table in tables}
    if len(groups) != 1:
        raise ValueError("sharded_lookup: the tables belong to different process groups")
    return tables[0].process_group
