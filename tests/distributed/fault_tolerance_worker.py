"""Launched by torchrun --max-restarts 1 from test_fault_tolerance.py.

Trains the equivalence model with gradient accumulation, checkpoints every few
micro-steps (the data position is the step in ``extra``), and on the first attempt
rank 1 kills itself with SIGKILL mid-training. Each rank logs every micro-step it
applies, with the attempt number, and saves its final shard.
"""

import datetime
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from two_table_training import GLOBAL_BATCH, TwoTables, global_batches, make_optimizer, owned_state

import recis.checkpoint as ck
from recis.dist import ShardedHashTable, ShardedOptimizer

ACCUM, SAVE_EVERY, KILL_AFTER = 2, 3, 7

if __name__ == "__main__":
    out_dir, checkpoints = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    model = TwoTables(ShardedHashTable)
    optimizer = ShardedOptimizer(make_optimizer("adamw", model, "row", ACCUM))
    try:
        start = ck.load(checkpoints, model, optimizer)["step"]
    except FileNotFoundError:
        start = 0
    batches = global_batches(ACCUM)
    local = GLOBAL_BATCH // world_size
    with open(out_dir / f"applied{rank}.log", "a") as log:
        for step in range(start, len(batches)):
            ids, targets = batches[step]
            part = slice(rank * local, (rank + 1) * local)
            optimizer.zero_grad()
            nn.functional.mse_loss(model(ids[part]), targets[part]).backward()
            optimizer.step()
            print(attempt, step, file=log, flush=True)
            if (step + 1) % SAVE_EVERY == 0:
                ck.save(checkpoints, model, optimizer, extra={"step": step + 1}, keep=2)
            if attempt == 0 and rank == 1 and step == KILL_AFTER:
                os.kill(os.getpid(), signal.SIGKILL)
    owned = {t.name: owned_state(t, optimizer.state[t]["step"]) for t in (model.user, model.item)}
    torch.save({"owned": owned, "replicas": {}}, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()
