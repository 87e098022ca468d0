"""DeepFM (Guo et al., 2017): a factorization machine and an MLP over shared field embeddings.

The model is split the way torchrec splits recommenders:

- a sparse part, the embedding of the 26 categorical features. ``HashEmbedding`` keeps
  them in one recis hash table (``HashTable``, or ``ShardedHashTable`` across ranks);
  ``ModuloEmbeddingBag`` is the plain-PyTorch baseline, an ``nn.EmbeddingBag`` of a
  fixed size indexed by a hash of the id modulo its rows.
- a dense part, ``DenseArch``: numeric-feature embeddings, the first-order terms, the FM's
  pairwise interactions and the deep MLP. Across ranks it is the part wrapped in
  ``DistributedDataParallel``; the sparse part is trained by a sparse optimizer.

Each categorical id has one row of ``1 + dim`` numbers: its first-order weight, then its
``dim``-element embedding, so one lookup serves both FM orders.

One table for all 26 features (rather than one per feature): the ids already carry their
feature (``feature << 33 | value``, see data.py), so sharing costs no collisions, and a
step then does one id-map lookup, one all-to-all exchange of rows across ranks and one
fused optimizer update instead of 26 of each; with per-step costs dominated by the number
of collectives on a few CPU cores, that is the difference that matters. The price is one
learning rate and one embedding size for every feature, which DeepFM's FM part needs anyway.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from data import NUM_CATEGORICAL, NUM_NUMERIC
from torch import nn

from recis.dist import ShardedHashTable
from recis.nn.modules.hashtable import HashTable
from recis.ops import mix64


class HashEmbedding(nn.Module):
    """The 26 categorical features in one recis hash table of rows ``[w, v_1 .. v_dim]``.

    With a ``capacity`` (rows per rank), a full table evicts by ``eviction`` ("lru" or
    "lfu") to make room for new ids; without one it grows with every new id.
    """

    def __init__(
        self, dim: int, *, sharded: bool, device: torch.device, capacity: int | None = None, eviction: str | None = None
    ) -> None:
        super().__init__()
        table_class = ShardedHashTable if sharded else HashTable
        bounds = {"capacity": capacity, "eviction": eviction} if capacity is not None else {}
        self.table = table_class([1 + dim], name="categorical", device=device, seed=0, **bounds)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, 26) int64 ids -> (B, 26, 1 + dim) rows."""
        return self.table(ids)

    def num_rows(self) -> int:
        """Rows in the whole table (a collective when sharded)."""
        return self.table.num_ids() if isinstance(self.table, ShardedHashTable) else len(self.table)

    def counters(self) -> dict[str, int]:
        """``rows`` and ``evicted`` (rows given up for new ids so far) of the whole table, summed over
        ranks when sharded (a collective: every rank calls it at the same point)."""
        stats = self.table.stats()
        values = torch.tensor([stats["rows"], stats["evicted"]], dtype=torch.int64, device=self.table.device)
        if isinstance(self.table, ShardedHashTable) and self.table.world_size > 1:
            dist.all_reduce(values, group=self.table.process_group)
        rows, evicted = values.tolist()
        return {"rows": rows, "evicted": evicted}


class ModuloEmbeddingBag(nn.Module):
    """The baseline: ``nn.EmbeddingBag(rows, 1 + dim, sparse=True)`` indexed by ``mix64(id) mod rows``.

    Distinct ids that land on the same row share it (a collision); the table's size is
    fixed up front. Rows start uniform in +-1/sqrt(1 + dim), as a HashTable's do.
    """

    def __init__(self, dim: int, rows: int, *, device: torch.device) -> None:
        super().__init__()
        self.rows = rows
        self.bag = nn.EmbeddingBag(rows, 1 + dim, mode="sum", sparse=True, device=device)
        bound = 1.0 / math.sqrt(1 + dim)
        nn.init.uniform_(self.bag.weight, -bound, bound)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = torch.remainder(mix64(ids), self.rows)
        return self.bag(rows.reshape(-1, 1)).reshape(*ids.shape, -1)

    def num_rows(self) -> int:
        return self.rows

    def counters(self) -> dict[str, int]:
        """A fixed table: all its rows, never an eviction (colliding ids share rows instead)."""
        return {"rows": self.rows, "evicted": 0}


class DenseArch(nn.Module):
    """First-order terms + FM pairwise interactions + MLP, from the categorical rows and numeric features."""

    def __init__(self, dim: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        self.numeric_embedding = nn.Parameter(torch.empty(NUM_NUMERIC, dim).uniform_(-1 / dim**0.5, 1 / dim**0.5))
        self.numeric_first_order = nn.Linear(NUM_NUMERIC, 1)  # its bias is the model's global bias
        layers: list[nn.Module] = []
        width = (NUM_CATEGORICAL + NUM_NUMERIC) * dim
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, numeric: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(B, 13) numeric features and (B, 26, 1 + dim) categorical rows -> (B,) logits."""
        first_order = rows[..., 0].sum(1) + self.numeric_first_order(numeric).squeeze(-1)
        fields = torch.cat([rows[..., 1:], numeric.unsqueeze(-1) * self.numeric_embedding], dim=1)  # (B, 39, dim)
        summed = fields.sum(1)
        pairwise = 0.5 * (summed.square() - fields.square().sum(1)).sum(-1)  # sum over pairs f < g of <v_f, v_g>
        deep = self.mlp(fields.flatten(1)).squeeze(-1)
        return first_order + pairwise + deep


class DeepFM(nn.Module):
    """``sparse`` (HashEmbedding or ModuloEmbeddingBag) followed by ``dense`` (DenseArch)."""

    def __init__(self, sparse: nn.Module, dense: DenseArch) -> None:
        super().__init__()
        self.sparse = sparse
        self.dense = dense

    def forward(self, numeric: torch.Tensor, categorical: torch.Tensor) -> torch.Tensor:
        return self.dense(numeric, self.sparse(categorical))
