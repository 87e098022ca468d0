"""EmbeddingEngine: many features, their tables and their pooling in one module (RecIS's).

``EmbeddingEngine({"user": EmbeddingOption(...), "item": EmbeddingOption(...)})`` maps a
dict of feature inputs (dense int64 tensors or ``RaggedTensor``s) to a dict of pooled
embeddings, as RecIS's does:

- Features with the same ``shared_name`` share one table: an id of two such features
  is one row. They must agree on the table's options (dim, dtype, initializer, filter
  hook, ...); their combiners may differ, and so may their admit hooks, as in RecIS: a
  feature with ``AdmitHook("ReadOnly")`` reads the rows another feature of its table
  inserts, and brings in no id of its own (sharded across ranks too: owners tell which ids
  have rows, and the others receive no gradient).
- Tables with ``coalesced=True`` and equal options are merged into one physical table
  whose children are their shared names; each keeps its ids apart (RecIS's 12-bit child
  encoding, ``recis.nn.table_children``). Fewer tables, fewer kernel calls. Other tables
  are not merged (RecIS merges all with equal options): a coalesced table keeps 52 bits
  of an id, a table of its own every 64-bit id exactly.
- A shared name that no trainable feature reads gets a frozen table
  (``requires_optimizer_state=False``; RecIS's ``_Frozen`` tables): sparse optimizers
  leave it out, and it merges only with other frozen ones.
- One lookup per physical table and admit hook per forward, of all those features' ids
  at once, in the order the options name their first features. Under
  torch.distributed (several ranks, or ``pg``) the tables are sharded and the lookups of
  all tables go through ONE ``recis.dist.sharded_lookup``: three collective calls per
  forward however many features and tables. Bad input on one rank makes every rank
  raise, and nothing changes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import nn

from recis.nn.bags import Bags, as_bags
from recis.nn.hashtable_hook import AdmitHook
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


def _distinct(hooks: Iterable[AdmitHook | None]) -> list[AdmitHook | None]:
    """The distinct hooks, in order of first appearance."""
    return list(dict.fromkeys(hooks))


def _index_of(entry: tuple[str, AdmitHook | None], entries: list[tuple[str, AdmitHook | None]]) -> int:
    """The position of ``entry`` in ``entries``, appended if absent."""
    if entry not in entries:
        entries.append(entry)
    return entries.index(entry)


def _trained_names(emb_options: Mapping[str, EmbeddingOption]) -> set[str]:
    """The shared names some trainable feature reads: the others' tables are frozen (as in RecIS)."""
    return {option.shared_name for option in emb_options.values() if option.trainable}


