"""RecIS's ``tests/optim/sparse_row_wise_adagrad_test.py`` (alibaba/RecIS), transcribed to CPU.

Its tests pin down ``SparseRowWiseAdagrad`` and ``SparseRowWiseAdagradSum``: the formula
over three steps with duplicate ids, torchrec's ``RowWiseAdagrad`` as an oracle, per-table
step counts through ``state_dict``/``reset_state_dict``/``load_state_dict`` and through a
checkpoint, weight decay on touched rows only, ``add_params``, multidimensional rows,
empty batches, defaults, the closure, ``maximize``, invalid hyperparameters and low
precision. Most of them are CUDA-only in RecIS ("RecIS lookup requires CUDA"); here they
all run on CPU, and the CUDA variants run where CUDA is.

The calls are RecIS's: ``HashTable(shape, block_size=..., dtype=..., device=..., name=...)``,
``filter_out_sparse_param``, the optimizers with RecIS's positional and keyword
arguments, ``step(closure)``, ``zero_grad``, ``add_params``, ``reset_state_dict``,
``state_dict``, ``load_state_dict``, ``set_grad_accum_steps``, ``insert``, ``clear``,
``ids``, ``accept_grad``. Changes, and why:

- The tables' initializer is spelled out as ``ConstantInitializer(init_val=0)``, RecIS's
  default, which the expected values assume; recis's default is uniform.
- ``snap_shot()`` row indices are read with ``ids_map()``; ``accept_grad`` takes ids here
  (RecIS: storage indices); ``raw_embeddings().index_select(...)`` (RecIS's storage
  blocks) is read by id with an eval-mode lookup, as RecIS's own ``_read_embeddings`` does.
- Left out, as RecIS's storage layout: the accumulator reads through
  ``slot_group().slot_by_name(...).value()``. RecIS's slot holds the accumulator; recis's
  slot holds the sum since the row was created and the accumulator adds
  ``initial_accumulator_value`` (read with ``state_sum(table)``, compared as RecIS does).
- Left out, as RecIS's storage layout: ``test_reused_state_slot_updates_new_row_initializer``.
  RecIS writes the initial value into a row's slot when the row is allocated, so rows
  created under two optimizers with 0.25 and 0.75 keep 0.25 and 0.75; in recis the
  initial value belongs to the optimizer's param group and is added when read, so both
  rows read the value of the optimizer that reads them.
- Left out, as RecIS's state-dict layout: ``test_single_table_loads_legacy_step`` (RecIS
  keys a step tensor ``"sparse_row_wise_adagrad_step"`` or ``"..._<name>_step"``, with a
  legacy spelling for one table). recis keeps an int step count per table in
  ``state_dict()["state"]``; its part that bad steps (-0.5, 1.5, NaN, Inf) are refused is
  kept, on recis's layout, and refused with ``ValueError`` (RecIS: ``RuntimeError``).
  Step counts are read from ``state_dict()["state"]`` wherever RecIS reads its step keys,
  and ``test_direct_load_rejects_foreign_hashtable_state`` names the foreign table in
  recis's layout (the entry's ``"table"``), refused with ``ValueError``.
- ``SparseRowWiseAdagradSum`` takes its squared sums from RecIS's HDMP backward, kept in a
  separate buffer (``_hashtable_impl.accept_grad_sq``); recis's owners compute them from
  what each rank sent (``recis.dist.ShardedOptimizer``), and a table's gradient alone is
  one worker's. So ``test_sum_uses_grad_sq_for_row_state`` hands its gradient and squared
  sums to ``apply_gradient(table, rows, grad, grad_sq=...)``, the owner's update, instead of
  the private ``accept_grad_sq`` and ``step``; ``test_sum_rejects_missing_grad_sq`` has no
  missing state to reject and is replaced by a test of what recis does without squared sums.
- ``test_sum_zero_grad_respects_accumulation_boundary`` mocks RecIS's native optimizer
  (``_imp``); here it checks the same boundary on a real table's pending gradient.
- ``optimizer._lr`` and ``optimizer._maximize`` (private) are read from ``param_groups[0]``.
- The torchrec oracle runs with any installed torchrec (RecIS pins 1.3 and CUDA); the
  ``RowWiseAdagrad`` formula is the same in the installed version.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import recis.checkpoint as ck
from recis.nn.initializers import ConstantInitializer
from recis.nn.modules.hashtable import HashTable, filter_out_sparse_param
from recis.optim.sparse_row_wise_adagrad import SparseRowWiseAdagrad
from recis.optim.sparse_row_wise_adagrad_sum import SparseRowWiseAdagradSum

try:
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad as TorchRecRowWiseAdagrad
except Exception:  # torchrec is optional
    TorchRecRowWiseAdagrad = None

_TABLE_COUNTER = itertools.count()
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def _make_table(embedding_shape, *, label, block_size=16, device="cpu", dtype=torch.float32):
    name = f"row_wise_adagrad_{label}_{next(_TABLE_COUNTER)}"
    table = HashTable(
        embedding_shape,
        block_size=block_size,
        dtype=dtype,
        device=torch.device(device),
        name=name,
        initializer=ConstantInitializer(init_val=0),
    )
    return name, table


def _take_step(table, optimizer, ids, gradients=None) -> None:
    ids = torch.as_tensor(ids, dtype=torch.long, device=table.device)
    output = table(ids)
    if gradients is None:
        gradients = torch.ones_like(output)
    else:
        gradients = gradients.to(device=output.device, dtype=output.dtype)
    (output * gradients).sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def _read_embeddings(table, ids) -> torch.Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long, device=table.device)
    was_training = table.training
    table.eval()
    try:
        with torch.no_grad():
            return table(ids).detach()
    finally:
        table.train(was_training)


def _row_indices(table, ids) -> torch.Tensor:
    table_ids, table_indices = table.ids_map()
    index_by_id = dict(zip(table_ids.tolist(), table_indices.tolist()))
    return torch.tensor([index_by_id[int(row_id)] for row_id in ids], dtype=torch.long, device=table.device)


def _read_state_rows(table, optimizer, ids) -> torch.Tensor:
    return optimizer.state_sum(table).index_select(0, _row_indices(table, ids))


def _step_values(state_dict) -> dict:
    """Each table's step count, by table name (RecIS: by step key)."""
    return {entry["table"]: entry["step"] for entry in state_dict["state"].values()}


