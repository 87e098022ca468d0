"""kill -9 of a worker under torchrun --max-restarts: the job resumes from the last checkpoint
and ends with the same tables as an undisturbed run; no step is lost or applied twice."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_harness import worker_environment
from fault_tolerance_worker import ACCUM, KILL_AFTER, SAVE_EVERY
from two_table_training import assert_owned_union_equals_reference, reference_state

WORKER = Path(__file__).with_name("fault_tolerance_worker.py")


@pytest.mark.timeout(300)
def test_a_worker_killed_mid_training_is_restarted_from_the_last_checkpoint_with_nothing_lost(tmp_path):
    out_dir, checkpoints = tmp_path / "out", tmp_path / "checkpoints"
    out_dir.mkdir()
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "--max-restarts",
        "1",
        "--monitor-interval",
        "0.5",
        str(WORKER),
        str(out_dir),
        str(checkpoints),
    ]
    # Workers get their own store instead of sharing torchrun's rendezvous store, from which a restarted
    # worker can read the address of a peer of the previous attempt (pytorch/pytorch#135712).
    environment = worker_environment(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=environment)
    assert result.returncode == 0, result.stderr[-4000:]

    last_checkpoint = (KILL_AFTER + 1) // SAVE_EVERY * SAVE_EVERY
    for rank in range(2):
        applied = [tuple(map(int, line.split())) for line in (out_dir / f"applied{rank}.log").read_text().splitlines()]
        first_attempt = [step for attempt, step in applied if attempt == 0]
        second_attempt = [step for attempt, step in applied if attempt == 1]
        assert first_attempt[-1] == KILL_AFTER or first_attempt[-1] == KILL_AFTER + 1  # rank 0 may take one more
        assert second_attempt[0] == last_checkpoint, "the restart resumes at the last checkpoint's data position"
        assert len(first_attempt) - last_checkpoint <= SAVE_EVERY, "at most the steps since the checkpoint are redone"
        assert sorted(set(first_attempt[:last_checkpoint] + second_attempt)) == list(range(5 * ACCUM))

    per_rank = [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    assert_owned_union_equals_reference(per_rank, reference_state("adamw", ACCUM, "row"), "killed and restarted")
