"""Frozen tables (RecIS's ``requires_optimizer_state=False``): rows without gradients or optimizer state.

A frozen table still looks up, inserts and evicts; its rows are constants to autograd,
sparse optimizers leave it out (RecIS's ``filter_param_dict``), and ``accept_grad``
refuses. ``EmbeddingOption(trainable=False)`` makes one: in ``DynamicEmbedding``, and in
``EmbeddingEngine`` for a shared name that no trainable feature reads.
"""

import pytest
import torch

from recis.nn import DynamicEmbedding, EmbeddingEngine, EmbeddingOption, HashTable
from recis.nn.hashtable_hook import FilterHook
from recis.nn.initializers import ConstantInitializer
from recis.nn.modules.hashtable import filter_out_sparse_param
from recis.optim import SparseAdagrad, SparseAdamW


def _frozen(**kwargs):
    return HashTable([3], requires_optimizer_state=False, initializer=ConstantInitializer(0.5), **kwargs)


def test_a_frozen_table_inserts_in_training_but_its_rows_carry_no_gradient():
    table = _frozen(name="frozen")
    rows = table(torch.tensor([4, 5, 4]))
    assert len(table) == 2 and table.requires_optimizer_state is False
    assert not rows.requires_grad
    assert torch.equal(rows, torch.full((3, 3), 0.5))


def test_sparse_optimizers_leave_frozen_tables_out_and_train_the_others():
    frozen, trained = _frozen(name="frozen"), HashTable([3], name="trained", initializer=ConstantInitializer(0.5))
    for optimizer_cls in (SparseAdamW, SparseAdagrad):
        optimizer = optimizer_cls({"frozen": frozen, "trained": trained}, lr=0.1)
        assert optimizer.param_groups[0]["params"] == [trained]
        (frozen(torch.tensor([1])).sum() + trained(torch.tensor([1])).sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(frozen.weight, torch.full((1, 3), 0.5)) and bool((trained.weight < 0.5).all())
    assert frozen.store.slot_names() == []


def test_add_params_skips_a_frozen_table():
    trained = HashTable([3], name="trained")
    optimizer = SparseAdamW([trained], lr=0.1)
    optimizer.add_params({"frozen": _frozen(name="frozen")})
    assert optimizer.param_groups[0]["params"] == [trained]


def test_accept_grad_on_a_frozen_table_raises_and_changes_nothing():
    table = _frozen(name="frozen")
    table(torch.tensor([1]))
    with pytest.raises(RuntimeError, match="frozen"):
        table.accept_grad(torch.tensor([1]), torch.ones(1, 3))
    assert table.pending_grad() is None


def test_requires_optimizer_state_must_be_a_bool():
    with pytest.raises(TypeError, match="requires_optimizer_state must be a bool, got 0"):
        HashTable([3], requires_optimizer_state=0)


def test_an_untrainable_dynamic_embedding_owns_a_frozen_table():
    layer = DynamicEmbedding(EmbeddingOption(embedding_dim=3, shared_name="f", trainable=False))
    assert layer.table.requires_optimizer_state is False
    assert DynamicEmbedding(EmbeddingOption(embedding_dim=3, shared_name="t")).table.requires_optimizer_state


def test_the_engine_freezes_a_shared_name_no_trainable_feature_reads():
    options = {
        "frozen": EmbeddingOption(embedding_dim=3, shared_name="f", trainable=False),
        "reader": EmbeddingOption(embedding_dim=3, shared_name="t", trainable=False),
        "writer": EmbeddingOption(embedding_dim=3, shared_name="t"),
    }
    engine = EmbeddingEngine(options)
    assert engine.table_of("frozen").requires_optimizer_state is False
    assert engine.table_of("reader") is engine.table_of("writer")
    assert engine.table_of("writer").requires_optimizer_state is True
    optimizer = SparseAdamW(filter_out_sparse_param(engine), lr=0.1)
    assert optimizer.param_groups[0]["params"] == [engine.table_of("writer")]


def test_coalesced_frozen_and_trained_tables_with_equal_options_stay_apart():
    options = {
        "a": EmbeddingOption(embedding_dim=3, shared_name="a", coalesced=True, trainable=False),
        "b": EmbeddingOption(embedding_dim=3, shared_name="b", coalesced=True, trainable=False),
        "c": EmbeddingOption(embedding_dim=3, shared_name="c", coalesced=True),
    }
    engine = EmbeddingEngine(options)
    assert engine.table_of("a") is engine.table_of("b") and engine.table_of("c") is not engine.table_of("a")
    assert sorted(engine.tables()) == ["a+b", "c"]


def test_a_full_frozen_table_evicts_the_rows_of_earlier_lookups_made_with_grad_enabled():
    # A frozen table takes no gradient and no optimizer ends its gradient window (zero_grad
    # leaves it out): its lookups must not protect their rows from eviction.
    table = _frozen(name="frozen", capacity=4)
    table(torch.tensor([0, 1, 2, 3]))
    table(torch.tensor([4, 5]))
    assert sorted(table.ids().tolist()) == [2, 3, 4, 5] and table.stats()["evicted"] == 2


def test_the_filter_removes_stale_rows_of_a_frozen_table_looked_up_with_grad_enabled():
    table = _frozen(name="frozen", filter_hook=FilterHook("GlobalStepFilter", {"filter_step": 1}))
    table(torch.tensor([1, 2]))
    table.advance_filter_step(5)
    assert table.run_filter() == 2 and len(table) == 0


def test_a_frozen_table_loads_a_trained_tables_rows_without_its_optimizer_slots_or_pending_gradient():
    # Fine-tuning with pretrained embeddings frozen: the rows load; the Adam slots, which no
    # optimizer of a frozen table reads, are not kept (as recis.checkpoint.load leaves them out),
    # nor is a pending gradient, which nothing would apply or clear.
    trained = HashTable([3], name="t", initializer=ConstantInitializer(0.5))
    optimizer = SparseAdamW([trained], lr=0.1)
    trained(torch.tensor([1, 2])).sum().backward()
    optimizer.step()
    trained(torch.tensor([2, 3])).sum().backward()  # saved with a gradient pending (mid-accumulation)
    frozen = _frozen(name="t")
    frozen.load_state_dict(trained.state_dict())
    ids = torch.tensor([1, 2, 3])
    assert torch.equal(frozen.lookup(ids), trained.lookup(ids))
    assert frozen.slot_names() == [] and frozen.pending_grad() is None


def test_an_adagrad_optimizer_of_frozen_tables_only_says_they_were_left_out():
    with pytest.raises(ValueError, match="empty parameter list .frozen tables"):
        SparseAdagrad({"frozen": _frozen(name="frozen")})
