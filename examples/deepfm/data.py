"""Criteo-shaped data: a streamed reader of Criteo TSV files, and a synthetic generator.

A sample is a click label, 13 integer ("numeric") features and 26 categorical ones, as
in the Criteo display-advertising logs: one line per sample,

    label \\t I1 ... I13 \\t C1 ... C26

with integers in decimal, categorical values as 32-bit hexadecimal hashes (8 digits),
and any field but the label possibly empty (missing).

Both sources produce the same ``Batch``: the model sees numeric features as
``sign(x) * log(1 + |x|)`` (0 when missing) and each categorical value as one int64 id
``feature << 33 | value``, so that the 26 features can share one hash table without
two features ever sharing an id (a missing value is ``2**32``, outside the 32-bit range).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from recis.ops import mix64

NUM_NUMERIC = 13
NUM_CATEGORICAL = 26
MISSING = 1 << 32  # the value code of an empty categorical field
_FIELDS = 1 + NUM_NUMERIC + NUM_CATEGORICAL
_FEATURE_SHIFT = torch.arange(NUM_CATEGORICAL, dtype=torch.int64) << 33


@dataclass
class Batch:
    labels: torch.Tensor  # (B,) float32, 0 or 1
    numeric: torch.Tensor  # (B, 13) float32, already transformed
    categorical: torch.Tensor  # (B, 26) int64 ids, feature << 33 | value

    def __len__(self) -> int:
        return self.labels.numel()

    def to(self, device: torch.device) -> Batch:
        return Batch(self.labels.to(device), self.numeric.to(device), self.categorical.to(device))

    @staticmethod
    def cat(batches: list[Batch]) -> Batch:
        return Batch(*(torch.cat([getattr(b, f) for b in batches]) for f in ("labels", "numeric", "categorical")))

    def split(self, size: int) -> list[Batch]:
        parts = zip(*(t.split(size) for t in (self.labels, self.numeric, self.categorical)))
        return [Batch(*part) for part in parts]


def empty_batch() -> Batch:
    return Batch(torch.empty(0), torch.empty(0, NUM_NUMERIC), torch.empty(0, NUM_CATEGORICAL, dtype=torch.int64))


def transform_numeric(raw: torch.Tensor) -> torch.Tensor:
    """``sign(x) * log(1 + |x|)`` of raw integer counts, with missing (NaN) read as 0."""
    return (raw.sign() * raw.abs().log1p()).nan_to_num(0.0).float()


def categorical_ids(values: torch.Tensor) -> torch.Tensor:
    """One int64 id per (feature, value): ``feature << 33 | value`` for values in [0, 2**32]."""
    return _FEATURE_SHIFT.to(values.device) | values


# --------------------------------------------------------------------------- Criteo TSV
def parse_lines(lines: list[bytes], where: str = "") -> Batch:
    """A batch from raw Criteo TSV lines (bytes, with or without the line end)."""
    labels, numeric, categorical = [], [], []
    for line in lines:
        fields = line.rstrip(b"\r\n").split(b"\t")
        if len(fields) != _FIELDS:
            raise ValueError(f"{where}a Criteo line has {_FIELDS} tab-separated fields, this one {len(fields)}")
        labels.append(int(fields[0]))
        numeric.append([float(x) if x else math.nan for x in fields[1 : 1 + NUM_NUMERIC]])
        categorical.append([int(x, 16) if x else MISSING for x in fields[1 + NUM_NUMERIC :]])
    if not lines:
        return empty_batch()
    return Batch(
        torch.tensor(labels, dtype=torch.float32),
        transform_numeric(torch.tensor(numeric, dtype=torch.float64)),
        categorical_ids(torch.tensor(categorical, dtype=torch.int64)),
    )


class CriteoTSV:
    """Streams the lines of one part of a Criteo TSV file, in batches.

    The file's bytes ``[begin, end)`` (fractions of its size) are cut into ``world_size``
    equal byte ranges; rank r reads the lines that start in range r, so the ranks read
    disjoint parts that cover every line once, each rank touching only its own part.
    ``offset`` is where the next unread line starts: pass it back as ``start`` to resume.
    """

    def __init__(self, path: str, rank: int, world_size: int, begin: float = 0.0, end: float = 1.0) -> None:
        if not 0.0 <= begin <= end <= 1.0:
            raise ValueError(f"need 0 <= begin <= end <= 1, got begin={begin}, end={end}")
        self.path = path
        size = os.path.getsize(path)
        lo, hi = int(size * begin), int(size * end)
        self.begin = lo + (hi - lo) * rank // world_size
        self.end = lo + (hi - lo) * (rank + 1) // world_size
        self.offset = self.begin

    def batches(self, batch_size: int, start: int | None = None) -> Iterator[Batch]:
        """Full batches of ``batch_size`` lines, then one shorter batch with the rest (if any)."""
        self.offset = self.begin if start is None else start
        with open(self.path, "rb") as file:
            file.seek(self.offset)
            if self.offset > 0:  # skip the rest of a line that started before this part
                file.seek(self.offset - 1)
                file.readline()
            lines = []
            while file.tell() < self.end:
                line = file.readline()
                if not line:
                    break
                if line.strip():
                    lines.append(line)
                if len(lines) == batch_size:
                    self.offset = file.tell()
                    yield parse_lines(lines, f"{self.path}: ")
                    lines = []
            self.offset = self.end
            if lines:
                yield parse_lines(lines, f"{self.path}: ")

    def stream(self, batch_size: int, epochs: int, position: tuple[int, int] | None = None) -> Iterator[Batch]:
        """``epochs`` passes over this part, from ``position`` (a ``self.position`` saved earlier) on."""
        first_epoch, start = position if position is not None else (0, None)
        for self.epoch in range(first_epoch, epochs):
            yield from self.batches(batch_size, start)
            start = None

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, byte offset) of the next unread line."""
        return getattr(self, "epoch", 0), self.offset

    def read_all(self, limit: int | None = None) -> Batch:
        """Every line of this part (at most ``limit``) as one batch."""
        batches = []
        count = 0
        for batch in self.batches(4096):
            batches.append(batch)
            count += len(batch)
            if limit is not None and count >= limit:
                break
        whole = Batch.cat(batches) if batches else empty_batch()
        return whole if limit is None else whole.split(limit)[0] if len(whole) else whole


