"""SparseAdagrad against torch.optim.Adagrad, and SparseAdagradSum against SparseAdagrad.

The reference is an ``nn.Embedding`` holding the table's initial rows, trained on the same
batches by ``torch.optim.Adagrad``: with sparse gradients (rows outside a batch are left
alone, as SparseAdagrad leaves them) when there is no weight decay, and with dense
gradients, every row in every batch, when there is (torch refuses weight decay with
sparse gradients, and with dense ones it decays every row). Rows and accumulators agree
to fp32 rounding.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from recis.nn.modules.hashtable import HashTable
from recis.optim import SparseAdagrad, SparseAdagradSum

VOCAB, DIM, STEPS = 40, 5, 6


def _batches(every_row: bool, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(STEPS):
        ids = torch.randint(0, VOCAB, (24,), generator=generator)  # duplicates: summed per row
        if every_row:
            ids = torch.cat([torch.randperm(VOCAB, generator=generator), ids])
        batches.append((ids, torch.randn(len(ids), DIM, generator=generator)))
    return batches


def _reference(table: HashTable, sparse: bool) -> nn.Embedding:
    embedding = nn.Embedding(VOCAB, DIM, sparse=sparse)
    with torch.no_grad():
        embedding.weight.copy_(table.initial_values(torch.arange(VOCAB)))
    return embedding


def _train_both(hyper: dict, every_row: bool) -> tuple[HashTable, SparseAdagrad, nn.Embedding, torch.optim.Adagrad]:
    table = HashTable(DIM, name="emb", seed=5)
    embedding = _reference(table, sparse=hyper.get("weight_decay", 0) == 0)
    ours = SparseAdagrad(param_dict={"emb": table}, **hyper)
    theirs = torch.optim.Adagrad(embedding.parameters(), **hyper)
    for ids, weights in _batches(every_row):
        for module, optimizer in ((table, ours), (embedding, theirs)):
            optimizer.zero_grad()
            (module(ids) * weights).sum().backward()
            optimizer.step()
    return table, ours, embedding, theirs


def _assert_rows_and_sums_match(table, ours, embedding, theirs) -> None:
    ids, rows = table.ids_map()
    torch.testing.assert_close(table.weight[rows], embedding.weight.detach()[ids])
    torch.testing.assert_close(ours.state_sum(table)[rows], theirs.state[embedding.weight]["sum"][ids])
    untouched = torch.ones(VOCAB, dtype=torch.bool)
    untouched[ids] = False
    torch.testing.assert_close(
        embedding.weight.detach()[untouched], table.initial_values(torch.arange(VOCAB))[untouched]
    )


@pytest.mark.parametrize(
    "hyper",
    [
        dict(lr=0.1),
        dict(lr=0.05, lr_decay=0.1, initial_accumulator_value=0.3, eps=0.1),
        dict(lr=0.2, initial_accumulator_value=0.1, maximize=True),
    ],
    ids=["lr", "decay_init_eps", "maximize"],
)
def test_sparse_adagrad_equals_torch_adagrad_with_sparse_gradients_on_the_rows_a_batch_touched(hyper):
    _assert_rows_and_sums_match(*_train_both(hyper, every_row=False))


def test_sparse_adagrad_weight_decay_equals_torch_adagrad_when_every_row_is_touched_every_step():
    hyper = dict(lr=0.1, lr_decay=0.05, initial_accumulator_value=0.2, weight_decay=0.3)
    _assert_rows_and_sums_match(*_train_both(hyper, every_row=True))


def test_weight_decay_reaches_only_the_rows_a_batch_touched():
    table = HashTable(DIM, name="emb", seed=5)
    optimizer = SparseAdagrad(table, lr=0.1, weight_decay=0.5)
    table(torch.arange(4)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    before = table.lookup(torch.arange(4))
    table(torch.tensor([1])).mul(0).sum().backward()  # a zero gradient: only the decay moves row 1
    optimizer.step()
    after = table.lookup(torch.arange(4))
    assert not torch.equal(after[1], before[1])
    torch.testing.assert_close(after[[0, 2, 3]], before[[0, 2, 3]], rtol=0, atol=0)


@pytest.mark.parametrize("maximize", [False, True])
def test_sparse_adagrad_sum_in_one_process_is_sparse_adagrad_without_weight_decay(maximize):
    results = []
    for optimizer_cls in (SparseAdagrad, SparseAdagradSum):
        table = HashTable(DIM, name="emb", seed=5)
        optimizer = optimizer_cls(table, lr=0.1, lr_decay=0.02, initial_accumulator_value=0.3, maximize=maximize)
        optimizer.set_grad_accum_steps(2)
        for ids, weights in _batches(every_row=False):
            optimizer.zero_grad()
            (table(ids) * weights).sum().backward()
            optimizer.step()
        results.append((table.weight.clone(), optimizer.state_sum(table), optimizer.state[table]["step"]))
    (weight, sums, steps), (weight_sum, sums_sum, steps_sum) = results
    assert torch.equal(weight, weight_sum) and torch.equal(sums, sums_sum) and steps == steps_sum == STEPS // 2
