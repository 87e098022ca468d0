"""EmbeddingOption, DynamicEmbedding and EmbeddingEngine in one process: pooling against a
hand computation, shared and coalesced tables, RecIS's inputs, and bad input."""

from __future__ import annotations

import pytest
import torch

from recis.nn import DynamicEmbedding, EmbeddingEngine, EmbeddingOption, HashTable
from recis.nn.initializers import ConstantInitializer
from recis.nn.modules.embedding import NoReduceEmbedding
from recis.optim import SparseAdamW
from recis.ragged import RaggedTensor

DIM = 3


def _option(name: str = "t", **kwargs) -> EmbeddingOption:
    return EmbeddingOption(embedding_dim=DIM, shared_name=name, **kwargs)


def _rows(table: HashTable, ids: list[int]) -> torch.Tensor:
    return table.initial_values(torch.tensor(ids))


def _ragged() -> RaggedTensor:
    return RaggedTensor(
        torch.tensor([4, 7, 7, 9, 2]), torch.tensor([0, 1, 1, 4, 5]), weight=torch.tensor([2.0, 1.0, 3.0, 0.5, 1.0])
    )


@pytest.mark.parametrize("combiner", ["sum", "mean"])
def test_ragged_bags_pool_their_weighted_rows(combiner):
    layer = DynamicEmbedding(_option(combiner=combiner))
    out = layer(_ragged())
    rows = _rows(layer.table, [4, 7, 7, 9, 2])
    weights = torch.tensor([2.0, 1.0, 3.0, 0.5, 1.0]).unsqueeze(1)
    bags = [(0, 1), (1, 1), (1, 4), (4, 5)]
    expected = []
    for start, end in bags:
        total = (weights[start:end] * rows[start:end]).sum(0)
        if combiner == "mean":
            total = total / weights[start:end].sum() if end > start else total
        expected.append(total)
    torch.testing.assert_close(out, torch.stack(expected))
    assert torch.equal(out[1], torch.zeros(DIM))  # an empty bag pools to zeros


def test_dense_ids_pool_over_the_last_dim_and_input_weights_apply():
    layer = DynamicEmbedding(_option(combiner="sum"))
    ids = torch.tensor([[[1, 2], [3, 3]]])
    weights = torch.tensor([[[1.0, 0.0], [2.0, 1.0]]])
    out = layer(ids, weights)
    assert out.shape == (1, 2, DIM)
    rows = _rows(layer.table, [1, 3])
    torch.testing.assert_close(out[0, 0], rows[0])
    torch.testing.assert_close(out[0, 1], 3 * rows[1])
    assert layer(torch.tensor([5, 6])).shape == (2, DIM)  # 1-D ids: one id per sample


def test_tile_puts_the_first_tile_len_rows_side_by_side_zero_padded():
    layer = DynamicEmbedding(_option(combiner="tile", combiner_kwargs={"tile_len": 2}))
    out = layer(RaggedTensor(torch.tensor([5, 6, 7, 8]), torch.tensor([0, 3, 4])))
    rows = _rows(layer.table, [5, 6, 8])
    assert out.shape == (2, 2 * DIM)
    torch.testing.assert_close(out[0], torch.cat([rows[0], rows[1]]))
    torch.testing.assert_close(out[1], torch.cat([rows[2], torch.zeros(DIM)]))


def test_the_gradient_of_a_pooled_row_reaches_each_id_times_its_weight():
    layer = DynamicEmbedding(_option(combiner="mean"))
    layer(_ragged()).sum().backward()
    rows, grad = layer.table.pending_grad()
    by_id = dict(zip(layer.table.ids_of_rows(rows).tolist(), grad[:, 0].tolist()))
    assert by_id == pytest.approx({4: 1.0, 7: 4 / 4.5, 9: 0.5 / 4.5, 2: 1.0})


def test_features_with_one_shared_name_share_rows_and_others_do_not():
    engine = EmbeddingEngine({"a": _option("shared"), "b": _option("shared", combiner="mean"), "c": _option("own")})
    out = engine({"a": torch.tensor([[1]]), "b": torch.tensor([[1, 1]]), "c": torch.tensor([[1]])})
    assert engine.table_of("a") is engine.table_of("b") and engine.table_of("c") is not engine.table_of("a")
    assert len(engine.table_of("a")) == 1
    torch.testing.assert_close(out["a"], out["b"])


