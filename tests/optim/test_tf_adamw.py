"""SparseAdamWTF and AdamWTF against the float64 TF AdamW reference (reference_adam.adamw_tf_step:
theta *= 1 - wd, then TF ApplyAdam), over 250 steps of random gradients.

How the tolerances are picked (measured on this CPU; lr 1e-3 to 1e-2, wd 3e-3 to 1e-2):
- fp64 rows / parameters (fp64 slots): the implementation does the same float64 math as the
  reference, so the whole 250-step trajectory must agree to rtol=1e-10, atol=1e-12
  (measured 4e-14 relative). This is the exact check of the formula.
- fp32, one step at a time ("teacher-forced"): before each step the reference is reset to the
  fp32 state, so one step of fp32 rounding separates the two: rtol=1e-6, atol=1e-7
  (measured at most 12% of that budget: 2.5e-7 on a value of 2, 3e-8 on exp_avg near zero,
  where the atol is needed). exp_avg_sq is positive: rtol=1e-6, atol=1e-12 (1.2e-7 relative).
- fp32 free-running for 250 steps: rounding accumulates through the (1 - wd) products and the
  long exp_avg_sq average (measured 6.9e-6 absolute, 5.8e-6 relative, on a row of size 1.2;
  2.1e-6 relative on exp_avg_sq), so rtol=2e-5, atol=1e-5 for rows and exp_avg, rtol=2e-5,
  atol=1e-12 for exp_avg_sq. One update moves a row by about lr (1e-3 to 1e-2), 100x more,
  so a wrong formula still fails.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from reference_adam import adamw_tf_step, lazy_table_step

from recis.nn.modules.hashtable import HashTable
from recis.optim import AdamWTF, SparseAdam, SparseAdamW, SparseAdamWTF

STEPS = 250
NUM_ROWS, DIM = 8, 4
IDS = torch.arange(NUM_ROWS, dtype=torch.int64) * 3 + 1

FP64_TOL = dict(rtol=1e-10, atol=1e-12)
STEP_TOL = dict(rtol=1e-6, atol=1e-7)
STEP_V_TOL = dict(rtol=1e-6, atol=1e-12)
RUN_TOL = dict(rtol=2e-5, atol=1e-5)
RUN_V_TOL = dict(rtol=2e-5, atol=1e-12)

HYPER_CASES = [
    pytest.param(dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, maximize=False), id="defaults"),
    pytest.param(dict(lr=1e-2, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=3e-3, maximize=False), id="other"),
    pytest.param(dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, maximize=True), id="maximize"),
]


def close(actual: torch.Tensor, expected: np.ndarray, tol: dict, what: str) -> None:
    expected = torch.from_numpy(np.asarray(expected))
    torch.testing.assert_close(actual.double(), expected, msg=lambda m: f"{what}: {m}", **tol)


def random_batches(seed: int):
    """250 steps of (rows touched, gradient): random subsets, sometimes every row."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(STEPS):
        count = int(torch.randint(1, NUM_ROWS + 1, (1,), generator=gen))
        rows = torch.randperm(NUM_ROWS, generator=gen)[:count]
        yield rows, torch.randn(count, DIM, generator=gen, dtype=torch.float64)


def sparse_optimizer(table: HashTable, hyper: dict, dtype: torch.dtype) -> SparseAdamWTF:
    return SparseAdamWTF(
        table,
        lr=hyper["lr"],
        betas=(hyper["beta1"], hyper["beta2"]),
        eps=hyper["eps"],
        weight_decay=hyper["weight_decay"],
        maximize=hyper["maximize"],
        state_dtype=dtype,
    )


def make_table(dtype: torch.dtype) -> HashTable:
    table = HashTable(DIM, dtype=dtype, name="tf")
    w0 = torch.randn(NUM_ROWS, DIM, generator=torch.Generator().manual_seed(100), dtype=torch.float64)
    table.assign(IDS, w0.to(dtype))
    assert torch.equal(table.ids(), IDS)  # rows in IDS order, so row i of the table is row i of the reference
    return table


