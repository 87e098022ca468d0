"""ShardedHashTable: a HashTable whose rows are hash-partitioned across ranks.

Each rank stores only the ids it owns (``owner_rank(id, world_size)``); its inherited
storage (``weight``, slots, ``len``) is that local shard. ``forward`` is collective:

    unique ids -> group by owner -> all-to-all (sizes, then ids) -> owners find-or-insert
    and gather -> all-to-all rows back -> expand by the inverse index

Backward keeps the gradient local, keyed by id; ``recis.dist.ShardedOptimizer`` sends
it to the owners at the update, so gradient accumulation costs no communication.
A new id's first row depends only on (seed, id), so it equals what a one-process
``HashTable`` with the same seed creates.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.distributed as dist

from recis.dist.agreement import require_same_config
from recis.dist.exchange import PeerError, all_gather_rows, group_size_and_rank, route_to_owners
from recis.dist.partition import owner_rank
from recis.nn.initializers import Initializer
from recis.nn.modules.hashtable import HashTable
from recis.ops import coalesce_rows


def _describe_initializer(initializer: Initializer | None) -> str:
    """A description equal on every rank for equal initializers (no memory addresses)."""
    if initializer is None:
        return "default"
    text = repr(initializer)
    return type(initializer).__qualname__ if " at 0x" in text else text


class ShardedHashTable(HashTable):
    """A ``HashTable`` sharded over the ranks of ``process_group`` (default: the world).

    Collective calls (every rank must make them, in the same order): construction,
    ``forward``, ``lookup``, ``assign``, ``ids``, ``num_ids``. ``len(table)``,
    ``weight``, ``local_ids()`` and ``state_dict()`` are local: the rows this rank owns.
    ``load_state_dict`` accepts any table's state (a one-process table's included) and
    keeps the ids this rank owns.
    """

    _pending_needs_local_rows = False

    def __init__(
        self,
        embedding_shape: int | Sequence[int],
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        initializer: Initializer | None = None,
        name: str | None = None,
        seed: int = 0,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__(embedding_shape, dtype=dtype, device=device, initializer=initializer, name=name, seed=seed)
        self.process_group = process_group
        self.world_size, self.rank = group_size_and_rank(process_group)
        self._local_grads: list[tuple[torch.Tensor, torch.Tensor]] = []  # (ids, float32 grad), ids maybe remote
        require_same_config(
            self.describe(),
            {
                "embedding_shape": list(self.embedding_shape),
                "dtype": str(dtype),
                "seed": seed,
                "name": name,
                "initializer": _describe_initializer(initializer),
            },
            process_group,
        )

    def describe(self) -> str:
        return f"Sharded{super().describe()}"

    # ------------------------------------------------------------------ collective reads
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat, error = self._ids_or_error(ids)
        unique_ids, inverse = torch.unique(flat, return_inverse=True)
        routing, asked = route_to_owners(unique_ids, self.process_group, error)
        answers = routing.backward(self._serve(asked))
        receive = partial(self._accept_local_grad, unique_ids)
        return self._differentiable(answers, inverse, receive).reshape(*ids.shape, *self.embedding_shape)

    def _serve(self, asked: torch.Tensor) -> torch.Tensor:
        """Rows of the ids other ranks asked this owner for (inserting them in training mode)."""
        unique_asked, inverse = torch.unique(asked, return_inverse=True)
        if self.training:
            rows = self._find_or_insert(unique_asked)  # may reallocate the storage: read it after
            values = self._weight.index_select(0, rows)
        else:
            values = self._read_or_initial(unique_asked, self._id_map.find(unique_asked))
        return values.index_select(0, inverse)

    @torch.no_grad()
    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of present ids; if any rank asked for an absent id, every rank raises ``KeyError``."""
        flat, error = self._ids_or_error(ids)
        routing, asked = route_to_owners(flat, self.process_group, error)
        rows = self._id_map.find(asked)
        found = torch.zeros((rows.numel(), self.embedding_dim + 1), dtype=torch.float32, device=self.device)
        found[:, 0] = (rows >= 0).float()
        found[rows >= 0, 1:] = self._weight.index_select(0, rows[rows >= 0]).float()
        answers = routing.backward(found)
        absent = answers[:, 0] == 0
        self._raise_if_any_rank_missed(flat, absent)
        return answers[:, 1:].to(self.dtype).reshape(*ids.shape, *self.embedding_shape)

    def _raise_if_any_rank_missed(self, flat_ids: torch.Tensor, absent: torch.Tensor) -> None:
        missed = torch.tensor([int(absent.sum())], dtype=torch.int64, device=self.device)
        dist.all_reduce(missed, group=self.process_group)
        if int(absent.sum()):
            raise KeyError(f"{self.describe()}: id {int(flat_ids[absent][0])} is not in the table")
        if int(missed):
            raise KeyError(f"{self.describe()}: {int(missed)} ids asked for on other ranks are not in the table")

    @torch.no_grad()
    def assign(self, ids: torch.Tensor, values: torch.Tensor) -> None:
        """Insert or overwrite rows at their owners. For an id given by several ranks, the highest rank wins."""
        try:
            flat, values = self._checked_assignment(ids, values)
            error = None
        except (TypeError, ValueError) as bad_input:
            flat, values, error = (
                self._no_ids(),
                torch.empty(0, self.embedding_dim, dtype=self.dtype, device=self.device),
                bad_input,
            )
        routing, owned_ids = route_to_owners(flat, self.process_group, error)
        owned_values = routing.forward(values)
        self._assign_rows(owned_ids, owned_values)

    def ids(self) -> torch.Tensor:
        """Every id of the table, gathered from all ranks (rank 0's first, each in row order)."""
        return all_gather_rows(self.local_ids(), self.process_group)

    def num_ids(self) -> int:
        """How many ids the whole table holds (collective)."""
        count = torch.tensor([len(self)], dtype=torch.int64, device=self.device)
        dist.all_reduce(count, group=self.process_group)
        return int(count)

    # ------------------------------------------------------------------ local gradients
    def _accept_local_grad(self, unique_ids: torch.Tensor, grad: torch.Tensor) -> None:
        self._local_grads.append((unique_ids, grad))

    def accept_grad(self, ids: torch.Tensor, grad: torch.Tensor) -> None:
        """Add a gradient for ids anywhere in the table; it reaches their owners at the next update."""
        flat_ids, grad = self._checked_gradient(ids, grad)
        self._local_grads.append((flat_ids, grad.float()))

    def take_local_grad(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This rank's gradient since the last update, summed per id, and forget it; None if none arrived."""
        summed = self._pending_by_id()
        self._local_grads = []
        return summed

    @property
    def has_grad(self) -> bool:
        return bool(self._local_grads) or super().has_grad

    def clear_grad(self) -> None:
        super().clear_grad()
        self._local_grads = []

    def _pending_by_id(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self._local_grads:
            return None
        ids = torch.cat([ids for ids, _ in self._local_grads])
        grads = torch.cat([grad for _, grad in self._local_grads])
        return coalesce_rows(ids, grads)

    def _restore_pending(self, ids: torch.Tensor, grad: torch.Tensor) -> None:
        self._local_grads = [(ids, grad)]

    # ------------------------------------------------------------------ state dict
    def _restore(self, ids: torch.Tensor, weight: torch.Tensor, slots: dict[str, torch.Tensor]) -> None:
        """Load a state dict holding any ids (a one-process table's, say): keep those this rank owns."""
        owned = owner_rank(ids.to(self.device), self.world_size) == self.rank
        owned_cpu = owned.to(ids.device)
        super()._restore(ids[owned_cpu], weight[owned_cpu], {name: value[owned_cpu] for name, value in slots.items()})

    # ------------------------------------------------------------------ helpers
    def _no_ids(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.int64, device=self.device)

    def _ids_or_error(self, ids: torch.Tensor) -> tuple[torch.Tensor, Exception | None]:
        """Flat int64 ids, or no ids and the error to raise once the other ranks are told."""
        try:
            return self._checked_ids(ids).reshape(-1), None
        except (TypeError, ValueError) as bad_input:
            return self._no_ids(), bad_input


__all__ = ["PeerError", "ShardedHashTable"]
