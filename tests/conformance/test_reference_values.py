"""Every row of /work/shared/REFERENCE_VALUES.md, on the real optimizers and on reference_adam.

Setup of the document: one scalar row (a table of embedding_shape 1), p0 = 1, lr = 0.1,
beta1 = 0.9, beta2 = 0.999, eps = 1e-8 unless stated. "torch form" is SparseAdamW with
weight_decay = 0; "TF form" is SparseAdam (and SparseAdamWTF with weight_decay = 0, and the
dense AdamWTF where a dense parameter makes sense).

Tolerances: each check runs on an fp32 table (fp32 slots) and on an fp64 table (fp64 slots,
so the update math runs in float64).
- fp32: rtol=1e-6, atol=1e-7: p is about 1, whose fp32 spacing is 6e-8 to 1.2e-7, and the
  document says fp32 implementations agree to about 1e-6 relative.
- fp64: rtol=1e-9, atol=1e-10: the document prints its values to 10 decimals (rounding
  <= 5e-11); float64 arithmetic adds ~1e-16. Only this tolerance separates the torch and TF
  forms of a one-step update with eps = 1e-8 (they differ by 6e-8, one fp32 ulp at 0.9).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference_adam import adam_step, adamw_step, adamw_tf_step, lazy_table_step, run_steps, sparse_adam_step

from recis.nn.modules.hashtable import HashTable
from recis.optim import AdamWTF, SparseAdam, SparseAdamW, SparseAdamWTF

LR, BETA1, BETA2, EPS = 0.1, 0.9, 0.999, 1e-8
HYPER = dict(lr=LR, beta1=BETA1, beta2=BETA2, eps=EPS)
X, Y = 7, 11  # ids of the rows; any int64 works

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float64, id="fp64")]
TOL = {torch.float32: dict(rtol=1e-6, atol=1e-7), torch.float64: dict(rtol=1e-9, atol=1e-10)}
REF_TOL = dict(rtol=1e-9, atol=1e-10)  # reference_adam is float64; values printed to 10 decimals

OPTIMIZERS = {"SparseAdam": SparseAdam, "SparseAdamW": SparseAdamW, "SparseAdamWTF": SparseAdamWTF}
TORCH_FORM = ["SparseAdamW"]  # with weight_decay = 0
TF_FORM = ["SparseAdam", "SparseAdamWTF"]  # with weight_decay = 0


# ---------------------------------------------------------------------------- helpers
def make_table(dtype: torch.dtype, ids=(X,), value: float = 1.0) -> HashTable:
    table = HashTable(1, dtype=dtype, name="ref")
    table.assign(torch.tensor(ids), torch.full((len(ids), 1), value, dtype=dtype))
    return table


def make_sparse(name: str, table: HashTable, dtype: torch.dtype, *, weight_decay: float = 0.0, eps: float = EPS, **kw):
    return OPTIMIZERS[name](
        table, lr=LR, beta1=BETA1, beta2=BETA2, eps=eps, weight_decay=weight_decay, state_dtype=dtype, **kw
    )


def give(table: HashTable, ids, grads) -> None:
    table.accept_grad(torch.tensor(ids), torch.tensor(grads, dtype=table.dtype).reshape(-1, 1))


def sparse_step(optimizer, table: HashTable, ids, grads) -> None:
    give(table, ids, grads)
    optimizer.step()
    optimizer.zero_grad()


def row(table: HashTable, id_: int, slot: str | None = None) -> float:
    if slot is None:
        return float(table.lookup(torch.tensor([id_])).reshape(()).double())
    index = table.ids().tolist().index(id_)
    return float(table.slot(slot)[index, 0].double())


def check(actual: float, expected: float, dtype: torch.dtype) -> None:
    torch.testing.assert_close(
        torch.tensor(actual, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64), **TOL[dtype]
    )


def dense_adamw_tf_steps(grads, dtype: torch.dtype, *, weight_decay: float = 0.0, eps: float = EPS) -> float:
    p = torch.ones(1, dtype=dtype, requires_grad=True)
    optimizer = AdamWTF([p], lr=LR, betas=(BETA1, BETA2), eps=eps, weight_decay=weight_decay)
    for g in grads:
        p.grad = torch.tensor([g], dtype=dtype)
        optimizer.step()
    return float(p.detach().double())


# ---------------------------------------------------------------------------- one step, eps placement
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", TORCH_FORM)
@pytest.mark.parametrize(("eps", "expected"), [(1e-8, 0.900000002), (0.1, 0.9166666667)], ids=["eps1e-8", "eps0.1"])
def test_one_step_torch_form_adds_eps_to_the_corrected_sqrt_v(name, dtype, eps, expected):
    table = make_table(dtype)
    optimizer = make_sparse(name, table, dtype, eps=eps)
    sparse_step(optimizer, table, [X], [0.5])
    check(row(table, X), expected, dtype)
    assert optimizer.state[table]["step"] == 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", TF_FORM)
@pytest.mark.parametrize(("eps", "expected"), [(1e-8, 0.9000000632455), (0.1, 0.9863472941)], ids=["eps1e-8", "eps0.1"])
def test_one_step_tf_form_adds_eps_to_the_uncorrected_sqrt_v(name, dtype, eps, expected):
    table = make_table(dtype)
    optimizer = make_sparse(name, table, dtype, eps=eps)
    sparse_step(optimizer, table, [X], [0.5])
    check(row(table, X), expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("eps", "expected"), [(1e-8, 0.9000000632455), (0.1, 0.9863472941)], ids=["eps1e-8", "eps0.1"])
def test_dense_adamw_tf_one_step_is_the_tf_form(dtype, eps, expected):
    check(dense_adamw_tf_steps([0.5], dtype, eps=eps), expected, dtype)


# ---------------------------------------------------------------------------- two steps
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", TORCH_FORM)
def test_two_steps_torch_form_value_and_moments(name, dtype):
    table = make_table(dtype)
    optimizer = make_sparse(name, table, dtype)
    sparse_step(optimizer, table, [X], [0.5])
    sparse_step(optimizer, table, [X], [0.5])
    check(row(table, X), 0.800000004, dtype)
    check(row(table, X, "exp_avg"), 0.095, dtype)
    check(row(table, X, "exp_avg_sq"), 0.00049975, dtype)
    assert optimizer.state[table]["step"] == 2


# ---------------------------------------------------------------------------- weight decay
@pytest.mark.parametrize("dtype", DTYPES)
def test_decoupled_weight_decay_of_sparse_adamw_is_scaled_by_lr(dtype):
    table = make_table(dtype)
    optimizer = make_sparse("SparseAdamW", table, dtype, weight_decay=0.1)
    sparse_step(optimizer, table, [X], [0.5])
    check(row(table, X), 0.890000002, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tf_weight_decay_of_sparse_adamw_tf_is_not_scaled_by_lr(dtype):
    table = make_table(dtype)
    optimizer = make_sparse("SparseAdamWTF", table, dtype, weight_decay=0.1)
    sparse_step(optimizer, table, [X], [0.5])
    check(row(table, X), 0.8000000632455, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tf_weight_decay_of_dense_adamw_tf_is_not_scaled_by_lr(dtype):
    check(dense_adamw_tf_steps([0.5], dtype, weight_decay=0.1), 0.8000000632455, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_l2_weight_decay_torch_form_is_torch_adam(dtype):
    # No recis optimizer has L2 + torch form; the row is torch.optim.Adam(weight_decay), checked here
    # so that the document's value is tied to a real optimizer. recis's L2 (SparseAdam) is the next test.
    p = torch.ones(1, dtype=dtype, requires_grad=True)
    optimizer = torch.optim.Adam([p], lr=LR, betas=(BETA1, BETA2), eps=EPS, weight_decay=0.1, foreach=False)
    p.grad = torch.tensor([0.5], dtype=dtype)
    optimizer.step()
    check(float(p.detach().double()), 0.9000000016667, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_l2_weight_decay_of_sparse_adam_is_added_to_the_gradient(dtype):
    # Derived from the formulas (not a row of the document): after one TF-form step from zero
    # moments, p1 = p0 - lr * g' / (|g'| + eps / sqrt(1 - beta2)), with g' = g + wd * p0 = 0.6.
    # eps = 0.1 makes the move depend on |g'|: without the decay (g' = 0.5) p1 would be 0.98634729.
    eps, wd = 0.1, 0.1
    g_decayed = 0.5 + wd * 1.0
    expected = 1.0 - LR * g_decayed / (g_decayed + eps / math.sqrt(1 - BETA2))
    table = make_table(dtype)
    optimizer = make_sparse("SparseAdam", table, dtype, weight_decay=wd, eps=eps)
    sparse_step(optimizer, table, [X], [0.5])
    check(row(table, X), expected, dtype)
    check(row(table, X, "exp_avg"), (1 - BETA1) * g_decayed, dtype)


# ---------------------------------------------------------------------------- first touch at table step t
FIRST_TOUCH = [(1, 0.0999999980, 0.0999999368), (5, 0.0545489226, 0.0545488905), (100, 0.0975770842, 0.0975770415)]


def first_touch_move(name: str, dtype: torch.dtype, t: int, **kw) -> tuple[float, object]:
    """Steps t-1 times with another row only, then touches row X (p0 = 1, g = 0.5); returns 1 - p."""
    table = make_table(dtype, ids=(X, Y))
    optimizer = make_sparse(name, table, dtype, **kw)
    for _ in range(t - 1):
        sparse_step(optimizer, table, [Y], [0.3])
    assert row(table, X) == 1.0
    sparse_step(optimizer, table, [X], [0.5])
    assert optimizer.state[table]["step"] == t
    return 1.0 - row(table, X), optimizer


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("t", "torch_move", "tf_move"), FIRST_TOUCH, ids=[f"t={c[0]}" for c in FIRST_TOUCH])
@pytest.mark.parametrize("name", TORCH_FORM + TF_FORM)
def test_first_touch_uses_the_table_step_count(name, dtype, t, torch_move, tf_move):
    move, _ = first_touch_move(name, dtype, t)
    check(move, torch_move if name in TORCH_FORM else tf_move, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", TORCH_FORM + TF_FORM)
def test_first_touch_with_row_bias_correction_moves_as_at_t_1(name, dtype):
    # bias_correction="row": t is the row's own count, so a first touch at table step 100 is a t=1 step.
    move, _ = first_touch_move(name, dtype, 100, bias_correction="row")
    _, torch_move, tf_move = FIRST_TOUCH[0]
    check(move, torch_move if name in TORCH_FORM else tf_move, dtype)


# ---------------------------------------------------------------------------- duplicates
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("via", ["forward_backward", "accept_grad"])
def test_duplicate_ids_are_summed_before_the_update(via, dtype):
    table = make_table(dtype)
    optimizer = make_sparse("SparseAdamW", table, dtype)
    ids = torch.tensor([X, X])
    grads = torch.tensor([[0.5], [0.25]], dtype=dtype)
    if via == "forward_backward":
        (table(ids) * grads).sum().backward()  # d loss / d row = 0.5 and 0.25 at the two positions
    else:
        table.accept_grad(ids, grads)
    optimizer.step()
    check(row(table, X), 0.9000000013333, dtype)
    check(row(table, X, "exp_avg"), 0.075, dtype)
    check(row(table, X, "exp_avg_sq"), 0.0005625, dtype)  # 0.0003125 if g^2 were summed per duplicate


# ---------------------------------------------------------------------------- empty step
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", TF_FORM)
def test_empty_batch_through_the_table_counts_as_a_step(name, dtype):
    table = make_table(dtype)
    optimizer = make_sparse(name, table, dtype)
    table(torch.empty(0, dtype=torch.int64)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    assert optimizer.state[table]["step"] == 1
    check(row(table, X), 1.0, dtype)  # no row touched
    (0.5 * table(torch.tensor([X]))).sum().backward()
    optimizer.step()
    assert optimizer.state[table]["step"] == 2
    check(1.0 - row(table, X), 0.0744136353, dtype)  # 0.0999999368 if the empty step were not counted


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", TF_FORM)
def test_step_without_any_use_of_the_table_does_not_count(name, dtype):
    table = make_table(dtype)
    optimizer = make_sparse(name, table, dtype)
    optimizer.step()  # no forward, no gradient: torch.optim.SparseAdam's rule, the count stays
    optimizer.zero_grad()
    assert optimizer.state[table].get("step", 0) == 0
    (0.5 * table(torch.tensor([X]))).sum().backward()
    optimizer.step()
    assert optimizer.state[table]["step"] == 1
    check(1.0 - row(table, X), 0.0999999368, dtype)


# ---------------------------------------------------------------------------- accumulation
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", TF_FORM)
def test_accumulated_gradients_are_averaged_not_summed(name, dtype):
    table = make_table(dtype)
    optimizer = make_sparse(name, table, dtype)
    sparse_step(optimizer, table, [X], [1.0])
    p1 = row(table, X)
    optimizer.set_grad_accum_steps(2)
    sparse_step(optimizer, table, [X], [0.2])  # micro-batch 1: no update, zero_grad keeps the gradient
    assert row(table, X) == p1
    assert optimizer.state[table]["step"] == 1
    sparse_step(optimizer, table, [X], [0.6])  # micro-batch 2: update with the mean 0.4
    assert optimizer.state[table]["step"] == 2
    check(p1 - row(table, X), 0.0898574941, dtype)  # the sum 0.8 would move 0.0988125560


# ---------------------------------------------------------------------------- lazy rows
@pytest.mark.parametrize("dtype", DTYPES)
def test_untouched_rows_keep_value_and_moments(dtype):
    table = make_table(dtype, ids=(X, Y))
    optimizer = make_sparse("SparseAdamW", table, dtype)
    sparse_step(optimizer, table, [X, Y], [0.5, 0.5])
    before = {name: row(table, Y, name) for name in ("exp_avg", "exp_avg_sq")}
    before["value"] = row(table, Y)
    sparse_step(optimizer, table, [X], [0.5])
    assert row(table, Y) == before["value"]
    assert row(table, Y, "exp_avg") == before["exp_avg"]
    assert row(table, Y, "exp_avg_sq") == before["exp_avg_sq"]
    check(row(table, Y), 0.900000002, dtype)
    check(row(table, Y, "exp_avg"), 0.05, dtype)
    check(row(table, Y, "exp_avg_sq"), 0.00025, dtype)
    check(row(table, X), 0.800000004, dtype)  # the touched row took its second step


# ---------------------------------------------------------------------------- the table's numbers are torch's
def test_torch_adamw_and_sparse_adam_give_the_documented_one_and_two_step_values():
    p = torch.ones(1, dtype=torch.float64, requires_grad=True)
    adamw = torch.optim.AdamW([p], lr=LR, betas=(BETA1, BETA2), eps=EPS, weight_decay=0.1, foreach=False)
    p.grad = torch.tensor([0.5], dtype=torch.float64)
    adamw.step()
    check(float(p.detach()), 0.890000002, torch.float64)

    emb = torch.nn.Embedding(1, 1, sparse=True, dtype=torch.float64)
    with torch.no_grad():
        emb.weight.fill_(1.0)
    sparse = torch.optim.SparseAdam(emb.parameters(), lr=LR, betas=(BETA1, BETA2), eps=0.1)
    (0.5 * emb(torch.tensor([0]))).sum().backward()
    sparse.step()
    check(float(emb.weight.detach()), 0.9863472941, torch.float64)


# ---------------------------------------------------------------------------- reference_adam reproduces the table
def _ref_first_touch(fn, t, **kw):
    return 1.0 - float(fn(1.0, 0.5, 0.0, 0.0, t, **HYPER, **kw)[0])


def _ref_accumulation(g2):
    p1, m, v = sparse_adam_step(1.0, 1.0, 0.0, 0.0, 1, **HYPER)
    return float(p1 - sparse_adam_step(p1, g2, m, v, 2, **HYPER)[0])


def _ref_empty_step():
    weight, m, v = (np.zeros((1, 1)) for _ in range(3))
    weight[:] = 1.0
    t = lazy_table_step("sparse_adam", weight, m, v, 0, [], np.zeros((0, 1)), **HYPER)
    t = lazy_table_step("sparse_adam", weight, m, v, t, [0], [[0.5]], **HYPER)
    assert t == 2
    return 1.0 - float(weight[0, 0])


def _ref_duplicates():
    weight, m, v = (np.zeros((1, 1)) for _ in range(3))
    weight[:] = 1.0
    lazy_table_step("adamw", weight, m, v, 0, [0, 0], [[0.5], [0.25]], **HYPER, weight_decay=0.0)
    return [float(weight[0, 0]), float(m[0, 0]), float(v[0, 0])]


def _ref_lazy_rows():
    weight, m, v = (np.zeros((2, 1)) for _ in range(3))
    weight[:] = 1.0
    t = lazy_table_step("adamw", weight, m, v, 0, [0, 1], [[0.5], [0.5]], **HYPER, weight_decay=0.0)
    lazy_table_step("adamw", weight, m, v, t, [0], [[0.5]], **HYPER, weight_decay=0.0)
    return [float(weight[1, 0]), float(m[1, 0]), float(v[1, 0]), float(weight[0, 0])]


REFERENCE_ROWS = [
    ("one_step_torch", lambda: float(adamw_step(1.0, 0.5, 0, 0, 1, **HYPER, weight_decay=0.0)[0]), 0.900000002),
    ("one_step_tf", lambda: float(sparse_adam_step(1.0, 0.5, 0, 0, 1, **HYPER)[0]), 0.9000000632455),
    (
        "one_step_tf_adamw_wd0",
        lambda: float(adamw_tf_step(1.0, 0.5, 0, 0, 1, **HYPER, weight_decay=0.0)[0]),
        0.9000000632455,
    ),
    (
        "eps_torch",
        lambda: float(adamw_step(1.0, 0.5, 0, 0, 1, **{**HYPER, "eps": 0.1}, weight_decay=0.0)[0]),
        0.9166666667,
    ),
    ("eps_tf", lambda: float(sparse_adam_step(1.0, 0.5, 0, 0, 1, **{**HYPER, "eps": 0.1})[0]), 0.9863472941),
    (
        "two_steps",
        lambda: [float(x) for x in run_steps("adamw", 1.0, [0.5, 0.5], **HYPER, weight_decay=0.0)],
        [0.800000004, 0.095, 0.00049975],
    ),
    ("wd_l2_torch", lambda: float(adam_step(1.0, 0.5, 0, 0, 1, **HYPER, weight_decay=0.1)[0]), 0.9000000016667),
    ("wd_adamw", lambda: float(adamw_step(1.0, 0.5, 0, 0, 1, **HYPER, weight_decay=0.1)[0]), 0.890000002),
    ("wd_tf_adamw", lambda: float(adamw_tf_step(1.0, 0.5, 0, 0, 1, **HYPER, weight_decay=0.1)[0]), 0.8000000632455),
    *[
        (
            f"first_touch_t{t}",
            (lambda t=t: [_ref_first_touch(adamw_step, t, weight_decay=0.0), _ref_first_touch(sparse_adam_step, t)]),
            [torch_move, tf_move],
        )
        for t, torch_move, tf_move in FIRST_TOUCH
    ],
    ("duplicates", _ref_duplicates, [0.9000000013333, 0.075, 0.0005625]),
    ("empty_step", _ref_empty_step, 0.0744136353),
    ("accumulation_mean", lambda: _ref_accumulation(0.4), 0.0898574941),
    ("accumulation_sum", lambda: _ref_accumulation(0.8), 0.0988125560),
    ("lazy_rows", _ref_lazy_rows, [0.900000002, 0.05, 0.00025, 0.800000004]),
]


@pytest.mark.parametrize(("compute", "expected"), [r[1:] for r in REFERENCE_ROWS], ids=[r[0] for r in REFERENCE_ROWS])
def test_reference_adam_reproduces_the_documented_values(compute, expected):
    torch.testing.assert_close(
        torch.tensor(compute(), dtype=torch.float64), torch.tensor(expected, dtype=torch.float64), **REF_TOL
    )


def test_reference_adam_row_step_count_gives_a_first_touch_t_of_1():
    weight, m, v = (np.zeros((2, 1)) for _ in range(3))
    weight[:] = 1.0
    row_steps = np.zeros(2, dtype=np.int64)
    t = 0
    for _ in range(99):
        t = lazy_table_step("sparse_adam", weight, m, v, t, [1], [[0.3]], row_steps=row_steps, **HYPER)
    t = lazy_table_step("sparse_adam", weight, m, v, t, [0], [[0.5]], row_steps=row_steps, **HYPER)
    assert t == 100 and row_steps.tolist() == [1, 99]
    torch.testing.assert_close(
        torch.tensor(1.0 - weight[0, 0]), torch.tensor(0.0999999368, dtype=torch.float64), **REF_TOL
    )
