"""EmbeddingEngine: many features, their tables and their pooling in one module (RecIS's).

``EmbeddingEngine({"user": EmbeddingOption(...), "item": EmbeddingOption(...)})`` maps a
dict of feature inputs (dense int64 tensors or ``RaggedTensor``s) to a dict of pooled
embeddings, as RecIS's does:

- Features with the same ``shared_name`` share one table: an id of two such features
  is one row. They must agree on the table's options (dim, dtype, initializer, hooks,
  ...); their combiners may differ.
- Tables with ``coalesced=True`` and equal options are merged into one physical table
  whose children are their shared names; each keeps its ids apart (RecIS's 12-bit child
  encoding, ``recis.nn.table_children``). Fewer tables, fewer kernel calls.
- One lookup per physical table per forward, of all its features' ids at once. Under
  torch.distributed (several ranks, or ``pg``) the tables are sharded and the lookups of
  all tables go through ONE ``recis.dist.sharded_lookup``: three collective calls per
  forward however many features and tables. Bad input on one rank makes every rank
  raise, and nothing changes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn

from recis.nn.bags import Bags, as_bags
from recis.nn.modules.embedding import (
    EmbeddingOption,
    NoReduceEmbedding,
    feature_output,
    is_distributed,
    make_table,
)
from recis.nn.modules.hashtable import HashTable
from recis.ragged.tensor import RaggedTensor


def _check_options(emb_options: Mapping[str, EmbeddingOption]) -> None:
    if not isinstance(emb_options, Mapping) or not emb_options:
        raise ValueError("EmbeddingEngine needs a non-empty dict of feature name -> EmbeddingOption")
    for name, option in emb_options.items():
        if not isinstance(name, str) or not isinstance(option, EmbeddingOption):
            raise TypeError(f"EmbeddingEngine: feature {name!r} must map a str to an EmbeddingOption")
    by_table: dict[str, tuple[str, dict]] = {}
    for name, option in emb_options.items():
        config = option.table_config()
        first = by_table.setdefault(option.shared_name, (name, config))
        for field, value in config.items():
            if first[1][field] != value:
                raise ValueError(
                    f"EmbeddingEngine: features {first[0]!r} and {name!r} share table {option.shared_name!r} "
                    f"but differ in {field}: {first[1][field]!r} vs {value!r}"
                )


def _physical_tables(emb_options: Mapping[str, EmbeddingOption]) -> dict[str, list[str]]:
    """Physical table name -> the shared names it holds (coalesced tables with equal options merge)."""
    groups: dict[str, list[str]] = {}
    for option in emb_options.values():
        key = json.dumps(option.table_config(), sort_keys=True) if option.coalesced else option.shared_name
        names = groups.setdefault(key, [])
        if option.shared_name not in names:
            names.append(option.shared_name)
    return {(names[0] if len(names) == 1 else "+".join(names)): names for names in groups.values()}


class EmbeddingEngine(nn.Module):
    """Features -> tables -> pooled embeddings (see the module docstring)."""

    def __init__(self, emb_options: Mapping[str, EmbeddingOption], pg: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        _check_options(emb_options)
        groups = {option.pg for option in emb_options.values()} | ({pg} if pg is not None else set())
        if len(groups - {None}) > 1:
            raise ValueError("EmbeddingEngine: the options name different process groups")
        self._pg = next(iter(groups - {None}), None)
        self._options = dict(emb_options)
        self._distributed = is_distributed(self._pg)
        self._tables = nn.ModuleDict()
        self._fea_to_ht: dict[str, str] = {}
        for key, (physical, shared_names) in enumerate(_physical_tables(emb_options).items()):
            option = next(o for o in emb_options.values() if o.shared_name == shared_names[0])
            self._tables[f"table{key}"] = make_table(option, physical, shared_names, self._pg)
            for feature, feature_option in emb_options.items():
                if feature_option.shared_name in shared_names:
                    self._fea_to_ht[feature] = f"table{key}"
        if self._distributed:
            from recis.dist.agreement import require_same_config  # recis.dist builds on recis.nn: import late

            options = self._options.items()
            config = {f"{name}.{k}": repr(v) for name, option in options for k, v in option.runtime_config().items()}
            require_same_config("EmbeddingEngine", config, self._pg)

    def tables(self) -> dict[str, HashTable]:
        """The physical tables by their names (a coalesced one holds several shared names)."""
        return {table.name: table for table in self._tables.values()}

    def table_of(self, feature: str) -> HashTable:
        return self._tables[self._fea_to_ht[feature]]

    def forward(
        self,
        samples: Mapping[str, torch.Tensor | RaggedTensor],
        input_weights: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor | NoReduceEmbedding]:
        bags, error = self._bags(samples, input_weights or {})
        keys = list(self._tables.keys())
        ids = {key: [] for key in keys}
        for feature, feature_bags in bags.items():
            table = self.table_of(feature)
            ids[self._fea_to_ht[feature]].append(table.encode_ids(feature_bags.ids, self._options[feature].shared_name))
        flat = [torch.cat(ids[key]) if ids[key] else self._no_ids(key) for key in keys]
        rows = dict(zip(keys, self._lookup(keys, flat, error)))
        outputs, start = {}, dict.fromkeys(keys, 0)
        for feature, feature_bags in bags.items():
            key, count = self._fea_to_ht[feature], feature_bags.ids.numel()
            feature_rows = rows[key][start[key] : start[key] + count]
            start[key] += count
            outputs[feature] = feature_output(self._options[feature], feature_rows, feature_bags)
        return outputs

    def _bags(self, samples: Mapping, weights: Mapping) -> tuple[dict[str, Bags], Exception | None]:
        """Every feature's bags, or (no bags, the error) so that a sharded lookup can tell every rank."""
        try:
            unknown = sorted(set(samples) - set(self._options))
            if unknown:
                raise ValueError(f"EmbeddingEngine: unknown features {unknown}; known: {sorted(self._options)}")
            present = [name for name in self._options if name in samples]
            return {name: as_bags(name, samples[name], weights.get(name)) for name in present}, None
        except (TypeError, ValueError) as bad_input:
            if not self._distributed:
                raise
            return {}, bad_input

    def _lookup(self, keys: list[str], flat: list[torch.Tensor], error: Exception | None) -> list[torch.Tensor]:
        """Each table's rows of its ids; a table's admit hook is its own (features of a table agree on it)."""
        tables = [self._tables[key] for key in keys]
        if self._distributed:
            from recis.dist.sharded_lookup import sharded_lookup  # recis.dist builds on recis.nn: import late

            return sharded_lookup(tables, flat, error=error)
        return [table(ids) for table, ids in zip(tables, flat)]

    def _no_ids(self, key: str) -> torch.Tensor:
        return torch.empty(0, dtype=torch.int64, device=self._tables[key].device)
