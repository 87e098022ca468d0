"""A small training run and a bitwise snapshot of everything it holds, for the random
call sequences of ``tests/conformance/test_random_call_sequences.py``.

The run: an unbounded table, a bounded one (capacity, eviction, Frequency admission, a
step filter), a dense layer, a sparse optimizer with one param group per table, AdamWTF
with one param group per dense parameter, and a checkpoint root in a folder of its own.
Two runs built alike with the same arguments are bitwise equal.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
from torch import nn

from recis.nn.hashtable_hook import AdmitHook, FilterHook
from recis.nn.modules.hashtable import HashTable
from recis.optim import AdamWTF

DIM = 4
CAPACITY = 10


class TwoTableModel(nn.Module):
    """``lin(bounded(ids))`` and ``lin(free(ids))``; rows are cast to the layer's dtype."""

    def __init__(self, eviction: str) -> None:
        super().__init__()
        self.lin = nn.Linear(DIM, 1)
        self.free = HashTable(DIM, name="free", seed=1)
        self.bounded = HashTable(
            DIM,
            name="bounded",
            seed=2,
            capacity=CAPACITY,
            eviction=eviction,
            admit_hook=AdmitHook("Frequency", {"min_count": 2, "sketch_width": 64, "sketch_depth": 2}),
            filter_hook=FilterHook("GlobalStepFilter", {"filter_step": 3}),
        )

    def loss(self, free_ids: torch.Tensor, bounded_ids: torch.Tensor) -> torch.Tensor:
        """The bounded table is looked up first: it is the one that may refuse good ids
        (no room), and then no other table has been touched yet."""
        bounded = self.bounded(bounded_ids)
        free = self.free(free_ids)
        dtype = self.lin.weight.dtype
        return self.lin(bounded.to(dtype)).square().sum() + self.lin(free.to(dtype)).square().sum()


class SmallTrainingRun:
    """Model, sparse optimizer, AdamWTF over the dense layer, and a checkpoint root under ``folder``."""

    def __init__(self, folder: Path, sparse_cls: type, eviction: str) -> None:
        torch.manual_seed(0)
        self.folder = folder
        self.root = folder / "checkpoints"
        self.scratch = folder / "scratch"
        self.model = TwoTableModel(eviction)
        self.sparse = sparse_cls([{"params": [self.model.free]}, {"params": [self.model.bounded], "lr": 0.1}], lr=0.05)
        self.dense = AdamWTF(
            [{"params": [self.model.lin.weight]}, {"params": [self.model.lin.bias], "lr": 0.02}], lr=0.01
        )
        self.remembered: dict[str, dict] | None = None  # state dicts kept by the test, to load later

    def tables(self) -> dict[str, HashTable]:
        return {"free": self.model.free, "bounded": self.model.bounded}

    def saved_checkpoints(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir()) if self.root.exists() else []

    def fresh_scratch(self) -> Path:
        shutil.rmtree(self.scratch, ignore_errors=True)
        return self.scratch


def _flat(value, path: str = "") -> list:
    """``value`` as a list of (path, leaf); a tensor's leaf is its dtype, shape and bytes.
    A dict's keys are taken in sorted order: their order is not state (torch's
    ``load_state_dict`` puts a group's ``params`` last)."""
    if isinstance(value, dict):
        return [leaf for key in sorted(value, key=repr) for leaf in _flat(value[key], f"{path}.{key!r}")]
    if isinstance(value, list | tuple):
        return [(path, type(value).__name__, len(value))] + [
            leaf for i, item in enumerate(value) for leaf in _flat(item, f"{path}[{i}]")
        ]
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous().reshape(-1)
        return [(path, str(value.dtype), tuple(value.shape), bytes(data.view(torch.uint8).numpy()))]
    return [(path, repr(value))]


def _groups(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> list:
    """The live param groups, with tables and parameters by name (a load must not swap them)."""
    return [
        {k: ([names.get(id(p), repr(p)) for p in v] if k == "params" else v) for k, v in g.items()}
        for g in optimizer.param_groups
    ]


def snapshot(run: SmallTrainingRun) -> list:
    """Everything a call may change, flattened: the model's state dict (tables' ids in row
    order, rows, slots, metadata columns, lifecycle state, pending gradient; the dense
    layer), each table's dtype, device, mode and counters, the dense gradients, both
    optimizers' state dicts and live param groups, the accumulation settings, and the
    names of the saved checkpoints."""
    tables = {
        name: {
            "dtype": table.dtype,
            "device": table.device,
            "training": table.training,
            "has_grad": table.has_grad,
            "len": len(table),
            "stats": table.stats(),
            "slot_names": table.slot_names(),
        }
        for name, table in run.tables().items()
    }
    names = {id(t): f"table:{n}" for n, t in run.tables().items()}
    names.update({id(p): f"param:{n}" for n, p in run.model.lin.named_parameters()})
    whole = {
        "model": run.model.state_dict(),
        "tables": tables,
        "dense_grads": [p.grad for p in run.model.lin.parameters()],
        "sparse": copy.deepcopy(run.sparse.state_dict()),
        "sparse_groups": _groups(run.sparse, names),
        "grad_accum_steps": run.sparse.grad_accum_steps,
        "dense": copy.deepcopy(run.dense.state_dict()),
        "dense_groups": _groups(run.dense, names),
        "checkpoints": run.saved_checkpoints(),
    }
    return _flat(whole)


def first_difference(a: list, b: list) -> str | None:
    """Where two snapshots differ first (a path), or None when they are bitwise equal."""
    if len(a) != len(b):
        paths_a, paths_b = [leaf[0] for leaf in a], [leaf[0] for leaf in b]
        extra = sorted(set(paths_a) ^ set(paths_b))
        return f"{len(a)} vs {len(b)} leaves; only in one: {extra[:5]}"
    for x, y in zip(a, b):
        if x != y:
            return str(x[0])
    return None
