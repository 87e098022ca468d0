"""Initial values of new rows, deterministic in (seed, id).

A row's first value depends only on the table's seed, the id and the element index,
never on insertion order, batch composition, device or world size: the distributed
layer relies on this so that any rank creating an id creates the same row.

Each element draws a counter-based random number: ``mix64`` of (id, seed, element
index) gives 64 random bits, whose top 53 become a float64 uniform in [0, 1).

The classes take RecIS's names, parameters and defaults (``recis.nn.initializers`` of
alibaba/RecIS): ``ConstantInitializer``, ``UniformInitializer``, ``NormalInitializer``,
``TruncNormalInitializer``, ``XavierUniformInitializer``, ``XavierNormalInitializer``,
``KaimingUniformInitializer``, ``KaimingNormalInitializer``. Where RecIS and this module
differ, each class says so. Common to all:

- ``generator=`` (a ``torch.Generator``): its ``initial_seed()`` is read once, when the
  initializer is made, and joins the table's seed, so rows are a pure function of (table
  seed, generator seed, id). The generator is never drawn from or reseeded; two
  generators with equal seeds give equal rows. Without one, rows depend on the table
  seed alone. (In RecIS rows come from the generator's stream, in insertion order.)
- RecIS's builder calls work: ``set_shape([rows, *embedding_shape])``, ``set_dtype``,
  ``build()`` (nothing to build here; calling it again is harmless) and ``generate()``
  (the rows of ids ``0 .. rows-1`` for seed 0, in the set dtype, float32 by default).
- Fans (Xavier, Kaiming) are computed as RecIS computes them: by torch's rule on the
  tensor ``[block_size, *embedding_shape]`` that RecIS's HashTable hands its
  initializer, so ``fan_in = prod(embedding_shape)`` and ``fan_out = block_size *
  prod(embedding_shape[1:])``. The block size is the first entry given to
  ``set_shape``, and 5 (RecIS's HashTable default) until ``set_shape`` is called.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from recis.ops.hashing import GOLDEN_GAMMA, mix64, mix64_

_INV_2_POW_53 = 1.0 / (1 << 53)
_MASK64 = (1 << 64) - 1
_BLOCK_ELEMENTS = 1 << 17  # uniform_bits works in blocks of this many elements (1 MiB of int64)
DEFAULT_BLOCK_SIZE = 5  # RecIS's HashTable(block_size=5): the row count its fans see by default
_UNIFORM_STREAM, _RADIUS_STREAM, _ANGLE_STREAM, _TRUNC_STREAM = 0, 1, 2, 3


class Initializer(Protocol):
    """Anything that maps ids to initial rows.

    Called as ``initializer(ids, embedding_shape, seed)`` with 1-D int64 ``ids``; returns
    a floating tensor of shape ``ids.shape + embedding_shape``. It must be a pure
    function of its arguments for sharded tables to agree across ranks.
    """

    def __call__(self, ids: torch.Tensor, embedding_shape: Sequence[int], seed: int) -> torch.Tensor: ...


# --------------------------------------------------------------------------- random bits


def _as_int64(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _stream_key(seed: int, stream: int) -> int:
    """An int64 key per (seed, stream), one-to-one in the seed for each stream.

    ``2 * seed + stream * 0x10001`` for seeds in [-2**62, 2**62); larger seeds take the odd
    keys (wrapped to int64), which the doubled smaller seeds leave free.
    """
    odd = 0 if -(2**62) <= seed < 2**62 else 1
    return _as_int64(2 * seed + odd + stream * 0x10001)


def uniform_bits(ids: torch.Tensor, width: int, seed: int, stream: int = 0) -> torch.Tensor:
    """Float64 uniforms in [0, 1) of shape ``(len(ids), width)``, a pure function of the inputs.

    Element (i, j) is ``top53(mix64(key_i + (j + 1) * GOLDEN_GAMMA)) / 2**53`` with
    ``key_i = mix64(ids[i] ^ mix64(stream key of (seed, stream)))``. The ids are taken in
    blocks of about ``_BLOCK_ELEMENTS`` elements, hashed in place in two scratch buffers of
    that size, so the result is the only tensor whose size grows with ``len(ids)``: a large
    insert makes no train of batch-sized temporaries for the allocator to keep or return.
    """
    ids = ids.reshape(-1)
    count = ids.numel()
    uniforms = torch.empty((count, width), dtype=torch.float64, device=ids.device)
    stream_key = mix64(torch.tensor(_stream_key(seed, stream), dtype=torch.int64))
    counters = torch.arange(1, width + 1, dtype=torch.int64, device=ids.device) * GOLDEN_GAMMA
    block = max(1, _BLOCK_ELEMENTS // max(width, 1))  # width 0: empty rows, no draws
    bits = torch.empty((min(block, count), width), dtype=torch.int64, device=ids.device)
    scratch = torch.empty_like(bits)
    for start in range(0, count, block):
        stop = min(start + block, count)
        block_bits, block_scratch = bits[: stop - start], scratch[: stop - start]
        torch.add(mix64(ids[start:stop].reshape(-1, 1) ^ stream_key), counters, out=block_bits)
        mix64_(block_bits, block_scratch)
        block_bits.bitwise_right_shift_(11).bitwise_and_((1 << 53) - 1)
        uniforms[start:stop].copy_(block_bits).mul_(_INV_2_POW_53)
    return uniforms


def _splitmix(value: int) -> int:
    """splitmix64's finalizer on a Python int (unsigned 64-bit arithmetic)."""
    value &= _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def _joined_seed(seed: int, generator_seed: int | None) -> int:
    """The seed the draws use: the table's, or the table's mixed with a generator's initial seed."""
    if generator_seed is None:
        return seed
    return _as_int64(_splitmix(seed ^ _splitmix(generator_seed + 0x9E3779B97F4A7C15)))