# ---------------------------------------------------------------------------- SparseAdamWTF
@pytest.mark.parametrize("hyper", HYPER_CASES)
@pytest.mark.parametrize(
    ("dtype", "tol", "v_tol"),
    [(torch.float64, FP64_TOL, FP64_TOL), (torch.float32, RUN_TOL, RUN_V_TOL)],
    ids=["fp64", "fp32"],
)
def test_sparse_adamw_tf_follows_the_tf_reference_over_250_steps(hyper, dtype, tol, v_tol):
    table = make_table(dtype)
    optimizer = sparse_optimizer(table, hyper, dtype)
    ref_w = table.weight.double().numpy().copy()
    ref_m, ref_v = np.zeros_like(ref_w), np.zeros_like(ref_w)
    t = 0
    for step, (rows, grad) in enumerate(random_batches(seed=1)):
        table.accept_grad(IDS[rows], grad.to(dtype))
        optimizer.step()
        optimizer.zero_grad()
        t = lazy_table_step("adamw_tf", ref_w, ref_m, ref_v, t, rows.numpy(), grad.numpy(), **hyper)
        if step % 25 == 24 or step == STEPS - 1:
            close(table.weight, ref_w, tol, f"rows after step {step + 1}")
            close(table.slot("exp_avg"), ref_m, tol, f"exp_avg after step {step + 1}")
            close(table.slot("exp_avg_sq"), ref_v, v_tol, f"exp_avg_sq after step {step + 1}")
    assert optimizer.state[table]["step"] == t == STEPS


@pytest.mark.parametrize("hyper", HYPER_CASES)
def test_sparse_adamw_tf_fp32_step_is_the_tf_step_to_fp32_rounding(hyper):
    table = make_table(torch.float32)
    optimizer = sparse_optimizer(table, hyper, torch.float32)
    for step, (rows, grad) in enumerate(random_batches(seed=2)):
        ref_w = table.weight.double().numpy().copy()
        ref_m = table.slot("exp_avg").double().numpy().copy()
        ref_v = table.slot("exp_avg_sq").double().numpy().copy()
        grad32 = grad.float()
        table.accept_grad(IDS[rows], grad32)
        optimizer.step()
        optimizer.zero_grad()
        lazy_table_step("adamw_tf", ref_w, ref_m, ref_v, step, rows.numpy(), grad32.double().numpy(), **hyper)
        close(table.weight, ref_w, STEP_TOL, f"rows at step {step + 1}")
        close(table.slot("exp_avg"), ref_m, STEP_TOL, f"exp_avg at step {step + 1}")
        close(table.slot("exp_avg_sq"), ref_v, STEP_V_TOL, f"exp_avg_sq at step {step + 1}")


# ---------------------------------------------------------------------------- AdamWTF (dense)
SHAPES = [(3, 4), (5,), (2, 1, 3)]


def dense_params(dtype: torch.dtype, seed: int = 200) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for shape in SHAPES]


def dense_grads(seed: int):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(STEPS):
        yield [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in SHAPES]


def adamw_tf(params, hyper: dict, **kw) -> AdamWTF:
    return AdamWTF(
        params,
        lr=hyper["lr"],
        betas=(hyper["beta1"], hyper["beta2"]),
        eps=hyper["eps"],
        weight_decay=hyper["weight_decay"],
        maximize=hyper["maximize"],
        **kw,
    )


