"""EmbeddingEngine on 2 gloo ranks: features of one table with different admit hooks are
refused on every rank at construction (a sharded table admits by one hook)."""

from __future__ import annotations

from dist_harness import run_ranks_outcomes

from recis.nn import EmbeddingEngine, EmbeddingOption
from recis.nn.hashtable_hook import AdmitHook


def _mixed_hooks(rank: int, world_size: int) -> None:
    EmbeddingEngine(
        {
            "writer": EmbeddingOption(embedding_dim=2, shared_name="t"),
            "reader": EmbeddingOption(embedding_dim=2, shared_name="t", admit_hook=AdmitHook("ReadOnly")),
        }
    )


def test_features_of_a_sharded_table_with_different_admit_hooks_are_refused_on_every_rank():
    outcomes = run_ranks_outcomes(2, _mixed_hooks, deadline_s=120)
    assert all("['reader', 'writer']" in outcome.get("error", "") for outcome in outcomes), outcomes
    assert all("different admit hooks" in outcome.get("error", "") for outcome in outcomes)