def _sample_uniform(ids: torch.Tensor, shape: Sequence[int], seed: int, a: float, b: float) -> torch.Tensor:
    u = uniform_bits(ids, math.prod(shape), seed, _UNIFORM_STREAM)
    return u.mul_(b - a).add_(a).reshape(ids.numel(), *shape)  # a + (b - a) * u, in place: the same roundings


def _sample_normal(ids: torch.Tensor, shape: Sequence[int], seed: int, mean: float, std: float) -> torch.Tensor:
    """N(mean, std^2) by the Box-Muller transform."""
    width = math.prod(shape)
    radius_u = 1.0 - uniform_bits(ids, width, seed, _RADIUS_STREAM)  # in (0, 1]: log is finite
    angle_u = uniform_bits(ids, width, seed, _ANGLE_STREAM)
    z = torch.sqrt(-2.0 * torch.log(radius_u)) * torch.cos(2.0 * math.pi * angle_u)
    return (mean + std * z).reshape(ids.numel(), *shape)


def _normal_cdf(x: float) -> float:
    """Phi(x), by erfc so that the lower tail keeps its relative precision."""
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _standard_trunc_normal(u: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """N(0, 1) conditioned on [alpha, beta] with alpha + beta <= 0, from uniforms ``u`` in [0, 1):
    z = Phi^-1(p), p uniform in [Phi(alpha), Phi(beta)). Since beta <= -alpha, p <= 1/2, where
    Phi and ``ndtri`` (Phi^-1) are precise even far in the tail."""
    low, high = _normal_cdf(alpha), _normal_cdf(beta)
    if not high > low:  # both bounds so far below the mean that Phi underflows: the mass sits at beta
        return torch.full_like(u, beta)
    return torch.special.ndtri(low + (high - low) * u)


def _sample_trunc_normal(
    ids: torch.Tensor, shape: Sequence[int], seed: int, mean: float, std: float, a: float, b: float
) -> torch.Tensor:
    """N(mean, std^2) conditioned on [a, b], by the inverse CDF (mirrored when [a, b] lies mostly
    above the mean, so the CDF is inverted on its precise side); clamped to [a, b] against rounding."""
    alpha, beta = (a - mean) / std, (b - mean) / std
    u = uniform_bits(ids, math.prod(shape), seed, _TRUNC_STREAM)
    if alpha + beta <= 0:
        z = _standard_trunc_normal(u, alpha, beta)
    else:
        z = -_standard_trunc_normal(u, -beta, -alpha)
    return (mean + std * z).clamp(a, b).reshape(ids.numel(), *shape)


# --------------------------------------------------------------------------- argument checks


def _number(owner: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}: {name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be finite, got {value}")
    return float(value)


def _non_negative(owner: str, name: str, value: Any) -> float:
    value = _number(owner, name, value)
    if value < 0:
        raise ValueError(f"{owner}: {name} must be >= 0, got {value}")
    return value


def _generator_seed(owner: str, generator: Any) -> int | None:
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{owner}: generator must be a torch.Generator or None, got {generator!r}")
    return generator.initial_seed()


def _fans(embedding_shape: Sequence[int], block_size: int) -> tuple[int, int]:
    """torch's (fan_in, fan_out) of a tensor of shape ``[block_size, *embedding_shape]``."""
    if len(embedding_shape) < 1:
        raise ValueError(f"fans need an embedding shape of at least one dimension, got {tuple(embedding_shape)}")
    receptive = math.prod(embedding_shape[1:])
    return embedding_shape[0] * receptive, block_size * receptive


# --------------------------------------------------------------------------- base


class SeededInitializer:
    """Base of this module's initializers: RecIS's builder calls and the ``generator`` seed.

    Subclasses implement ``sample(ids, embedding_shape, seed)``; ``__call__`` gives it the
    table's seed joined with the generator's (see the module docstring).
    """

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator_seed = _generator_seed(type(self).__name__, generator)
        self._shape: tuple[int, ...] | None = None
        self._dtype = torch.float32

    def __call__(self, ids: torch.Tensor, embedding_shape: Sequence[int], seed: int) -> torch.Tensor:
        return self.sample(ids, tuple(embedding_shape), _joined_seed(seed, self.generator_seed))

    def sample(self, ids: torch.Tensor, embedding_shape: tuple[int, ...], seed: int) -> torch.Tensor:
        raise NotImplementedError

    def set_shape(self, shape: Sequence[int] | None = None) -> None:
        """RecIS's ``[block_size, *embedding_shape]``: the shape ``generate()`` fills; its first entry is
        the block size the fans of Xavier and Kaiming see. Set it before a table creates rows: rows
        made afterwards would be scaled differently."""
        if shape is not None:
            shape = tuple(shape)
            if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
                raise ValueError(f"{type(self).__name__}.set_shape needs positive ints, got {shape!r}")
        self._shape = shape

    def set_dtype(self, dtype: torch.dtype = torch.float32) -> None:
        """The dtype ``generate()`` returns (a table casts rows to its own dtype)."""
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"{type(self).__name__}.set_dtype needs a floating torch.dtype, got {dtype!r}")
        self._dtype = dtype

    def build(self) -> None:
        """RecIS builds a native generator here; these initializers need nothing built."""

    def generate(self) -> torch.Tensor:
        """The rows of ids ``0 .. shape[0]-1`` for seed 0: a tensor of the ``set_shape`` shape and dtype."""
        if self._shape is None:
            raise RuntimeError(f"{type(self).__name__}.generate needs set_shape([rows, *embedding_shape]) first")
        ids = torch.arange(self._shape[0], dtype=torch.int64)
        return self(ids, self._shape[1:], 0).to(self._dtype)

    @property
    def block_size(self) -> int:
        """Rows of RecIS's storage block: the first entry of ``set_shape``, else RecIS's default 5."""
        return self._shape[0] if self._shape is not None else DEFAULT_BLOCK_SIZE

    def _generator_repr(self) -> str:
        return "" if self.generator_seed is None else f", generator_seed={self.generator_seed}"


# --------------------------------------------------------------------------- distributions


class ConstantInitializer(SeededInitializer):
    """Every element of a new row equals ``init_val``.

    Args:
        init_val: the value (RecIS's name and default, 0.0).
        dtype: the dtype ``generate()`` returns, as ``set_dtype``; a table casts to its own.
    """

    def __init__(self, init_val: float = 0.0, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.init_val = _number("ConstantInitializer", "init_val", init_val)
        self.set_dtype(dtype)

    def sample(self, ids: torch.Tensor, embedding_shape: tuple[int, ...], seed: int) -> torch.Tensor:
        return torch.full((ids.numel(), *embedding_shape), self.init_val, dtype=torch.float64, device=ids.device)

    def __repr__(self) -> str:
        return f"ConstantInitializer(init_val={self.init_val})"


class UniformInitializer(SeededInitializer):
    """Elements uniform in [a, b), deterministic in (seed, id, element).

    Args:
        a, b: the bounds, a <= b (RecIS's names and defaults: 0.0 and 1.0).
        generator: see the module docstring.
    """

    def __init__(self, a: float = 0.0, b: float = 1.0, generator: torch.Generator | None = None) -> None:
        super().__init__(generator)
        self.a = _number("UniformInitializer", "a", a)
        self.b = _number("UniformInitializer", "b", b)
        if not self.a <= self.b:
            raise ValueError(f"UniformInitializer needs a <= b, got a={self.a}, b={self.b}")

    def sample(self, ids: torch.Tensor, embedding_shape: tuple[int, ...], seed: int) -> torch.Tensor:
        return _sample_uniform(ids, embedding_shape, seed, self.a, self.b)

    def __repr__(self) -> str:
        return f"UniformInitializer(a={self.a}, b={self.b}{self._generator_repr()})"


class NormalInitializer(SeededInitializer):
    """Elements from N(mean, std^2) by the Box-Muller transform, deterministic in (seed, id, element).

    Args:
        mean, std: of the distribution, std >= 0 (RecIS's defaults: 0.0 and 1.0).
        generator: see the module docstring.
    """

    def __init__(self, mean: float = 0.0, std: float = 1.0, generator: torch.Generator | None = None) -> None:
        super().__init__(generator)
        self.mean = _number("NormalInitializer", "mean", mean)
        self.std = _non_negative("NormalInitializer", "std", std)

    def sample(self, ids: torch.Tensor, embedding_shape: tuple[int, ...], seed: int) -> torch.Tensor:
        return _sample_normal(ids, embedding_shape, seed, self.mean, self.std)

    def __repr__(self) -> str:
        return f"NormalInitializer(mean={self.mean}, std={self.std}{self._generator_repr()})"


class TruncNormalInitializer(SeededInitializer):
    """Elements from N(mean, std^2) truncated to [a, b], as ``torch.nn.init.trunc_normal_``.

    Drawn by the inverse CDF (see ``_sample_trunc_normal``), as RecIS does; every value lies
    in [a, b], however far from the mean [a, b] is.

    Args:
        mean, std: of the normal before truncation, std > 0 (defaults 0.0 and 1.0).
        a, b: the truncation bounds, a < b, as absolute values (defaults -2.0 and 2.0).
            RecIS's docstring calls them "units of standard deviations from the mean",
            but its kernel clamps to [a, b] itself, as torch does; this follows the kernel.
        generator: see the module docstring.
    """

    def __init__(
        self,
        mean: float = 0.0,
        std: float = 1.0,
        a: float = -2.0,
        b: float = 2.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(generator)
        owner = "TruncNormalInitializer"
        self.mean, self.std = _number(owner, "mean", mean), _number(owner, "std", std)
        self.a, self.b = _number(owner, "a", a), _number(owner, "b", b)
        if self.std <= 0:
            raise ValueError(f"{owner} needs std > 0, got std={self.std}")
        if not self.a < self.b:
            raise ValueError(f"{owner} needs a < b, got a={self.a}, b={self.b}")

    def sample(self, ids: torch.Tensor, embedding_shape: tuple[int, ...], seed: int) -> torch.Tensor:
        return _sample_trunc_normal(ids, embedding_shape, seed, self.mean, self.std, self.a, self.b)

    def __repr__(self) -> str:
        return (
            f"TruncNormalInitializer(mean={self.mean}, std={self.std}, a={self.a}, b={self.b}{self._generator_repr()})"
        )


class XavierUniformInitializer(SeededInitializer):
    """Glorot/Xavier uniform: U(-bound, bound), bound = gain * sqrt(6 / (fan_in + fan_out)).

    Reference: Glorot and Bengio (2010); ``torch.nn.init.xavier_uniform_``. Fans: see the
    module docstring. RecIS ignores ``generator`` here; this class uses it as everywhere.

    Args:
        gain: scaling factor, >= 0 (default 1.0).
        generator: see the module docstring.
    """

    def __init__(self, gain: float = 1.0, generator: torch.Generator | None = None) -> None:
        super().__init__(generator)
        self.gain = _non_negative(type(self).__name__, "gain", gain)

    def scale(self, embedding_shape: tuple[int, ...]) -> float:
        """The distribution's bound (uniform) or std (normal) for this row shape."""
        fan_in, fan_out = _fans(embedding_shape, self.block_size)
        return self.gain * math.sqrt(6.0 / (fan_in + fan_out))

    def sample(self, ids: torch.Tensor, embedding_shape: tuple[int, ...], seed: int) -> torch.Tensor:
        bound = self.scale(embedding_shape)
        return _sample_uniform(ids, embedding_shape, seed, -bound, bound)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(gain={self.gain}, block_size={self.block_size}{self._generator_repr()})"


class XavierNormalInitializer(XavierUniformInitializer):
    """Glorot/Xavier normal: N(0, std^2), std = gain * sqrt(2 / (fan_in + fan_out)).

    Reference: Glorot and Bengio (2010); ``torch.nn.init.xavier_normal_``. Arguments as
    ``XavierUniformInitializer``.
    """

    def scale(self, embedding_shape: tuple[int, ...]) -> float:
        fan_in, fan_out = _fans(embedding_shape, self.block_size)
        return self.gain * math.sqrt(2.0 / (fan_in + fan_out))

    def sample(self, ids: torch.Tensor, embedding_shape: tuple[int, ...], seed: int) -> torch.Tensor:
        return _sample_normal(ids, embedding_shape, seed, 0.0, self.scale(embedding_shape))


_LINEAR_GAIN_NAMES = {
    # torch's names and RecIS's spellings ("liner", "sigmod", "conv_1d", ...), all of gain 1
    "linear", "liner", "sigmoid", "sigmod",
    "conv1d", "conv2d", "conv3d", "conv_1d", "conv_2d", "conv_3d",
    "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "conv_transpose_1d", "conv_transpose_2d", "conv_transpose_3d",
}  # fmt: skip


def _gain(nonlinearity: str, a: float) -> float:
    """``torch.nn.init.calculate_gain(nonlinearity, a)``; RecIS's spellings accepted too."""
    if nonlinearity in _LINEAR_GAIN_NAMES:
        return 1.0
    gains = {"tanh": 5.0 / 3, "relu": math.sqrt(2.0), "leaky_relu": math.sqrt(2.0 / (1 + a * a)), "selu": 0.75}
    if nonlinearity not in gains:
        known = sorted(_LINEAR_GAIN_NAMES | set(gains))
        raise ValueError(f"nonlinearity {nonlinearity!r} is not one of {known}")
    return gains[nonlinearity]


class KaimingUniformInitializer(SeededInitializer):
    """He/Kaiming uniform: U(-bound, bound), bound = sqrt(3) * gain(nonlinearity, a) / sqrt(fan).

    Reference: He et al. (2015); ``torch.nn.init.kaiming_uniform_``. ``fan`` is fan_in or
    fan_out by ``mode`` (fans: see the module docstring). RecIS ignores ``generator`` here;
    this class uses it as everywhere.

    Args:
        a: negative slope of the rectifier, used by ``leaky_relu`` (default 0.0).
        mode: ``"fan_in"`` (default) or ``"fan_out"``, any case.
        nonlinearity: torch's names (``"leaky_relu"``, default, ``"relu"``, ``"tanh"``,
            ``"linear"``, ``"sigmoid"``, ``"conv1d"`` ...) or RecIS's spellings
            (``"liner"``, ``"sigmod"``, ``"conv_1d"`` ...), any case.
        generator: see the module docstring.
    """

    def __init__(
        self,
        a: float = 0.0,
        mode: str = "fan_in",
        nonlinearity: str = "leaky_relu",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(generator)
        owner = type(self).__name__
        self.a = _number(owner, "a", a)
        if not isinstance(mode, str) or mode.lower() not in ("fan_in", "fan_out"):
            raise ValueError(f"{owner}: mode must be 'fan_in' or 'fan_out', got {mode!r}")
        if not isinstance(nonlinearity, str):
            raise TypeError(f"{owner}: nonlinearity must be a str, got {nonlinearity!r}")
        self.mode, self.nonlinearity = mode.lower(), nonlinearity.lower()
        self.gain = _gain(self.nonlinearity, self.a)

    def std(self, embedding_shape: tuple[int, ...]) -> float:
        """gain / sqrt(fan): the std of both Kaiming distributions for this row shape."""
        fan_in, fan_out = _fans(embedding_shape, self.block_size)
        return self.gain / math.sqrt(fan_in if self.mode == "fan_in" else fan_out)

    def sample(self, ids: torch.Tensor, embedding_shape: tuple[int, ...], seed: int) -> torch.Tensor:
        bound = math.sqrt(3.0) * self.std(embedding_shape)
        return _sample_uniform(ids, embedding_shape, seed, -bound, bound)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(a={self.a}, mode={self.mode!r}, nonlinearity={self.nonlinearity!r}, "
            f"block_size={self.block_size}{self._generator_repr()})"
        )


class KaimingNormalInitializer(KaimingUniformInitializer):
    """He/Kaiming normal: N(0, std^2), std = gain(nonlinearity, a) / sqrt(fan).

    Reference: He et al. (2015); ``torch.nn.init.kaiming_normal_``. RecIS's class builds
    its uniform generator instead (U(-sqrt(3) std, sqrt(3) std): same mean and variance, not
    normal); this class draws the normal its name and RecIS's docstring promise.

    Args:
        shape, dtype: RecIS's leading parameters, which RecIS leaves unused (its table
            sets both); here they preset ``set_shape`` and ``set_dtype`` when given.
        a, mode, nonlinearity, generator: as ``KaimingUniformInitializer``.
    """

    def __init__(
        self,
        shape: Sequence[int] | None = None,
        dtype: torch.dtype = torch.float32,
        a: float = 0.0,
        mode: str = "fan_in",
        nonlinearity: str = "leaky_relu",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(a, mode, nonlinearity, generator)
        self.set_shape(shape)
        self.set_dtype(dtype)

    def sample(self, ids: torch.Tensor, embedding_shape: tuple[int, ...], seed: int) -> torch.Tensor:
        return _sample_normal(ids, embedding_shape, seed, 0.0, self.std(embedding_shape))


def default_initializer(embedding_shape: Sequence[int]) -> Initializer:
    """Uniform in +-1/sqrt(dim), dim the row's element count.

    Zero rows would leave factorization-machine style interactions without gradient,
    so the default is random, and scaled so a row's norm stays near 1/sqrt(3).
    (RecIS's HashTable defaults to ``ConstantInitializer(init_val=0)``.)
    """
    bound = 1.0 / math.sqrt(math.prod(embedding_shape))
    return UniformInitializer(-bound, bound)
