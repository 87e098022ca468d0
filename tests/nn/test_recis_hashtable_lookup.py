"""RecIS's ``tests/hashtable/ht_lookup_test.py``, transcribed to CPU.

Source: alibaba/RecIS, ``tests/hashtable/ht_lookup_test.py`` (class ``GPUHashtableTest``).
Its tests build ``HashTable(embedding_shape=[emb_dim], block_size=1024, dtype=...,
device=..., name=...)``, look ids up in training mode, with ``AdmitHook("ReadOnly")`` and
in eval mode, insert rows with ``insert(ids, embeddings)``, train through
``split_sparse_dense_state_dict`` and ``SparseAdam``, and check which ids the table holds.
The calls and keywords are RecIS's. Changes, and why:

- CPU instead of CUDA: ``device=torch.device("cpu")``; RecIS's ``.cuda()`` calls are dropped.
- ``ht._hashtable_impl.insert(ids, emb)`` is spelled ``ht.insert(ids, emb)``: RecIS's public
  method of the same call; ``_hashtable_impl`` is RecIS's C++ object.
- RecIS's default initializer is zeros, and ``test_embedding_lookup`` asserts that new ids
  read zeros. recis's default is uniform in +-1/sqrt(dim), a function of (seed, id), so
  these assertions compare with the table's ``initial_values`` of the same ids instead,
  and check that a second table gives the same rows to the same ids in another order.
- ``test_cg_lookup_after_scalar_rehash_with_uint32_max_hash`` is a regression test of
  cuco's GPU probing: it asserts cuco's XXH32 value of its keys, picks background keys by
  their cuco bucket, asserts ``id_info()`` (cuco's slot count: 640,000, then 1,280,000
  after the insert that crosses 60% load) and reads the target's storage index through
  ``_hashtable_impl.embedding_lookup``. Those are RecIS's storage internals and are left
  out. What it protects, a key inserted before the id map grows is still found after,
  is transcribed: the same keys, inserted one at a time, then as many background keys as
  RecIS inserts (contiguous ones here, since no bucket matters), then one more; the
  target must still be present and read back the row inserted for it.
"""

from __future__ import annotations

import torch

from recis.nn.hashtable_hook import AdmitHook
from recis.nn.modules.hashtable import HashTable, split_sparse_dense_state_dict
from recis.optim import SparseAdam

DEVICE = "cpu"
IDS_NUM = 2048
EMB_DIM = 128
BLOCK_SIZE = 1024
DTYPE = torch.float32


def _table(name: str, emb_dim: int = EMB_DIM) -> HashTable:
    return HashTable(
        embedding_shape=[emb_dim],
        block_size=BLOCK_SIZE,
        dtype=DTYPE,
        device=torch.device(DEVICE),
        name=name,
    )


def _tiled(ids: torch.Tensor) -> torch.Tensor:
    """RecIS's test rows: each id repeated along the row."""
    return torch.tile(ids.reshape([-1, 1]), [1, EMB_DIM])


def test_embedding_lookup():
    ht = _table("gpu_ht")

    # new ids: RecIS expects zeros (its default initializer); here the initial values
    ids = torch.arange(IDS_NUM, device=DEVICE)
    emb_r = ht(ids)
    assert torch.equal(emb_r, ht.initial_values(ids))
    other = _table("gpu_ht_other")
    assert torch.equal(other(ids.flip(0)).detach(), emb_r.detach().flip(0))  # a function of the id

    # inserted rows
    ids_beg = IDS_NUM
    ids = torch.arange(ids_beg, ids_beg + IDS_NUM, device=DEVICE)
    emb = _tiled(ids)
    ht.insert(ids, emb.type(DTYPE))
    emb_r = ht(ids)
    assert (emb == emb_r).all()

    # half inserted, half missing: the missing half is inserted with its initial values
    ids_beg += IDS_NUM
    ids = torch.arange(ids_beg - IDS_NUM, ids_beg + IDS_NUM, device=DEVICE)
    emb_r = ht(ids)
    missing = torch.arange(ids_beg, ids_beg + IDS_NUM, device=DEVICE)
    exp_r = torch.concat([emb.type(DTYPE), ht.initial_values(missing)], 0)
    assert torch.equal(exp_r, emb_r)

    ids_r, _ = torch.sort(ht.ids())
    ids_exp = torch.arange(ids_beg + IDS_NUM, device=DEVICE)
    assert (ids_r == ids_exp).all()


