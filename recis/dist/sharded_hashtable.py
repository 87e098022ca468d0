"""ShardedHashTable: a HashTable whose rows are hash-partitioned across ranks.

Each rank stores only the ids it owns (``owner_rank(id, world_size)``); its inherited
storage (``weight``, slots, ``len``) is that local shard. ``forward`` is collective,
a ``sharded_lookup`` of one table:

    unique ids -> input_dist (sizes, then ids, to owners) -> lookup at owners
    (find-or-insert and gather) -> output_dist (rows back) -> expand by the inverse index

Backward keeps the gradient local, keyed by id; ``recis.dist.ShardedOptimizer`` sends
it to the owners at the update, so gradient accumulation costs no communication.
A new id's first row depends only on (seed, id), so it equals what a one-process
``HashTable`` with the same seed creates.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from recis.dist.agreement import require_same_config
from recis.dist.exchange import PeerError, all_gather_blocks, group_size_and_rank, route
from recis.dist.partition import owner_rank
from recis.dist.sharded_lookup import sharded_lookup
from recis.nn.functional import GradReceiver
from recis.nn.gradient_buffer import GradientBuffer
from recis.nn.hashtable_hook import AdmitHook
from recis.nn.initializers import Initializer
from recis.nn.modules.hashtable import HashTable
from recis.store import RowStore


def _describe_initializer(initializer: Initializer | None) -> str:
    """A description equal on every rank for equal initializers (no memory addresses)."""
    if initializer is None:
        return "default"
    text = repr(initializer)
    return type(initializer).__qualname__ if " at 0x" in text else text


def _add_present(buffer: GradientBuffer, unique_ids: torch.Tensor, present: torch.Tensor, grad: torch.Tensor) -> None:
    buffer.add(unique_ids[present], grad[present], distinct=True)


@dataclass
class _ServedRows:
    """The ids an owner served in a training lookup, and their rows in the store of the time
    (held weakly: a table moved to another device or dtype frees its old store)."""

    ids: torch.Tensor
    rows: torch.Tensor
    store: weakref.ref[RowStore]
    generation: int
    replacements: int

    @classmethod
    def of(cls, ids: torch.Tensor, rows: torch.Tensor, store: RowStore) -> _ServedRows:
        return cls(ids, rows, weakref.ref(store), store.generation, store.replacements)

    def still_rows_of(self, store: RowStore) -> bool:
        """Whether ``rows`` still hold ``ids`` in ``store``: no row renumbered or replaced since."""
        same = self.store() is store
        return same and (store.generation, store.replacements) == (self.generation, self.replacements)


class ShardedHashTable(HashTable):
    """A ``HashTable`` sharded over the ranks of ``process_group`` (default: the world).

    Collective calls (every rank must make them, in the same order): construction,
    ``forward``, ``lookup``, ``assign``, ``ids``, ``num_ids``. ``len(table)``,
    ``weight``, ``local_ids()`` and ``state_dict()`` are local: the rows this rank owns.
    ``load_state_dict`` accepts any table's state (a one-process table's included) and
    keeps the ids this rank owns. The gradient is kept by id (``grad_by_id``) until
    ``ShardedOptimizer`` sends it to the owners.

    ``stats()`` counts this rank's rows and the lookups it served; an unbounded table counts an
    id once per rank that asked for it, a bounded one once per lookup.

    Bounded tables: each owner admits, evicts and filters among its own rows, so
    ``capacity`` is per rank (the table holds at most ``world_size * capacity`` rows).
    An owner counts a sighting once per lookup however many ranks asked, as one process
    does for the whole batch: admission and filters give the table one process would
    give with the concatenated batch. A gradient that reaches an owner for an id
    without a row (not admitted) is dropped, as it is in one process.
    """

    def __init__(
        self,
        embedding_shape: int | Sequence[int],
        *args: Any,
        process_group: dist.ProcessGroup | None = None,
        **kwargs: Any,
    ) -> None:
        """``HashTable``'s arguments (RecIS's positional order included), and the process group."""
        super().__init__(embedding_shape, *args, **kwargs)
        self._served: _ServedRows | None = None
        self._lookup_owners: tuple[torch.Tensor, torch.Tensor] | None = None  # see owner_counts_of
        self.process_group = process_group
        self.world_size, self.rank = group_size_and_rank(process_group)
        require_same_config(self.describe(), self._config(), process_group)

    def _config(self) -> dict[str, Any]:
        """What must agree across ranks."""
        return {
            "embedding_shape": list(self.embedding_shape),
            "dtype": str(self.dtype),
            "seed": self.seed,
            "name": self.name,
            "initializer": _describe_initializer(self.initializer()),
            "grad_reduce_by": self.grad_reduce_by,
            "children": list(self.children_info.names),
            "coalesced": self.children_info.coalesced,
            "requires_optimizer_state": self.requires_optimizer_state,
            **self.lifecycle.config(),
        }

    def describe(self) -> str:
        return f"Sharded{super().describe()}"

    # ------------------------------------------------------------------ collective reads
    def forward(self, ids: torch.Tensor, admit_hook: AdmitHook | None = None) -> torch.Tensor:
        return sharded_lookup([self], [ids], [admit_hook])[0]

    def serve(
        self, asked: torch.Tensor, admit_hook: AdmitHook | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The owner's part of a lookup: rows of the ids asked of it, repeats allowed (several ranks
        may ask for one id); absent ids are inserted in training mode (as the lifecycle admits them),
        else read their initial value (zeros under an admit hook). When the lookup ``may_miss``, also
        which ids have a row (the others get no gradient), else None."""
        may_miss = self.may_miss(admit_hook)
        if not may_miss and not self.lifecycle.columns:  # unbounded: no deduplication needed
            rows = self.rows_of_lookup(asked)
            self._served = _ServedRows.of(asked, rows, self.store)
            return self.store.gather(rows), None
        unique_ids, inverse = torch.unique(asked, return_inverse=True)
        rows, values = self.unique_rows(unique_ids, admit_hook)
        present = (rows >= 0).index_select(0, inverse) if may_miss else None
        return values.index_select(0, inverse), present

    def rows_to_update(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``HashTable.rows_to_update``; when ``ids`` are exactly the ids this owner served in the last
        training lookup (the gradient of one lookup comes back in the order its ids were asked), the
        rows found then, without probing the id map again."""
        served, self._served = self._served, None
        if served is not None and served.still_rows_of(self.store) and torch.equal(served.ids, ids):
            return served.rows, torch.ones(ids.numel(), dtype=torch.bool, device=ids.device)
        return super().rows_to_update(ids)

    def gradient_receiver(
        self, unique_ids: torch.Tensor, present: torch.Tensor | None = None, owner_counts: torch.Tensor | None = None
    ) -> GradReceiver:
        """Where backward hands the gradient of the distinct ``unique_ids`` of one lookup: kept by id;
        ids without a row at the lookup (``present`` False) get none, as in a one-process table.
        ``owner_counts``: the ids are in owner order, ``owner_counts[r]`` of them owned by rank r
        (``recis.ops.unique_by_owner``); kept for ``owner_counts_of``. Only a lookup that records
        gradients replaces them: an evaluation between backward and step leaves them as they are."""
        if torch.is_grad_enabled():
            self._lookup_owners = None if owner_counts is None else (unique_ids, owner_counts)
        if present is None:
            return partial(self.grad_buffer.add, unique_ids, distinct=True)
        return partial(_add_present, self.grad_buffer, unique_ids, present)

    def owner_counts_of(self, ids: torch.Tensor) -> torch.Tensor | None:
        """How many of ``ids`` each rank owns, known without hashing them when ``ids`` is the very
        tensor the last ``gradient_receiver`` got with its ``owner_counts`` (the gradient of one
        lookup comes back keyed by it); else None."""
        known = self._lookup_owners
        return known[1] if known is not None and known[0] is ids else None

    @torch.no_grad()
    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of present ids; if any rank asked for an absent id, every rank raises ``KeyError``."""
        flat, error = self._ids_or_error(ids)
        routing, sorted_ids = route([flat], self.process_group, error)
        (asked,) = routing.forward(sorted_ids)
        rows = self.store.find(asked)
        found = torch.zeros((rows.numel(), self.embedding_dim + 1), dtype=torch.float32, device=self.device)
        found[:, 0] = (rows >= 0).float()
        found[rows >= 0, 1:] = self.store.gather(rows[rows >= 0]).float()
        (answers,) = routing.backward([found])
        in_batch_order = torch.empty_like(answers)
        in_batch_order[routing.orders[0] if routing.orders[0] is not None else slice(None)] = answers
        absent = in_batch_order[:, 0] == 0
        self._raise_if_any_rank_missed(flat, absent)
        return in_batch_order[:, 1:].to(self.dtype).reshape(*ids.shape, *self.embedding_shape)

    def _raise_if_any_rank_missed(self, flat_ids: torch.Tensor, absent: torch.Tensor) -> None:
        missed = torch.tensor([int(absent.sum())], dtype=torch.int64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(missed, group=self.process_group)
        if int(absent.sum()):
            raise KeyError(f"{self.describe()}: id {int(flat_ids[absent][0])} is not in the table")
        if int(missed):
            raise KeyError(f"{self.describe()}: {int(missed)} ids asked for on other ranks are not in the table")

    @torch.no_grad()
    def assign(self, ids: torch.Tensor, values: torch.Tensor) -> None:
        """Insert or overwrite rows at their owners. For an id given by several ranks, the highest rank wins."""
        try:
            flat, values = self.checked_assignment(ids, values)
            error = None
        except (TypeError, ValueError) as bad_input:
            flat, values, error = (
                self._no_ids(),
                torch.empty(0, self.embedding_dim, dtype=self.dtype, device=self.device),
                bad_input,
            )
        routing, sorted_ids = route([flat], self.process_group, error)
        owned_ids, owned_values = routing.forward([sorted_ids[0], routing.by_owner(0, values)])
        self.assign_rows(owned_ids, owned_values)

    def ids(self, child: str | None = None) -> torch.Tensor:
        """Every id of the table (of ``child``), gathered from all ranks (rank 0's first, each in row order)."""
        return all_gather_blocks([super().ids(child)], self.process_group)[0]

    def num_ids(self) -> int:
        """How many ids the whole table holds (collective)."""
        count = torch.tensor([len(self)], dtype=torch.int64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(count, group=self.process_group)
        return int(count)

    # ------------------------------------------------------------------ gradients, kept by id
    def accept_grad(self, ids: torch.Tensor, grad: torch.Tensor) -> None:
        """Add a gradient for ids anywhere in the table; it reaches their owners at the next update."""
        flat_ids, grad = self.checked_gradient(ids, grad)
        self.grad_buffer.add(flat_ids, grad, distinct=False)

    def pending_grad(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Not available: a sharded table's gradient is kept by id, for ``ShardedOptimizer`` (see ``grad_by_id``)."""
        if self.grad_buffer:
            raise RuntimeError(
                f"{self.describe()} keeps its gradient by id until recis.dist.ShardedOptimizer sends it to the "
                "owners; wrap the sparse optimizer in ShardedOptimizer"
            )
        return None

    def grad_by_id(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This rank's gradient since the last update, summed per id (ids anywhere in the table), or None."""
        return self.grad_buffer.summed()

    def restore_grad(self, ids: torch.Tensor, grad: torch.Tensor) -> None:
        self.grad_buffer.clear()
        self.grad_buffer.add(ids.to(self.device), grad.to(self.device), distinct=True)

    def _pending_ids_problem(self, pending_ids: torch.Tensor, ids: torch.Tensor) -> str | None:
        return None  # kept by id: any id of the table

    # ------------------------------------------------------------------ state dict
    def load_rows(
        self,
        ids: torch.Tensor,
        weight: torch.Tensor,
        slots: dict[str, torch.Tensor],
        columns: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Load rows of any ids (a one-process table's, say): keep those this rank owns."""
        owned = (owner_rank(ids.to(self.device), self.world_size) == self.rank).to(ids.device)
        columns = {name: value[owned] for name, value in (columns or {}).items()}
        super().load_rows(ids[owned], weight[owned], {name: value[owned] for name, value in slots.items()}, columns)

    def _renumber_pending(self, moved_from: torch.Tensor, moved_to: torch.Tensor) -> None:
        return None  # kept by id: renumbered rows change nothing

    # ------------------------------------------------------------------ helpers
    def _no_ids(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.int64, device=self.device)

    def _ids_or_error(self, ids: torch.Tensor) -> tuple[torch.Tensor, Exception | None]:
        """Flat int64 ids, or no ids and the error to raise once the other ranks are told."""
        try:
            return self.checked_ids(ids).reshape(-1), None
        except (TypeError, ValueError) as bad_input:
            return self._no_ids(), bad_input


__all__ = ["PeerError", "ShardedHashTable"]