@pytest.mark.parametrize("foreach", [None, True, False], ids=["foreach_default", "foreach", "for_loop"])
@pytest.mark.parametrize("hyper", HYPER_CASES)
@pytest.mark.parametrize(
    ("dtype", "tol", "v_tol"),
    [(torch.float64, FP64_TOL, FP64_TOL), (torch.float32, RUN_TOL, RUN_V_TOL)],
    ids=["fp64", "fp32"],
)
def test_adamw_tf_follows_the_tf_reference_over_250_steps(hyper, dtype, tol, v_tol, foreach):
    params = dense_params(dtype)
    optimizer = adamw_tf(params, hyper, foreach=foreach)
    refs = [[p.detach().double().numpy().copy(), np.zeros(p.shape), np.zeros(p.shape)] for p in params]
    for t, grads in enumerate(dense_grads(seed=3), start=1):
        for p, g, ref in zip(params, grads, refs):
            p.grad = g.to(dtype)
            ref[:] = adamw_tf_step(*ref[:1], p.grad.double().numpy(), *ref[1:], t, **hyper)
        optimizer.step()
    for i, (p, (ref_p, ref_m, ref_v)) in enumerate(zip(params, refs)):
        state = optimizer.state[p]
        assert float(state["step"]) == STEPS
        close(p.detach(), ref_p, tol, f"param {i}")
        close(state["exp_avg"], ref_m, tol, f"exp_avg {i}")
        close(state["exp_avg_sq"], ref_v, v_tol, f"exp_avg_sq {i}")


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "for_loop"])
@pytest.mark.parametrize("hyper", HYPER_CASES)
def test_adamw_tf_fp32_step_is_the_tf_step_to_fp32_rounding(hyper, foreach):
    params = dense_params(torch.float32)
    optimizer = adamw_tf(params, hyper, foreach=foreach)
    for t, grads in enumerate(dense_grads(seed=4), start=1):
        refs = []
        for p, g in zip(params, grads):
            p.grad = g.float()
            state = optimizer.state[p]
            m = state["exp_avg"].double().numpy() if state else np.zeros(p.shape)
            v = state["exp_avg_sq"].double().numpy() if state else np.zeros(p.shape)
            refs.append(adamw_tf_step(p.detach().double().numpy(), p.grad.double().numpy(), m, v, t, **hyper))
        optimizer.step()
        for i, (p, (ref_p, ref_m, ref_v)) in enumerate(zip(params, refs)):
            close(p.detach(), ref_p, STEP_TOL, f"param {i} at step {t}")
            close(optimizer.state[p]["exp_avg"], ref_m, STEP_TOL, f"exp_avg {i} at step {t}")
            close(optimizer.state[p]["exp_avg_sq"], ref_v, STEP_V_TOL, f"exp_avg_sq {i} at step {t}")


@pytest.mark.parametrize("hyper", HYPER_CASES)
def test_adamw_tf_foreach_and_for_loop_give_identical_results(hyper):
    # float32 and float64 parameters together: the foreach path groups tensors by dtype.
    runs = []
    for foreach in (True, False, None):
        params = dense_params(torch.float32, seed=5) + dense_params(torch.float64, seed=6)
        optimizer = adamw_tf(params, hyper, foreach=foreach)
        for step, grads in enumerate(dense_grads(seed=7)):
            if step == 60:
                break
            for p, g in zip(params, grads + grads):
                p.grad = g.to(p.dtype)
            if step % 10 == 3:
                params[1].grad = None  # a parameter skipped in some steps keeps its own step count
            optimizer.step()
        runs.append((params, optimizer))
    (ref_params, ref_opt), *others = runs
    for params, optimizer in others:
        for i, (p, q) in enumerate(zip(params, ref_params)):
            assert torch.equal(p, q), f"param {i}"
            for key in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(optimizer.state[p][key], ref_opt.state[q][key]), f"{key} of param {i}"
    assert float(ref_opt.state[ref_params[1]]["step"]) == 54 and float(ref_opt.state[ref_params[0]]["step"]) == 60


