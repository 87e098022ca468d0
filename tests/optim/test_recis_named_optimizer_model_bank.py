"""RecIS's ``tests/optim/named_optimizer_model_bank_test.py`` (alibaba/RecIS), transcribed to CPU.

Four models share two tables (``HashTable([1024], name=..., slice=gen_slice(0, 1))``) and
differ in their dense layers: "normal", "large" (one more layer), "small" (one layer
fewer) and "diff" (other widths). Two checkpoints of the normal model are written after
one training step, one with ``wrapped_named_optimizer(optim.AdamW)`` (state keyed by
name) and one with a plain ``optim.AdamW`` (keyed by index, without names). Each model
then restores each checkpoint into a named AdamW over its own parameters, checks that
the dense optimizer's state equals the saved one for every parameter they share and
that the param groups' hyperparameters are the saved ones, and trains one more step.
The diff model's restore fails with "size mismatch".

The calls of recis are RecIS's: ``HashTable``, ``gen_slice``, ``filter_out_sparse_param``,
``SparseAdamWTF(..., lr=0.001)``, ``wrapped_named_optimizer(optim.AdamW)(model.named_parameters())``,
its ``state_dict``, ``load_state_dict(state, valid_names=...)`` and ``index_param_map``.
Changes, and why:

- Left out: RecIS's framework. Its ``Saver``/``SaverOptions`` with ``ExtraFields``, the
  model bank (``_init_model_bank``, ``restore``, the ``"oname"`` renames of the tables),
  ``get_file_system`` and ``extra.pt``, and Hugging Face ``accelerate`` (``Accelerator``,
  ``prepare``, which wraps the optimizer so that the test reads
  ``optimizer.optimizer.index_param_map``) are not recis's. What they do here is written
  out: a checkpoint is ``torch.save`` of the model's state dict, the sparse and the dense
  optimizer's; a restore loads the model non-strictly (the parameters and tables the
  checkpoint has; torch raises "size mismatch" for the diff model, as RecIS's loader
  does), the sparse optimizer, and the dense one with ``valid_names``, the names of the
  dense parameters the checkpoint held (the model bank's role). The tables of all models
  sit at the same module paths, so their rows load by path; RecIS's ``"oname"`` renames
  (``table_h_1`` from ``table_n_1``, ...) are applied to the table names in the sparse
  optimizer's state dict.
- RecIS builds one ``SparseAdamWTF`` per model in ``setUpClass`` but keeps only the last
  (the diff model's) and uses it for every model; here each model has its own.
- CPU instead of CUDA; the ``torch >= 2.6`` skip is dropped (the installed torch is newer).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.optim as optim

from recis.nn.modules.hashtable import HashTable, filter_out_sparse_param, gen_slice
from recis.optim.named_optimizer import wrapped_named_optimizer
from recis.optim.sparse_adamw_tf import SparseAdamWTF


def _tables(module: nn.Module, prefix: str, shard_idx: int, shard_num: int) -> None:
    module.table_1 = HashTable([1024], name=f"table_{prefix}_1", slice=gen_slice(shard_idx, shard_num))
    module.table_2 = HashTable([1024], name=f"table_{prefix}_2", slice=gen_slice(shard_idx, shard_num))


class NormalModel(nn.Module):
    def __init__(self, shard_idx=0, shard_num=1):
        super().__init__()
        _tables(self, "n", shard_idx, shard_num)
        self.dense1 = nn.Sequential(nn.Linear(1024, 512), nn.Linear(512, 1))
        self.dense2 = nn.Sequential(nn.Linear(1024, 512), nn.Linear(512, 1))

    def forward(self, x):
        return self.dense1(self.table_1(x) + self.table_2(x)) + self.dense2(self.table_2(x))


class LargeModel(nn.Module):
    def __init__(self, shard_idx=0, shard_num=1):
        super().__init__()
        _tables(self, "h", shard_idx, shard_num)
        self.dense1 = nn.Sequential(nn.Linear(1024, 512), nn.Linear(512, 1))
        self.dense2 = nn.Sequential(nn.Linear(1024, 512), nn.Linear(512, 1))
        self.dense3 = nn.Linear(1, 1)

    def forward(self, x):
        return self.dense1(self.table_1(x) + self.table_2(x)) + self.dense3(self.dense2(self.table_2(x)))


class SmallModel(nn.Module):
    def __init__(self, shard_idx=0, shard_num=1):
        super().__init__()
        _tables(self, "s", shard_idx, shard_num)
        self.dense1 = nn.Sequential(nn.Linear(1024, 512), nn.Linear(512, 1))

    def forward(self, x):
        return self.dense1(self.table_1(x) + self.table_2(x))


class DiffModel(nn.Module):
    def __init__(self, shard_idx=0, shard_num=1):
        super().__init__()
        _tables(self, "d", shard_idx, shard_num)
        self.dense1 = nn.Sequential(nn.Linear(1024, 256), nn.Linear(256, 1))
        self.dense2 = nn.Sequential(nn.Linear(1024, 784), nn.Linear(784, 1))

    def forward(self, x):
        return self.dense1(self.table_1(x) + self.table_2(x)) + self.dense2(self.table_2(x))


def _train_step(model, sparse_optim, dense_optim) -> None:
    sparse_optim.zero_grad()
    dense_optim.zero_grad()
    emb = model(torch.arange(100))
    torch.sum(emb).backward()
    sparse_optim.step()
    dense_optim.step()


def save_model(model, sparse_optim, dense_optim, path) -> None:
    """RecIS's ``save_model``: one training step, then a checkpoint (the Saver's, written out)."""
    _train_step(model, sparse_optim, dense_optim)
    torch.save(
        {
            "model": model.state_dict(),
            "sparse_optim": sparse_optim.state_dict(),
            "dense_optim": dense_optim.state_dict(),
            "train_epoch": torch.scalar_tensor(1, dtype=torch.int64),
            "global_step": torch.scalar_tensor(1, dtype=torch.int64),
        },
        path,
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """RecIS's ``setUpClass``: ckpt_1 saved through a named AdamW, ckpt_2 through a plain one."""
    tmpdir = tmp_path_factory.mktemp("named_optimizer")
    normal_model = NormalModel(shard_idx=0, shard_num=1)
    sparse_optim = SparseAdamWTF(filter_out_sparse_param(normal_model), lr=0.001)
    dense_optim_1 = wrapped_named_optimizer(optim.AdamW)(normal_model.named_parameters())
    save_model(normal_model, sparse_optim, dense_optim_1, tmpdir / "ckpt_1")
    dense_optim_2 = optim.AdamW(normal_model.parameters())
    save_model(normal_model, sparse_optim, dense_optim_2, tmpdir / "ckpt_2")
    return tmpdir


