"""EmbeddingOption and DynamicEmbedding: one feature's pooled embedding, as RecIS spells them.

``DynamicEmbedding(EmbeddingOption(embedding_dim=16, shared_name="user", combiner="mean"))``
owns one table and pools the rows of each bag of ids (``recis.nn.pooling``); inputs are
dense int64 tensors or ``RaggedTensor``s (``recis.nn.bags``). When a process group of
more than one rank is initialized (or ``pg`` is given) the table is a
``ShardedHashTable`` over it, as RecIS shards every table; otherwise a ``HashTable``.

Differences from RecIS, deliberate: a RaggedTensor's ``weight`` is applied (RecIS's
``DynamicEmbedding.forward`` replaces it by ``input_weights``); options are checked
when made, with ``ValueError``/``TypeError`` instead of asserts; the default initializer
is the table's (uniform in +-1/sqrt(dim); RecIS: zeros); ``hdmp_*`` and
``fp16_enabled`` (int8 tables) are not supported and refused when set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from recis.nn.bags import Bags, as_bags
from recis.nn.hashtable_hook import AdmitHook, FilterHook
from recis.nn.initializers import Initializer
from recis.nn.modules.hashtable import GRAD_REDUCTIONS, HashTable
from recis.nn.pooling import COMBINERS, pool
from recis.ragged.tensor import RaggedTensor


@dataclass
class EmbeddingOption:
    """How one feature is embedded (RecIS's fields; ``seed``, ``capacity`` and ``eviction`` are recis's)."""

    embedding_dim: int = 16
    block_size: int = 10240
    dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"
    trainable: bool = True
    pg: dist.ProcessGroup | None = None
    max_partition_num: int = 65536
    shared_name: str = "embedding"
    children: list[str] = field(default_factory=list)
    coalesced: bool = False
    initializer: Initializer | None = None
    use_weight: bool = True
    combiner: str = "sum"
    combiner_kwargs: dict[str, Any] | None = None
    grad_reduce_by: str = "worker"
    hdmp_group_size: int | None = None
    hdmp_group_reduce_by: str | None = None
    filter_hook: FilterHook | None = None
    admit_hook: AdmitHook | None = None
    fp16_enabled: bool = False
    no_reduce: bool = False
    seed: int = 0
    capacity: int | None = None
    eviction: str | None = None

    def __post_init__(self) -> None:
        if not self.children:
            self.children = [self.shared_name]
        problem = self._problem()
        if problem:
            raise ValueError(f"EmbeddingOption(shared_name={self.shared_name!r}): {problem}")

    def _problem(self) -> str | None:
        if isinstance(self.embedding_dim, bool) or not isinstance(self.embedding_dim, int) or self.embedding_dim < 1:
            return f"embedding_dim must be a positive int, got {self.embedding_dim!r}"
        if not isinstance(self.shared_name, str) or not self.shared_name:
            return f"shared_name must be a non-empty str, got {self.shared_name!r}"
        if self.grad_reduce_by not in GRAD_REDUCTIONS:
            return f"grad_reduce_by must be one of {list(GRAD_REDUCTIONS)}, got {self.grad_reduce_by!r}"
        if self.hdmp_group_size is not None or self.hdmp_group_reduce_by is not None:
            return "hdmp_group_size / hdmp_group_reduce_by are not supported by recis"
        if self.fp16_enabled:
            return "fp16_enabled applies to int8 tables, which recis does not have"
        if self.no_reduce:
            return None
        if self.combiner not in COMBINERS:
            return f"unknown combiner {self.combiner!r}; known: {list(COMBINERS)}"
        if self.combiner == "tile":
            tile_len = (self.combiner_kwargs or {}).get("tile_len")
            if isinstance(tile_len, bool) or not isinstance(tile_len, int) or tile_len < 1:
                kwargs = self.combiner_kwargs
                return f"combiner 'tile' needs combiner_kwargs={{'tile_len': positive int}}, got {kwargs!r}"
        return None

    @property
    def tile_len(self) -> int | None:
        return (self.combiner_kwargs or {}).get("tile_len") if self.combiner == "tile" else None

    def table_config(self) -> dict[str, Any]:
        """What features sharing one table must agree on."""
        return {
            "embedding_dim": self.embedding_dim,
            "dtype": str(self.dtype),
            "device": str(torch.empty(0, device=self.device).device),
            "initializer": repr(self.initializer),
            "grad_reduce_by": self.grad_reduce_by,
            "filter_hook": str(self.filter_hook),
            "seed": self.seed,
            "capacity": self.capacity,
            "eviction": self.eviction,
            "coalesced": self.coalesced,
        }

    def runtime_config(self) -> dict[str, Any]:
        """What the feature does with its rows (may differ between features of a table): as in
        RecIS, the admit hook is the feature's; features of one table may admit differently."""
        return {
            "combiner": self.combiner,
            "combiner_kwargs": self.combiner_kwargs,
            "use_weight": self.use_weight,
            "trainable": self.trainable,
            "no_reduce": self.no_reduce,
            "admit_hook": str(self.admit_hook),
        }


