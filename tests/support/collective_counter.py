"""Count the torch.distributed collective calls made inside a block (for the tests that
pin how many collectives a lookup or a step makes)."""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import torch.distributed as dist

COLLECTIVES = ("all_to_all_single", "all_gather", "all_reduce", "broadcast", "all_gather_object", "barrier")


@contextmanager
def counting_collectives():
    """Count calls of torch.distributed's collectives made inside the block."""
    calls: Counter = Counter()
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def counted(name):
        def call(*args, **kwargs):
            calls[name] += 1
            return originals[name](*args, **kwargs)

        return call

    for name in COLLECTIVES:
        setattr(dist, name, counted(name))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