def test_embedding_lookup_readonly():
    ht = _table("gpu_ht_ro")
    sparse_state, _ = split_sparse_dense_state_dict(ht.state_dict())
    opt = SparseAdam(sparse_state)

    ro_hook = AdmitHook("ReadOnly")
    # absent ids: a read-only lookup inserts nothing
    ids = torch.arange(IDS_NUM, device=DEVICE)
    ht(ids, admit_hook=ro_hook)
    assert len(ht) == 0

    # inserted rows train through a read-only lookup
    ids_beg = IDS_NUM
    ids = torch.arange(ids_beg, ids_beg + IDS_NUM, device=DEVICE)
    emb = _tiled(ids)
    ht.insert(ids, emb.type(DTYPE))
    emb = ht(ids, admit_hook=ro_hook)
    emb.sum().backward()
    opt.step()
    opt.zero_grad()
    assert not torch.equal(ht.lookup(ids), _tiled(ids).type(DTYPE))  # the step moved them

    # half present, half absent: the absent half stays out, also after a step
    ids_beg += IDS_NUM
    ids = torch.arange(ids_beg - IDS_NUM, ids_beg + IDS_NUM, device=DEVICE)
    emb = ht(ids, admit_hook=ro_hook)
    emb.sum().backward()
    opt.step()
    opt.zero_grad()

    ids_r, _ = torch.sort(ht.ids())
    ids_exp = torch.arange(IDS_NUM, 2 * IDS_NUM, device=DEVICE)
    assert (ids_r == ids_exp).all()


def test_embedding_lookup_eval():
    ht = _table("gpu_ht_eval")
    ht.eval()

    # eval lookups insert nothing
    ids = torch.arange(IDS_NUM, device=DEVICE)
    ht(ids)

    ids_beg = IDS_NUM
    ids = torch.arange(ids_beg, ids_beg + IDS_NUM, device=DEVICE)
    emb = _tiled(ids)
    ht.insert(ids, emb.type(DTYPE))
    ht(ids)

    ids_beg += IDS_NUM
    ids = torch.arange(ids_beg - IDS_NUM, ids_beg + IDS_NUM, device=DEVICE)
    ht(ids)

    ids_r, _ = torch.sort(ht.ids())
    ids_exp = torch.arange(IDS_NUM, 2 * IDS_NUM, device=DEVICE)
    assert (ids_r == ids_exp).all()


def test_cg_lookup_after_scalar_rehash_with_uint32_max_hash():
    """A key inserted before the id map grows is found after it (see the module docstring)."""
    old_capacity = 640_000
    target = 7_387_261_146_061_804
    filler = 244_033
    prefill = (460_431, 332_399, 287_184)

    ht = HashTable(
        embedding_shape=[1],
        block_size=BLOCK_SIZE,
        dtype=DTYPE,
        device=torch.device(DEVICE),
        name="gpu_ht_cg_probe_regression",
    )

    def insert(keys):
        ids = torch.as_tensor(keys, dtype=torch.int64, device=DEVICE)
        embeddings = torch.zeros((len(keys), 1), dtype=DTYPE, device=DEVICE)
        ht.insert(ids, embeddings)

    bootstrap = (*prefill, filler, target)
    for key in bootstrap:  # one key at a time, as RecIS
        insert([key])

    before_rehash_count = int(old_capacity * 0.60) - 1
    background = torch.arange(1_000_000, 1_000_000 + before_rehash_count - len(bootstrap))
    insert(background)
    assert len(ht) == before_rehash_count
    insert([1_000_000 + before_rehash_count])
    assert len(ht) == before_rehash_count + 1

    target_ids = torch.tensor([target], dtype=torch.int64, device=DEVICE)
    assert bool(ht.initial_values(target_ids).ne(0).all())  # so reading 0 below means the row was found
    ht.eval()
    assert torch.equal(ht(target_ids), torch.zeros(1, 1))
    ids, _ = ht.ids_map()
    assert bool((ids == target).any())
    for key in bootstrap:
        assert torch.equal(ht.lookup(torch.tensor([key])), torch.zeros(1, 1))
