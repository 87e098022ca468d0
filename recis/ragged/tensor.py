"""RaggedTensor: rows of different lengths, stored flat, as RecIS defines it.

``RaggedTensor(values, offsets, weight=None, dense_shape=None)``: row ``i`` holds
``values[offsets[i]:offsets[i + 1]]`` (and the same slice of ``weight``). RecIS allows a
list of offset tensors for several ragged dimensions; recis takes one (a tensor or a
one-element list), which is what the embedding layers consume. The constructor checks
what RecIS leaves unchecked: 1-D values, int64 offsets that start at 0, never decrease
and end at ``len(values)``, and weights of the values' length; a bad one raises
``ValueError`` naming it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def _checked_offsets(values: torch.Tensor, offsets: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    if not isinstance(offsets, torch.Tensor):
        offsets = list(offsets)
        if len(offsets) != 1:
            raise ValueError(f"RaggedTensor: recis supports one ragged dimension, got {len(offsets)} offset tensors")
        offsets = offsets[0]
    if not isinstance(offsets, torch.Tensor) or offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError("RaggedTensor: offsets must be a 1-D tensor of at least one entry")
    if offsets.is_floating_point() or offsets.dtype == torch.bool:
        raise ValueError(f"RaggedTensor: offsets must be integers, got {offsets.dtype}")
    if int(offsets[0]) != 0 or int(offsets[-1]) != values.numel():
        raise ValueError(
            f"RaggedTensor: offsets must start at 0 and end at len(values)={values.numel()}, "
            f"got {int(offsets[0])} .. {int(offsets[-1])}"
        )
    if bool((offsets[1:] < offsets[:-1]).any()):
        at = int((offsets[1:] < offsets[:-1]).nonzero()[0])
        raise ValueError(f"RaggedTensor: offsets must not decrease; offsets[{at + 1}] < offsets[{at}]")
    return offsets.to(torch.int64)


class RaggedTensor:
    """A batch of variable-length rows (see the module docstring)."""

    def __init__(
        self,
        values: torch.Tensor,
        offsets: torch.Tensor | Sequence[torch.Tensor],
        weight: torch.Tensor | None = None,
        dense_shape: tuple[int, ...] | None = None,
    ) -> None:
        if not isinstance(values, torch.Tensor) or values.dim() != 1:
            raise ValueError(f"RaggedTensor: values must be a 1-D tensor, got {getattr(values, 'shape', values)!r}")
        self._values = values
        self._offsets = _checked_offsets(values, offsets)
        self._weight = None
        self.set_weight(weight)
        rows = self._offsets.numel() - 1
        self._dense_shape = tuple(dense_shape) if dense_shape is not None else (rows, -1)
        if self._dense_shape[0] not in (-1, rows):
            raise ValueError(f"RaggedTensor: dense_shape {self._dense_shape} does not have {rows} rows")

    # ------------------------------------------------------------------ RecIS's accessors
    def values(self) -> torch.Tensor:
        return self._values

    def offsets(self) -> list[torch.Tensor]:
        """The offsets, as RecIS returns them: a list with one tensor per ragged dimension."""
        return [self._offsets]

    def weight(self) -> torch.Tensor | None:
        return self._weight

    def set_values(self, values: torch.Tensor) -> None:
        if not isinstance(values, torch.Tensor) or values.shape != self._values.shape:
            raise ValueError(f"RaggedTensor.set_values: expected shape {tuple(self._values.shape)}")
        self._values = values

    def set_weight(self, weight: torch.Tensor | None) -> None:
        if weight is not None:
            if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != tuple(self._values.shape):
                got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
                expected = tuple(self._values.shape)
                raise ValueError(f"RaggedTensor: weight must have the values' shape {expected}, got {got}")
            if not weight.is_floating_point():
                raise ValueError(f"RaggedTensor: weight must be floating, got {weight.dtype}")
        self._weight = weight

    @property
    def row_lengths(self) -> torch.Tensor:
        return self._offsets[1:] - self._offsets[:-1]

    def get_shape(self, dim: int) -> int:
        if self._dense_shape[dim] != -1:
            return self._dense_shape[dim]
        if dim == 0:
            return self._offsets.numel() - 1
        return int(self.row_lengths.max()) if self._offsets.numel() > 1 else 0

    def real_shape(self, start: int = 0, end: int | None = None) -> tuple[int, ...]:
        end = len(self._dense_shape) if end is None else (end % len(self._dense_shape) if end < 0 else end)
        return tuple(self.get_shape(d) for d in range(start, end))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.real_shape()

    def size(self) -> tuple[int, ...]:
        return self.real_shape()

    @property
    def dim(self) -> int:
        return len(self._dense_shape)

    @property
    def max_length(self) -> int:
        return self.get_shape(-1)

    @property
    def device(self) -> torch.device:
        return self._values.device

    @property
    def dtype(self) -> torch.dtype:
        return self._values.dtype

    # ------------------------------------------------------------------ conversions
    def to(self, *args, **kwargs) -> RaggedTensor:
        """Move values, offsets and weight (a dtype applies to values only)."""
        moved = self._values.to(*args, **kwargs)
        device = moved.device
        weight = None if self._weight is None else self._weight.to(device)
        return RaggedTensor(moved, self._offsets.to(device), weight, self._dense_shape)

    def to_dense(self, default_value: float = 0.0) -> torch.Tensor:
        """``(rows, max length)``: each row's values, padded with ``default_value``."""
        rows, width = self.get_shape(0), self.get_shape(1)
        dense = torch.full((rows, width), default_value, dtype=self._values.dtype, device=self.device)
        row_of = torch.repeat_interleave(torch.arange(rows, device=self.device), self.row_lengths)
        column = torch.arange(self._values.numel(), device=self.device) - self._offsets[row_of]
        dense[row_of, column] = self._values
        return dense

    @staticmethod
    def from_dense(dense: torch.Tensor, check_invalid: bool = False, invalid_value: int = 0) -> RaggedTensor:
        """Rows of a 2-D tensor; with ``check_invalid``, entries equal to ``invalid_value`` are dropped."""
        if dense.dim() != 2:
            raise ValueError(f"RaggedTensor.from_dense needs a 2-D tensor, got shape {tuple(dense.shape)}")
        keep = dense != invalid_value if check_invalid else torch.ones_like(dense, dtype=torch.bool)
        lengths = keep.sum(dim=1)
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        return RaggedTensor(dense[keep], offsets, dense_shape=tuple(dense.shape))

    @staticmethod
    def from_numpy(values: np.ndarray, offsets: np.ndarray | Sequence[np.ndarray]) -> RaggedTensor:
        offsets = [offsets] if isinstance(offsets, np.ndarray) else list(offsets)
        return RaggedTensor(torch.from_numpy(values), [torch.from_numpy(o) for o in offsets])

    def __repr__(self) -> str:
        return f"RaggedTensor(values={self._values}, offsets={self._offsets}, weight={self._weight})"