# --------------------------------------------------------------------------- synthetic data
# Distinct values per categorical feature in the Criteo Kaggle (2014) training set.
CRITEO_CARDINALITIES = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip


def _uniform(keys: torch.Tensor) -> torch.Tensor:
    """A float64 in [0, 1) per int64 key, a fixed function of the key."""
    return (mix64(keys) >> 11 & ((1 << 53) - 1)).double() * 2.0**-53


def _mix(*parts: int | torch.Tensor) -> torch.Tensor | int:
    """Combine integers (or int64 tensors) into one well-mixed int64 key."""
    key = torch.zeros((), dtype=torch.int64)
    for part in parts:
        key = mix64(key * 31 + torch.as_tensor(part, dtype=torch.int64) + 0x2545F491)
    return key


class SyntheticCriteo:
    """Criteo-shaped clicks drawn from a planted factorization machine, as a stream in time.

    - Categorical values of feature f are slots of popularity rank r in [0, V_f), drawn
      Zipf-like: P(r) is proportional to (r + 1) ** -zipf. V_f is Criteo's cardinality,
      capped at ``max_vocabulary``.
    - New ids over time: in features with more than 1000 values, the value in each slot
      is replaced by a new one every ``lifetime`` samples of the stream (at a phase that
      depends on the slot), so new ids keep arriving at every popularity.
    - Planted model: logit = bias + sum_f w(id_f) + sum_{f<g} <u(id_f), u(id_g)> + numeric
      terms, where w and u are fixed pseudo-random functions of the id (no table is
      stored), scaled per feature so that some features matter more than others.

    ``batch(size, time, generator)`` draws ``size`` samples at stream position ``time``
    (in samples); every random choice comes from ``generator``, and the planted model from
    ``seed`` alone, so every rank sees the same model.
    """

    LATENT = 4

    def __init__(
        self,
        seed: int = 0,
        max_vocabulary: int = 100_000,
        zipf: float = 1.1,
        lifetime: float = 3_000_000,
        signal: float = 1.0,
    ) -> None:
        self.seed = seed
        self.zipf = zipf
        self.lifetime = lifetime
        self.vocabulary = torch.tensor([min(c, max_vocabulary) for c in CRITEO_CARDINALITIES], dtype=torch.float64)
        self.renewed = self.vocabulary > 1000
        gen = torch.Generator().manual_seed(seed)
        # Per-feature strength of the first-order and pairwise terms, and numeric weights.
        self.first_order_scale = signal * 0.5 * torch.rand(NUM_CATEGORICAL, generator=gen, dtype=torch.float64)
        self.pair_scale = signal * 0.28 * torch.rand(NUM_CATEGORICAL, generator=gen, dtype=torch.float64).sqrt()
        self.numeric_weight = signal * 0.25 * torch.randn(NUM_NUMERIC, generator=gen, dtype=torch.float64)
        self.numeric_missing = 0.3 * torch.rand(NUM_NUMERIC, generator=gen, dtype=torch.float64)
        self.numeric_scale = 0.5 + 2.0 * torch.rand(NUM_NUMERIC, generator=gen, dtype=torch.float64)
        self.bias = -1.6

    # ------------------------------------------------------------------ sampling
    def _zipf_ranks(self, size: int, generator: torch.Generator) -> torch.Tensor:
        """(size, 26) ranks by inverting the continuous power law on [1, V + 1)."""
        u = torch.rand(size, NUM_CATEGORICAL, generator=generator, dtype=torch.float64)
        top = self.vocabulary + 1
        if abs(self.zipf - 1.0) < 1e-9:
            x = top**u
        else:
            a = 1.0 - self.zipf
            x = (1.0 + u * (top**a - 1.0)) ** (1.0 / a)
        return torch.minimum(x.long() - 1, self.vocabulary.long() - 1)

    def _values(self, ranks: torch.Tensor, time: float) -> torch.Tensor:
        """The 32-bit value occupying each (feature, slot) at stream position ``time``."""
        features = torch.arange(NUM_CATEGORICAL, dtype=torch.int64).expand_as(ranks)
        slot_key = _mix(self.seed, features, ranks)
        phase = _uniform(slot_key)
        generation = torch.where(self.renewed, (time / self.lifetime + phase).floor(), torch.zeros_like(phase))
        return mix64(slot_key + generation.long()) & 0xFFFFFFFF

    def batch(self, size: int, time: float, generator: torch.Generator) -> tuple[Batch, torch.Tensor]:
        """``size`` samples at stream position ``time``, and the planted logits that drew their labels."""
        ids = categorical_ids(self._values(self._zipf_ranks(size, generator), time))
        z = torch.randn(size, NUM_NUMERIC, generator=generator, dtype=torch.float64)
        raw = (self.numeric_scale * (z + 0.5)).exp().floor()  # heavy-tailed counts, like Criteo's
        missing = torch.rand(size, NUM_NUMERIC, generator=generator, dtype=torch.float64) < self.numeric_missing
        raw[missing] = math.nan
        logits = self.planted_logits(ids, torch.where(missing, 0.0, z))
        labels = torch.bernoulli(torch.sigmoid(logits), generator=generator).float()
        return Batch(labels, transform_numeric(raw), ids), logits

    def planted_logits(self, ids: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        keys = _mix(self.seed, ids)
        w = (2.0 * _uniform(keys) - 1.0) * 3.0**0.5 * self.first_order_scale  # unit variance before scaling
        latent_keys = keys.unsqueeze(-1) + torch.arange(1, self.LATENT + 1)
        u = (2.0 * _uniform(latent_keys) - 1.0) * 3.0**0.5 * self.pair_scale.unsqueeze(-1)
        summed = u.sum(1)
        pairwise = 0.5 * (summed.square().sum(-1) - u.square().sum((1, 2)))
        return self.bias + w.sum(1) + pairwise + z @ self.numeric_weight


def _step_generator(seed: int, stream: int, rank: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(_mix(seed, stream, rank, index)) & ((1 << 63) - 1))


def synthetic_batches(
    data: SyntheticCriteo, rank: int, world_size: int, batch_size: int, start: int = 0
) -> Iterator[Batch]:
    """This rank's endless stream of training batches, from micro-batch ``start`` on.

    Micro-batch i of every rank lies at stream position ``i * world_size * batch_size``,
    and is drawn from a generator seeded by (seed, rank, i), so a resumed run sees
    exactly the batches an uninterrupted one would.
    """
    index = start
    while True:
        generator = _step_generator(data.seed, 0, rank, index)
        yield data.batch(batch_size, index * world_size * batch_size, generator)[0]
        index += 1


def synthetic_test_set(
    data: SyntheticCriteo, rank: int, world_size: int, samples: int, time: float
) -> tuple[Batch, torch.Tensor]:
    """This rank's share of a held-out set drawn at stream position ``time`` (the end of training)."""
    share = samples // world_size + (rank < samples % world_size)
    return data.batch(share, time, _step_generator(data.seed, 1, rank, 0))
