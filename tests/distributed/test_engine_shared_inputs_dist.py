"""Features given one input tensor (a feature's first-order and factor tables, as in DeepFM) on gloo
ranks: the engine trains the tables that copies of the input train, and that one process trains
with the concatenated batch; the shared input is made into bags, deduplicated and routed to the
owners once per forward, however many tables read it."""

from __future__ import annotations

import importlib
from contextlib import contextmanager

import pytest
import torch
from dist_harness import run_ranks

import recis.dist.exchange
import recis.nn.modules.embedding_engine
from recis.dist import ShardedOptimizer
from recis.nn import EmbeddingEngine, EmbeddingOption
from recis.optim import SparseAdamW

SHARDED_LOOKUP = importlib.import_module("recis.dist.sharded_lookup")  # recis.dist.sharded_lookup is also a function

BATCH = 12
STEPS = 3


def _options() -> dict[str, EmbeddingOption]:
    """Features a and b: first-order (dim 1) and factor (dim 3) tables, coalesced per dim; g: two tables of its own."""
    options = {}
    for name in "ab":
        options[f"{name}.w"] = EmbeddingOption(embedding_dim=1, shared_name=f"{name}.w", coalesced=True, seed=1)
        options[f"{name}.v"] = EmbeddingOption(embedding_dim=3, shared_name=f"{name}.v", coalesced=True, seed=2)
    options["g.w"] = EmbeddingOption(embedding_dim=1, shared_name="g.w", seed=3)
    options["g.v"] = EmbeddingOption(embedding_dim=2, shared_name="g.v", combiner="mean", seed=4)
    return options


def _batch(step: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return {
        "a": torch.randint(0, 20, (BATCH,), generator=generator),
        "b": torch.randint(0, 20, (BATCH,), generator=generator),
        "g": torch.randint(0, 20, (BATCH, 2), generator=generator),
        "target": torch.randn(BATCH, generator=generator),
    }


def _samples(batch: dict, part: slice, shared: bool) -> dict[str, torch.Tensor]:
    """Each feature's input: one tensor object for both tables of a feature, or a copy for each."""
    samples = {}
    for name in "abg":
        ids = batch[name][part]
        samples[f"{name}.w"], samples[f"{name}.v"] = ids, ids if shared else ids.clone()
    return samples


@contextmanager
def _counting(module: object, name: str):
    """Count the calls of ``module.name`` made inside the block."""
    original, calls = getattr(module, name), []

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    setattr(module, name, counted)
    try:
        yield calls
    finally:
        setattr(module, name, original)


def _train(rank: int, world_size: int, shared: bool) -> dict:
    engine = EmbeddingEngine(_options())
    tables = list(engine.tables().values())
    optimizer = SparseAdamW(tables, lr=0.05)
    if world_size > 1:
        optimizer = ShardedOptimizer(optimizer)
    local = BATCH // world_size
    part = slice(rank * local, (rank + 1) * local)
    counts = []
    for step in range(STEPS):
        batch = _batch(step)
        with (
            _counting(recis.nn.modules.embedding_engine, "as_bags") as bags,
            _counting(SHARDED_LOOKUP, "unique_by_owner") as routed_forward,
        ):
            out = engine(_samples(batch, part, shared))
        score = sum(value.reshape(local, -1).sum(dim=1) for value in out.values())
        torch.nn.functional.mse_loss(score, batch["target"][part]).backward()
        with _counting(recis.dist.exchange, "owner_rank") as routed_step:
            optimizer.step()
        optimizer.zero_grad()
        counts.append((len(bags), len(routed_forward), len(routed_step)))
    rows = {name: dict(zip(t.local_ids().tolist(), t.weight.tolist())) for name, t in engine.tables().items()}
    return {"tables": rows, "counts": counts}


def _ranks(rank: int, world_size: int) -> dict:
    return {"shared": _train(rank, world_size, shared=True), "copies": _train(rank, world_size, shared=False)}


@pytest.mark.parametrize("world_size", [2, 3])
def test_tables_reading_one_input_train_as_copies_and_as_one_process_and_route_it_once(world_size):
    per_rank = run_ranks(world_size, _ranks)
    reference = _train(0, 1, shared=True)["tables"]
    assert sorted(reference) == ["a.v+b.v", "a.w+b.w", "g.v", "g.w"]
    for result in per_rank:
        assert result["shared"]["tables"] == result["copies"]["tables"]  # the same arithmetic, bit for bit
    for name, rows in reference.items():
        merged = {key: value for result in per_rank for key, value in result["shared"]["tables"][name].items()}
        assert sorted(merged) == sorted(rows), name
        for key, value in rows.items():
            torch.testing.assert_close(torch.tensor(merged[key]), torch.tensor(value), rtol=1e-6, atol=1e-7)
    # 3 inputs become bags once each; 2 distinct id sets (a and b's stored ids, g's ids) are routed
    # once each per forward, where copies route each of the 4 tables' ids. The step hashes no id:
    # each gradient goes with the owner counts its lookup found (test_gradient_routing.py).
    for result in per_rank:
        assert result["shared"]["counts"] == [(3, 2, 0)] * STEPS
        assert result["copies"]["counts"] == [(6, 4, 0)] * STEPS
