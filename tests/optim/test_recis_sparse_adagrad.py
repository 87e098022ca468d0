"""RecIS's ``tests/optim/sparse_adagrad_test.py`` (alibaba/RecIS), transcribed to CPU.

``test_sparse_adagrad`` trains a ``HashTable`` under ``SparseAdagrad(param_dict=...,
lr, lr_decay, initial_accumulator_value)`` and a zero ``nn.Embedding(sparse=True)`` under
``torch.optim.Adagrad`` with the same hyperparameters on 100 batches (behind the same
frozen classifier and cross-entropy loss), compares rows and accumulators, then saves a
checkpoint, clears the table, resets the optimizer's step, restores and compares again.
``test_weight_decay_uses_adjusted_gradient`` checks one update against the formula with
the update info RecIS records (``save_update_info_interval=1``).

The calls are RecIS's: ``HashTable([emb_size], block_size=1024, device=..., name=...)``,
``filter_out_sparse_param``, ``SparseAdagrad(param_dict=..., lr=, lr_decay=,
initial_accumulator_value=, weight_decay=, save_update_info_interval=)``, ``step``,
``zero_grad``, ``eval``, ``clear``, ``reset_state_dict``, ``state_dict``,
``get_step_update_info``. Changes, and why:

- CPU instead of CUDA (the test's own ``TEST_DEVICE`` default); the ``.cuda()`` calls on
  tensors being compared are dropped.
- The table's initializer is spelled out as ``ConstantInitializer(init_val=0)``: RecIS's
  HashTable default, which the test relies on (the table must start equal to the zero
  embedding); recis's HashTable defaults to a uniform initializer.
- RecIS's ``Saver``/``SaverOptions``, ``_init_model_bank``, ``restore`` and
  ``CheckpointReader`` (its framework's checkpoint format) become ``recis.checkpoint.save``
  and ``load``, the global step going in ``extra``.
- ``snap_shot()`` (ids, storage indices, rows) is read as ``ids_map()`` and ``embeddings()``:
  the same ids, rows and values.
- Left out, as assertions on RecIS's storage layout: the reads of the accumulator through
  ``slot_group().slot_by_name("sparse_adagrad_state_sum").value()``. RecIS's slot holds the
  accumulator itself; recis's slot holds the sum of squares since the row was created and
  the accumulator is ``initial_accumulator_value`` plus it. The same accumulators are read
  with ``SparseAdagrad.state_sum(table)`` and compared as RecIS compares them.
- RecIS's optimizer state dict keys one step tensor under the fixed name
  ``"sparse_adagrad_step"``; recis keeps a step count per table in
  ``state_dict()["state"]``, which is what is compared before and after the restore.
- ``optimizer._eps`` (a private attribute) is read as ``param_groups[0]["eps"]``.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn as nn

import recis.checkpoint as ck
from recis.nn.initializers import ConstantInitializer
from recis.nn.modules.hashtable import HashTable, filter_out_sparse_param
from recis.optim.sparse_adagrad import SparseAdagrad

SEED = 42
DEVICE = "cpu"


def set_all_seeds(seed):
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def compare_snapshot(
    mapping1: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    mapping2: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    rtol: float = 1e-5,
    atol: float = 1e-8,
) -> bool:
    """Whether two (ids, rows, embeddings, accumulators) snapshots hold the same ids and values, by id."""
    ids1, _, embs1, states1 = mapping1
    ids2, _, embs2, states2 = mapping2
    if ids1.size(0) != ids2.size(0):
        return False
    if ids1.size(0) == 0:
        return True
    sorted_ids1, order1 = torch.sort(ids1)
    sorted_ids2, order2 = torch.sort(ids2)
    if not torch.equal(sorted_ids1, sorted_ids2):
        return False
    same_embs = torch.allclose(embs1[order1], embs2[order2], rtol=rtol, atol=atol)
    same_states = torch.allclose(states1[order1], states2[order2], rtol=rtol, atol=atol)
    return same_embs and same_states


def snap_shot(table: HashTable) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RecIS's ``snap_shot()``: ids, their rows, and the rows' values."""
    ids, rows = table.ids_map()
    return ids, rows, table.embeddings()


