"""SparseAdamW equals torch.optim.AdamW: on the whole table when every row gets a gradient every
step, and on the touched rows only otherwise (untouched rows and their slots stay as they were).

Loss each step: sum(table(ids) * C) with random C, so the gradient of a row is the sum of the
rows of C at its positions (ids repeat inside batches).

Tolerances: recis follows torch.optim.Adam's single-tensor operation order, and on CPU the
results measured identical to torch's (0 difference over 30 steps, repeated ids included).
The checks still allow fp32 rounding (a different summation order of repeated ids, or a
fused kernel, may move a value by a few ulps, which Adam's normalized update does not
amplify): rows and exp_avg rtol=1e-6, atol=1e-7; exp_avg_sq (order 1e-3 * g^2) rtol=1e-6,
atol=1e-12. fp64 tables against the float64 reference: rtol=1e-10, atol=1e-12 (measured 2e-15).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference_adam import lazy_table_step

from recis.nn.modules.hashtable import HashTable
from recis.optim import SparseAdamW

NUM_ROWS = 10
IDS = torch.arange(NUM_ROWS, dtype=torch.int64) * 7919 - 40  # row i of the reference <-> IDS[i]
STEPS = 30
TOL = dict(rtol=1e-6, atol=1e-7)
V_TOL = dict(rtol=1e-6, atol=1e-12)
FP64_TOL = dict(rtol=1e-10, atol=1e-12)
HYPER_CASES = [
    pytest.param(dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, maximize=False), id="defaults"),
    pytest.param(dict(lr=0.05, betas=(0.8, 0.99), eps=1e-3, weight_decay=0.5, maximize=False), id="strong_decay"),
    pytest.param(dict(lr=0.02, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, maximize=True), id="maximize"),
]


def make_table(embedding_shape, w0: torch.Tensor, dtype=torch.float32) -> HashTable:
    table = HashTable(embedding_shape, dtype=dtype, name="emb")
    table.assign(IDS, w0.reshape(NUM_ROWS, *table.embedding_shape).to(dtype))
    return table


def rows_in_ids_order(table: HashTable, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (table row order) re-ordered to IDS order."""
    position = {int(i): k for k, i in enumerate(table.ids())}
    return tensor[torch.tensor([position[int(i)] for i in IDS])]


def table_backward(table: HashTable, positions: torch.Tensor, weights: torch.Tensor) -> None:
    out = table(IDS[positions])
    (out * weights.reshape(out.shape).to(out.dtype)).sum().backward()


