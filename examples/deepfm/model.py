"""DeepFM (Guo et al., 2017): a factorization machine and an MLP over shared field embeddings.

The model is split the way torchrec splits recommenders:

- a sparse part, the embedding of the 26 categorical features. ``EngineEmbedding`` is a
  recis ``EmbeddingEngine`` (``HashTable``s, ``ShardedHashTable``s across ranks; one
  grouped lookup of all its tables per forward); ``ModuloEmbeddingBag`` is the plain-PyTorch
  baseline, an ``nn.EmbeddingBag`` of a fixed size indexed by a hash of the id modulo its rows.
- a dense part, ``DenseArch``: numeric-feature embeddings, the first-order terms, the FM's
  pairwise interactions and the deep MLP. Across ranks it is the part wrapped in
  ``DistributedDataParallel``; the sparse part is trained by a sparse optimizer.

Each categorical id has a first-order weight ``w`` and ``dim`` FM factors ``v``. The ids
carry their feature (``feature << 33 | value``, see data.py). Three table layouts:

- ``per-feature`` (the default): every feature has two tables of its own, ``C<i>.w`` of
  dim 1 and ``C<i>.v`` of dim ``dim``, declared ``coalesced=True``: the engine stores the
  26 tables of each dim as one physical table (a feature's ids kept apart as its child),
  so a step works on 2 tables, not 52. Both tables of a feature read one input tensor, so
  the engine makes its bags and a sharded lookup deduplicates and routes its ids once.
- ``coalesced``: one table of rows ``[w, v_1 .. v_dim]`` for all 26 features.
- ``per-feature-separate``: the 52 tables each stored apart, as a model that gives each
  table its own learning rate or capacity would have them.

Measured on 2 gloo ranks, the default 3,000-step run timed in turns on a shared 2-core
machine (3 runs each): ``per-feature`` used 1.04x the CPU time of ``coalesced`` (whole
process; 1.15x before its two tables shared the input's deduplication and routing) and
0.98x its wall time, with a median of 282.5 s of training against 291.1 s. Held-out AUC,
per-feature vs coalesced: 0.8034 vs 0.8045 (seed 0), 0.8018 vs 0.7996 (seed 1), 0.7963
vs 0.7935 (seed 2). Equal cost, and the better AUC at two seeds of three: per-feature is
the default. ``per-feature-separate`` pays the per-table work of a step 52 times: 600-step
runs in turns took 2.2x the training time of ``coalesced`` (medians 92.9 s and 43.1 s).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from data import NUM_CATEGORICAL, NUM_NUMERIC
from torch import nn

from recis.dist import ShardedHashTable
from recis.nn import EmbeddingEngine, EmbeddingOption, HashTable
from recis.nn.initializers import UniformInitializer
from recis.ops import mix64

TABLE_LAYOUTS = ("per-feature", "coalesced", "per-feature-separate")
FEATURES = tuple(f"C{f + 1}" for f in range(NUM_CATEGORICAL))  # Criteo's names of the categorical features


def table_capacity(capacity: int, layout: str) -> int:
    """The ``capacity`` of each table's option for a bound of ``capacity`` ids per rank over all
    features: the whole bound where the tables of all features share storage (``per-feature``,
    ``coalesced``); an even share, floor(capacity / 26), for each feature's own tables
    (``per-feature-separate``). A feature's first-order and FM-factor tables hold the same ids."""
    return capacity // NUM_CATEGORICAL if layout == "per-feature-separate" else capacity


def feature_options(
    dim: int, layout: str, *, device: torch.device, capacity: int | None = None, eviction: str | None = None
) -> dict[str, EmbeddingOption]:
    """The EmbeddingEngine options of the 26 features in ``layout`` (see the module docstring).

    Rows start uniform in +-1/sqrt(1 + dim) in every layout, so that the layouts differ
    in their tables only. First-order and FM-factor tables have different seeds: rows are
    a function of (seed, id, element), and equal seeds would start an id's first-order
    weight equal to the first element of its factors.
    """
    if layout not in TABLE_LAYOUTS:
        raise ValueError(f"table layout must be one of {list(TABLE_LAYOUTS)}, got {layout!r}")
    bound = 1.0 / math.sqrt(1 + dim)
    common = {
        "device": device,
        "initializer": UniformInitializer(-bound, bound),
        "capacity": None if capacity is None else table_capacity(capacity, layout),
        "eviction": eviction,
        "coalesced": layout != "per-feature-separate",
    }
    if layout == "coalesced":
        return {name: EmbeddingOption(1 + dim, shared_name=name, **common) for name in FEATURES}
    options = {}
    for name in FEATURES:
        options[f"{name}.w"] = EmbeddingOption(1, shared_name=f"{name}.w", seed=0, **common)
        options[f"{name}.v"] = EmbeddingOption(dim, shared_name=f"{name}.v", seed=1, **common)
    return options


