"""SparseAdam equals torch.optim.SparseAdam on nn.Embedding(sparse=True), and reference_adam with decay.

Both sides start from the same rows (``table.assign``) and get the same loss each step:
random subsets of rows, ids repeated inside a batch, a batch with no ids that still runs
forward/backward (counted as a step by both), and a step in which the table is not used
at all (counted by neither).

Tolerances: recis and torch both compute in fp32 but in different operation orders
(torch: m += (1 - b1) * (g - m), v += (1 - b2) * (g^2 - v); recis: lerp, v * b2 + (1 - b2) g^2;
duplicate gradients summed in different orders), so each step differs by a few fp32 ulps.
Adam's update is normalized (about lr per step), so those ulps do not grow: measured over
40 steps, rows (of order 1) differ by at most 2.4e-7 and exp_avg_sq by 4.6e-7 relative.
Rows and exp_avg: rtol=1e-5, atol=1e-6 (margin over the measured 2.4e-7, still 10,000x
smaller than one update of lr = 0.01 to 0.05). exp_avg_sq, which is of order 1e-3 * g^2,
gets a relative tolerance: rtol=5e-6, atol=1e-12. Against the float64 reference: fp64
tables (fp64 slots) to rtol=1e-10, atol=1e-12 (measured 1.3e-15 relative); fp32 tables as
against torch (measured 6e-7 absolute on the rows).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference_adam import lazy_table_step

from recis.nn.modules.hashtable import HashTable
from recis.optim import SparseAdam

NUM_ROWS = 12
IDS = torch.arange(NUM_ROWS, dtype=torch.int64) * 1_000_003 + 17  # row i of nn.Embedding <-> IDS[i]
STEPS = 40
EMPTY_STEP, UNUSED_STEP = 7, 13
FP32_TOL = dict(rtol=1e-5, atol=1e-6)
FP32_V_TOL = dict(rtol=5e-6, atol=1e-12)  # exp_avg_sq: relative
FP64_TOL = dict(rtol=1e-10, atol=1e-12)


def schedule(seed: int, dim: int) -> list[tuple[str, torch.Tensor | None, torch.Tensor | None]]:
    """Per step: ("batch", positions into IDS with duplicates, loss weights), ("empty", ...), ("unused", ...)."""
    gen = torch.Generator().manual_seed(seed)
    steps = []
    for step in range(STEPS):
        if step == EMPTY_STEP:
            steps.append(("empty", torch.empty(0, dtype=torch.int64), torch.empty(0, dim)))
            continue
        if step == UNUSED_STEP:
            steps.append(("unused", None, None))
            continue
        subset = torch.randperm(NUM_ROWS, generator=gen)[: int(torch.randint(1, NUM_ROWS, (1,), generator=gen))]
        repeats = int(torch.randint(1, 4, (1,), generator=gen))
        extra = subset[torch.randint(0, subset.numel(), (repeats,), generator=gen)]
        positions = torch.cat([subset, extra])  # every batch repeats some ids
        positions = positions[torch.randperm(positions.numel(), generator=gen)]
        steps.append(("batch", positions, torch.randn(positions.numel(), dim, generator=gen)))
    return steps


def make_table(embedding_shape, w0: torch.Tensor, dtype=torch.float32) -> HashTable:
    table = HashTable(embedding_shape, dtype=dtype, name="emb")
    table.assign(IDS, w0.reshape(NUM_ROWS, *table.embedding_shape).to(dtype))
    return table


def table_order(table: HashTable) -> torch.Tensor:
    """Position in IDS of each table row (table rows are in table.ids() order)."""
    order = torch.searchsorted(IDS, table.ids())
    assert torch.equal(IDS[order], table.ids())
    return order


def table_loss(table: HashTable, positions: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    out = table(IDS[positions])
    assert out.shape == (positions.numel(), *table.embedding_shape)
    return (out * weights.reshape(out.shape).to(out.dtype)).sum()


@pytest.mark.parametrize("embedding_shape", [[4], [2, 3]], ids=["dim4", "shape2x3"])
@pytest.mark.parametrize(
    ("lr", "betas", "eps", "maximize"),
    [(0.01, (0.9, 0.999), 1e-8, False), (0.05, (0.8, 0.99), 1e-3, False), (0.01, (0.9, 0.999), 1e-8, True)],
    ids=["defaults", "other_hyper", "maximize"],
)
def test_sparse_adam_matches_torch_sparse_adam_step_by_step(embedding_shape, lr, betas, eps, maximize):
    dim = math.prod(embedding_shape)
    w0 = torch.randn(NUM_ROWS, dim, generator=torch.Generator().manual_seed(1))
    emb = torch.nn.Embedding(NUM_ROWS, dim, sparse=True)
    with torch.no_grad():
        emb.weight.copy_(w0)
    table = make_table(embedding_shape, w0)
    torch_opt = torch.optim.SparseAdam(emb.parameters(), lr=lr, betas=betas, eps=eps, maximize=maximize)
    ours = SparseAdam(table, lr=lr, betas=betas, eps=eps, maximize=maximize)
    order = table_order(table)

    for step, (kind, positions, weights) in enumerate(schedule(seed=2, dim=dim)):
        torch_opt.zero_grad()
        ours.zero_grad()
        before = table.weight.clone()
        if kind != "unused":
            (emb(positions) * weights).sum().backward()
            table_loss(table, positions, weights).backward()
        torch_opt.step()
        ours.step()

        torch_state = torch_opt.state[emb.weight]
        assert ours.state[table].get("step", 0) == torch_state.get("step", 0), f"step {step}"
        if kind != "batch":
            assert torch.equal(table.weight, before), f"step {step}: {kind} step changed rows"
        torch.testing.assert_close(table.lookup(IDS).reshape(NUM_ROWS, dim), emb.weight.detach(), **FP32_TOL)
        if torch_state:
            torch.testing.assert_close(table.slot("exp_avg"), torch_state["exp_avg"][order], **FP32_TOL)
            torch.testing.assert_close(table.slot("exp_avg_sq"), torch_state["exp_avg_sq"][order], **FP32_V_TOL)
    assert torch_opt.state[emb.weight]["step"] == STEPS - 1  # the empty step counted, the unused one not


def make_table_small(emb: torch.nn.Embedding) -> HashTable:
    table = HashTable(emb.embedding_dim, name="small")
    table.assign(torch.arange(emb.num_embeddings) + 100, emb.weight.detach())
    return table


def test_sparse_adam_matches_torch_on_one_step_with_only_duplicated_ids():
    # All gradient for a row comes from repeats of one id: torch coalesces, recis must sum too.
    emb = torch.nn.Embedding(3, 2, sparse=True)
    table = make_table_small(emb)
    torch_opt = torch.optim.SparseAdam(emb.parameters(), lr=0.1)
    ours = SparseAdam(table, lr=0.1)
    positions = torch.tensor([1, 1, 1, 2, 1])
    weights = torch.tensor([[0.5, -1.0], [0.25, 2.0], [1.0, 0.5], [3.0, -3.0], [-0.125, 0.0]])
    (emb(positions) * weights).sum().backward()
    (table(positions + 100) * weights).sum().backward()
    torch_opt.step()
    ours.step()
    torch.testing.assert_close(table.lookup(torch.tensor([100, 101, 102])), emb.weight.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(
        table.slot("exp_avg_sq"), torch_opt.state[emb.weight]["exp_avg_sq"], rtol=1e-6, atol=1e-10
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("embedding_shape", [[4], [2, 3]], ids=["dim4", "shape2x3"])
def test_sparse_adam_l2_weight_decay_matches_the_reference(embedding_shape, dtype):
    # torch.optim.SparseAdam has no weight decay: compare with reference_adam's rule
    # (g += wd * theta, then the TF-form update; lazy rows, per-table t).
    lr, wd = 0.02, 0.3
    dim = math.prod(embedding_shape)
    w0 = torch.randn(NUM_ROWS, dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    table = make_table(embedding_shape, w0, dtype=dtype)
    ours = SparseAdam(table, lr=lr, weight_decay=wd, state_dtype=dtype)
    order = table_order(table).numpy()
    ref_w = w0.numpy()[order].copy()  # reference rows in table row order
    ref_m, ref_v = np.zeros_like(ref_w), np.zeros_like(ref_w)
    ref_t = 0
    row_of_position = np.argsort(order)  # IDS position -> table row
    tol = FP64_TOL if dtype == torch.float64 else FP32_TOL
    v_tol = FP64_TOL if dtype == torch.float64 else FP32_V_TOL

    for kind, positions, weights in schedule(seed=4, dim=dim):
        ours.zero_grad()
        if kind != "unused":
            table_loss(table, positions, weights).backward()
            ref_t = lazy_table_step(
                "sparse_adam",
                ref_w,
                ref_m,
                ref_v,
                ref_t,
                row_of_position[positions.numpy()],
                weights.double().numpy(),
                lr=lr,
                beta1=0.9,
                beta2=0.999,
                eps=1e-8,
                weight_decay=wd,
            )
        ours.step()
        assert ours.state[table].get("step", 0) == ref_t
        torch.testing.assert_close(table.weight.double(), torch.from_numpy(ref_w), **tol)
        torch.testing.assert_close(table.slot("exp_avg").double(), torch.from_numpy(ref_m), **tol)
        torch.testing.assert_close(table.slot("exp_avg_sq").double(), torch.from_numpy(ref_v), **v_tol)
    assert ref_t == STEPS - 1  # the empty step counted, the unused one not


def test_sparse_adam_l2_weight_decay_changes_the_rows():
    # Guards the test above against a decay too small to matter: wd=0.3 moves rows measurably.
    dim = 4
    w0 = torch.randn(NUM_ROWS, dim, generator=torch.Generator().manual_seed(3))
    results = []
    for wd in (0.0, 0.3):
        table = make_table([dim], w0)
        ours = SparseAdam(table, lr=0.02, weight_decay=wd, eps=1e-3)
        for kind, positions, weights in schedule(seed=4, dim=dim):
            ours.zero_grad()
            if kind != "unused":
                table_loss(table, positions, weights).backward()
            ours.step()
        results.append(table.weight.clone())
    assert (results[0] - results[1]).abs().max() > 1e-3
