"""Distributed training step: time and bytes per step on 1, 2 and 4 gloo ranks (CPU).

The global batch is the same at every world size (each rank takes its share). One
step = ShardedHashTable forward (ids to owners and rows back), backward, and
ShardedOptimizer(SparseAdamW).step() (gradients to owners, fused update). Bytes are
what one rank sends to the others, summed over ranks, per step (forward + step).
Times are medians over the measured steps of the slowest rank.

    python benchmarks/dist_step.py [--world-sizes 1 2 4] [--batch 16384] [--vocab 262144]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from recis.dist import ShardedHashTable, ShardedOptimizer
from recis.dist.exchange import traffic
from recis.optim import SparseAdamW


def _rank(rank: int, world_size: int, store: str, args: argparse.Namespace, out_dir: str) -> None:
    torch.set_num_threads(max(1, args.threads // world_size))
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=120)
    )
    table = ShardedHashTable(args.dim, name="bench")
    optimizer = ShardedOptimizer(SparseAdamW(table, lr=1e-3))
    generator = torch.Generator().manual_seed(1234)
    vocabulary = torch.randint(-(2**63), 2**63 - 1, (args.vocab,), generator=generator)
    local = args.batch // world_size
    with torch.no_grad():
        table(vocabulary[rank::world_size])  # the table starts full: steps measure lookups, not inserts
    times, sent = [], []
    for step in range(args.warmup + args.steps):
        ids = vocabulary[torch.randint(0, args.vocab, (args.batch,), generator=generator)][
            rank * local : (rank + 1) * local
        ]
        dist.barrier()
        before, start = traffic.bytes_sent, time.perf_counter()
        optimizer.zero_grad()
        table(ids).square().mean().backward()
        optimizer.step()
        elapsed = time.perf_counter() - start
        if step >= args.warmup:
            times.append(elapsed)
            sent.append(traffic.bytes_sent - before)
    torch.save({"times": times, "sent": sent}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def measure(world_size: int, args: argparse.Namespace) -> tuple[float, float]:
    """(median step seconds of the slowest rank, bytes sent per step by all ranks)."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _rank,
            args=(world_size, os.path.join(out_dir, "store"), args, out_dir),
            nprocs=world_size,
            start_method="spawn",
        )
        results = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world_size)]
    slowest = [max(per_rank) for per_rank in zip(*(r["times"] for r in results))]
    bytes_per_step = statistics.median(sum(per_rank) for per_rank in zip(*(r["sent"] for r in results)))
    return statistics.median(slowest), bytes_per_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch", type=int, default=16384, help="global batch of ids per step")
    parser.add_argument("--vocab", type=int, default=262144, help="distinct ids the batches draw from")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads shared by all ranks")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}")
    print(f"global batch {args.batch} ids from {args.vocab} distinct, dim {args.dim}, fp32, gloo on localhost")
    print(f"{'ranks':>5} {'step ms (median)':>17} {'MB sent/step':>13} {'vs 1 rank':>9}")
    baseline = None
    for world_size in args.world_sizes:
        seconds, sent = measure(world_size, args)
        baseline = baseline or seconds
        print(f"{world_size:>5} {seconds * 1e3:>17.1f} {sent / 1e6:>13.2f} {seconds / baseline:>8.2f}x")


if __name__ == "__main__":
    main()