class EngineEmbedding(nn.Module):
    """The 26 categorical features through one recis ``EmbeddingEngine``, in one of three layouts:

    - ``"per-feature"``: each feature has two tables of its own, its first-order weights
      (dim 1) and its FM factors (dim ``dim``), declared ``coalesced=True``: the engine
      stores the 26 tables of each dim as one physical table (each feature a child of it,
      its ids kept apart), so 52 tables are 2 physical ones;
    - ``"per-feature-separate"``: the same 52 tables, each stored apart (52 physical tables);
    - ``"coalesced"``: one table of rows ``[w, v_1 .. v_dim]`` for all 26 features
      (``coalesced=True``, each feature a child of it).

    With a ``capacity`` (ids per rank over all features, see ``table_capacity``), a full
    table evicts by ``eviction`` ("lru" or "lfu") to make room for new ids; without one it
    grows with every new id. Every table is a ``ShardedHashTable`` when a process group of
    several ranks is initialized, and one forward is one grouped lookup of all tables.
    """

    def __init__(
        self,
        dim: int,
        layout: str,
        *,
        device: torch.device,
        capacity: int | None = None,
        eviction: str | None = None,
    ) -> None:
        super().__init__()
        self.dim, self.layout = dim, layout
        self.engine = EmbeddingEngine(feature_options(dim, layout, device=device, capacity=capacity, eviction=eviction))

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 26) int64 ids -> first-order weights (B, 26) and FM factors (B, 26, dim)."""
        columns = dict(zip(FEATURES, ids.t().contiguous()))
        if self.layout == "coalesced":
            out = self.engine(columns)
            rows = torch.stack([out[name] for name in FEATURES], dim=1)
            return rows[..., 0], rows[..., 1:]
        out = self.engine({f"{name}.{part}": column for name, column in columns.items() for part in "wv"})
        first_order = torch.cat([out[f"{name}.w"] for name in FEATURES], dim=1)
        factors = torch.stack([out[f"{name}.v"] for name in FEATURES], dim=1)
        return first_order, factors

    def tables(self) -> list[HashTable]:
        """The engine's physical tables: 2 (``per-feature``), 52 (``per-feature-separate``) or 1 (``coalesced``)."""
        return list(self.engine.tables().values())

    def _tables_of_ids(self) -> list[HashTable]:
        """The tables holding FM factors, each once: one row per id held (a first-order table holds the same ids)."""
        features = FEATURES if self.layout == "coalesced" else [f"{name}.v" for name in FEATURES]
        return list({id(table): table for table in map(self.engine.table_of, features)}.values())

    def num_rows(self) -> int:
        """Ids held over all features (a collective when sharded)."""
        return self.counters()["rows"]

    def counters(self) -> dict[str, int]:
        """``rows`` (ids held, over all features) and ``evicted`` (rows given up for new ids so far)
        of the FM-factor tables, summed over ranks when sharded (a collective: every rank calls it
        at the same point). The first-order tables hold the same ids and evict alike."""
        tables = self._tables_of_ids()
        stats = [table.stats() for table in tables]
        totals = [sum(s["rows"] for s in stats), sum(s["evicted"] for s in stats)]
        values = torch.tensor(totals, dtype=torch.int64, device=tables[0].device)
        if isinstance(tables[0], ShardedHashTable) and tables[0].world_size > 1:
            dist.all_reduce(values, group=tables[0].process_group)
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

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 26) int64 ids -> first-order weights (B, 26) and FM factors (B, 26, dim)."""
        rows = self.bag(torch.remainder(mix64(ids), self.rows).reshape(-1, 1)).reshape(*ids.shape, -1)
        return rows[..., 0], rows[..., 1:]

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

    def forward(self, numeric: torch.Tensor, first_order: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        """(B, 13) numeric features, (B, 26) categorical first-order weights and (B, 26, dim) FM factors
        -> (B,) logits."""
        first_order = first_order.sum(1) + self.numeric_first_order(numeric).squeeze(-1)
        fields = torch.cat([factors, numeric.unsqueeze(-1) * self.numeric_embedding], dim=1)  # (B, 39, dim)
        summed = fields.sum(1)
        pairwise = 0.5 * (summed.square() - fields.square().sum(1)).sum(-1)  # sum over pairs f < g of <v_f, v_g>
        deep = self.mlp(fields.flatten(1)).squeeze(-1)
        return first_order + pairwise + deep


class DeepFM(nn.Module):
    """``sparse`` (EngineEmbedding or ModuloEmbeddingBag) followed by ``dense`` (DenseArch)."""

    def __init__(self, sparse: nn.Module, dense: DenseArch) -> None:
        super().__init__()
        self.sparse = sparse
        self.dense = dense

    def forward(self, numeric: torch.Tensor, categorical: torch.Tensor) -> torch.Tensor:
        return self.dense(numeric, *self.sparse(categorical))
