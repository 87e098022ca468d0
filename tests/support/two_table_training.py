"""The two-table model and data that the equivalence, torchrun, resharding and fault-tolerance
tests train: W ranks with local batches against one process with the whole batch."""

import torch
from torch import nn

from recis.dist import ShardedHashTable, ShardedOptimizer
from recis.nn.modules.hashtable import HashTable, filter_out_sparse_param
from recis.optim import SparseAdam, SparseAdamW, SparseAdamWTF

GLOBAL_BATCH = 12  # divisible by 1, 2, 3 and 4 ranks
UPDATES = 5
DIM = 3
OPTIMIZERS = {"adam": SparseAdam, "adamw": SparseAdamW, "adamw_tf": SparseAdamWTF}
CASES = [
    (optimizer, kind, accum, bias_correction)
    for optimizer in OPTIMIZERS
    for kind in ("sharded", "replicated")
    for accum, bias_correction in ((1, "table"), (2, "row"))
]
RTOL, ATOL = 1e-6, 1e-7


def global_batches(accum: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(7)
    batches = []
    for step in range(UPDATES * accum):
        popular = (torch.rand(GLOBAL_BATCH, 2, generator=generator) ** 3 * 25).long()
        popular[step % GLOBAL_BATCH, 1] = torch.randint(-(2**63), 2**63 - 1, (1,), generator=generator)
        batches.append((popular, torch.randn(GLOBAL_BATCH, generator=generator)))
    return batches


class TwoTables(nn.Module):
    def __init__(self, table_type: type) -> None:
        super().__init__()
        self.user = table_type(DIM, name="user", seed=1)
        self.item = table_type(DIM, name="item", seed=2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        user, item = self.user(ids[:, 0]), self.item(ids[:, 1])
        return (user * item).sum(-1) + 0.5 * user.sum(-1)


def make_optimizer(name: str, model: nn.Module, bias_correction: str, accum: int):
    optimizer = OPTIMIZERS[name](
        filter_out_sparse_param(model), lr=0.05, weight_decay=0.1, bias_correction=bias_correction
    )
    optimizer.set_grad_accum_steps(accum)
    return optimizer


def train(model: nn.Module, optimizer, batches, rank: int, world_size: int) -> None:
    local = GLOBAL_BATCH // world_size
    for ids, targets in batches:
        part = slice(rank * local, (rank + 1) * local)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(ids[part]), targets[part]).backward()
        optimizer.step()


def owned_state(table: HashTable, step: int) -> dict:
    ids = table.local_ids()  # the rows stored here (a sharded table's local shard)
    state = {"ids": ids, "weight": table.weight.clone(), "table_step": step}
    for name in table.slot_names():
        state[f"slots.{name}"] = table.slot(name).clone()
    return state


def trained_results(model: nn.Module, optimizer, kind: str) -> dict:
    """What a rank holds after training: its owned rows and slots, and, for replicated tables, the replicas."""
    owned = {
        table.name: owned_state(table, optimizer.state[table]["step"])
        for group in optimizer.param_groups
        for table in group["params"]
    }
    replicas = {}
    if kind == "replicated":
        replicas = {t.name: (t.local_ids(), t.weight.clone()) for t in (model.user, model.item)}
    return {"owned": owned, "replicas": replicas}


def run_cases(rank: int, world_size: int) -> dict:
    results = {}
    for optimizer_name, kind, accum, bias_correction in CASES:
        model = TwoTables(ShardedHashTable if kind == "sharded" else HashTable)
        optimizer = ShardedOptimizer(make_optimizer(optimizer_name, model, bias_correction, accum))
        train(model, optimizer, global_batches(accum), rank, world_size)
        results[(optimizer_name, kind, accum, bias_correction)] = trained_results(model, optimizer, kind)
    return results


def reference_state(optimizer_name: str, accum: int, bias_correction: str) -> dict:
    model = TwoTables(HashTable)
    optimizer = make_optimizer(optimizer_name, model, bias_correction, accum)
    train(model, optimizer, global_batches(accum), rank=0, world_size=1)
    return {table.name: owned_state(table, optimizer.state[table]["step"]) for table in (model.user, model.item)}


def by_id(state: dict, key: str) -> dict[int, torch.Tensor]:
    return dict(zip(state["ids"].tolist(), state[key]))


def assert_owned_union_equals_reference(per_rank: list[dict], reference: dict, case) -> None:
    for name, expected in reference.items():
        keys = ["weight", *[k for k in expected if k.startswith("slots.")]]
        for key in keys:
            union: dict[int, torch.Tensor] = {}
            for rank_result in per_rank:
                part = by_id(rank_result["owned"][name], key)
                assert not set(part) & set(union), f"{case} {name}: an id is owned by two ranks"
                union.update(part)
            wanted = by_id(expected, key)
            assert set(union) == set(wanted), f"{case} {name} {key}: ids differ"
            ordered = sorted(wanted)
            torch.testing.assert_close(
                torch.stack([union[i] for i in ordered]).double(),
                torch.stack([wanted[i] for i in ordered]).double(),
                rtol=RTOL,
                atol=ATOL,
                msg=lambda m, n=name, k=key: f"{case} {n} {k}: {m}",
            )
        for rank_result in per_rank:
            assert rank_result["owned"][name]["table_step"] == expected["table_step"], f"{case} {name}: step count"


def assert_replicas_equal_reference(per_rank: list[dict], reference: dict, case) -> None:
    for name, expected in reference.items():
        wanted = by_id(expected, "weight")
        for rank, rank_result in enumerate(per_rank):
            ids, weight = rank_result["replicas"][name]
            assert set(ids.tolist()) >= set(wanted), f"{case} {name}: rank {rank} replica lacks updated ids"
            got = dict(zip(ids.tolist(), weight))
            ordered = sorted(wanted)
            torch.testing.assert_close(
                torch.stack([got[i] for i in ordered]),
                torch.stack([wanted[i] for i in ordered]),
                rtol=RTOL,
                atol=ATOL,
                msg=lambda m, r=rank, n=name: f"{case} {n} rank {r} replica: {m}",
            )
