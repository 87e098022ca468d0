"""The distributed layer launched by torchrun itself: 2 processes, and 2 "nodes" on 127.0.0.1."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_harness import worker_environment
from two_table_training import (
    CASES,
    assert_owned_union_equals_reference,
    assert_replicas_equal_reference,
    reference_state,
)

WORKER = Path(__file__).with_name("torchrun_worker.py")
DEADLINE_S = 240


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launch(commands: list[list[str]]) -> None:
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=worker_environment())
        for command in commands
    ]
    try:
        outputs = [process.communicate(timeout=DEADLINE_S)[0] for process in processes]
    finally:
        for process in processes:
            process.kill()
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def _assert_matches_one_process(out_dir: Path) -> None:
    per_rank = [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    for case in CASES:
        optimizer_name, kind, accum, bias_correction = case
        reference = reference_state(optimizer_name, accum, bias_correction)
        assert_owned_union_equals_reference([r[case] for r in per_rank], reference, case)
        if kind == "replicated":
            assert_replicas_equal_reference([r[case] for r in per_rank], reference, case)


@pytest.mark.timeout(DEADLINE_S + 30)
def test_torchrun_standalone_two_processes_match_one_process(tmp_path):
    _launch([_torchrun("--standalone", "--nproc_per_node", "2", str(WORKER), str(tmp_path))])
    _assert_matches_one_process(tmp_path)


@pytest.mark.timeout(DEADLINE_S + 30)
def test_torchrun_two_nodes_on_localhost_match_one_process(tmp_path):
    port = str(_free_port())
    nodes = [
        _torchrun(
            "--nnodes",
            "2",
            "--nproc_per_node",
            "1",
            "--node_rank",
            str(node),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            port,
            str(WORKER),
            str(tmp_path),
        )
        for node in range(2)
    ]
    _launch(nodes)
    _assert_matches_one_process(tmp_path)