def _check_optim_by_extra(optimizer, saved: dict) -> int:
    """RecIS's check; returns how many saved entries it compared (the parameters shared)."""
    tmp_state_dict = optimizer.state_dict()
    compared = 0
    for top_key, value in saved["dense_optim"]["state"].items():
        real_key = top_key
        if top_key not in tmp_state_dict["state"]:
            real_key = optimizer.index_param_map.get(top_key, "")
        if real_key == "" or real_key not in tmp_state_dict["state"]:
            continue  # a parameter this model does not have
        for key, val in value.items():
            assert torch.allclose(val, tmp_state_dict["state"][real_key][key])
        compared += 1
    assert len(tmp_state_dict["param_groups"]) == len(saved["dense_optim"]["param_groups"])
    for group1, group2 in zip(tmp_state_dict["param_groups"], saved["dense_optim"]["param_groups"]):
        for key in group1:
            if key in ("params", "param_names"):
                continue
            assert group1[key] == group2[key]
    return compared


def _load_model(model, sparse_optim, dense_optim, ckpt_path, oname=None) -> int:
    """RecIS's ``_load_model``: restore, check the dense optimizer, train one step. Returns how
    many dense parameters' states were compared with the checkpoint's. ``oname`` (``{table name here:
    table name in the checkpoint}``) renames the tables' optimizer state, as the model bank does."""
    saved = torch.load(ckpt_path, weights_only=False)
    model.load_state_dict(saved["model"], strict=False)
    sparse_state = copy.deepcopy(saved["sparse_optim"])
    saved_name = {ckpt_name: name for name, ckpt_name in (oname or {}).items()}
    for entry in sparse_state["state"].values():
        entry["table"] = saved_name.get(entry["table"], entry["table"])
    sparse_optim.load_state_dict(sparse_state)
    valid_names = {name for name, _ in model.named_parameters() if name in saved["model"]}
    dense_optim.load_state_dict(copy.deepcopy(saved["dense_optim"]), valid_names=valid_names)
    compared = _check_optim_by_extra(dense_optim, saved)
    _train_step(model, sparse_optim, dense_optim)
    return compared


def _named_run(model_cls):
    model = model_cls(shard_idx=0, shard_num=1)
    sparse_optim = SparseAdamWTF(filter_out_sparse_param(model), lr=0.001)
    dense_optim = wrapped_named_optimizer(optim.AdamW)(model.named_parameters())
    dense_optim.named_optimizer = True
    return model, sparse_optim, dense_optim


@pytest.mark.parametrize(
    "model_cls, shared_parameters, oname",
    [
        (NormalModel, 8, None),
        (LargeModel, 8, {"table_h_1": "table_n_1", "table_h_2": "table_n_2"}),
        (SmallModel, 4, {"table_s_1": "table_n_1", "table_s_2": "table_n_2"}),
    ],
    ids=["normal_normal", "normal_large", "normal_small"],
)
def test_named_optimizer_restores_the_parameters_it_shares_with_the_checkpoint(
    checkpoints, model_cls, shared_parameters, oname
):
    model, sparse_optim, dense_optim = _named_run(model_cls)
    assert _load_model(model, sparse_optim, dense_optim, checkpoints / "ckpt_1", oname) == shared_parameters
    assert _load_model(model, sparse_optim, dense_optim, checkpoints / "ckpt_2", oname) == shared_parameters


def test_normal_diff(checkpoints):
    model, sparse_optim, dense_optim = _named_run(DiffModel)
    for ckpt in ("ckpt_1", "ckpt_2"):
        with pytest.raises(RuntimeError) as cm:
            _load_model(model, sparse_optim, dense_optim, checkpoints / ckpt)
        assert "size mismatch" in str(cm.value)
