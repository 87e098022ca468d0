"""Count the torch.distributed collective calls this process makes (a benchmark helper; recis never uses it).

``CollectiveCounter.install()`` replaces each collective function of ``torch.distributed``
(and of ``torch.distributed.distributed_c10d``, where it is defined) by a wrapper that counts
the call by name, so code that calls ``dist.all_to_all_single(...)`` at run time is seen,
whoever wrote it (recis, TorchRec). A call made inside another counted call
(``all_gather_object`` runs ``all_gather``) counts once, as the outer one. Not seen: code
that bound a function before ``install()`` (``from torch.distributed import all_reduce``),
and calls that bypass these Python functions (``torch.ops.c10d`` directly, functional
collectives).

It also adds up the bytes this process sends to other ranks through ``all_to_all_single``
(its input less the block it keeps) and ``all_gather`` / ``all_gather_into_tensor`` (its
tensor, once per other rank); other collectives add no bytes.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

COLLECTIVES = (
    "all_to_all_single", "all_to_all", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_gather_single",
    "all_reduce", "all_reduce_coalesced", "broadcast", "broadcast_object_list", "reduce",
    "reduce_scatter", "reduce_scatter_tensor", "gather", "gather_object", "scatter",
    "scatter_object_list", "barrier", "monitored_barrier", "send", "recv", "isend", "irecv",
    "batch_isend_irecv",
)  # fmt: skip


class CollectiveCounter:
    """Calls per collective name since the last ``take()``."""

    _installed: CollectiveCounter | None = None

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.bytes_sent = 0
        self._depth = 0

    @classmethod
    def install(cls) -> CollectiveCounter:
        """Wrap the collectives once per process and return the process's counter."""
        if cls._installed is None:
            counter = cls()
            for name in COLLECTIVES:
                original = getattr(c10d, name, None)
                if original is not None:
                    wrapped = counter.wrap(name, original)
                    setattr(c10d, name, wrapped)
                    if getattr(dist, name, None) is original:
                        setattr(dist, name, wrapped)
            cls._installed = counter
        return cls._installed

    def wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        """``original`` counting its calls into this counter (a call inside a counted call is not counted)."""

        @functools.wraps(original)
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self._depth == 0:
                self.counts[name] += 1
                self.bytes_sent += _bytes_to_others(name, args, kwargs)
            self._depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._depth -= 1

        return counted

    def take(self) -> Counter[str]:
        """The calls counted since the last ``take()``, and start counting afresh (bytes too)."""
        counts, self.counts = self.counts, Counter()
        return counts

    def take_bytes(self) -> int:
        """The bytes sent to other ranks since the last ``take_bytes()``, and start afresh."""
        sent, self.bytes_sent = self.bytes_sent, 0
        return sent


def _argument(args: tuple, kwargs: dict, position: int, name: str) -> Any:
    return args[position] if len(args) > position else kwargs.get(name)


def _bytes_to_others(name: str, args: tuple, kwargs: dict) -> int:
    """Bytes one call sends to other ranks (all_to_all_single, all_gather*; 0 for the rest)."""
    if name == "all_to_all_single":
        group = _argument(args, kwargs, 4, "group")
        tensor = _argument(args, kwargs, 1, "input")
        splits = _argument(args, kwargs, 3, "input_split_sizes")
        world_size, rank = dist.get_world_size(group), dist.get_rank(group)
        rows = tensor.shape[0] if tensor.dim() else 1
        row_bytes = tensor.numel() * tensor.element_size() // max(rows, 1)
        own = splits[rank] if splits else rows // world_size
        return (rows - own) * row_bytes
    if name in ("all_gather", "all_gather_into_tensor"):
        group = _argument(args, kwargs, 2, "group")
        tensor = _argument(args, kwargs, 1, "tensor" if name == "all_gather" else "input_tensor")
        return (dist.get_world_size(group) - 1) * tensor.numel() * tensor.element_size()
    return 0