def row_grads(positions: torch.Tensor, weights: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """The gradient of every row (zero for rows not in the batch): C summed per position."""
    return torch.zeros(NUM_ROWS, weights.shape[1], dtype=dtype).index_add_(0, positions, weights.to(dtype))


def partial_schedule(seed: int, dim: int):
    """Per step: ("batch", positions with repeats, C), ("empty", ...) or ("unused", None, None)."""
    gen = torch.Generator().manual_seed(seed)
    steps = []
    for step in range(STEPS):
        if step == 5:
            steps.append(("empty", torch.empty(0, dtype=torch.int64), torch.empty(0, dim)))
        elif step == 11:
            steps.append(("unused", None, None))
        else:
            size = int(torch.randint(1, NUM_ROWS // 2, (1,), generator=gen))
            subset = torch.randperm(NUM_ROWS, generator=gen)[:size]
            positions = torch.cat([subset, subset[:1]])
            steps.append(("batch", positions, torch.randn(positions.numel(), dim, generator=gen)))
    return steps


# ---------------------------------------------------------------------------- (a) every row, every step
@pytest.mark.parametrize("embedding_shape", [[3], [2, 3]], ids=["dim3", "shape2x3"])
@pytest.mark.parametrize("hyper", HYPER_CASES)
def test_every_row_every_step_equals_nn_embedding_with_torch_adamw(embedding_shape, hyper):
    dim = math.prod(embedding_shape)
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(NUM_ROWS, dim, generator=gen)
    emb = torch.nn.Embedding(NUM_ROWS, dim)
    with torch.no_grad():
        emb.weight.copy_(w0)
    table = make_table(embedding_shape, w0)
    torch_opt = torch.optim.AdamW(emb.parameters(), foreach=False, **hyper)
    ours = SparseAdamW(table, **hyper)

    for _ in range(STEPS):
        extra = torch.randint(0, NUM_ROWS, (4,), generator=gen)
        positions = torch.cat([torch.arange(NUM_ROWS), extra])
        positions = positions[torch.randperm(positions.numel(), generator=gen)]
        weights = torch.randn(positions.numel(), dim, generator=gen)
        torch_opt.zero_grad()
        ours.zero_grad()
        (emb(positions) * weights).sum().backward()
        table_backward(table, positions, weights)
        torch_opt.step()
        ours.step()

    state = torch_opt.state[emb.weight]
    assert ours.state[table]["step"] == int(state["step"]) == STEPS
    torch.testing.assert_close(table.lookup(IDS).reshape(NUM_ROWS, dim), emb.weight.detach(), **TOL)
    torch.testing.assert_close(rows_in_ids_order(table, table.slot("exp_avg")), state["exp_avg"], **TOL)
    torch.testing.assert_close(rows_in_ids_order(table, table.slot("exp_avg_sq")), state["exp_avg_sq"], **V_TOL)


# ---------------------------------------------------------------------------- (b) touched rows only
def torch_adamw_on_rows(weight, exp_avg, exp_avg_sq, rows, grad, table_step: int, hyper: dict) -> None:
    """torch.optim.AdamW applied to ``weight[rows]`` alone, at step ``table_step``; writes back in place."""
    p = torch.nn.Parameter(weight[rows].clone())
    optimizer = torch.optim.AdamW([p], foreach=False, **hyper)
    optimizer.state[p] = {
        "step": torch.tensor(float(table_step - 1)),
        "exp_avg": exp_avg[rows].clone(),
        "exp_avg_sq": exp_avg_sq[rows].clone(),
    }
    p.grad = grad.clone()
    optimizer.step()
    assert int(optimizer.state[p]["step"]) == table_step
    weight[rows] = p.detach()
    exp_avg[rows] = optimizer.state[p]["exp_avg"]
    exp_avg_sq[rows] = optimizer.state[p]["exp_avg_sq"]


def assert_untouched_rows_unchanged(table: HashTable, before: dict, touched: torch.Tensor, step: int) -> None:
    untouched = torch.ones(NUM_ROWS, dtype=torch.bool)
    untouched[touched] = False
    for name, old in before.items():
        now = rows_in_ids_order(table, table.weight if name == "weight" else table.slot(name))
        assert torch.equal(now[untouched], old[untouched]), f"step {step}: {name} of an untouched row changed"


def snapshot(table: HashTable) -> dict:
    out = {"weight": rows_in_ids_order(table, table.weight).clone()}
    for name in ("exp_avg", "exp_avg_sq"):
        out[name] = rows_in_ids_order(table, table.slot(name)).clone()
    return out


@pytest.mark.parametrize("embedding_shape", [[3], [2, 3]], ids=["dim3", "shape2x3"])
@pytest.mark.parametrize("hyper", HYPER_CASES)
def test_touched_rows_follow_torch_adamw_with_the_table_step_count(embedding_shape, hyper):
    dim = math.prod(embedding_shape)
    w0 = torch.randn(NUM_ROWS, dim, generator=torch.Generator().manual_seed(1))
    table = make_table(embedding_shape, w0)
    ours = SparseAdamW(table, **hyper)
    ref_w, ref_m, ref_v = w0.clone(), torch.zeros(NUM_ROWS, dim), torch.zeros(NUM_ROWS, dim)
    table_step = 0

    for step, (kind, positions, weights) in enumerate(partial_schedule(seed=2, dim=dim)):
        ours.zero_grad()
        if step > 0:
            before = snapshot(table)
        if kind != "unused":
            table_backward(table, positions, weights)
            table_step += 1
            touched = positions.unique()
            if touched.numel():
                grads = row_grads(positions, weights)[touched]
                torch_adamw_on_rows(ref_w, ref_m, ref_v, touched, grads, table_step, hyper)
        else:
            touched = torch.empty(0, dtype=torch.int64)
        ours.step()
        assert ours.state[table].get("step", 0) == table_step
        if step > 0:
            assert_untouched_rows_unchanged(table, before, touched, step)
        torch.testing.assert_close(rows_in_ids_order(table, table.weight), ref_w, **TOL)
        torch.testing.assert_close(rows_in_ids_order(table, table.slot("exp_avg")), ref_m, **TOL)
        torch.testing.assert_close(rows_in_ids_order(table, table.slot("exp_avg_sq")), ref_v, **V_TOL)
    assert table_step == STEPS - 1


@pytest.mark.parametrize("hyper", HYPER_CASES)
def test_row_bias_correction_equals_one_torch_adamw_per_row(hyper):
    # bias_correction="row": each row's own update count is its t, which is what torch.optim.AdamW
    # does for a parameter that gets a gradient only in some steps (p.grad None in the others).
    dim = 3
    w0 = torch.randn(NUM_ROWS, dim, generator=torch.Generator().manual_seed(3))
    table = make_table([dim], w0)
    ours = SparseAdamW(table, bias_correction="row", **hyper)
    params = [torch.nn.Parameter(w0[i].clone()) for i in range(NUM_ROWS)]
    torch_opt = torch.optim.AdamW(params, foreach=False, **hyper)
    counts = torch.zeros(NUM_ROWS, dtype=torch.int64)

    for kind, positions, weights in partial_schedule(seed=4, dim=dim):
        ours.zero_grad()
        torch_opt.zero_grad()
        if kind != "unused":
            table_backward(table, positions, weights)
            grads = row_grads(positions, weights)
            for i in positions.unique().tolist():
                params[i].grad = grads[i].clone()
                counts[i] += 1
        ours.step()
        torch_opt.step()

    torch.testing.assert_close(rows_in_ids_order(table, table.weight), torch.stack([p.detach() for p in params]), **TOL)
    assert torch.equal(rows_in_ids_order(table, table.slot("step")).reshape(-1), counts)
    for i, p in enumerate(params):
        assert int(torch_opt.state[p].get("step", 0)) == int(counts[i])


@pytest.mark.parametrize("hyper", HYPER_CASES)
def test_touched_rows_follow_the_float64_reference_with_the_table_step_count(hyper):
    dim = 3
    w0 = torch.randn(NUM_ROWS, dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    table = make_table([dim], w0, dtype=torch.float64)
    ours = SparseAdamW(table, state_dtype=torch.float64, **hyper)
    beta1, beta2 = hyper["betas"]
    ref = dict(lr=hyper["lr"], beta1=beta1, beta2=beta2, eps=hyper["eps"], weight_decay=hyper["weight_decay"])
    ref_w, ref_m, ref_v = w0.numpy().copy(), np.zeros((NUM_ROWS, dim)), np.zeros((NUM_ROWS, dim))
    table_step = 0
    for kind, positions, weights in partial_schedule(seed=6, dim=dim):
        ours.zero_grad()
        if kind != "unused":
            table_backward(table, positions, weights.double())
            table_step = lazy_table_step(
                "adamw",
                ref_w,
                ref_m,
                ref_v,
                table_step,
                positions.numpy(),
                weights.double().numpy(),
                maximize=hyper["maximize"],
                **ref,
            )
        ours.step()
    assert ours.state[table]["step"] == table_step
    torch.testing.assert_close(rows_in_ids_order(table, table.weight), torch.from_numpy(ref_w), **FP64_TOL)
    torch.testing.assert_close(rows_in_ids_order(table, table.slot("exp_avg")), torch.from_numpy(ref_m), **FP64_TOL)
    torch.testing.assert_close(rows_in_ids_order(table, table.slot("exp_avg_sq")), torch.from_numpy(ref_v), **FP64_TOL)


def test_maximize_ascends_as_descending_on_the_negated_gradient():
    results = []
    for maximize, sign in ((True, 1.0), (False, -1.0)):
        table = make_table([2], torch.ones(NUM_ROWS, 2))
        optimizer = SparseAdamW(table, lr=0.1, weight_decay=0.1, maximize=maximize)
        for kind, positions, weights in partial_schedule(seed=7, dim=2):
            optimizer.zero_grad()
            if kind != "unused":
                table_backward(table, positions, sign * weights)
            optimizer.step()
        results.append(table.weight.clone())
    assert torch.equal(results[0], results[1])
    # and maximize really ascends: a row with a positive gradient moves up (1.0 * (1 - lr*wd) + ~lr)
    table = make_table([1], torch.ones(NUM_ROWS, 1))
    optimizer = SparseAdamW(table, lr=0.1, weight_decay=0.0, maximize=True)
    table.accept_grad(IDS[:1], torch.tensor([[0.5]]))
    optimizer.step()
    torch.testing.assert_close(table.lookup(IDS[:1]), torch.tensor([[1.099999998]]), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------- betas spelling
def _train(make_optimizer) -> tuple[torch.Tensor, tuple]:
    table = make_table([3], torch.randn(NUM_ROWS, 3, generator=torch.Generator().manual_seed(8)))
    optimizer = make_optimizer(table)
    for kind, positions, weights in partial_schedule(seed=9, dim=3)[:8]:
        optimizer.zero_grad()
        if kind != "unused":
            table_backward(table, positions, weights)
        optimizer.step()
    return table.weight.clone(), tuple(optimizer.param_groups[0]["betas"])


def test_betas_spellings_are_equivalent():
    spellings = {
        "betas": lambda t: SparseAdamW(t, lr=0.05, betas=(0.8, 0.99)),
        "beta1_beta2": lambda t: SparseAdamW(t, lr=0.05, beta1=0.8, beta2=0.99),
        "positional": lambda t: SparseAdamW(t, 0.05, 0.8, 0.99),
        "group_betas": lambda t: SparseAdamW([{"params": [t], "betas": (0.8, 0.99)}], lr=0.05),
        "group_beta1_beta2": lambda t: SparseAdamW([{"params": [t], "beta1": 0.8, "beta2": 0.99}], lr=0.05),
    }
    results = {name: _train(make) for name, make in spellings.items()}
    weights, betas = results.pop("betas")
    assert betas == (0.8, 0.99)
    for name, (other_weights, other_betas) in results.items():
        assert other_betas == (0.8, 0.99), name
        assert torch.equal(other_weights, weights), name
    default_weights, _ = _train(lambda t: SparseAdamW(t, lr=0.05))
    assert not torch.equal(default_weights, weights)  # the betas were not ignored


def test_beta1_alone_keeps_the_default_beta2():
    table = make_table([1], torch.ones(NUM_ROWS, 1))
    assert SparseAdamW(table, beta1=0.5).param_groups[0]["betas"] == (0.5, 0.999)
    table = make_table([1], torch.ones(NUM_ROWS, 1))
    group = SparseAdamW([{"params": [table], "beta2": 0.9}]).param_groups[0]
    assert group["betas"] == (0.9, 0.9)


def test_betas_and_beta1_beta2_together_are_rejected():
    table = make_table([1], torch.ones(NUM_ROWS, 1))
    with pytest.raises(ValueError):
        SparseAdamW(table, betas=(0.8, 0.99), beta1=0.8)
    with pytest.raises(ValueError):
        SparseAdamW([{"params": [table], "betas": (0.8, 0.99), "beta2": 0.99}])


def test_betas_spelling_matches_torch_adamw():
    w0 = torch.randn(NUM_ROWS, 3, generator=torch.Generator().manual_seed(10))
    emb = torch.nn.Embedding(NUM_ROWS, 3)
    with torch.no_grad():
        emb.weight.copy_(w0)
    table = make_table([3], w0)
    torch_opt = torch.optim.AdamW(emb.parameters(), lr=0.05, betas=(0.8, 0.99), foreach=False)
    ours = SparseAdamW(table, lr=0.05, beta1=0.8, beta2=0.99)
    gen = torch.Generator().manual_seed(11)
    for _ in range(5):
        weights = torch.randn(NUM_ROWS, 3, generator=gen)
        torch_opt.zero_grad()
        ours.zero_grad()
        (emb(torch.arange(NUM_ROWS)) * weights).sum().backward()
        table_backward(table, torch.arange(NUM_ROWS), weights)
        torch_opt.step()
        ours.step()
    torch.testing.assert_close(table.lookup(IDS), emb.weight.detach(), **TOL)
