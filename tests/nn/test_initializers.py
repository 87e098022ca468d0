"""recis.nn.initializers: distributions, determinism in (seed, id), argument checks."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from recis.nn import initializers
from recis.nn.initializers import (
    ConstantInitializer,
    KaimingNormalInitializer,
    KaimingUniformInitializer,
    NormalInitializer,
    TruncNormalInitializer,
    UniformInitializer,
    XavierNormalInitializer,
    XavierUniformInitializer,
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


def test_uniform_initializer_stays_within_a_b_and_fills_it():
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


_INITIALIZERS = [
    UniformInitializer(-1.0, 1.0),
    NormalInitializer(0.0, 1.0),
    TruncNormalInitializer(0.0, 1.0, -1.5, 2.0),
    XavierUniformInitializer(),
    XavierNormalInitializer(2.0),
    KaimingUniformInitializer(0.1, "fan_out", "leaky_relu"),
    KaimingNormalInitializer(nonlinearity="relu"),
    UniformInitializer(-1.0, 1.0, generator=torch.Generator().manual_seed(3)),
    TruncNormalInitializer(generator=torch.Generator().manual_seed(4)),
]


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


@pytest.mark.parametrize("initializer", [i for i in _INITIALIZERS if not hasattr(i, "gain")], ids=repr)
def test_initial_value_prefix_of_a_wider_row_is_the_narrower_row(initializer):
    # The element index is a counter: element k of an id does not depend on the row width
    # through anything but k, so the flattened shape (2, 3) equals the shape (6,). (Xavier and
    # Kaiming scale by the fans of the row shape, so for them the shape matters by design.)
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


def test_uniform_initializer_with_a_above_b_raises_naming_both():
    with pytest.raises(ValueError, match=r"a=1\.0, b=0\.5"):
        UniformInitializer(1.0, 0.5)


def test_normal_initializer_with_negative_std_raises_naming_it():
    with pytest.raises(ValueError, match=r"-0\.1"):
        NormalInitializer(0.0, -0.1)


@pytest.mark.parametrize("a, b", [(float("nan"), 1.0), (0.0, float("nan"))])
def test_uniform_initializer_with_nan_bound_raises(a, b):
    with pytest.raises(ValueError, match="nan"):
        UniformInitializer(a, b)


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


@pytest.mark.parametrize("count", [0, 1, 6, 7, 8, 20])
def test_uniform_bits_in_blocks_equal_the_draws_id_by_id(monkeypatch, count):
    # Blocks of 3 ids of width 2 (6 elements): counts below, at and across block boundaries.
    ids = _ids(list(range(-7, 3 * count, 3))[:count])
    one_by_one = [uniform_bits(ids[i : i + 1], 2, 11, stream=1) for i in range(count)]
    monkeypatch.setattr(initializers, "_BLOCK_ELEMENTS", 6)
    blocked = uniform_bits(ids, 2, 11, stream=1)
    assert blocked.shape == (count, 2) and blocked.dtype == torch.float64
    assert blocked.tolist() == [row.reshape(-1).tolist() for row in one_by_one]


def test_uniform_bits_of_width_zero_are_an_empty_row_per_id():
    # An initializer called with a zero-size embedding shape: no draws, one empty row per id.
    assert uniform_bits(_ids([1, 2, 3]), 0, 5).shape == (3, 0)
    assert initializers.UniformInitializer()(_ids([1, 2]), (2, 0), 5).shape == (2, 2, 0)


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


# --------------------------------------------------------------------------- RecIS's signatures

# (name, default) of every parameter, as recis/nn/initializers.py of alibaba/RecIS declares them.
_RECIS_SIGNATURES = {
    ConstantInitializer: [("init_val", 0.0), ("dtype", torch.float32)],
    UniformInitializer: [("a", 0.0), ("b", 1.0), ("generator", None)],
    NormalInitializer: [("mean", 0.0), ("std", 1.0), ("generator", None)],
    TruncNormalInitializer: [("mean", 0.0), ("std", 1.0), ("a", -2.0), ("b", 2.0), ("generator", None)],
    XavierUniformInitializer: [("gain", 1.0), ("generator", None)],
    XavierNormalInitializer: [("gain", 1.0), ("generator", None)],
    KaimingUniformInitializer: [("a", 0.0), ("mode", "fan_in"), ("nonlinearity", "leaky_relu"), ("generator", None)],
    KaimingNormalInitializer: [
        ("shape", None),
        ("dtype", torch.float32),
        ("a", 0.0),
        ("mode", "fan_in"),
        ("nonlinearity", "leaky_relu"),
        ("generator", None),
    ],
}


@pytest.mark.parametrize("cls", list(_RECIS_SIGNATURES), ids=lambda cls: cls.__name__)
def test_constructor_takes_recis_parameter_names_order_and_defaults(cls):
    parameters = list(inspect.signature(cls).parameters.values())
    assert [(p.name, p.default) for p in parameters] == _RECIS_SIGNATURES[cls]
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in parameters)


def test_recis_keyword_spellings_set_the_distributions():
    ids = _ids(range(20_000))
    assert torch.all(ConstantInitializer(init_val=0.5, dtype=torch.float64)(ids[:3], (2,), 0) == 0.5)
    values = UniformInitializer(a=-3.0, b=-2.0)(ids, (5,), 0)
    assert values.min() >= -3.0 and values.max() < -2.0
    default_uniform = UniformInitializer()(ids, (5,), 0)
    assert default_uniform.min() >= 0.0 and default_uniform.max() < 1.0 and default_uniform.max() > 0.999
    default_normal = NormalInitializer()(ids, (5,), 0).double()
    assert abs(default_normal.std().item() - 1.0) < 5 / math.sqrt(2 * default_normal.numel())


# --------------------------------------------------------------------------- truncated normal


def _phi(x: float) -> float:
    return math.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def _cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


@pytest.mark.parametrize("mean, std, a, b", [(0.0, 1.0, -2.0, 2.0), (0.5, 2.0, -1.0, 3.0), (-1.0, 0.3, -1.2, 5.0)])
def test_trunc_normal_stays_in_a_b_and_matches_the_truncated_normal_moments_and_cdf(mean, std, a, b):
    values = TruncNormalInitializer(mean, std, a, b)(_sample_ids(), (10,), 9).reshape(-1).double()
    n = values.numel()
    assert values.min() >= a and values.max() <= b  # the truncation is exact
    alpha, beta = (a - mean) / std, (b - mean) / std
    z = _cdf(beta) - _cdf(alpha)
    shift = (_phi(alpha) - _phi(beta)) / z
    expected_mean = mean + std * shift
    expected_std = std * math.sqrt(1 + (alpha * _phi(alpha) - beta * _phi(beta)) / z - shift**2)
    assert abs(values.mean().item() - expected_mean) < 5 * expected_std / math.sqrt(n)
    assert abs(values.std().item() / expected_std - 1) < 0.01  # relative error of a 100k-sample std: ~0.3%
    for x in torch.linspace(a, b, 9)[1:-1].tolist():
        expected = (_cdf((x - mean) / std) - _cdf(alpha)) / z
        observed = (values <= x).double().mean().item()
        assert abs(observed - expected) < 5 * math.sqrt(0.25 / n)


def test_trunc_normal_bounds_are_absolute_values_as_in_recis_kernel_and_torch():
    # RecIS's docstring reads a, b as standard deviations (values in [-0.04, 0.04] for std 0.02);
    # its kernel and torch.nn.init.trunc_normal_ clamp to [a, b] itself, so std 0.02 stays ~0.02.
    values = TruncNormalInitializer(mean=0.0, std=0.02, a=-2.0, b=2.0)(_sample_ids(), (10,), 1).double()
    reference = torch.nn.init.trunc_normal_(
        torch.empty(100_000, dtype=torch.float64), 0.0, 0.02, -2.0, 2.0, generator=torch.Generator().manual_seed(0)
    )
    assert abs(values.std().item() / reference.std().item() - 1) < 0.02
    assert values.abs().max() > 0.06  # beyond 2 std: not truncated at +-0.04


@pytest.mark.parametrize("mean", [10.0, -10.0, 25.0])
def test_trunc_normal_far_outside_its_mean_piles_up_at_the_nearest_bound(mean):
    # [-1, 1] lies 9 to 26 std from the mean; inverting the CDF on its precise side keeps the
    # conditional mean exact there (the naive 2p - 1 rounds to -1 or 1 and gives a bound).
    values = TruncNormalInitializer(mean=mean, std=1.0, a=-1.0, b=1.0)(_sample_ids(), (4,), 0).double()
    assert values.isfinite().all() and values.min() >= -1.0 and values.max() <= 1.0
    alpha, beta = -1.0 - abs(mean), 1.0 - abs(mean)  # mirrored to the lower tail, where Phi is precise
    expected = math.copysign(abs(mean) + (_phi(alpha) - _phi(beta)) / (_cdf(beta) - _cdf(alpha)), mean)
    assert abs(values.mean().item() - expected) < 5 * values.std().item() / math.sqrt(values.numel())
    assert values.std() > 0


# --------------------------------------------------------------------------- Xavier and Kaiming against torch


def _torch_reference(init, shape, count, **kwargs):
    """Samples of ``init`` (a torch.nn.init function) on tensors of ``shape``, as RecIS draws its blocks."""
    generator = torch.Generator().manual_seed(0)
    return torch.cat([init(torch.empty(shape), generator=generator, **kwargs).reshape(-1) for _ in range(count)])


def _assert_same_spread(values, reference, uniform):
    values, reference = values.reshape(-1).double(), reference.double()
    assert abs(values.mean().item()) < 5 * reference.std().item() / math.sqrt(values.numel())
    assert abs(values.std().item() / reference.std().item() - 1) < 0.02
    if uniform:  # the same bound: both samples reach within 0.1% of it, neither beyond
        bound = max(values.abs().max().item(), reference.abs().max().item())
        assert values.abs().max().item() > 0.999 * bound and reference.abs().max().item() > 0.999 * bound
    else:  # normal tails: about 4.55% beyond 2 std (a uniform of that std has none)
        fraction = (values.abs() > 2 * reference.std()).double().mean().item()
        assert abs(fraction - 0.0455) < 5 * math.sqrt(0.0455 / values.numel())


_FAN_SCALED = {  # ours (a factory: set_shape changes it), torch's function and keywords, uniform or normal
    "xavier_uniform": (lambda: XavierUniformInitializer(gain=1.5), torch.nn.init.xavier_uniform_, {"gain": 1.5}, True),
    "xavier_normal": (lambda: XavierNormalInitializer(gain=0.5), torch.nn.init.xavier_normal_, {"gain": 0.5}, False),
    "kaiming_uniform": (KaimingUniformInitializer, torch.nn.init.kaiming_uniform_, {}, True),
    "kaiming_uniform_fan_out": (
        lambda: KaimingUniformInitializer(0.2, "FAN_OUT", "Leaky_ReLU"),
        torch.nn.init.kaiming_uniform_,
        {"a": 0.2, "mode": "fan_out", "nonlinearity": "leaky_relu"},
        True,
    ),
    "kaiming_normal_relu": (
        lambda: KaimingNormalInitializer(mode="fan_out", nonlinearity="relu"),
        torch.nn.init.kaiming_normal_,
        {"mode": "fan_out", "nonlinearity": "relu"},
        False,
    ),
    "kaiming_normal_tanh": (
        lambda: KaimingNormalInitializer(nonlinearity="tanh"),
        torch.nn.init.kaiming_normal_,
        {"nonlinearity": "tanh"},
        False,
    ),
}


@pytest.mark.parametrize("block, shape", [(None, (16,)), (1024, (16,)), (64, (4, 8))])
@pytest.mark.parametrize("case", list(_FAN_SCALED))
def test_fan_scaled_initializers_match_torch_init_on_recis_block_tensor(case, block, shape):
    # RecIS calls torch::nn::init on its block, a tensor [block_size, *embedding_shape]
    # (block_size 5 until set_shape says otherwise); the fans, and so the spread, come from it.
    make, init, kwargs, uniform = _FAN_SCALED[case]
    initializer = make()
    if block is not None:
        initializer.set_shape([block, *shape])
    rows = block if block is not None else 5
    reference = _torch_reference(init, (rows, *shape), 200_000 // (rows * math.prod(shape)) + 1, **kwargs)
    _assert_same_spread(initializer(_sample_ids(20_000), shape, 2), reference, uniform)


@pytest.mark.parametrize(
    "recis_name, torch_name",
    [("liner", "linear"), ("sigmod", "sigmoid"), ("conv_2d", "conv2d"), ("conv_transpose_3d", "conv_transpose3d"),
     ("linear", "linear"), ("conv1d", "conv1d"), ("TANH", "tanh"), ("selu", "selu")],
)  # fmt: skip
def test_kaiming_takes_recis_and_torch_spellings_of_nonlinearity_with_torch_gains(recis_name, torch_name):
    initializer = KaimingUniformInitializer(a=0.3, nonlinearity=recis_name)
    assert initializer.gain == pytest.approx(torch.nn.init.calculate_gain(torch_name, 0.3), rel=1e-15)


def test_kaiming_leaky_relu_gain_uses_a_as_torch_does():
    for a in (0.0, 0.01, 0.5, 3.0):
        assert KaimingNormalInitializer(a=a).gain == pytest.approx(torch.nn.init.calculate_gain("leaky_relu", a))


def test_fans_come_from_the_block_and_the_row_shape_as_torch_computes_them():
    # torch's rule on [block, *shape]: fan_in = prod(shape), fan_out = block * prod(shape[1:]).
    for block, shape in ((5, (16,)), (1024, (16,)), (7, (3, 4, 5))):
        initializer = XavierUniformInitializer()
        initializer.set_shape([block, *shape])
        fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(block, *shape))
        assert initializer.scale(shape) == pytest.approx(math.sqrt(6 / (fan_in + fan_out)), rel=1e-15)
        kaiming = KaimingNormalInitializer(shape=[block, *shape], mode="fan_out", nonlinearity="relu")
        assert kaiming.std(shape) == pytest.approx(math.sqrt(2) / math.sqrt(fan_out), rel=1e-15)
    assert XavierNormalInitializer().block_size == 5  # RecIS's HashTable default block_size


def test_kaiming_normal_is_normal_unlike_recis_uniform_build():
    # RecIS's KaimingNormalInitializer.build uses its uniform generator; this one is Gaussian.
    values = KaimingNormalInitializer(nonlinearity="relu")(_sample_ids(), (16,), 0).double()
    std = math.sqrt(2) / 4  # gain sqrt(2), fan_in 16
    assert abs(values.std().item() / std - 1) < 0.01
    beyond = (values.abs() > math.sqrt(3) * std).double().mean().item()  # a uniform of that std: none
    assert abs(beyond - 0.0833) < 5 * math.sqrt(0.0833 / values.numel())


# --------------------------------------------------------------------------- generator=


def _rows(initializer, seed=0):
    return initializer(_ids(range(-50, 50)), (6,), seed)


@pytest.mark.parametrize(
    "make",
    [lambda g: UniformInitializer(-1.0, 1.0, generator=g), lambda g: NormalInitializer(generator=g),
     lambda g: TruncNormalInitializer(generator=g), lambda g: XavierNormalInitializer(generator=g),
     lambda g: KaimingUniformInitializer(generator=g)],
    ids=["uniform", "normal", "trunc_normal", "xavier_normal", "kaiming_uniform"],
)  # fmt: skip
def test_generator_seed_joins_the_table_seed_deterministically(make):
    with_7 = _rows(make(torch.Generator().manual_seed(7)))
    torch.testing.assert_close(_rows(make(torch.Generator().manual_seed(7))), with_7, rtol=0, atol=0)
    assert not torch.isclose(_rows(make(torch.Generator().manual_seed(8))), with_7).any()
    assert not torch.isclose(_rows(make(None)), with_7).any()  # a generator changes the stream
    assert not torch.isclose(_rows(make(torch.Generator().manual_seed(7)), seed=1), with_7).any()


def test_generator_is_read_once_and_never_drawn_from():
    generator = torch.Generator().manual_seed(11)
    initializer = UniformInitializer(generator=generator)
    before = _rows(initializer)
    assert torch.equal(torch.rand(3, generator=generator), torch.rand(3, generator=torch.Generator().manual_seed(11)))
    generator.manual_seed(12)  # reseeding the generator later does not change the initializer
    torch.testing.assert_close(_rows(initializer), before, rtol=0, atol=0)
    assert initializer.generator_seed == 11 and "generator_seed=11" in repr(initializer)


def test_rows_with_a_generator_do_not_depend_on_insertion_order():
    initializer = TruncNormalInitializer(std=0.1, generator=torch.Generator().manual_seed(5))
    ids = _ids([9, -4, 2**40, 0, 77])
    first = HashTable([3], initializer=initializer, seed=2)
    second = HashTable([3], initializer=initializer, seed=2)
    first(ids)
    second(ids.flip(0))
    second(_ids(range(100, 200)))
    torch.testing.assert_close(first.lookup(ids), second.lookup(ids), rtol=0, atol=0)


def test_generator_must_be_a_torch_generator():
    with pytest.raises(TypeError, match=r"generator must be a torch\.Generator or None, got 42"):
        NormalInitializer(generator=42)


# --------------------------------------------------------------------------- RecIS's builder calls


def test_set_shape_set_dtype_build_generate_give_the_rows_of_ids_0_to_n():
    initializer = TruncNormalInitializer(std=0.5)
    initializer.set_shape([6, 2, 3])
    initializer.set_dtype(torch.float64)
    initializer.build()
    initializer.build()  # nothing to rebuild: harmless
    values = initializer.generate()
    assert values.shape == (6, 2, 3) and values.dtype == torch.float64
    torch.testing.assert_close(values, initializer(torch.arange(6), (2, 3), 0), rtol=0, atol=0)


def test_generate_defaults_to_float32_and_constant_dtype_sets_it():
    uniform = UniformInitializer()
    uniform.set_shape([4, 3])
    assert uniform.generate().dtype == torch.float32
    constant = ConstantInitializer(init_val=2.0, dtype=torch.float16)
    constant.set_shape([2, 2])
    assert constant.generate().dtype == torch.float16 and torch.all(constant.generate() == 2.0)


def test_generate_without_a_shape_raises():
    with pytest.raises(RuntimeError, match=r"set_shape"):
        NormalInitializer().generate()


@pytest.mark.parametrize("shape", [[], [0, 4], [4, -1], [2.5, 3], [True, 2]])
def test_set_shape_refuses_non_positive_or_non_int_entries(shape):
    initializer = XavierUniformInitializer()
    with pytest.raises(ValueError, match=r"set_shape needs positive ints"):
        initializer.set_shape(shape)
    assert initializer.block_size == 5  # unchanged


def test_set_dtype_refuses_non_floating_dtypes():
    with pytest.raises(TypeError, match=r"torch\.int64"):
        UniformInitializer().set_dtype(torch.int64)


# --------------------------------------------------------------------------- bad arguments of the new classes


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: TruncNormalInitializer(std=0.0), r"std > 0, got std=0\.0"),
        (lambda: TruncNormalInitializer(std=-1.0), r"std > 0, got std=-1\.0"),
        (lambda: TruncNormalInitializer(a=1.0, b=1.0), r"a < b, got a=1\.0, b=1\.0"),
        (lambda: TruncNormalInitializer(mean=float("inf")), r"mean must be finite, got inf"),
        (lambda: XavierUniformInitializer(gain=-1.0), r"gain must be >= 0, got -1\.0"),
        (lambda: XavierNormalInitializer(gain="2"), r"gain must be a number, got '2'"),
        (lambda: KaimingUniformInitializer(mode="fan_avg"), r"mode must be 'fan_in' or 'fan_out', got 'fan_avg'"),
        (lambda: KaimingNormalInitializer(nonlinearity="gelu"), r"nonlinearity 'gelu' is not one of"),
        (lambda: KaimingNormalInitializer(nonlinearity=None), r"nonlinearity must be a str, got None"),
        (lambda: KaimingUniformInitializer(a=float("nan")), r"a must be finite, got nan"),
        (lambda: NormalInitializer(std=float("nan")), r"std must be finite, got nan"),
        (lambda: ConstantInitializer(init_val=True), r"init_val must be a number, got True"),
    ],
)
def test_bad_initializer_arguments_raise_naming_the_value(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_fan_scaled_initializer_needs_a_row_of_at_least_one_dimension():
    with pytest.raises(ValueError, match=r"at least one dimension, got \(\)"):
        XavierUniformInitializer()(_ids([1]), (), 0)
