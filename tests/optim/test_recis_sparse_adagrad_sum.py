"""RecIS's ``tests/optim/sparse_adagrad_sum_test.py`` (alibaba/RecIS), transcribed to CPU.

Three tests of ``SparseAdagradSum``: its hyperparameter record
(``super_param_state_dict`` / ``load_super_param_state_dict``) follows the live learning
rate and restores what it saved; ``weight_decay`` is refused; and an update grows the
accumulator by the externally given squared sums, not by the square of the gradient.

The calls are RecIS's: ``SparseAdagradSum({}, weight_decay=...)``,
``SparseAdagradSum({"table": ...}, lr=, initial_accumulator_value=, eps=)``,
``HashTable([3], block_size=8, device=..., name=...)``, ``insert``,
``super_param_state_dict``, ``load_super_param_state_dict``. Changes, and why:

- ``test_super_param_state_restores_live_learning_rate_and_interval`` builds the optimizer
  with ``__new__`` and a mocked native optimizer (``_imp``) whose ``set_lr`` and
  ``set_save_update_info_interval`` calls it asserts; recis has no native optimizer
  object, so the test builds a real optimizer with the same hyperparameters and checks
  that the values reach the param group and the update-info interval.
- ``test_uses_external_grad_sq_for_state_update`` (CUDA-only in RecIS) runs on CPU. It
  passes ``table._hashtable_impl`` (the native table) where recis takes the ``HashTable``,
  feeds the gradient and squared sums through the private ``accept_grad``/``accept_grad_sq``
  of that native table and calls ``step()``; in recis the squared sums are computed at the
  owners from what each rank sent, so the test hands both to
  ``apply_gradient(table, rows, grad, grad_sq=...)``, the owner's update. ``snap_shot()``
  is read with ``ids_map()`` and ``embeddings()``.
- Left out, as RecIS's storage layout: the accumulator read through
  ``slot_group().slot_by_name("sparse_adagrad_state_sum").value()`` (RecIS's slot holds the
  accumulator, recis's the sum since the row was created); it is read with
  ``state_sum(table)`` and compared as RecIS compares it.
- The tables get RecIS's default initializer, ``ConstantInitializer(init_val=0)``, spelled out.
"""

from __future__ import annotations

import uuid

import pytest
import torch

from recis.nn.initializers import ConstantInitializer
from recis.nn.modules.hashtable import HashTable
from recis.optim.sparse_adagrad_sum import SparseAdagradSum


def test_super_param_state_restores_live_learning_rate_and_interval():
    table = HashTable([3], name="super_params", initializer=ConstantInitializer(init_val=0))
    optimizer = SparseAdagradSum(
        {"table": table}, lr=0.1, lr_decay=0.2, initial_accumulator_value=0.3, eps=1e-4, save_update_info_interval=4
    )
    optimizer.param_groups[0]["lr"] = 0.5

    assert optimizer.super_param_state_dict()["lr"] == 0.5
    optimizer.load_super_param_state_dict(
        {"lr": 0.25, "lr_decay": 0.4, "initial_accumulator_value": 0.6, "eps": 1e-6, "save_update_info_interval": 8}
    )

    assert optimizer.param_groups[0]["lr"] == 0.25
    assert optimizer.save_update_info_interval() == 8
    assert optimizer.super_param_state_dict() == {
        "lr": 0.25,
        "lr_decay": 0.4,
        "initial_accumulator_value": 0.6,
        "eps": 1e-6,
        "save_update_info_interval": 8,
    }


def test_rejects_weight_decay():
    with pytest.raises(ValueError, match="does not support weight_decay"):
        SparseAdagradSum({}, weight_decay=1e-4)


def test_uses_external_grad_sq_for_state_update():
    lr = 0.1
    initial_accumulator_value = 0.5
    eps = 0.0
    table = HashTable(
        [3],
        block_size=8,
        device=torch.device("cpu"),
        name=f"sparse_adagrad_sum_{uuid.uuid4().hex}",
        initializer=ConstantInitializer(init_val=0),
    )
    optimizer = SparseAdagradSum({"table": table}, lr=lr, initial_accumulator_value=initial_accumulator_value, eps=eps)

    ids = torch.tensor([11, 23], dtype=torch.long)
    params_before = torch.zeros([2, 3], dtype=torch.float32)
    table.insert(ids, params_before)
    snap_ids, snap_index = table.ids_map()
    order = torch.argsort(snap_ids)
    snap_index = snap_index[order].to(dtype=torch.long)

    grad = torch.tensor([[3.0, 4.0, 0.0], [1.0, 2.0, 2.0]], dtype=torch.float32)
    grad_sq = torch.tensor([[5.0, 8.0, 1.0], [4.0, 9.0, 16.0]], dtype=torch.float32)
    optimizer.apply_gradient(table, snap_index, grad, grad_sq=grad_sq)

    result_ids, result_index = table.ids_map()
    result_params = table.embeddings()
    result_order = torch.argsort(result_ids)
    result_index = result_index[result_order]
    result_params = result_params[result_order]
    expected_state_sum = initial_accumulator_value + grad_sq
    expected_params = params_before - lr * grad / torch.sqrt(expected_state_sum)
    state_sum = optimizer.state_sum(table)[result_index]

    assert torch.allclose(state_sum, expected_state_sum)
    assert torch.allclose(result_params, expected_params)
