"""Spawned ranks run the kernels of the test's backend (tests/conftest.py sets RECIS_BACKEND)."""

from __future__ import annotations

from dist_harness import run_ranks

from recis.ops import choose_backend


def _backend_of_rank(rank: int, world_size: int) -> str:
    return choose_backend()


def test_each_rank_runs_the_backend_of_the_test(backend):
    assert run_ranks(2, _backend_of_rank) == [backend, backend]
