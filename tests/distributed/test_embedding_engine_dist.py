"""EmbeddingEngine on W gloo ranks: the same tables as one process with the concatenated
batch, for every combiner, ragged and dense input, weights, a coalesced table and a frozen one; at most
three collective calls per forward however many features; bad input and options that
differ across ranks raise on every rank."""

from __future__ import annotations

import pytest
import torch
from collective_counter import counting_collectives
from dist_harness import run_ranks, run_ranks_outcomes

from recis.dist import ShardedOptimizer
from recis.nn import EmbeddingEngine, EmbeddingOption
from recis.optim import SparseAdamW
from recis.ragged import RaggedTensor

GLOBAL_BAGS = 12
STEPS = 4


def _options() -> dict[str, EmbeddingOption]:
    return {
        "clicks": EmbeddingOption(embedding_dim=4, shared_name="item", combiner="sum", seed=1),
        "views": EmbeddingOption(embedding_dim=4, shared_name="item", combiner="mean", seed=1),
        "user": EmbeddingOption(embedding_dim=3, shared_name="user", combiner="mean", coalesced=True, seed=2),
        "city": EmbeddingOption(embedding_dim=3, shared_name="city", combiner="sum", coalesced=True, seed=2),
        "recent": EmbeddingOption(
            embedding_dim=2, shared_name="seq", combiner="tile", combiner_kwargs={"tile_len": 2}, seed=3
        ),
        "tag": EmbeddingOption(embedding_dim=2, shared_name="tag", trainable=False, seed=4),  # a frozen table
    }


def _global_batch(step: int) -> dict:
    generator = torch.Generator().manual_seed(step)
    lengths = torch.randint(0, 4, (GLOBAL_BAGS,), generator=generator)
    values = torch.randint(0, 15, (int(lengths.sum()),), generator=generator)
    return {
        "lengths": lengths,
        "values": values,
        "weights": torch.rand(values.numel(), generator=generator) + 0.5,
        "views": torch.randint(0, 15, (GLOBAL_BAGS, 3), generator=generator),
        "user": torch.randint(0, 10, (GLOBAL_BAGS, 1), generator=generator),
        "city": torch.randint(0, 10, (GLOBAL_BAGS, 2), generator=generator),
        "target": torch.randn(GLOBAL_BAGS, generator=generator),
    }


def _ragged(batch: dict, part: slice, weighted: bool) -> RaggedTensor:
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), batch["lengths"].cumsum(0)])
    start, end = int(offsets[part.start]), int(offsets[part.stop])
    local = offsets[part.start : part.stop + 1] - start
    weight = batch["weights"][start:end] if weighted else None
    return RaggedTensor(batch["values"][start:end], local, weight=weight)


def _samples(batch: dict, part: slice) -> dict:
    return {
        "clicks": _ragged(batch, part, weighted=True),
        "views": batch["views"][part],
        "user": batch["user"][part],
        "city": batch["city"][part],
        "recent": _ragged(batch, part, weighted=False),
        "tag": batch["user"][part],
    }


def _train(engine: EmbeddingEngine, optimizer, rank: int, world_size: int) -> list:
    local = GLOBAL_BAGS // world_size
    part = slice(rank * local, (rank + 1) * local)
    forward_collectives = []
    for step in range(STEPS):
        batch = _global_batch(step)
        optimizer.zero_grad()
        with counting_collectives() as calls:
            out = engine(_samples(batch, part))
        forward_collectives.append(sum(calls.values()))
        score = sum(value.sum(dim=-1) for value in out.values())
        torch.nn.functional.mse_loss(score, batch["target"][part]).backward()
        optimizer.step()
    return forward_collectives


def _tables_by_name(engine: EmbeddingEngine) -> dict:
    return {name: dict(zip(t.local_ids().tolist(), t.weight.tolist())) for name, t in engine.tables().items()}


def _ranks(rank: int, world_size: int) -> dict:
    engine = EmbeddingEngine(_options())
    optimizer = ShardedOptimizer(SparseAdamW(list(engine.tables().values()), lr=0.05))
    collectives = _train(engine, optimizer, rank, world_size)
    return {"tables": _tables_by_name(engine), "collectives": collectives}


def _one_process() -> dict:
    engine = EmbeddingEngine(_options())
    _train(engine, SparseAdamW(list(engine.tables().values()), lr=0.05), 0, 1)
    return _tables_by_name(engine)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_the_engine_on_ranks_trains_the_tables_of_one_process_with_the_whole_batch(world_size):
    per_rank = run_ranks(world_size, _ranks)
    reference = _one_process()
    assert sorted(reference) == ["item", "seq", "tag", "user+city"]
    for name, rows in reference.items():
        merged = {key: value for result in per_rank for key, value in result["tables"][name].items()}
        assert sorted(merged) == sorted(rows), name
        for key, value in rows.items():
            torch.testing.assert_close(torch.tensor(merged[key]), torch.tensor(value), rtol=1e-6, atol=1e-7)
    expected = 0 if world_size == 1 else 3  # counts, ids, rows: however many features and tables
    assert all(count == expected for result in per_rank for count in result["collectives"])


def _bad_input_on_rank_one(rank: int, world_size: int) -> str:
    engine = EmbeddingEngine(_options())
    samples = _samples(_global_batch(0), slice(0, 6))
    if rank == 1:
        samples["views"] = samples["views"].float()
    try:
        engine(samples)
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def test_bad_input_on_one_rank_makes_every_rank_raise_and_changes_nothing():
    outcomes = run_ranks(2, _bad_input_on_rank_one, deadline_s=120)
    assert "feature 'views'" in outcomes[1] and "PeerError" in outcomes[0]


def _different_combiners(rank: int, world_size: int) -> None:
    options = _options()
    options["views"] = EmbeddingOption(embedding_dim=4, shared_name="item", combiner="sum" if rank else "mean", seed=1)
    EmbeddingEngine(options)


def test_options_that_differ_across_ranks_raise_on_every_rank():
    outcomes = run_ranks_outcomes(2, _different_combiners, deadline_s=120)
    assert all("views.combiner" in outcome.get("error", "") for outcome in outcomes)
