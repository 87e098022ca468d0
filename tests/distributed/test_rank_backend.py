"""Spawned ranks run the kernels of the test's backend (tests/conftest.py sets RECIS_BACKEND)."""

from __future__ import annotations

import torch.distributed as dist
from dist_harness import run_ranks

from recis.ops import choose_backend


def _backends_of_all_ranks(rank: int, world_size: int) -> list[str]:
    backends: list[str | None] = [None] * world_size
    dist.all_gather_object(backends, choose_backend())  # a collective: no rank leaves before the others connect
    return backends


def test_each_rank_runs_the_backend_of_the_test(backend):
    assert run_ranks(2, _backends_of_all_ranks) == [[backend, backend]] * 2