def test_adamw_tf_maximize_is_descent_on_the_negated_gradient():
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2)
    results = []
    for maximize, sign in ((True, 1.0), (False, -1.0)):
        params = dense_params(torch.float32)
        optimizer = adamw_tf(params, dict(hyper, maximize=maximize))
        for step, grads in enumerate(dense_grads(seed=8)):
            if step == 20:
                break
            for p, g in zip(params, grads):
                p.grad = (sign * g).float()
            optimizer.step()
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results):
        assert torch.equal(a, b)
    # one step by hand: p = 1, g = 0.5, lr = 0.1, wd = 0: maximize moves UP by ~lr (TF form)
    p = torch.ones(1, requires_grad=True)
    optimizer = AdamWTF([p], lr=0.1, weight_decay=0.0, maximize=True)
    p.grad = torch.tensor([0.5])
    optimizer.step()
    torch.testing.assert_close(p.detach(), torch.tensor([1.0999999368]), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------- AdamWTF state dict
def test_adamw_tf_state_dict_has_torch_adamw_layout():
    ours_params = dense_params(torch.float32) + [torch.zeros(2, requires_grad=True)]  # last one: never a grad
    torch_params = dense_params(torch.float32) + [torch.zeros(2, requires_grad=True)]
    ours = AdamWTF(ours_params, lr=1e-2)
    theirs = torch.optim.AdamW(torch_params, lr=1e-2)
    for step, grads in enumerate(dense_grads(seed=9)):
        if step == 3:
            break
        for p, q, g in zip(ours_params, torch_params, grads):
            p.grad, q.grad = g.float(), g.float()
        ours.step()
        theirs.step()
    ours_sd, torch_sd = ours.state_dict(), theirs.state_dict()
    assert set(ours_sd) == set(torch_sd) == {"state", "param_groups"}
    assert sorted(ours_sd["state"]) == sorted(torch_sd["state"]) == [0, 1, 2]  # no entry for the grad-less param
    for i in ours_sd["state"]:
        state, torch_state = ours_sd["state"][i], torch_sd["state"][i]
        assert set(state) == set(torch_state) == {"step", "exp_avg", "exp_avg_sq"}
        assert isinstance(state["step"], torch.Tensor) and state["step"].dtype == torch_state["step"].dtype
        assert state["step"].shape == torch_state["step"].shape == ()
        assert float(state["step"]) == 3
        for key in ("exp_avg", "exp_avg_sq"):
            assert state[key].shape == torch_state[key].shape == ours_params[i].shape
            assert state[key].dtype == ours_params[i].dtype
    group = ours_sd["param_groups"][0]
    assert group["params"] == torch_sd["param_groups"][0]["params"] == [0, 1, 2, 3]
    for key in ("lr", "betas", "eps", "weight_decay", "maximize", "foreach"):
        assert key in group, key
    assert tuple(group["betas"]) == (0.9, 0.999) and group["weight_decay"] == 1e-2


def test_adamw_tf_state_dict_round_trip_continues_identically():
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, maximize=False)
    params = dense_params(torch.float32)
    optimizer = adamw_tf(params, hyper)
    grads = list(dense_grads(seed=10))[:10]
    for g_list in grads[:5]:
        for p, g in zip(params, g_list):
            p.grad = g.float()
        optimizer.step()
    # torch's state_dict holds the live state tensors and load_state_dict may keep them, so take
    # a copy, as torch.save/torch.load would; otherwise both optimizers would share m and v.
    saved = copy.deepcopy(optimizer.state_dict())
    copies = [p.detach().clone().requires_grad_() for p in params]
    restored = adamw_tf(copies, dict(hyper, lr=0.5))  # lr comes back from the state dict
    restored.load_state_dict(saved)
    for g_list in grads[5:]:
        for p, q, g in zip(params, copies, g_list):
            p.grad, q.grad = g.float(), g.float()
        optimizer.step()
        restored.step()
    for p, q in zip(params, copies):
        assert torch.equal(p, q)
        assert float(restored.state[q]["step"]) == 10


# ---------------------------------------------------------------------------- weight decay defaults
@pytest.mark.parametrize(
    ("cls", "default_wd", "expected"),
    [
        (SparseAdamWTF, 1e-2, 0.99 - 0.0999999368),  # theta *= 1 - wd, then the TF-form move
        (SparseAdamW, 1e-2, 1 - 0.1 * 1e-2 - 0.099999998),  # theta *= 1 - lr * wd, then the torch-form move
        (SparseAdam, 0.0, 1 - 0.0999999368),  # no decay, TF-form move
    ],
    ids=["SparseAdamWTF", "SparseAdamW", "SparseAdam"],
)
@pytest.mark.parametrize("spelling", ["omitted", "None"])
def test_sparse_weight_decay_default(cls, default_wd, expected, spelling):
    table = HashTable(1, name="wd")
    table.assign(torch.tensor([5]), torch.ones(1, 1))
    kwargs = {} if spelling == "omitted" else {"weight_decay": None}
    optimizer = cls(table, lr=0.1, **kwargs)
    assert optimizer.param_groups[0]["weight_decay"] == default_wd
    assert optimizer.defaults["weight_decay"] == default_wd
    table.accept_grad(torch.tensor([5]), torch.tensor([[0.5]]))
    optimizer.step()
    torch.testing.assert_close(table.lookup(torch.tensor([5])), torch.tensor([[expected]]), rtol=1e-6, atol=1e-7)


def test_adamw_tf_weight_decay_default_is_1e_2_not_scaled_by_lr():
    p = torch.ones(1, requires_grad=True)
    optimizer = AdamWTF([p], lr=0.1)
    assert optimizer.param_groups[0]["weight_decay"] == 1e-2
    p.grad = torch.tensor([0.5])
    optimizer.step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.99 - 0.0999999368]), rtol=1e-6, atol=1e-7)
