"""Grouped sharded lookup: the rows of many ShardedHashTables in one exchange of ids and one of rows.

    input_dist   each table's ids, deduplicated and sorted by owner; ONE swap of counts
                 and ONE all-to-all of ids for all tables
    lookup       each owner finds (in training: inserts) and gathers the rows asked of it
    output_dist  ONE all-to-all of rows back for all tables; each table's rows are
                 expanded to its batch, differentiably

So a forward over 26 tables makes three collective calls, as over one, and a world of
one makes none. Backward keeps each table's gradient local, keyed by id (see
``ShardedHashTable``): accumulation costs no communication.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from recis.dist.exchange import Routing, route

if TYPE_CHECKING:
    from recis.dist.sharded_hashtable import ShardedHashTable


@dataclass
class _Request:
    """One table's part of a lookup: its distinct ids in owner order, and where each batch entry reads."""

    table: ShardedHashTable
    shape: torch.Size
    ids: torch.Tensor  # distinct, in owner order
    inverse: torch.Tensor  # batch position -> index into ids


def input_dist(tables: Sequence[ShardedHashTable], ids: Sequence[torch.Tensor]) -> tuple[Routing, list, list]:
    """Send each table's distinct ids to their owners; returns the routing, the requests and the ids received.

    Bad ids on any rank make every rank raise (the bad rank its own error, the others ``PeerError``).
    """
    if len(tables) != len(ids):
        raise ValueError(f"sharded_lookup: {len(tables)} tables but {len(ids)} id tensors")
    group = _common_group(tables)
    error, flat = None, []
    try:
        flat = [table.checked_ids(table_ids).reshape(-1) for table, table_ids in zip(tables, ids)]
    except (TypeError, ValueError) as bad_input:
        error = bad_input
        flat = [torch.empty(0, dtype=torch.int64, device=table.device) for table in tables]
    uniques = [torch.unique(table_ids, return_inverse=True) for table_ids in flat]
    routing, sorted_ids = route([unique for unique, _ in uniques], group, error)
    requests = []
    for t, (table, (_, inverse)) in enumerate(zip(tables, uniques)):
        order = routing.orders[t]
        if order is not None:  # batch entries read the sorted position of their id
            position = torch.empty_like(order)
            position[order] = torch.arange(order.numel(), device=order.device)
            inverse = position.index_select(0, inverse)
        requests.append(_Request(table, ids[t].shape, sorted_ids[t], inverse))
    return routing, requests, routing.forward(sorted_ids)


def lookup(tables: Sequence[ShardedHashTable], asked: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """At each owner: the rows of the ids other ranks asked for, in the order asked."""
    return [table.serve(table_asked) for table, table_asked in zip(tables, asked)]


def output_dist(routing: Routing, requests: Sequence[_Request], answers: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Bring the rows back and expand each table's to its batch: ``ids.shape + embedding_shape``."""
    rows = routing.backward(answers)
    outputs = []
    for request, table_rows in zip(requests, rows):
        table = request.table
        expanded = table.differentiable(table_rows, request.inverse, table.gradient_receiver(request.ids))
        outputs.append(expanded.reshape(*request.shape, *table.embedding_shape))
    return outputs


def sharded_lookup(tables: Sequence[ShardedHashTable], ids: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``[table(ids) for table, ids in zip(tables, ids)]`` in one exchange of ids and one of rows.

    Collective: every rank of the tables' process group calls it with the same tables,
    in the same order (each with its own ids).
    """
    routing, requests, asked = input_dist(tables, ids)
    answers = lookup(tables, asked)
    return output_dist(routing, requests, answers)


def _common_group(tables: Sequence[ShardedHashTable]):  # noqa: ANN202 (a ProcessGroup or None)
    if not tables:
        raise ValueError("sharded_lookup needs at least one table")
    groups = {id(table.process_group) for table in tables}
    if len(groups) != 1:
        raise ValueError("sharded_lookup: the tables belong to different process groups")
    return tables[0].process_group