def _physical_tables(emb_options: Mapping[str, EmbeddingOption], trained: set[str]) -> dict[str, list[str]]:
    """Physical table name -> the shared names it holds (coalesced tables with equal options, both
    in ``trained`` or both frozen, merge)."""
    groups: dict[tuple | str, list[str]] = {}
    for option in emb_options.values():
        config = json.dumps(option.table_config(), sort_keys=True)
        key = (config, option.shared_name in trained) if option.coalesced else option.shared_name
        names = groups.setdefault(key, [])
        if option.shared_name not in names:
            names.append(option.shared_name)
    return {(names[0] if len(names) == 1 else "+".join(names)): names for names in groups.values()}


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """The ids of one lookup: one feature's as they are, several concatenated."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _split(rows: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, ...]:
    """A lookup's rows cut into its features' rows (``counts`` of them each, in order)."""
    return (rows,) if len(counts) == 1 else rows.split(counts)


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
        self._lookups: list[tuple[str, AdmitHook | None]] = []  # (table key, admit hook): one lookup each
        self._fea_to_lookup: dict[str, int] = {}
        trained_names = _trained_names(emb_options)
        for key, (physical, shared_names) in enumerate(_physical_tables(emb_options, trained_names).items()):
            features = [name for name, option in emb_options.items() if option.shared_name in shared_names]
            hooks = _distinct(emb_options[name].admit_hook for name in features)
            option = next(o for o in emb_options.values() if o.shared_name == shared_names[0])
            option = replace(option, admit_hook=hooks[0] if len(hooks) == 1 else None)  # else: per lookup
            trained = shared_names[0] in trained_names
            self._tables[f"table{key}"] = make_table(option, physical, shared_names, self._pg, trained)
            for feature in features:
                self._fea_to_ht[feature] = f"table{key}"
                self._fea_to_lookup[feature] = _index_of(
                    (f"table{key}", emb_options[feature].admit_hook), self._lookups
                )
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
        flat, counts = self._lookup_ids(bags)
        # One split per lookup: its backward is one concatenation, where slicing out each
        # feature's rows would build a lookup-sized zero gradient per feature.
        parts = [iter(_split(rows, n)) for rows, n in zip(self._lookup(flat, error), counts)]
        return {
            feature: feature_output(self._options[feature], next(parts[self._fea_to_lookup[feature]]), feature_bags)
            for feature, feature_bags in bags.items()
        }

    def _lookup_ids(self, bags: dict[str, Bags]) -> tuple[list[torch.Tensor], list[list[int]]]:
        """Each lookup's ids (its features' stored ids, concatenated) and each feature's count of them.

        Equal inputs give one tensor object: features of one input tensor share their stored
        ids (unless coalesced tables store them apart), and lookups of equal ids share one
        tensor, whose deduplication and routing a sharded lookup then does once.
        """
        stored: dict[tuple, torch.Tensor] = {}
        ids: list[list[torch.Tensor]] = [[] for _ in self._lookups]
        counts: list[list[int]] = [[] for _ in self._lookups]
        for feature, feature_bags in bags.items():
            table, child = self.table_of(feature), self._options[feature].shared_name
            key = (id(feature_bags.ids), table.device, table.children_info.index(child) if table.coalesce else -1)
            if key not in stored:
                stored[key] = table.encode_ids(feature_bags.ids, child)
            ids[self._fea_to_lookup[feature]].append(stored[key])
            counts[self._fea_to_lookup[feature]].append(feature_bags.ids.numel())
        joined: dict[tuple, torch.Tensor] = {}
        flat = []
        for parts, (key, _) in zip(ids, self._lookups):
            same = tuple(map(id, parts)) if parts else (key,)
            if same not in joined:
                joined[same] = _joined(parts) if parts else self._no_ids(key)
            flat.append(joined[same])
        return flat, counts

    def _bags(self, samples: Mapping, weights: Mapping) -> tuple[dict[str, Bags], Exception | None]:
        """Every feature's bags (features given the same tensors share them), or (no bags, the error)
        so that a sharded lookup can tell every rank."""
        try:
            unknown = sorted(set(samples) - set(self._options))
            if unknown:
                raise ValueError(f"EmbeddingEngine: unknown features {unknown}; known: {sorted(self._options)}")
            made: dict[tuple[int, int], Bags] = {}
            bags = {}
            for name in (name for name in self._options if name in samples):
                key = (id(samples[name]), id(weights.get(name)))
                if key not in made:
                    made[key] = as_bags(name, samples[name], weights.get(name))
                bags[name] = made[key]
            return bags, None
        except (TypeError, ValueError) as bad_input:
            if not self._distributed:
                raise
            return {}, bad_input

    def _lookup(self, flat: list[torch.Tensor], error: Exception | None) -> list[torch.Tensor]:
        """The rows of each lookup's ids: one lookup per table and admit hook (``self._lookups``)."""
        tables = [self._tables[key] for key, _ in self._lookups]
        hooks = [hook for _, hook in self._lookups]
        if self._distributed:
            from recis.dist.sharded_lookup import sharded_lookup  # recis.dist builds on recis.nn: import late

            return sharded_lookup(tables, flat, hooks, error=error)
        return [table(ids, admit_hook=hook) for table, ids, hook in zip(tables, flat, hooks)]

    def _no_ids(self, key: str) -> torch.Tensor:
        return torch.empty(0, dtype=torch.int64, device=self._tables[key].device)
