"""recis.nn.initializers: distributions, determinism in (seed, id), argument checks."""

from __future__ import annotations

import math

import pytest
import torch

from recis.nn.initializers import (
    ConstantInitializer,
    NormalInitializer,
    UniformInitializer,
    default_initializer,
    uniform_bits,
)
from recis.nn.modules.hashtable import HashTable

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


def _ids(values) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.int64)


def _sample_ids(count: int = 10_000) -> torch.Tensor:
    # Half consecutive, half random over the whole int64 range.
    generator = torch.Generator().manual_seed(0)
    random = torch.randint(INT64_MIN, INT64_MAX, (count // 2,), dtype=torch.int64, generator=generator)
    return torch.cat([torch.arange(count - count // 2, dtype=torch.int64), random])


# --------------------------------------------------------------------------- uniform


def test_uniform_initializer_stays_within_low_high_and_fills_it():
    low, high = -0.3, 0.7
    values = UniformInitializer(low, high)(_sample_ids(), (10,), 0)  # 100k samples
    assert values.shape == (10_000, 10)
    assert values.min() >= low
    assert values.max() < high
    assert values.min() < low + 1e-3 and values.max() > high - 1e-3


def test_uniform_initializer_mean_and_histogram_are_roughly_uniform():
    low, high = 2.0, 5.0
    values = UniformInitializer(low, high)(_sample_ids(), (10,), 3).reshape(-1).double()
    n = values.numel()
    std_of_mean = (high - low) / math.sqrt(12 * n)
    assert abs(values.mean().item() - (low + high) / 2) < 5 * std_of_mean
    # Sample std of 100k uniforms: relative error about 0.3%; 1% is a loose but failing-when-wrong bound.
    assert abs(values.std().item() / ((high - low) / math.sqrt(12)) - 1) < 0.01
    counts = torch.histc(values, bins=10, min=low, max=high)
    expected = n / 10
    # Binomial std of a bin count is about sqrt(n * 0.1 * 0.9) ~ 95; allow 5 sigma.
    assert (counts - expected).abs().max() < 5 * math.sqrt(n * 0.1 * 0.9)


def test_uniform_initializer_with_low_equal_high_is_constant():
    values = UniformInitializer(1.5, 1.5)(_ids(range(10)), (3,), 0)
    torch.testing.assert_close(values, torch.full((10, 3), 1.5, dtype=values.dtype), rtol=0, atol=0)


def test_uniform_bits_are_in_unit_interval_with_53_bit_resolution():
    bits = uniform_bits(_sample_ids(), 10, seed=1)
    assert bits.dtype == torch.float64
    assert bits.min() >= 0 and bits.max() < 1
    scaled = bits * 2.0**53
    assert torch.equal(scaled, scaled.floor())  # exact multiples of 2**-53
    assert torch.unique(bits).numel() == bits.numel()


def test_uniform_elements_are_uncorrelated_across_neighbouring_ids_and_elements():
    values = UniformInitializer(-1.0, 1.0)(_ids(range(20_000)), (2,), 0).double()
    # Correlation of element 0 and 1 of a row, and of consecutive ids: about N(0, 1/sqrt(n)).
    within_row = torch.corrcoef(values.T)[0, 1]
    across_ids = torch.corrcoef(torch.stack([values[:-1, 0], values[1:, 0]]))[0, 1]
    assert abs(within_row) < 5 / math.sqrt(20_000)
    assert abs(across_ids) < 5 / math.sqrt(20_000)


def test_default_initializer_is_uniform_in_plus_minus_one_over_sqrt_dim():
    for shape in ([16], [2, 8]):
        initializer = default_initializer(shape)
        values = initializer(_ids(range(5000)), shape, 0)
        assert values.shape == (5000, *shape)
        bound = 1 / math.sqrt(16)
        assert values.abs().max() < bound
        assert values.abs().max() > 0.99 * bound
        assert abs(values.mean().item()) < 5 * bound / math.sqrt(3 * values.numel())


# --------------------------------------------------------------------------- normal


def test_normal_initializer_mean_and_std_on_100k_samples():
    mean, std = 1.5, 0.2
    values = NormalInitializer(mean, std)(_sample_ids(), (10,), 7).reshape(-1).double()
    n = values.numel()
    assert values.isfinite().all()
    assert abs(values.mean().item() - mean) < 5 * std / math.sqrt(n)
    # The std of a sample std is about std / sqrt(2n) = 0.00045 here; allow 5 sigma.
    assert abs(values.std().item() - std) < 5 * std / math.sqrt(2 * n)


def test_normal_initializer_tails_are_gaussian():
    values = NormalInitializer(0.0, 1.0)(_sample_ids(), (10,), 8).reshape(-1).double()
    n = values.numel()
    for k, probability in ((1, 0.3173), (2, 0.0455), (3, 0.0027)):
        fraction = (values.abs() > k).double().mean().item()
        assert abs(fraction - probability) < 5 * math.sqrt(probability * (1 - probability) / n)


def test_normal_initializer_with_zero_std_is_its_mean():
    values = NormalInitializer(-2.0, 0.0)(_ids(range(100)), (4,), 0)
    torch.testing.assert_close(values, torch.full((100, 4), -2.0, dtype=values.dtype), rtol=0, atol=0)


# --------------------------------------------------------------------------- constant


@pytest.mark.parametrize("value", [0.0, -3.25, 1e30])
def test_constant_initializer_fills_every_element(value):
    values = ConstantInitializer(value)(_ids([1, -1, INT64_MAX]), (2, 3), 5)
    assert values.shape == (3, 2, 3)
    assert torch.all(values == value)


def test_constant_initializer_default_is_zero():
    assert torch.all(ConstantInitializer()(_ids([4]), (3,), 0) == 0)


# --------------------------------------------------------------------------- determinism


_INITIALIZERS = [UniformInitializer(-1.0, 1.0), NormalInitializer(0.0, 1.0)]


@pytest.mark.parametrize("initializer", _INITIALIZERS, ids=repr)
def test_initial_value_depends_only_on_seed_and_id_not_on_batch(initializer):
    ids = _ids([5, -1, 0, INT64_MIN, INT64_MAX, 2**32, 123456789])
    whole = initializer(ids, (2, 3), 11)
    permutation = torch.tensor([3, 6, 0, 2, 5, 1, 4])
    permuted = initializer(ids[permutation], (2, 3), 11)
    torch.testing.assert_close(permuted, whole[permutation], rtol=0, atol=0)
    for i in range(ids.numel()):
        alone = initializer(ids[i : i + 1], (2, 3), 11)
        torch.testing.assert_close(alone, whole[i : i + 1], rtol=0, atol=0)
    mixed = initializer(torch.cat([_ids(range(1000, 1100)), ids[:3]]), (2, 3), 11)
    torch.testing.assert_close(mixed[-3:], whole[:3], rtol=0, atol=0)
    torch.testing.assert_close(initializer(ids, (2, 3), 11), whole, rtol=0, atol=0)


@pytest.mark.parametrize("initializer", _INITIALIZERS, ids=repr)
def test_initial_value_changes_with_seed_and_with_id(initializer):
    ids = _ids(range(200))
    a = initializer(ids, (8,), 0)
    b = initializer(ids, (8,), 1)
    assert not torch.isclose(a, b).any()
    assert torch.unique(a).numel() == a.numel()  # no two ids or elements share a value


@pytest.mark.parametrize("initializer", _INITIALIZERS, ids=repr)
def test_initial_value_prefix_of_a_wider_row_is_the_narrower_row(initializer):
    # The element index is a counter: element k of an id does not depend on the row width
    # through anything but k, so the flattened shape (2, 3) equals the shape (6,).
    ids = _ids([1, 2, 3])
    torch.testing.assert_close(initializer(ids, (2, 3), 4).reshape(3, 6), initializer(ids, (6,), 4), rtol=0, atol=0)


def test_equal_ids_in_one_batch_get_equal_values():
    values = UniformInitializer()(_ids([9, 9, 8, 9]), (4,), 0)
    torch.testing.assert_close(values[0], values[1], rtol=0, atol=0)
    torch.testing.assert_close(values[0], values[3], rtol=0, atol=0)
    assert not torch.equal(values[0], values[2])


def test_hashtable_initial_rows_are_initializer_output_cast_to_table_dtype():
    initializer = NormalInitializer(0.0, 0.5)
    ids = _ids([3, 1, 2])
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        table = HashTable([2, 2], dtype=dtype, initializer=initializer, seed=6)
        expected = initializer(ids, (2, 2), 6).to(dtype)
        torch.testing.assert_close(table(ids), expected, rtol=0, atol=0)
        assert table.weight.dtype == dtype


# --------------------------------------------------------------------------- invalid arguments


def test_uniform_initializer_with_low_above_high_raises_naming_both():
    with pytest.raises(ValueError, match=r"low=1\.0.*high=0\.5"):
        UniformInitializer(1.0, 0.5)


def test_normal_initializer_with_negative_std_raises_naming_it():
    with pytest.raises(ValueError, match=r"-0\.1"):
        NormalInitializer(0.0, -0.1)


@pytest.mark.parametrize("low, high", [(float("nan"), 1.0), (0.0, float("nan"))])
def test_uniform_initializer_with_nan_bound_raises(low, high):
    with pytest.raises(ValueError, match="nan"):
        UniformInitializer(low, high)


def test_draws_of_seeds_that_worked_before_are_unchanged():
    # Values of the counter-based draws before large seeds were made to work: rows of existing
    # tables and checkpoints' fresh ids must not move.
    ids = _ids([0, 7, -3, 2**62])
    expected = [[0.3069637668211851, 0.9918412937026999], [0.6347335442040033, 0.9524261879621475],
                [0.2261293433562871, 0.3736943952417985], [0.7731320944374745, 0.7975503589719245]]  # fmt: skip
    assert uniform_bits(ids, 2, 5).tolist() == expected
    expected = [[0.7131054136919887, 0.7812383825192055], [0.14946485421447808, 0.8600990994046573],
                [0.058620012174649294, 0.9950268444633534], [0.1694059294792981, 0.9890621480371279]]  # fmt: skip
    assert uniform_bits(ids, 2, -(2**61), stream=2).tolist() == expected


def test_every_int64_seed_works_and_seeds_a_half_range_apart_differ():
    # HashTable takes any int64 seed; doubling the seed used to overflow from 2**62 on. The list
    # holds pairs 2**63 apart (-1 and INT64_MAX, 0 and INT64_MIN, +-2**62, ...), which a plain
    # wrap-around of 2 * seed would give equal draws.
    seeds = [INT64_MIN, INT64_MIN + 1, -(2**62) - 1, -(2**62), -1, 0, 2**62 - 1, 2**62, INT64_MAX]
    rows = [UniformInitializer()(_ids(range(50)), (4,), seed) for seed in seeds]
    for i in range(len(rows)):
        for j in range(i):
            assert not torch.equal(rows[i], rows[j]), (i, j)
    table = HashTable([4], seed=INT64_MAX, initializer=UniformInitializer())
    torch.testing.assert_close(table(_ids([3])), rows[len(seeds) - 1][3:4].float(), rtol=0, atol=0)