def _run_formula_parity_test(device: str) -> None:
    dimension = 7
    ids = torch.tensor([2, 5, 2, 9], device=device)
    gradients = torch.tensor(
        [
            [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0],
            [2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0],
            [-1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0],
            [0.5, -0.5, 1.0, -1.0, 2.0, -2.0, 3.0],
        ]
    )
    name, table = _make_table([dimension], block_size=2, device=device, label=f"formula_{device}")
    optimizer = SparseRowWiseAdagrad(
        filter_out_sparse_param(table),
        lr=0.1,
        lr_decay=0.02,
        initial_accumulator_value=0.3,
        eps=1e-4,
        weight_decay=0.07,
    )
    unique_ids = [2, 5, 9]
    expected_grad = torch.stack((gradients[0] + gradients[2], gradients[1], gradients[3]))
    expected_state = torch.full((3, 1), 0.3)
    expected_embedding = torch.zeros((3, dimension))
    for step in range(1, 4):
        _take_step(table, optimizer, ids, gradients)
        adjusted_grad = expected_grad + 0.07 * expected_embedding
        expected_state += adjusted_grad.square().mean(dim=1, keepdim=True)
        effective_lr = 0.1 / (1 + (step - 1) * 0.02)
        expected_embedding -= effective_lr * adjusted_grad / (expected_state.sqrt() + 1e-4)

    torch.testing.assert_close(_read_embeddings(table, unique_ids).cpu(), expected_embedding, rtol=2e-5, atol=2e-6)
    actual_state = _read_state_rows(table, optimizer, unique_ids).cpu()
    torch.testing.assert_close(actual_state, expected_state, rtol=2e-5, atol=2e-6)
    assert tuple(actual_state.shape) == (3, 1)
    assert _step_values(optimizer.state_dict()) == {name: 3}


