"""Run a function on W gloo ranks spawned on localhost, with a hard deadline.

``run_ranks(world_size, fn, *args)`` starts one process per rank, each with a gloo
process group (file-store rendezvous, so no port can clash), calls
``fn(rank, world_size, *args)`` and returns the per-rank results (anything
``torch.save`` can write). A rank that raises fails the test with its traceback; a
run past the deadline is killed and fails instead of hanging CI. Ranks start with this
process's environment, so they run the kernels of its ``RECIS_BACKEND`` (which the
``backend`` fixture of tests/conftest.py sets for each test).
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 60


class RankFailed(AssertionError):
    pass


def _rank_main(rank: int, world_size: int, store_path: str, out_dir: str, fn: Callable, args: tuple) -> None:
    torch.set_num_threads(1)
    outcome: dict[str, Any]
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store_path}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
        # gloo's init returns once this rank's side of every pair is up; a rank whose fn makes
        # no collective could then exit while a slower peer is still connecting, failing that
        # peer's init ("Connection closed by peer"). Past this barrier every rank is connected.
        dist.barrier()
        outcome = {"result": fn(rank, world_size, *args)}
    except BaseException as error:  # reported to the parent, which fails the test
        outcome = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    torch.save(outcome, os.path.join(out_dir, f"rank{rank}.pt"))
    if dist.is_initialized() and "error" not in outcome:
        dist.destroy_process_group()


def run_ranks_outcomes(world_size: int, fn: Callable, *args: Any, deadline_s: float = 240) -> list[dict[str, Any]]:
    """Per-rank ``{"result": ...}`` or ``{"error": ..., "traceback": ...}`` (also for a rank that died)."""
    with tempfile.TemporaryDirectory() as out_dir:
        store_path = os.path.join(out_dir, "store")
        context = mp.get_context("spawn")
        processes = [
            context.Process(target=_rank_main, args=(rank, world_size, store_path, out_dir, fn, args), daemon=True)
            for rank in range(world_size)
        ]
        for process in processes:
            process.start()
        end = time.monotonic() + deadline_s
        for process in processes:
            process.join(max(0.0, end - time.monotonic()))
        hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()
        if hung:
            raise RankFailed(f"ranks {hung} of {world_size} still running after {deadline_s} s (hang?)")
        outcomes = []
        for rank, process in enumerate(processes):
            path = os.path.join(out_dir, f"rank{rank}.pt")
            if os.path.exists(path):
                outcomes.append(torch.load(path, weights_only=False))
            else:
                outcomes.append({"error": f"exited with code {process.exitcode} without a result", "traceback": ""})
        return outcomes


def run_ranks(world_size: int, fn: Callable, *args: Any, deadline_s: float = 240) -> list[Any]:
    """Per-rank results of ``fn``; any rank's exception fails with its traceback."""
    outcomes = run_ranks_outcomes(world_size, fn, *args, deadline_s=deadline_s)
    for rank, outcome in enumerate(outcomes):
        if "error" in outcome:
            raise RankFailed(f"rank {rank} failed: {outcome['error']}\n{outcome['traceback']}")
    return [outcome["result"] for outcome in outcomes]


def worker_environment(**extra: str) -> dict[str, str]:
    """The environment for a torchrun-launched test worker: it imports from tests/support like the tests do."""
    support = str(Path(__file__).resolve().parent)
    paths = [support, *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), **extra}