class RecisModel(torch.nn.Module):
    def __init__(self, emb_size, num_classes, name, device) -> None:
        super().__init__()
        self._emb = HashTable(
            [emb_size],
            block_size=1024,
            device=torch.device(device),
            name=name,
            initializer=ConstantInitializer(init_val=0),
        )
        self.classifier = nn.Linear(emb_size, num_classes, bias=False, dtype=torch.float32, device=device)
        self.device = device
        self.loss_ce = nn.CrossEntropyLoss(reduction="mean")

    def forward(self, ids):
        embeds = self._emb(ids).to(self.device)
        return embeds, self.classifier(embeds)

    def loss(self, logits, labels):
        return self.loss_ce(logits, labels)

    @property
    def recis_emb(self):
        return self._emb

    @property
    def linear(self):
        return self.classifier


class TorchModel(torch.nn.Module):
    def __init__(self, emb_size, num_classes, device) -> None:
        super().__init__()
        self._torch_emb = nn.Embedding(num_embeddings=100000, embedding_dim=emb_size, sparse=True, device=device)
        self._torch_emb.weight.data.fill_(0.0)
        set_all_seeds(SEED)
        self.classifier = nn.Linear(emb_size, num_classes, bias=False, dtype=torch.float32, device=device)
        self.loss_ce = nn.CrossEntropyLoss(reduction="mean")

    def forward(self, ids):
        embeds = self._torch_emb(ids)
        return embeds, self.classifier(embeds)

    @property
    def torch_emb(self):
        return self._torch_emb

    @property
    def linear(self):
        return self.classifier

    def loss(self, logits, labels):
        return self.loss_ce(logits, labels)


class Setup:
    """RecIS's ``setUp``: both models and optimizers, labels, and the 23 id batches."""

    def __init__(self, name: str) -> None:
        set_all_seeds(SEED)
        self.lr, self.lr_decay, self.initial_accumulator_value = 0.01, 0.001, 0.03
        self.emb_size, self.num_classes = 53, 20
        self.recis_model = RecisModel(self.emb_size, self.num_classes, name=name, device=DEVICE).train()
        self.recis_sparse_optim = SparseAdagrad(
            param_dict=filter_out_sparse_param(self.recis_model),
            lr=self.lr,
            lr_decay=self.lr_decay,
            initial_accumulator_value=self.initial_accumulator_value,
        )
        self.torch_model = TorchModel(self.emb_size, self.num_classes, device=DEVICE).train()
        self.torch_optim = torch.optim.Adagrad(
            self.torch_model.torch_emb.parameters(),
            lr_decay=self.lr_decay,
            initial_accumulator_value=self.initial_accumulator_value,
        )
        assert torch.equal(self.recis_model.linear.weight, self.torch_model.linear.weight)
        self.labels = torch.randint(low=0, high=20, size=(100000,), device=DEVICE)
        self.ids = [
            torch.arange(start=0, end=3, step=1, device=DEVICE),
            torch.arange(start=1, end=10, step=1, device=DEVICE),
            torch.randperm(100, device=DEVICE)[:5],
        ]
        for i in range(20):
            self.ids.append(torch.randperm(100000 - i, device=DEVICE)[: 1000 + i])
        self.steps = 100
        self.global_step = torch.scalar_tensor(self.steps, dtype=torch.int64)