def test_sum_uses_grad_sq_for_row_state() -> None:
    name, table = _make_table([3], block_size=2, label="sum_manual_grad_sq")
    ids = torch.tensor([7], device=table.device)
    table.insert(ids, torch.zeros((1, 3), device=table.device))
    row_index = _row_indices(table, [7])
    optimizer = SparseRowWiseAdagradSum(filter_out_sparse_param(table), lr=0.1, initial_accumulator_value=0.5, eps=0.0)
    grad = torch.tensor([[3.0, 4.0, 0.0]])
    grad_sq = torch.tensor([[5.0, 8.0, 1.0]])

    optimizer.apply_gradient(table, row_index, grad, grad_sq=grad_sq)
    optimizer.zero_grad()

    expected_state = torch.tensor([[0.5 + (5.0 + 8.0 + 1.0) / 3.0]])
    expected_embedding = -0.1 * grad / expected_state.sqrt()
    torch.testing.assert_close(_read_state_rows(table, optimizer, [7]), expected_state)
    torch.testing.assert_close(_read_embeddings(table, [7]), expected_embedding)
    assert _step_values(optimizer.state_dict()) == {name: 1}


def test_sum_without_grad_sq_takes_the_gradient_as_one_workers() -> None:
    """Replaces ``test_sum_rejects_missing_grad_sq`` (see the module docstring)."""
    _, table = _make_table([3], label="sum_missing_grad_sq")
    optimizer = SparseRowWiseAdagradSum(filter_out_sparse_param(table), lr=0.1, initial_accumulator_value=0.5)
    table.insert(torch.tensor([0]), torch.zeros((1, 3)))
    table.accept_grad(torch.tensor([0]), torch.tensor([[1.0, 2.0, 2.0]]))
    optimizer.step()
    expected_state = 0.5 + (1.0 + 4.0 + 4.0) / 3.0
    torch.testing.assert_close(_read_state_rows(table, optimizer, [0]), torch.tensor([[expected_state]]))
    torch.testing.assert_close(
        _read_embeddings(table, [0]), -0.1 * torch.tensor([[1.0, 2.0, 2.0]]) / (expected_state**0.5 + 1e-10)
    )


def test_sum_zero_grad_respects_accumulation_boundary() -> None:
    _, table = _make_table([3], label="sum_zero_grad")
    optimizer = SparseRowWiseAdagradSum(filter_out_sparse_param(table))
    optimizer.set_grad_accum_steps(2)
    table(torch.tensor([1])).sum().backward()
    optimizer.step()  # the first of two micro-steps
    optimizer.zero_grad()
    assert table.has_grad  # kept: the window is not over
    table(torch.tensor([1])).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    assert not table.has_grad


@pytest.mark.parametrize("device", DEVICES)
def test_formula_parity_across_blocks(device) -> None:
    _run_formula_parity_test(device)


