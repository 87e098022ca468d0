"""RecIS's ``tests/optim/optim_ga_test.py`` (alibaba/RecIS), transcribed to CPU.

The test trains a two-table ``EmbeddingEngine`` model with ``SparseAdamWTF`` once with one
batch of 10 and once as 5 micro-batches of 2 under ``set_grad_accum_steps(5)``, and checks
that the gradients left afterwards, dense and per id of each table, agree to 1e-5: the
accumulated sum of the micro-batch gradients of ``loss / 5`` is the full batch's gradient.

Changes, and why:

- RecIS's engine holds ``DynamicEmbedding`` modules and the test reads each one's
  ``_hashtable``; recis's engine holds the tables themselves, so the test reads every
  ``HashTable`` of the model (with RecIS's ``grad()`` and ``ids_map()``).
- CPU instead of CUDA; no process group (one process).
- Hugging Face ``accelerate`` is not a recis dependency: its two effects here are written
  out (the loss divided by the accumulation steps; the dense step taken only at the last
  micro-batch).
- RecIS builds the model once ("global registration") and resets it between runs through
  ``embedding_engine._ht[...]._hashtable.reset()``; here each run builds a fresh model.
- No files: the gradients are compared in memory rather than through ``torch.save``.
"""

from __future__ import annotations

import torch
from torch import nn

from recis.nn.initializers import ConstantInitializer
from recis.nn.modules.hashtable import HashTable, filter_out_sparse_param
from recis.optim.sparse_adamw_tf import SparseAdamWTF


def embedding_modules():
    from recis.nn.modules.embedding import DynamicEmbedding, EmbeddingOption
    from recis.nn.modules.embedding_engine import EmbeddingEngine

    return DynamicEmbedding, EmbeddingOption, EmbeddingEngine


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        _, EmbeddingOption, EmbeddingEngine = embedding_modules()
        options = {
            name: EmbeddingOption(
                embedding_dim=3,
                shared_name=name,
                combiner="sum",
                coalesced=True,
                device=torch.device("cpu"),
                initializer=ConstantInitializer(0.5),
            )
            for name in ("table_1", "table_2")
        }
        self.embedding_engine = EmbeddingEngine(options)
        self.dense1 = nn.Sequential(nn.Linear(3, 7), nn.ReLU(), nn.Linear(7, 1))
        self.dense2 = nn.Sequential(nn.Linear(3, 7), nn.ReLU(), nn.Linear(7, 1))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.constant_(module.weight, 0.15)
                nn.init.constant_(module.bias, 0.11)

    def forward(self, x, y):
        embedding_results = self.embedding_engine({"table_1": x, "table_2": y})
        table_1_emb, table_2_emb = embedding_results["table_1"], embedding_results["table_2"]
        return self.dense1(table_1_emb + table_2_emb) + self.dense2(table_2_emb)


def sparse_grad_by_id(hashtable) -> dict[int, torch.Tensor]:
    """RecIS's reading of a table's gradient: COO rows of ``grad()`` named through ``ids_map()``."""
    grad = hashtable.grad().coalesce()
    by_row = {int(row): value for row, value in zip(grad.indices()[0], grad.values())}
    ids, rows = (tensor.view(-1) for tensor in hashtable.ids_map())
    return {int(i): by_row[int(r)] for i, r in zip(ids, rows) if int(r) in by_row}


def gradients_after_training(accumulation_steps: int) -> dict[str, object]:
    torch.manual_seed(42)
    model = Model()
    dense_opt = torch.optim.AdamW(model.parameters(), lr=0.001, weight_decay=1e-6)
    sparse_opt = SparseAdamWTF(filter_out_sparse_param(model), lr=0.001, weight_decay=1e-6)
    sparse_opt.set_grad_accum_steps(accumulation_steps)
    inputs = torch.arange(0, 30, dtype=torch.long).reshape(10, 3)
    dense_opt.zero_grad()
    sparse_opt.zero_grad()
    batch_size = 10 // accumulation_steps
    for i in range(accumulation_steps):
        batch = inputs[i * batch_size : (i + 1) * batch_size]
        loss = model(batch, batch).mean()
        (loss / accumulation_steps).backward()  # accelerator.backward under accumulate()
        if i == accumulation_steps - 1:  # the accelerated dense optimizer steps when gradients sync
            dense_opt.step()
        sparse_opt.step()
    grads: dict[str, object] = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    for name, module in model.named_modules():
        if isinstance(module, HashTable):
            grads[name] = sparse_grad_by_id(module)
    return grads


def test_grad_accu_1_vs_5():
    one, five = gradients_after_training(1), gradients_after_training(5)
    assert one.keys() == five.keys()
    assert sum(isinstance(grad, dict) for grad in one.values()) == 1  # the two tables coalesced into one
    for name in one:
        a, b = one[name], five[name]
        if isinstance(a, dict):
            assert a.keys() == b.keys(), name
            a, b = torch.stack([a[i] for i in sorted(a)]), torch.stack([b[i] for i in sorted(b)])
        assert (a - b).abs().max().item() < 1e-5, f"Gradient difference too large: {name}"
