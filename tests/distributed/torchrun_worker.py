"""Launched by torchrun from test_torchrun.py: trains the equivalence cases, saves each rank's result."""

import datetime
import os
import sys

import torch
import torch.distributed as dist
from two_table_training import run_cases

if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.save(run_cases(rank, world_size), os.path.join(sys.argv[1], f"rank{rank}.pt"))
    dist.destroy_process_group()
