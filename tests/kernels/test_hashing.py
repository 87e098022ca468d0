"""recis.ops.hashing: the splitmix64 finalizer on int64 tensors."""

from __future__ import annotations

import torch
from reference_hashing import mix64_int

from recis.ops.hashing import GOLDEN_GAMMA, logical_shift_right, mix64, mix64_

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
MASK64 = (1 << 64) - 1

# Published splitmix64 constants (Steele, Lea, Flood 2014; Vigna's splitmix64.c), written
# here independently of the library.
SPLITMIX_GAMMA = 0x9E3779B97F4A7C15
SPLITMIX_MUL1 = 0xBF58476D1CE4E5B9
SPLITMIX_MUL2 = 0x94D049BB133111EB

# First outputs of the splitmix64 generator seeded with 0 (Vigna's reference splitmix64.c).
SPLITMIX_SEED0_OUTPUTS = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F, 0xF88BB8A8724C81EC]


def _to_int64(value: int) -> int:
    value &= MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _splitmix64_outputs(seed: int, count: int) -> tuple[list[int], list[int]]:
    """(states, outputs) of the splitmix64 generator: state += gamma; output = finalize(state)."""
    states, outputs = [], []
    state = seed & MASK64
    for _ in range(count):
        state = (state + SPLITMIX_GAMMA) & MASK64
        z = state
        z = ((z ^ (z >> 30)) * SPLITMIX_MUL1) & MASK64
        z = ((z ^ (z >> 27)) * SPLITMIX_MUL2) & MASK64
        z ^= z >> 31
        states.append(state)
        outputs.append(z)
    return states, outputs


def _interesting_int64(count: int, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    random = torch.randint(INT64_MIN, INT64_MAX, (count,), dtype=torch.int64, generator=generator).tolist()
    edges = [0, 1, -1, 2, -2, INT64_MIN, INT64_MAX, INT64_MIN + 1, INT64_MAX - 1, 2**32, -(2**32), 2**62, 12345]
    return edges + random


def test_mix64_matches_python_int_reference_on_random_and_edge_int64():
    values = _interesting_int64(5000)
    got = mix64(torch.tensor(values, dtype=torch.int64)).tolist()
    expected = [mix64_int(v) for v in values]
    assert got == expected


def test_mix64_in_place_gives_the_same_bits_in_its_own_tensor():
    values = torch.tensor(_interesting_int64(5000, seed=3), dtype=torch.int64).reshape(-1, 3)[:1000]
    x, scratch = values.clone(), torch.empty_like(values)
    result = mix64_(x, scratch)
    assert result is x
    assert x.tolist() == [[mix64_int(v) for v in row] for row in values.tolist()]


def test_mix64_of_splitmix64_states_gives_published_seed0_generator_outputs():
    states, outputs = _splitmix64_outputs(0, 4)
    # The independent reference reproduces the published outputs, which pins its constants ...
    assert outputs == SPLITMIX_SEED0_OUTPUTS
    # ... and the library, tensor and Python-int forms, gives the same words.
    got = mix64(torch.tensor([_to_int64(s) for s in states], dtype=torch.int64)).tolist()
    assert got == [_to_int64(o) for o in SPLITMIX_SEED0_OUTPUTS]
    assert [mix64_int(_to_int64(s)) for s in states] == [_to_int64(o) for o in outputs]


def test_mix64_matches_independent_splitmix64_finalizer_for_other_seeds():
    for seed in (1, 42, 2**63 - 1, -1):
        states, outputs = _splitmix64_outputs(seed, 16)
        got = mix64(torch.tensor([_to_int64(s) for s in states], dtype=torch.int64)).tolist()
        assert got == [_to_int64(o) for o in outputs]


def test_golden_gamma_constant_is_the_splitmix64_increment():
    assert GOLDEN_GAMMA == _to_int64(SPLITMIX_GAMMA)


def test_mix64_of_zero_is_zero_and_of_minus_one_is_the_reference_value():
    # The finalizer maps 0 to 0; -1 (all bits set) must be treated as the unsigned 2**64 - 1.
    got = mix64(torch.tensor([0, -1], dtype=torch.int64)).tolist()
    assert got[0] == 0
    z = MASK64
    z = ((z ^ (z >> 30)) * SPLITMIX_MUL1) & MASK64
    z = ((z ^ (z >> 27)) * SPLITMIX_MUL2) & MASK64
    z ^= z >> 31
    assert got[1] == _to_int64(z)


def test_mix64_keeps_shape_and_works_elementwise_on_2d_tensors():
    values = _interesting_int64(60, seed=3)[:60]
    x = torch.tensor(values, dtype=torch.int64).reshape(6, 10)
    got = mix64(x)
    assert got.shape == (6, 10)
    assert got.dtype == torch.int64
    assert got.reshape(-1).tolist() == [mix64_int(v) for v in values]


def test_mix64_does_not_modify_its_input():
    x = torch.tensor(_interesting_int64(100), dtype=torch.int64)
    before = x.clone()
    mix64(x)
    assert torch.equal(x, before)


def test_mix64_is_injective_on_structured_ids():
    # A bijection on 64-bit words: multiples of 2**32 and consecutive ids never collide.
    ids = torch.cat([torch.arange(10_000, dtype=torch.int64) * 2**32, torch.arange(-5000, 5000, dtype=torch.int64)])
    ids = torch.unique(ids)
    assert torch.unique(mix64(ids)).numel() == ids.numel()


def test_mix64_spreads_multiples_of_2_pow_32_over_low_bits():
    # Structured ids whose low 32 bits are all zero must still fill low-bit buckets
    # about as well as random keys: 4096 keys into 4096 buckets -> about 63% distinct.
    ids = torch.arange(1, 4097, dtype=torch.int64) * 2**32
    buckets = mix64(ids) & 4095
    assert torch.unique(buckets).numel() > 2400


def test_logical_shift_right_treats_int64_as_unsigned():
    values = _interesting_int64(500, seed=7)
    x = torch.tensor(values, dtype=torch.int64)
    for bits in (1, 27, 30, 31, 63):
        got = logical_shift_right(x, bits).tolist()
        assert got == [_to_int64((v & MASK64) >> bits) for v in values]
