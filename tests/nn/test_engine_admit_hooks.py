"""EmbeddingEngine: features of one table with different admit hooks, as RecIS allows.

A ReadOnly feature reads and trains the rows its table holds and brings in no id of
its own; a feature of the same table without a hook inserts as usual (on ranks too:
tests/distributed/test_engine_admit_hooks_dist.py).
"""

from __future__ import annotations

import torch

from recis.nn import EmbeddingEngine, EmbeddingOption
from recis.nn.hashtable_hook import AdmitHook
from recis.nn.initializers import ConstantInitializer
from recis.optim import SparseAdamW

DIM = 2


def _engine() -> EmbeddingEngine:
    def option(**kwargs) -> EmbeddingOption:
        return EmbeddingOption(embedding_dim=DIM, shared_name="t", initializer=ConstantInitializer(1.0), **kwargs)

    return EmbeddingEngine({"writer": option(), "reader": option(admit_hook=AdmitHook("ReadOnly"))})


def test_a_read_only_feature_inserts_nothing_and_reads_zeros_for_absent_ids():
    engine = _engine()
    out = engine({"reader": torch.tensor([[5], [6]])})
    assert len(engine.table_of("reader")) == 0
    assert torch.equal(out["reader"], torch.zeros(2, DIM))


def test_a_read_only_feature_reads_the_rows_another_feature_of_its_table_inserts():
    engine = _engine()
    out = engine({"writer": torch.tensor([[5]]), "reader": torch.tensor([[5], [7]])})
    assert engine.table_of("writer") is engine.table_of("reader")
    assert sorted(engine.table_of("reader").ids().tolist()) == [5]
    assert torch.equal(out["reader"], torch.tensor([[1.0, 1.0], [0.0, 0.0]]))


def test_a_read_only_feature_trains_present_rows_and_no_absent_id():
    engine = _engine()
    table = engine.table_of("reader")
    optimizer = SparseAdamW(list(engine.tables().values()), lr=0.1)
    engine({"writer": torch.tensor([[5]])})  # 5 gets a row
    optimizer.zero_grad()
    engine({"reader": torch.tensor([[5], [7]])})["reader"].sum().backward()
    optimizer.step()
    assert sorted(table.ids().tolist()) == [5]
    assert bool((table.lookup(torch.tensor([5])) < 1.0).all())


def test_features_with_equal_hooks_make_one_lookup_and_the_table_keeps_their_hook():
    hook = AdmitHook("ReadOnly")
    engine = EmbeddingEngine(
        {
            "a": EmbeddingOption(embedding_dim=DIM, shared_name="t", admit_hook=hook),
            "b": EmbeddingOption(embedding_dim=DIM, shared_name="t", admit_hook=AdmitHook("ReadOnly")),
        }
    )
    assert engine.table_of("a").lifecycle.admit_hook == hook
    engine({"a": torch.tensor([[1]]), "b": torch.tensor([[2]])})
    assert len(engine.table_of("a")) == 0