def test_coalesced_tables_with_equal_options_merge_and_keep_their_ids_apart():
    options = {"a": _option("user", coalesced=True), "b": _option("item", coalesced=True), "c": _option("plain")}
    engine = EmbeddingEngine(options)
    assert sorted(engine.tables()) == ["plain", "user+item"]
    merged = engine.table_of("a")
    assert merged is engine.table_of("b") and merged.coalesce
    out = engine({"a": torch.tensor([[5]]), "b": torch.tensor([[5]])})
    assert len(merged) == 2 and not torch.equal(out["a"], out["b"])  # id 5 of user and of item: two rows
    assert merged.ids("item").numel() == 1


def test_an_untrainable_feature_is_detached_and_no_reduce_returns_distinct_rows():
    engine = EmbeddingEngine({"frozen": _option("f", trainable=False), "seq": _option("s", no_reduce=True)})
    sequence = RaggedTensor(torch.tensor([3, 4, 3]), torch.tensor([0, 2, 3]))
    out = engine({"frozen": torch.tensor([[1, 2]]), "seq": sequence})
    assert not out["frozen"].requires_grad
    seq = out["seq"]
    assert isinstance(seq, NoReduceEmbedding) and seq.emb.shape == (2, DIM)
    assert seq.reverse_index.tolist() == [0, 1, 0] and seq.offsets.tolist() == [0, 2, 3]


def test_an_engine_trains_with_a_sparse_optimizer():
    engine = EmbeddingEngine({"a": _option("t", initializer=ConstantInitializer(0.5))})
    optimizer = SparseAdamW(list(engine.tables().values()), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        engine({"a": torch.tensor([[1, 2]])})["a"].pow(2).sum().backward()
        optimizer.step()
    assert bool((engine.table_of("a").weight < 0.5).all())


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: _option(combiner="max"), ValueError, "unknown combiner 'max'"),
        (lambda: _option(combiner="tile"), ValueError, "needs combiner_kwargs"),
        (lambda: RaggedTensor(torch.tensor([1, 2]), torch.tensor([0, 2, 1, 2])), ValueError, "must not decrease"),
        (lambda: RaggedTensor(torch.tensor([1, 2]), torch.tensor([0, 1])), ValueError, "end at len\\(values\\)=2"),
        (lambda: RaggedTensor(torch.tensor([1, 2]), torch.tensor([0, 2]), torch.ones(3)), ValueError, "weight"),
        (
            lambda: EmbeddingEngine({"a": _option("t"), "b": EmbeddingOption(embedding_dim=4, shared_name="t")}),
            ValueError,
            "share table 't' but differ in embedding_dim",
        ),
        (lambda: _option(hdmp_group_size=2), ValueError, "not supported"),
    ],
)
def test_bad_options_and_inputs_raise_a_clear_error(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_bad_feature_input_changes_no_table():
    engine = EmbeddingEngine({"a": _option("t"), "b": _option("u")})
    with pytest.raises(TypeError, match="feature 'b'"):
        engine({"a": torch.tensor([[1]]), "b": torch.tensor([[0.5]])})
    with pytest.raises(ValueError, match="unknown features \\['z'\\]"):
        engine({"a": torch.tensor([[1]]), "z": torch.tensor([[1]])})
    assert all(len(table) == 0 for table in engine.tables().values())


@pytest.mark.parametrize("combiner", ["sum", "mean"])
@pytest.mark.parametrize("weighted", [False, True])
def test_dense_bags_pool_as_the_same_bags_given_ragged(combiner, weighted):
    layer = DynamicEmbedding(_option(combiner=combiner))
    ids = torch.tensor([[1, 2, 2], [3, 4, 1]])
    weights = torch.tensor([[1.0, 0.5, 2.0], [0.0, 0.0, 0.0]]) if weighted else None
    ragged = RaggedTensor(ids.reshape(-1), torch.tensor([0, 3, 6]), None if weights is None else weights.reshape(-1))
    torch.testing.assert_close(layer(ids, weights), layer(ragged))
    empty = layer(torch.empty(2, 0, dtype=torch.int64))
    assert torch.equal(empty, torch.zeros(2, DIM))  # bags of no ids pool to zeros
