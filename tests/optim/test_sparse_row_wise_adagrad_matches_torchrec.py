"""SparseRowWiseAdagrad against torchrec's RowWiseAdagrad and against its formula written out.

torchrec's ``RowWiseAdagrad`` (the dense twin of FBGEMM's fused row-wise Adagrad) keeps one
accumulator per row, grown by the mean of the row's squared gradient. It updates every
row of its dense parameter; rows outside a batch get a zero gradient, which changes
nothing unless there is weight decay. So the comparison is on the touched rows without
weight decay, and with every row touched every step with it. The formula check is in
float64, independent of both, and runs without torchrec (a benchmark-only dependency):
``S += mean_j g_j^2``, ``theta -= lr_t * g / (sqrt(init + S) + eps)``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from recis.nn.modules.hashtable import HashTable
from recis.optim import SparseRowWiseAdagrad, SparseRowWiseAdagradSum

VOCAB, DIM, STEPS = 30, 6, 5


def _batches(every_row: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(STEPS):
        ids = torch.randint(0, VOCAB, (20,), generator=generator)
        if every_row:
            ids = torch.cat([torch.randperm(VOCAB, generator=generator), ids])
        batches.append((ids, torch.randn(len(ids), DIM, generator=generator)))
    return batches


@pytest.mark.parametrize(
    "hyper, every_row",
    [
        (dict(lr=0.1), False),
        (dict(lr=0.05, lr_decay=0.2, initial_accumulator_value=0.4, eps=0.05), False),
        (dict(lr=0.1, lr_decay=0.05, initial_accumulator_value=0.2, eps=1e-3, weight_decay=0.3, maximize=True), True),
    ],
    ids=["lr", "decay_init_eps", "weight_decay_maximize_every_row"],
)
def test_row_wise_adagrad_equals_torchrec_row_wise_adagrad_on_the_touched_rows(hyper, every_row):
    rowwise_adagrad = pytest.importorskip("torchrec.optim.rowwise_adagrad")  # benchmark-only dependency
    table = HashTable(DIM, name="emb", seed=9)
    weight = nn.Parameter(table.initial_values(torch.arange(VOCAB)).clone())
    ours = SparseRowWiseAdagrad(param_dict={"emb": table}, **hyper)
    theirs = rowwise_adagrad.RowWiseAdagrad([weight], **hyper)
    for ids, upstream in _batches(every_row):
        ours.zero_grad()
        theirs.zero_grad()
        (table(ids) * upstream).sum().backward()
        (weight.index_select(0, ids) * upstream).sum().backward()
        ours.step()
        theirs.step()
    ids, rows = table.ids_map()
    torch.testing.assert_close(table.weight[rows], weight.detach()[ids])
    torch.testing.assert_close(ours.state_sum(table)[rows], theirs.state[weight]["sum"][ids])
    assert ours.state_sum(table).shape == (len(table), 1)


def _formula(theta, total, grad, step, *, lr, lr_decay, init, eps, weight_decay=0.0, grad_sq=None):
    """One row-wise Adagrad step in float64, rows flattened."""
    theta, grad = theta.double().flatten(1), grad.double().flatten(1)
    g = grad + weight_decay * theta
    squares = g.square() if grad_sq is None else grad_sq.double().flatten(1)
    total = total.double() + squares.mean(dim=1, keepdim=True)
    return theta - lr / (1 + (step - 1) * lr_decay) * g / ((init + total).sqrt() + eps), total


def test_row_wise_adagrad_takes_the_mean_over_the_whole_row_of_a_multidimensional_embedding():
    hyper = dict(lr=0.1, lr_decay=0.1, initial_accumulator_value=0.2, eps=1e-4, weight_decay=0.05)
    table = HashTable([2, 3], name="emb", seed=2)
    optimizer = SparseRowWiseAdagrad(table, **hyper)
    ids = torch.tensor([4, 8, 4])
    generator = torch.Generator().manual_seed(3)
    theta, total = table.initial_values(torch.tensor([4, 8])), torch.zeros(2, 1)
    for step in range(1, 4):
        upstream = torch.randn(3, 2, 3, generator=generator)
        optimizer.zero_grad()
        (table(ids) * upstream).sum().backward()
        optimizer.step()
        grad = torch.stack([upstream[0] + upstream[2], upstream[1]])
        theta, total = _formula(theta, total, grad, step, lr=0.1, lr_decay=0.1, init=0.2, eps=1e-4, weight_decay=0.05)
    torch.testing.assert_close(table.lookup(torch.tensor([4, 8])).double().flatten(1), theta)
    rows = table.rows_for(torch.tensor([4, 8]))
    torch.testing.assert_close(optimizer.state_sum(table)[rows].double(), total + 0.2)


def test_row_wise_adagrad_sum_grows_the_accumulator_by_the_mean_of_the_given_squared_sums():
    table = HashTable(3, name="emb", seed=2)
    table.insert(torch.tensor([7, 9]), torch.zeros(2, 3))
    optimizer = SparseRowWiseAdagradSum(table, lr=0.1, initial_accumulator_value=0.5, eps=0.0)
    rows = table.rows_for(torch.tensor([7, 9]))
    grad = torch.tensor([[3.0, 4.0, 0.0], [1.0, -2.0, 2.0]])
    grad_sq = torch.tensor([[5.0, 8.0, 1.0], [4.0, 9.0, 16.0]])  # two workers' squares summed
    optimizer.apply_gradient(table, rows, grad, grad_sq=grad_sq)
    theta, total = _formula(torch.zeros(2, 3), torch.zeros(2, 1), grad, 1, lr=0.1, lr_decay=0, init=0.5, eps=0.0,
                            grad_sq=grad_sq)  # fmt: skip
    torch.testing.assert_close(table.lookup(torch.tensor([7, 9])).double(), theta)
    torch.testing.assert_close(optimizer.state_sum(table)[rows].double(), total + 0.5)
    assert optimizer.state[table]["step"] == 1