@dataclass
class NoReduceEmbedding:
    """A ``no_reduce`` feature's output: distinct rows, and where each id and bag reads them."""

    emb: torch.Tensor  # (distinct ids, dim)
    reverse_index: torch.Tensor  # id position -> row of emb
    offsets: torch.Tensor  # (bags + 1,)


def is_distributed(pg: dist.ProcessGroup | None) -> bool:
    """Whether tables should be sharded: a group was given, or the default one has several ranks."""
    return pg is not None or (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def make_table(
    option: EmbeddingOption, name: str, children: list[str], pg: dist.ProcessGroup | None, trained: bool
) -> HashTable:
    """The table for ``option``: sharded across ranks when distributed (see ``is_distributed``);
    frozen (``requires_optimizer_state=False``) unless ``trained``."""
    kwargs = {
        "block_size": option.block_size,
        "dtype": option.dtype,
        "device": option.device,
        "coalesced": option.coalesced,
        "children": children,
        "initializer": option.initializer,
        "name": name,
        "grad_reduce_by": option.grad_reduce_by,
        "filter_hook": option.filter_hook,
        "seed": option.seed,
        "capacity": option.capacity,
        "eviction": option.eviction,
        "admit_hook": option.admit_hook,
        "requires_optimizer_state": trained,
    }
    if is_distributed(pg):
        from recis.dist.sharded_hashtable import ShardedHashTable  # recis.dist builds on recis.nn: import late

        return ShardedHashTable([option.embedding_dim], process_group=pg, **kwargs)
    return HashTable([option.embedding_dim], **kwargs)


def feature_output(option: EmbeddingOption, rows: torch.Tensor, bags: Bags) -> torch.Tensor | NoReduceEmbedding:
    """One feature's output from the rows of its ids (``(n, dim)``, in the order of ``bags.ids``)."""
    if not option.use_weight:
        bags = Bags(bags.ids, bags.offsets, None, bags.shape)
    if option.no_reduce:
        unique, inverse = torch.unique(bags.ids, return_inverse=True)
        first = torch.zeros(unique.numel(), dtype=torch.int64, device=rows.device).scatter_(
            0, inverse, torch.arange(bags.ids.numel(), device=rows.device)
        )
        emb = rows.index_select(0, first)
        return NoReduceEmbedding(emb if option.trainable else emb.detach(), inverse, bags.offsets)
    pooled = pool(rows, bags, option.combiner, option.tile_len)
    if option.combiner != "tile":
        pooled = pooled.reshape(*bags.shape, option.embedding_dim)
    return pooled if option.trainable else pooled.detach()


class DynamicEmbedding(nn.Module):
    """One feature's table and pooling (see the module docstring)."""

    def __init__(self, emb_opt: EmbeddingOption, pg: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        if not isinstance(emb_opt, EmbeddingOption):
            raise TypeError(f"DynamicEmbedding takes an EmbeddingOption, got {type(emb_opt).__name__}")
        self._emb_opt = emb_opt
        self._hashtable = make_table(
            emb_opt, emb_opt.shared_name, emb_opt.children, pg or emb_opt.pg, trained=emb_opt.trainable
        )

    @property
    def name(self) -> str:
        return self._emb_opt.shared_name

    @property
    def table(self) -> HashTable:
        return self._hashtable

    def forward(
        self, input_ids: torch.Tensor | RaggedTensor, input_weights: torch.Tensor | None = None
    ) -> torch.Tensor | NoReduceEmbedding:
        bags = as_bags(self.name, input_ids, input_weights)
        rows = self._hashtable(bags.ids, admit_hook=self._emb_opt.admit_hook)
        return feature_output(self._emb_opt, rows, bags)