@pytest.mark.skipif(TorchRecRowWiseAdagrad is None, reason="torchrec is not installed")
def test_matches_torchrec_for_active_rows() -> None:
    dimension = 7
    recis_ids = torch.tensor([2, 5, 2, 9])
    torchrec_ids = torch.tensor([0, 1, 0, 2])
    gradients = torch.tensor(
        [
            [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0],
            [2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0],
            [-1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0],
            [0.5, -0.5, 1.0, -1.0, 2.0, -2.0, 3.0],
        ]
    )
    _, table = _make_table([dimension], block_size=2, label="torchrec_oracle")
    hyper = dict(lr=0.1, lr_decay=0.02, initial_accumulator_value=0.3, eps=1e-4, weight_decay=0.07)
    recis_optimizer = SparseRowWiseAdagrad(filter_out_sparse_param(table), **hyper)
    weight = torch.nn.Parameter(torch.zeros((3, dimension)))
    torchrec_optimizer = TorchRecRowWiseAdagrad([weight], **hyper)
    for _ in range(3):
        _take_step(table, recis_optimizer, recis_ids, gradients)
        (weight.index_select(0, torchrec_ids) * gradients).sum().backward()
        torchrec_optimizer.step()
        torchrec_optimizer.zero_grad()
    torch.testing.assert_close(_read_embeddings(table, [2, 5, 9]), weight.detach(), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(
        _read_state_rows(table, recis_optimizer, [2, 5, 9]),
        torchrec_optimizer.state[weight]["sum"],
        rtol=2e-5,
        atol=2e-6,
    )


def test_state_round_trip_preserves_independent_table_steps() -> None:
    first_name, first_table = _make_table([3], label="state_first")
    optimizer = SparseRowWiseAdagrad(filter_out_sparse_param(first_table), lr=0.1, lr_decay=0.1)
    _take_step(first_table, optimizer, [1])
    _take_step(first_table, optimizer, [1])

    second_name, second_table = _make_table([3], label="state_second")
    optimizer.add_params(filter_out_sparse_param(second_table))
    _take_step(second_table, optimizer, [2])

    expected_steps = {first_name: 2, second_name: 1}
    state_dict = optimizer.state_dict()
    assert _step_values(state_dict) == expected_steps
    saved_state = {
        key: value.detach().clone() if torch.is_tensor(value) else value for key, value in state_dict.items()
    }

    optimizer.reset_state_dict()
    assert _step_values(optimizer.state_dict()) == {first_name: 0, second_name: 0}
    optimizer.load_state_dict(saved_state)
    assert _step_values(optimizer.state_dict()) == expected_steps

    _take_step(second_table, optimizer, [2])
    expected_second_embedding = -0.1 - 0.1 / (1 + 0.1) / (2.0**0.5 + 1e-10)
    torch.testing.assert_close(_read_embeddings(second_table, [2]), torch.full((1, 3), expected_second_embedding))
    assert _step_values(optimizer.state_dict()) == {first_name: 2, second_name: 2}


def test_saver_round_trip_with_multiple_tables(tmp_path) -> None:
    first_name, first_table = _make_table([3], block_size=2, label="save_first")
    model = torch.nn.Module()
    model.add_module("first_table", first_table)
    optimizer = SparseRowWiseAdagrad(filter_out_sparse_param(model), lr=0.1, lr_decay=0.1)
    second_name, second_table = _make_table([3], block_size=2, label="save_second")
    model.add_module("second_table", second_table)
    optimizer.add_params(filter_out_sparse_param(second_table))

    _take_step(first_table, optimizer, [1])
    _take_step(first_table, optimizer, [1])
    _take_step(second_table, optimizer, [2])
    expected_first_embedding = _read_embeddings(first_table, [1]).clone()
    expected_first_state = _read_state_rows(first_table, optimizer, [1]).clone()
    expected_second_embedding = _read_embeddings(second_table, [2]).clone()
    expected_second_state = _read_state_rows(second_table, optimizer, [2]).clone()
    expected_steps = {first_name: 2, second_name: 1}

    ck.save(tmp_path / "row_wise_multi_table", model, optimizer)
    first_table.clear()
    second_table.clear()
    optimizer.reset_state_dict()
    ck.load(tmp_path / "row_wise_multi_table", model, optimizer)

    torch.testing.assert_close(_read_embeddings(first_table, [1]), expected_first_embedding)
    torch.testing.assert_close(_read_state_rows(first_table, optimizer, [1]), expected_first_state)
    torch.testing.assert_close(_read_embeddings(second_table, [2]), expected_second_embedding)
    torch.testing.assert_close(_read_state_rows(second_table, optimizer, [2]), expected_second_state)
    assert _step_values(optimizer.state_dict()) == expected_steps


def test_invalid_steps_are_refused() -> None:
    """The part of ``test_single_table_loads_legacy_step`` that is not RecIS's key layout."""
    _, table = _make_table([3], label="legacy_state")
    optimizer = SparseRowWiseAdagrad(filter_out_sparse_param(table))
    _take_step(table, optimizer, [1])
    for invalid_step in (-0.5, 1.5, float("nan"), float("inf")):
        invalid_state = optimizer.state_dict()
        invalid_state["state"][0]["step"] = invalid_step
        with pytest.raises(ValueError):
            optimizer.load_state_dict(invalid_state)
    assert _step_values(optimizer.state_dict()) == {table.name: 1}


def test_direct_load_rejects_foreign_hashtable_state() -> None:
    _, table = _make_table([3], label="load_target")
    optimizer = SparseRowWiseAdagrad(filter_out_sparse_param(table))
    _take_step(table, optimizer, [1])
    state_dict = optimizer.state_dict()
    foreign_name, _ = _make_table([3], label="load_foreign")
    state_dict["state"][0]["table"] = foreign_name
    with pytest.raises(ValueError, match=foreign_name):
        optimizer.load_state_dict(state_dict)


def test_existing_rows_keep_weight_decay_sparse() -> None:
    _, table = _make_table([3], block_size=2, label="existing_rows")
    ids = torch.tensor([1, 2])
    table.insert(ids, torch.ones((2, 3)))
    optimizer = SparseRowWiseAdagrad(
        filter_out_sparse_param(table), lr=0.2, initial_accumulator_value=0.5, eps=1e-4, weight_decay=0.1
    )
    _take_step(table, optimizer, [1], torch.zeros((1, 3)))

    expected_active_state = torch.tensor([[0.51]])
    expected_active = torch.full((3,), 1.0 - 0.2 * 0.1 / (0.51**0.5 + 1e-4))
    actual = _read_embeddings(table, [1, 2])
    torch.testing.assert_close(actual[0], expected_active)
    torch.testing.assert_close(actual[1], torch.ones(3))
    torch.testing.assert_close(
        _read_state_rows(table, optimizer, [1, 2]), torch.cat((expected_active_state, torch.tensor([[0.5]])))
    )


def test_add_params_initializes_preallocated_blocks() -> None:
    _, primary = _make_table([3], block_size=2, label="add_primary")
    optimizer = SparseRowWiseAdagrad(filter_out_sparse_param(primary), lr=0.1)
    _, added = _make_table([3], block_size=2, label="add_existing")
    ids = torch.tensor([10, 11, 12])
    added.insert(ids, torch.zeros((3, 3)))
    optimizer.add_params(filter_out_sparse_param(added))
    _take_step(added, optimizer, ids, torch.full((3, 3), 2.0))
    torch.testing.assert_close(_read_embeddings(added, ids), torch.full((3, 3), -0.1))
    torch.testing.assert_close(_read_state_rows(added, optimizer, ids), torch.full((3, 1), 4.0))


def test_multidimensional_embedding_uses_full_row_mean() -> None:
    _, table = _make_table([2, 3], block_size=2, label="multidimensional")
    optimizer = SparseRowWiseAdagrad(filter_out_sparse_param(table), lr=0.1, initial_accumulator_value=0.2, eps=1e-4)
    ids = torch.tensor([4, 8])
    gradients = torch.arange(1.0, 13.0).reshape(2, 2, 3)
    table.insert(ids, torch.zeros_like(gradients))
    table.accept_grad(ids, gradients)
    optimizer.step()
    optimizer.zero_grad()

    expected_state = 0.2 + gradients.square().reshape(2, -1).mean(dim=1, keepdim=True)
    expected_embedding = -0.1 * gradients / (expected_state.sqrt().reshape(2, 1, 1) + 1e-4)
    torch.testing.assert_close(_read_embeddings(table, ids), expected_embedding)
    torch.testing.assert_close(_read_state_rows(table, optimizer, ids), expected_state)


def test_empty_batch_on_unallocated_table() -> None:
    name, table = _make_table([4], label="empty_batch")
    optimizer = SparseRowWiseAdagrad(filter_out_sparse_param(table))
    _take_step(table, optimizer, torch.empty(0, dtype=torch.long))
    assert table.ids().numel() == 0
    assert _step_values(optimizer.state_dict()) == {name: 1}


def test_default_learning_rate_matches_sparse_adagrad() -> None:
    _, table = _make_table([4], label="default_lr")
    optimizer = SparseRowWiseAdagrad(filter_out_sparse_param(table))
    assert optimizer.param_groups[0]["lr"] == 1e-3
    assert optimizer.param_groups[0]["maximize"] is False


def test_step_runs_closure_with_grad_and_returns_loss() -> None:
    _, table = _make_table([4], label="closure")
    optimizer = SparseRowWiseAdagrad(filter_out_sparse_param(table))
    closure_calls = []

    def closure():
        closure_calls.append(torch.is_grad_enabled())
        return torch.tensor(3.0, requires_grad=True)

    loss = optimizer.step(closure)
    assert closure_calls == [True]
    assert loss.item() == 3.0


def test_maximize_reverses_the_gradient_update() -> None:
    _, table = _make_table([4], label="maximize")
    initial_embedding = torch.arange(1.0, 5.0).reshape(1, 4)
    table.insert(torch.tensor([1]), initial_embedding)
    optimizer = SparseRowWiseAdagrad(
        filter_out_sparse_param(table), lr=0.1, initial_accumulator_value=0.5, eps=0, weight_decay=0.25, maximize=True
    )
    _take_step(table, optimizer, [1], torch.ones((1, 4)))

    adjusted_grad = -torch.ones((1, 4)) + 0.25 * initial_embedding
    expected_state = 0.5 + adjusted_grad.square().mean(dim=1, keepdim=True)
    expected_embedding = initial_embedding - (0.1 * adjusted_grad / expected_state.sqrt())
    torch.testing.assert_close(_read_embeddings(table, [1]), expected_embedding)
    torch.testing.assert_close(_read_state_rows(table, optimizer, [1]), expected_state)


@pytest.mark.parametrize("argument", ["lr", "lr_decay", "initial_accumulator_value", "eps", "weight_decay"])
@pytest.mark.parametrize("invalid_value", [-0.1, float("nan")], ids=["negative", "nan"])
def test_rejects_invalid_hyperparameters(argument, invalid_value) -> None:
    _, table = _make_table([4], label=f"invalid_{argument}")
    with pytest.raises(ValueError):
        SparseRowWiseAdagrad(filter_out_sparse_param(table), **{argument: invalid_value})


def test_rejects_empty_parameter_dict() -> None:
    with pytest.raises(ValueError):
        SparseRowWiseAdagrad({})


def test_add_params_rejects_existing_parameter_name() -> None:
    _, table = _make_table([4], label="duplicate_param")
    params = filter_out_sparse_param(table)
    optimizer = SparseRowWiseAdagrad(params)
    with pytest.raises(RuntimeError):
        optimizer.add_params(params)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_zero_gradient_is_finite(device, dtype) -> None:
    _, table = _make_table([4], block_size=2, device=device, dtype=dtype, label=f"zero_{device}_{dtype}")
    optimizer = SparseRowWiseAdagrad(filter_out_sparse_param(table))
    ids = torch.tensor([1], dtype=torch.long, device=table.device)
    initial_embedding = torch.zeros((1, 4), dtype=dtype, device=table.device)
    table.insert(ids, initial_embedding)
    table.accept_grad(ids, torch.zeros_like(initial_embedding))
    optimizer.step()
    optimizer.zero_grad()

    embedding = _read_embeddings(table, [1])
    state = _read_state_rows(table, optimizer, [1])
    assert torch.isfinite(embedding).all() and torch.isfinite(state).all()
    torch.testing.assert_close(embedding, torch.zeros_like(embedding))
    torch.testing.assert_close(state, torch.zeros_like(state))
    assert not math.isnan(float(state.sum()))