def test_sparse_adagrad(tmp_path):
    s = Setup("test_sparse_adagrad")
    for step in range(s.steps):
        ids = s.ids[step % len(s.ids)]
        _, logits = s.recis_model(ids)
        s.recis_model.loss(logits, s.labels[ids]).backward()
        s.recis_sparse_optim.step()
        s.recis_sparse_optim.zero_grad()

    s.recis_model = s.recis_model.eval()
    for step in range(s.steps):
        s.recis_model(s.ids[step % len(s.ids)])

    for step in range(s.steps):
        ids = s.ids[step % len(s.ids)]
        _, logits = s.torch_model(ids)
        s.torch_model.loss(logits, s.labels[ids]).backward()
        s.torch_optim.step()
        s.torch_optim.zero_grad()

    table = s.recis_model.recis_emb
    recis_ids, recis_index, recis_emb = snap_shot(table)
    torch_valid_emb = s.torch_model.torch_emb(recis_ids)
    assert torch.allclose(recis_emb, torch_valid_emb)
    recis_state_sum = s.recis_sparse_optim.state_sum(table)[recis_index]
    torch_state_sum = s.torch_optim.state[s.torch_model.torch_emb.weight]["sum"][recis_ids]
    assert torch.allclose(recis_state_sum, torch_state_sum)

    # Test Optimizer Save and Load
    ckpt_dir = tmp_path / "ckpt"
    ck.save(ckpt_dir, s.recis_model, s.recis_sparse_optim, extra={"global_step": s.global_step})
    save_ids, save_index, save_emb = snap_shot(table)
    save_state_sum = s.recis_sparse_optim.state_sum(table)[save_index]
    save_sparse_adagrad_step = s.recis_sparse_optim.state_dict()["state"][0]["step"]

    table.clear()
    s.recis_sparse_optim.reset_state_dict()
    assert s.recis_sparse_optim.state_dict()["state"][0]["step"] == 0
    extra = ck.load(ckpt_dir, s.recis_model, s.recis_sparse_optim)

    load_sparse_adagrad_step = s.recis_sparse_optim.state_dict()["state"][0]["step"]
    assert load_sparse_adagrad_step == save_sparse_adagrad_step == s.steps
    assert int(extra["global_step"]) == s.steps
    load_ids, load_index, load_emb = snap_shot(table)
    load_state_sum = s.recis_sparse_optim.state_sum(table)[load_index]
    assert compare_snapshot(
        (save_ids, save_index, save_emb, save_state_sum),
        (load_ids, load_index, load_emb, load_state_sum),
    )


def test_weight_decay_uses_adjusted_gradient():
    s = Setup("test_weight_decay_uses_adjusted_gradient")
    weight_decay = 0.1
    model = RecisModel(s.emb_size, s.num_classes, name="test_weight_decay", device=DEVICE).train()
    optimizer = SparseAdagrad(
        param_dict=filter_out_sparse_param(model),
        lr=s.lr,
        lr_decay=s.lr_decay,
        initial_accumulator_value=s.initial_accumulator_value,
        weight_decay=weight_decay,
        save_update_info_interval=1,
    )
    ids = s.ids[1]
    for _ in range(2):
        _, logits = model(ids)
        model.loss(logits, s.labels[ids]).backward()
        optimizer.step()
        optimizer.zero_grad()

    update_info = optimizer.get_step_update_info()

    def value_with_suffix(suffix):
        return next(value for key, value in update_info.items() if key.endswith(suffix))

    state_sum_before = value_with_suffix("_updated_state_sum")
    params_before = value_with_suffix("_updated_params_before")
    params_after = value_with_suffix("_updated_params_after")
    raw_grad = value_with_suffix("_updated_grad")
    saved_step = value_with_suffix("_last_saved_step").item()
    assert saved_step == 2 and bool(params_before.ne(0).any())  # the second step: decay has a value to act on
    adjusted_grad = raw_grad + weight_decay * params_before
    state_sum_after = state_sum_before + adjusted_grad.square()
    effective_lr = s.lr / (1 + (saved_step - 1) * s.lr_decay)
    expected_params_after = params_before - effective_lr * adjusted_grad / (
        state_sum_after.sqrt() + optimizer.param_groups[0]["eps"]
    )
    torch.testing.assert_close(params_after, expected_params_after)


@pytest.fixture(autouse=True)
def _quiet_torch_sparse_warning():
    """torch.optim.Adagrad's sparse path warns about disabled invariant checks; not ours to fix."""
    with torch.sparse.check_sparse_tensor_invariants(enable=False):
        yield
