"""HashTable: shapes, insertion, initial values, assign/lookup, gradients, state dict, growth."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from recis.nn.initializers import ConstantInitializer, NormalInitializer, UniformInitializer
from recis.nn.modules.hashtable import HashTable, filter_out_sparse_param
from recis.optim import SparseAdam

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
FP32 = dict(rtol=1e-6, atol=1e-7)


def _ids(values) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.int64)


def _snapshot(table: HashTable) -> dict:
    return {
        "ids": table.ids().clone(),
        "weight": table.weight.clone(),
        "len": len(table),
        "slots": {name: table.slot(name).clone() for name in table.slot_names()},
    }


def _assert_same_snapshot(a: dict, b: dict) -> None:
    assert a["len"] == b["len"]
    assert torch.equal(a["ids"], b["ids"])
    assert torch.equal(a["weight"], b["weight"])
    assert a["slots"].keys() == b["slots"].keys()
    for name in a["slots"]:
        assert torch.equal(a["slots"][name], b["slots"][name])


def _trained_table(name: str | None = None, seed: int = 0) -> tuple[HashTable, SparseAdam]:
    """A table with a few rows whose weight and optimizer slots have been updated once."""
    table = HashTable([2, 3], name=name, seed=seed)
    optimizer = SparseAdam(table, lr=0.1)
    out = table(_ids([5, -1, 5, INT64_MAX, 77]))
    (out * torch.arange(out.numel(), dtype=torch.float32).reshape(out.shape)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    return table, optimizer


class _Tower(nn.Module):
    def __init__(self, table: HashTable) -> None:
        super().__init__()
        self.emb = table
        self.proj = nn.Linear(4, 1)


class _Model(nn.Module):
    def __init__(self, user: HashTable, item: HashTable) -> None:
        super().__init__()
        self.user = _Tower(user)
        self.item = item
        self.head = nn.Linear(4, 1)

    def forward(self, user_ids: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.user.proj(self.user.emb(user_ids)) * self.item(item_ids))


def _model(seed: int = 0) -> _Model:
    torch.manual_seed(seed)
    return _Model(HashTable(4, name="user", seed=1), HashTable(4, name="item", seed=2))


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("embedding_shape", [8, [64], [2, 3]])
@pytest.mark.parametrize("ids_shape", [(), (5,), (3, 4)])
def test_output_shape_is_ids_shape_plus_embedding_shape(ids_shape, embedding_shape):
    table = HashTable(embedding_shape)
    ids = torch.arange(12, dtype=torch.int64)[: max(1, torch.Size(ids_shape).numel())].reshape(ids_shape)
    out = table(ids)
    row_shape = (embedding_shape,) if isinstance(embedding_shape, int) else tuple(embedding_shape)
    assert out.shape == (*ids_shape, *row_shape)
    assert out.dtype == torch.float32
    table.eval()
    assert table(ids).shape == (*ids_shape, *row_shape)
    assert table.lookup(ids).shape == (*ids_shape, *row_shape)


def test_output_positions_hold_the_row_of_their_id():
    table = HashTable([2, 3])
    ids = _ids([[7, 8, 7], [9, 7, 8]])
    out = table(ids)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(out[i, j], table.lookup(ids[i, j]), rtol=0, atol=0)
    assert torch.equal(out[0, 0], out[1, 1])


def test_embedding_dim_is_product_of_embedding_shape():
    assert HashTable(8).embedding_dim == 8
    assert HashTable([64]).embedding_dim == 64
    assert HashTable([2, 3]).embedding_dim == 6
    table = HashTable([2, 3])
    table(_ids([1, 2]))
    assert table.weight.shape == (2, 6)


# --------------------------------------------------------------------------- insertion


def test_training_mode_inserts_new_ids_and_len_grows_once_per_distinct_id():
    table = HashTable(4)
    assert len(table) == 0
    table(_ids([3, 3, 4]))
    assert len(table) == 2
    table(_ids([[4, 5], [6, 3]]))
    assert len(table) == 4
    table(torch.tensor(-1))
    assert len(table) == 5
    assert sorted(table.ids().tolist()) == [-1, 3, 4, 5, 6]


def test_same_id_gets_same_initial_row_whatever_insertion_order_and_batch():
    ids = _ids(list(range(-50, 50)) + [INT64_MIN, INT64_MAX, 2**40])
    first = HashTable([2, 3], seed=11)
    first(ids)
    second = HashTable([2, 3], seed=11)
    reordered = ids.flip(0)
    for chunk in reordered.split(7):
        second(torch.cat([chunk, chunk[:2]]))  # duplicates within a batch change nothing
    assert sorted(first.ids().tolist()) == sorted(second.ids().tolist())
    assert not torch.equal(first.ids(), second.ids())  # the rows really are in a different order
    torch.testing.assert_close(first.lookup(ids), second.lookup(ids), rtol=0, atol=0)
    torch.testing.assert_close(first(ids), second(ids), rtol=0, atol=0)


def test_different_seeds_give_different_initial_rows():
    ids = _ids(range(100))
    a, b = HashTable(8, seed=0), HashTable(8, seed=1)
    rows_a, rows_b = a(ids), b(ids)
    assert not torch.isclose(rows_a, rows_b).any()


def test_default_initializer_is_uniform_in_plus_minus_inverse_sqrt_dim_and_not_constant():
    table = HashTable(16)
    rows = table(_ids(range(500)))
    bound = 1 / 16**0.5
    assert rows.abs().max() <= bound
    assert rows.abs().max() > 0.9 * bound
    assert torch.unique(rows).numel() > 7000  # elements differ across ids and within a row


def test_eval_mode_inserts_nothing_and_absent_ids_read_their_initial_value():
    ids = _ids([3, -1, INT64_MAX, 3, 8])
    evaluated = HashTable([2, 3], seed=5)
    evaluated(_ids([8, 100]))  # some rows present, others absent
    before = _snapshot(evaluated)
    evaluated.eval()
    eval_out = evaluated(ids)
    _assert_same_snapshot(before, _snapshot(evaluated))
    trained = HashTable([2, 3], seed=5)
    train_out = trained(ids)
    torch.testing.assert_close(eval_out, train_out, rtol=0, atol=0)
    torch.testing.assert_close(eval_out.reshape(5, 6), evaluated.initial_values(ids), rtol=0, atol=0)


def test_eval_mode_on_an_empty_table_reads_initial_values():
    ids = _ids([3, -1, INT64_MAX, 3])
    evaluated = HashTable([2, 3], seed=5)
    evaluated.eval()
    eval_out = evaluated(ids)
    assert len(evaluated) == 0
    assert evaluated.ids().numel() == 0
    torch.testing.assert_close(eval_out, HashTable([2, 3], seed=5)(ids), rtol=0, atol=0)


def test_eval_mode_reads_the_current_row_of_present_ids():
    table = HashTable(3, seed=5)
    table.assign(_ids([10]), torch.tensor([[1.0, 2.0, 3.0]]))
    table.eval()
    out = table(_ids([10, 11, 10]))
    torch.testing.assert_close(out[0], torch.tensor([1.0, 2.0, 3.0]), rtol=0, atol=0)
    torch.testing.assert_close(out[2], torch.tensor([1.0, 2.0, 3.0]), rtol=0, atol=0)
    torch.testing.assert_close(out[1], table.initial_values(_ids([11]))[0], rtol=0, atol=0)
    assert len(table) == 1


def test_eval_mode_backward_gives_gradient_to_present_ids_only():
    table = HashTable(2)
    table(_ids([1]))
    table.eval()
    out = table(_ids([1, 2, 1]))
    out.sum().backward()
    rows, grad = table.pending_grad()
    assert rows.tolist() == [0]
    torch.testing.assert_close(grad, torch.full((1, 2), 2.0), rtol=0, atol=0)
    assert len(table) == 1


# --------------------------------------------------------------------------- assign / lookup


def test_assign_inserts_new_ids_and_overwrites_present_ones():
    table = HashTable([2, 2])
    table(_ids([1, 2]))
    original_row_2 = table.lookup(_ids([2]))
    values = torch.arange(8, dtype=torch.float32).reshape(2, 2, 2)
    table.assign(_ids([1, 3]), values)
    assert len(table) == 3
    torch.testing.assert_close(table.lookup(_ids([1, 3])), values, rtol=0, atol=0)
    torch.testing.assert_close(table.lookup(_ids([2])), original_row_2, rtol=0, atol=0)
    # Flattened rows are accepted too.
    table.assign(_ids([2]), torch.full((1, 4), 9.0))
    torch.testing.assert_close(table.lookup(_ids([2])), torch.full((1, 2, 2), 9.0), rtol=0, atol=0)


def test_assign_with_repeated_ids_keeps_the_last_value():
    table = HashTable(2)
    ids = _ids([4, 5, 4, 6, 4, 5])
    values = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    table.assign(ids, values)
    assert len(table) == 3
    torch.testing.assert_close(table.lookup(_ids([4, 5, 6])), values[[4, 5, 3]], rtol=0, atol=0)


def test_assign_gives_new_rows_zero_slots():
    table, _ = _trained_table()
    assert table.slot("exp_avg").abs().sum() > 0  # the trained rows have nonzero slots
    before = {name: table.slot(name).clone() for name in table.slot_names()}
    table.assign(_ids([1000, 1001]), torch.ones(2, 2, 3))
    rows = table.ids().tolist()
    new_rows = [rows.index(1000), rows.index(1001)]
    for name in ("exp_avg", "exp_avg_sq"):
        slot = table.slot(name)
        assert slot.shape == (len(table), 6)
        assert torch.equal(slot[new_rows], torch.zeros(2, 6))
        assert torch.equal(slot[: before[name].shape[0]], before[name])


def test_training_insert_gives_new_rows_zero_slots_after_optimizer_registered_them():
    table, _ = _trained_table()
    count = len(table)
    table(_ids(range(2000, 2100)))  # enough new rows to grow the storage
    for name in ("exp_avg", "exp_avg_sq"):
        slot = table.slot(name)
        assert slot.shape == (count + 100, 6)
        assert torch.equal(slot[count:], torch.zeros(100, 6))


def test_assign_values_are_cast_to_table_dtype():
    table = HashTable(2, dtype=torch.float64)
    table.assign(_ids([1]), torch.tensor([[0.1, 0.2]], dtype=torch.float32))
    assert table.weight.dtype == torch.float64
    torch.testing.assert_close(table.lookup(_ids([1])), torch.tensor([[0.1, 0.2]], dtype=torch.float32).double())


def test_lookup_of_absent_id_raises_key_error_naming_it():
    table = HashTable(2)
    table(_ids([1, 2]))
    with pytest.raises(KeyError, match="987654321"):
        table.lookup(_ids([1, 987654321, 2]))
    with pytest.raises(KeyError, match="-1"):
        table.lookup(_ids([-1]))
    assert len(table) == 2


def test_lookup_returns_a_copy_not_a_view():
    table = HashTable(2)
    table.assign(_ids([1]), torch.zeros(1, 2))
    got = table.lookup(_ids([1]))
    got += 5
    torch.testing.assert_close(table.lookup(_ids([1])), torch.zeros(1, 2), rtol=0, atol=0)


def test_ids_order_matches_weight_rows():
    table = HashTable(3)
    table(_ids([30, -1, 10]))
    table.assign(_ids([20, 30]), torch.randn(2, 3))
    table(_ids([INT64_MIN, 10]))
    ids = table.ids()
    # Rows follow insertion, batch by batch (the order inside one batch is not pinned).
    assert sorted(ids[:3].tolist()) == [-1, 10, 30]
    assert ids[3:].tolist() == [20, INT64_MIN]
    assert table.weight.shape == (5, 3)
    torch.testing.assert_close(table.weight, table.lookup(ids), rtol=0, atol=0)


# --------------------------------------------------------------------------- parameters and gradients


def test_rows_are_not_parameters_of_the_model():
    model = _model()
    dense = [model.user.proj.weight, model.user.proj.bias, model.head.weight, model.head.bias]
    params = list(model.parameters())
    assert len(params) == len(dense)
    assert {id(p) for p in params} == {id(p) for p in dense}
    assert list(model.user.emb.parameters()) == []


def test_dense_adamw_over_model_parameters_leaves_table_rows_unchanged():
    model = _model()
    model(_ids([1, 2, 3]), _ids([4, 5, 6]))  # insert rows
    user_before = model.user.emb.weight.clone()
    item_before = model.item.weight.clone()
    head_before = model.head.weight.clone()
    dense = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(_ids([1, 2, 3]), _ids([4, 5, 6])).sum().backward()
    dense.step()
    assert not torch.equal(model.head.weight, head_before)  # the dense step really ran
    assert torch.equal(model.user.emb.weight, user_before)
    assert torch.equal(model.item.weight, item_before)
    assert model.user.emb.has_grad and model.item.has_grad


def test_backward_never_creates_a_grad_attribute_on_table_tensors():
    model = _model()
    model(_ids([1, 2, 2]), _ids([4, 5, 6])).sum().backward()
    for table in (model.user.emb, model.item):
        assert table.weight.grad is None
        for value in vars(table).values():
            if isinstance(value, torch.Tensor):
                assert value.grad is None
        for name in table.slot_names():
            assert table.slot(name).grad is None
        assert table.has_grad
    assert model.head.weight.grad is not None


def test_pending_grad_sums_duplicate_ids_per_row():
    table = HashTable(2)
    table(_ids([3, 5]))  # rows 0 and 1
    out = table(_ids([[5, 3, 5], [5, 9, 3]]))  # 9 -> row 2
    coeff = torch.arange(12, dtype=torch.float32).reshape(2, 3, 2)
    (out * coeff).sum().backward()
    rows, grad = table.pending_grad()
    assert rows.tolist() == [0, 1, 2]
    assert grad.dtype == torch.float32
    expected = torch.stack(
        [coeff[0, 1] + coeff[1, 2], coeff[0, 0] + coeff[0, 2] + coeff[1, 0], coeff[1, 1]]
    )  # rows of 3, 5, 9
    torch.testing.assert_close(grad, expected, **FP32)


def test_pending_grad_accumulates_across_backward_calls_and_clear_grad_drops_it():
    table = HashTable(2)
    assert table.pending_grad() is None and not table.has_grad
    table(_ids([1, 2])).sum().backward()
    table(_ids([2, 2])).sum().backward()
    rows, grad = table.pending_grad()
    assert rows.tolist() == [0, 1]
    torch.testing.assert_close(grad, torch.tensor([[1.0, 1.0], [3.0, 3.0]]), rtol=0, atol=0)
    table.clear_grad()
    assert table.pending_grad() is None and not table.has_grad


def test_accept_grad_adds_to_pending_gradient_of_present_ids():
    table = HashTable([1, 2])
    table(_ids([7, 8]))
    table.accept_grad(_ids([8, 8, 7]), torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]], [[5.0, 6.0]]]))
    rows, grad = table.pending_grad()
    assert rows.tolist() == [0, 1]
    torch.testing.assert_close(grad, torch.tensor([[5.0, 6.0], [4.0, 6.0]]), rtol=0, atol=0)


def test_no_grad_forward_still_inserts_in_training_mode_but_records_no_gradient():
    table = HashTable(3)
    with torch.no_grad():
        out = table(_ids([1, 2, 1]))
    assert len(table) == 2
    assert not out.requires_grad
    assert out.grad_fn is None
    assert not table.has_grad
    torch.testing.assert_close(out[0], table.lookup(_ids([1]))[0], rtol=0, atol=0)


def test_grad_mode_forward_output_requires_grad_without_any_dense_parameter():
    table = HashTable(3)
    out = table(_ids([1, 2]))
    assert out.requires_grad
    out.sum().backward()
    assert table.has_grad


# --------------------------------------------------------------------------- filter_out_sparse_param


def test_filter_out_sparse_param_keys_tables_by_name_as_recis_does():
    model = _model()
    found = filter_out_sparse_param(model)
    assert set(found) == {"user", "item"}
    assert found["user"] is model.user.emb
    assert found["item"] is model.item


def test_filter_out_sparse_param_keys_unnamed_and_same_named_tables_by_module_path():
    model = nn.ModuleDict({"a": HashTable(2), "b": HashTable(2, name="x"), "c": HashTable(2, name="x")})
    assert set(filter_out_sparse_param(model)) == {"a", "b", "c"}


def test_filter_out_sparse_param_lists_a_shared_table_once():
    shared = HashTable(4, name="shared")
    model = nn.ModuleDict({"a": _Tower(shared), "b": _Tower(shared), "c": nn.Linear(2, 2)})
    found = filter_out_sparse_param(model)
    assert len(found) == 1
    (table,) = found.values()
    assert table is shared


def test_filter_out_sparse_param_of_a_bare_table_and_of_a_model_without_tables():
    table = HashTable(2)
    assert filter_out_sparse_param(table) == {"": table}
    assert filter_out_sparse_param(nn.Linear(2, 2)) == {}


# --------------------------------------------------------------------------- state dict


def _train_model_a_bit(model: _Model) -> SparseAdam:
    optimizer = SparseAdam(filter_out_sparse_param(model), lr=0.05)
    for step in range(3):
        users = _ids([1, 2, 3, step + 10, -1])
        items = _ids([INT64_MAX, 5, 6, 5, step])
        model(users, items).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def test_state_dict_holds_ids_weight_and_slots_of_each_table():
    model = _model()
    _train_model_a_bit(model)
    state = model.state_dict()
    for prefix, table in (("user.emb.", model.user.emb), ("item.", model.item)):
        assert torch.equal(state[prefix + "ids"], table.ids())
        assert state[prefix + "weight"].shape == (len(table), 4)
        assert torch.equal(state[prefix + "weight"], table.weight)
        assert torch.equal(state[prefix + "slots.exp_avg"], table.slot("exp_avg"))
        assert torch.equal(state[prefix + "slots.exp_avg_sq"], table.slot("exp_avg_sq"))
    assert "head.weight" in state


def _assert_models_equal(a: _Model, b: _Model) -> None:
    for ta, tb in ((a.user.emb, b.user.emb), (a.item, b.item)):
        _assert_same_snapshot(_snapshot(ta), _snapshot(tb))
        torch.testing.assert_close(ta.lookup(ta.ids()), tb.lookup(ta.ids()), rtol=0, atol=0)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_state_dict_round_trip_into_a_fresh_model():
    model = _model()
    _train_model_a_bit(model)
    fresh = _model(seed=123)
    result = fresh.load_state_dict(model.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    _assert_models_equal(model, fresh)
    users, items = _ids([1, 2, 999]), _ids([5, 6, 7])
    torch.testing.assert_close(fresh(users, items), model(users, items), rtol=0, atol=0)
    assert fresh.user.emb.ids().tolist() == model.user.emb.ids().tolist()  # 999 went to the same row


def test_state_dict_round_trip_through_torch_save():
    model = _model()
    _train_model_a_bit(model)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = _model(seed=321)
    fresh.load_state_dict(torch.load(buffer))
    _assert_models_equal(model, fresh)


def test_loaded_table_keeps_training_identically_to_the_original():
    model = _model()
    optimizer = _train_model_a_bit(model)
    fresh = _model(seed=7)
    fresh.load_state_dict(model.state_dict())
    fresh_optimizer = SparseAdam(filter_out_sparse_param(fresh), lr=0.05)
    fresh_optimizer.load_state_dict(optimizer.state_dict())
    for m, opt in ((model, optimizer), (fresh, fresh_optimizer)):
        m(_ids([1, 50, 50]), _ids([5, 51, 0])).sum().backward()
        opt.step()
        opt.zero_grad()
    _assert_models_equal(model, fresh)


def test_state_dict_of_a_table_never_used():
    table = HashTable([2, 3])
    state = table.state_dict()
    assert state["ids"].shape == (0,)
    assert state["weight"].shape == (0, 2, 3)
    other = HashTable([2, 3])
    other(_ids([1, 2]))
    other.load_state_dict(state)
    assert len(other) == 0
    with pytest.raises(KeyError):
        other.lookup(_ids([1]))


# --------------------------------------------------------------------------- initializers


def test_constant_initializer_is_used_for_new_rows():
    table = HashTable([2, 3], initializer=ConstantInitializer(0.25))
    out = table(_ids([1, 2, -1]))
    torch.testing.assert_close(out, torch.full((3, 2, 3), 0.25), rtol=0, atol=0)


def test_normal_initializer_is_used_for_new_rows():
    initializer = NormalInitializer(mean=3.0, std=0.5)
    table = HashTable(4, initializer=initializer, seed=9)
    ids = _ids(range(50))
    out = table(ids)
    expected = initializer(ids, (4,), 9).to(torch.float32)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert 2.5 < out.mean() < 3.5


def test_user_callable_initializer_gets_ids_shape_and_seed():
    calls = []

    def by_id(ids, embedding_shape, seed):
        calls.append((ids.clone(), tuple(embedding_shape), seed))
        base = ids.to(torch.float64).reshape(-1, 1, 1) * 10 + seed
        return base + torch.arange(6, dtype=torch.float64).reshape(1, *embedding_shape)

    table = HashTable([2, 3], initializer=by_id, seed=4)
    out = table(_ids([2, 1, 2]))
    assert len(calls) == 1
    assert sorted(calls[0][0].tolist()) == [1, 2]
    assert calls[0][1:] == ((2, 3), 4)
    expected = torch.tensor([24.0, 25, 26, 27, 28, 29]).reshape(2, 3)
    torch.testing.assert_close(out[0], expected, rtol=0, atol=0)
    torch.testing.assert_close(out[1], expected - 10, rtol=0, atol=0)
    table(_ids([1, 2]))
    assert len(calls) == 1  # present ids do not call the initializer again


def test_uniform_initializer_argument_is_used():
    table = HashTable(8, initializer=UniformInitializer(5.0, 6.0))
    out = table(_ids(range(100)))
    assert out.min() >= 5.0 and out.max() < 6.0


class _SwitchableInitializer:
    """Constant rows until ``broken`` is set; then a wrong shape, or an exception."""

    def __init__(self) -> None:
        self.broken: str | None = None

    def __call__(self, ids, embedding_shape, seed):
        if self.broken == "shape":
            return torch.zeros(ids.numel(), 5)
        if self.broken == "raise":
            raise RuntimeError("initializer exploded")
        return torch.full((ids.numel(), *embedding_shape), 0.5)


@pytest.mark.parametrize("training", [True, False])
def test_initializer_returning_wrong_shape_raises_and_inserts_nothing(training):
    initializer = _SwitchableInitializer()
    table = HashTable([2, 3], initializer=initializer)
    table(_ids([1, 7]))
    SparseAdam(table)  # registers slots, so they are compared too
    initializer.broken = "shape"
    table.train(training)
    before = _snapshot(table)
    with pytest.raises(ValueError, match=r"\(2, 5\)"):
        table(_ids([2, 3, 1]))
    _assert_same_snapshot(before, _snapshot(table))
    with pytest.raises(KeyError):
        table.lookup(_ids([2]))
    torch.testing.assert_close(table(_ids([1, 7])), torch.full((2, 2, 3), 0.5), rtol=0, atol=0)


def test_assign_does_not_call_the_initializer_for_the_rows_it_writes():
    initializer = _SwitchableInitializer()
    table = HashTable([2, 3], initializer=initializer)
    initializer.broken = "shape"
    table.assign(_ids([4, 1]), torch.ones(2, 2, 3))
    torch.testing.assert_close(table.lookup(_ids([4, 1])), torch.ones(2, 2, 3), rtol=0, atol=0)


@pytest.mark.parametrize("training", [True, False])
def test_initializer_raising_inserts_nothing(training):
    initializer = _SwitchableInitializer()
    table = HashTable(2, initializer=initializer)
    table(_ids([1]))
    initializer.broken = "raise"
    table.train(training)
    before = _snapshot(table)
    with pytest.raises(RuntimeError, match="exploded"):
        table(_ids([1, 2]))
    _assert_same_snapshot(before, _snapshot(table))


# --------------------------------------------------------------------------- growth


def test_twenty_thousand_inserts_in_batches_keep_every_row_correct():
    generator = torch.Generator().manual_seed(0)
    table = HashTable(4, seed=3)
    table.add_slot("probe", 1, torch.float32)
    expected: dict[int, torch.Tensor] = {}
    pool = torch.randint(INT64_MIN, INT64_MAX, (15_000,), dtype=torch.int64, generator=generator)
    pool = torch.cat([pool, torch.arange(5000, dtype=torch.int64) * 2**32, _ids([-1, 0, INT64_MIN, INT64_MAX])])
    pool = pool[torch.randperm(pool.numel(), generator=generator)]
    for start in range(0, pool.numel(), 1500):
        batch = pool[start : start + 1500]
        batch = torch.cat([batch, batch[:100]])  # duplicates within a batch
        out = table(batch)
        new = [v for v in dict.fromkeys(batch.tolist()) if v not in expected]
        if new:
            initial = table.initial_values(_ids(new))
            expected.update(zip(new, initial))
        # Overwrite a few rows, old and new, as a training step would.
        touched = batch[::97]
        values = torch.randn(touched.numel(), 4, generator=generator)
        table.assign(touched, values)
        last = dict(zip(touched.tolist(), values))
        expected.update(last)
        torch.testing.assert_close(out[:100], out[-100:], rtol=0, atol=0)
    assert len(table) == len(expected) > 19_000
    assert table.slot("probe").shape == (len(table), 1)
    assert set(table.ids().tolist()) == set(expected)
    ids = _ids(expected)
    torch.testing.assert_close(table.lookup(ids), torch.stack(list(expected.values())), rtol=0, atol=0)
    torch.testing.assert_close(table.weight, table.lookup(table.ids()), rtol=0, atol=0)


def test_a_table_grown_under_inference_mode_still_trains_and_grows_afterwards():
    table = HashTable(4)
    with torch.inference_mode():
        table.assign(torch.arange(5000), torch.ones(5000, 4))  # grows rows and the id map
    optimizer = SparseAdam([table], lr=0.1)
    table(torch.tensor([1, 6000, 7000])).sum().backward()  # new ids: rows and map grow again
    optimizer.step()
    table.assign(torch.arange(10_000, 30_000), torch.zeros(20_000, 4))
    assert len(table) == 25_002
    assert bool((table.lookup(torch.tensor([1])) < 1).all()), "the trained row moved"
