"""Training throughput of the DeepFM example, recis tables vs the nn.EmbeddingBag baseline, on 1 and 2 ranks.

    python examples/deepfm/throughput.py --rounds 5

Runs train.py once per configuration per round, configurations interleaved so that a
busy moment of the machine hits all of them alike, and prints the median samples/s
(and the range) of each. Every rank gets one thread (OMP_NUM_THREADS=1), so 2 ranks use
2 cores. samples/s is what train.py reports: all samples over the time of all training
steps, data generation included, evaluation and start-up excluded. On a machine shared
with other jobs the ranks get less than a core each; samples/s per busy core divides by
the CPU time they did get (all their threads, communication included).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

TRAIN = Path(__file__).resolve().with_name("train.py")
CONFIGS = {
    "recis EmbeddingEngine (HashTables) + SparseAdamW, 1 rank": ([], 1),
    "recis EmbeddingEngine (ShardedHashTables) + ShardedOptimizer(SparseAdamW), 2 ranks": ([], 2),
    "baseline nn.EmbeddingBag + torch.optim.SparseAdam, 1 rank": (["--baseline"], 1),
    "baseline nn.EmbeddingBag + torch.optim.SparseAdam (DDP), 2 ranks": (["--baseline"], 2),
}


def run(extra: list[str], ranks: int, steps: int, out_dir: str) -> tuple[float, float]:
    """(samples/s, samples/s per busy CPU core) of one run of train.py."""
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    command = [
        *launcher, str(TRAIN), *extra, "--steps", str(steps), "--eval-every", "0", "--checkpoint-every", "0",
        "--test-samples", "2000", "--out-dir", out_dir,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    found = re.search(r"([\d,]+) samples/s, ([\d.]+) CPU cores busy per rank", result.stdout)
    samples_per_s = float(found.group(1).replace(",", ""))
    return samples_per_s, samples_per_s / (float(found.group(2)) * ranks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=500, help="updates per run (batch 1024 per rank)")
    parser.add_argument("--out-dir", default="runs/throughput")
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in CONFIGS}
    for round_index in range(args.rounds):
        for name, (extra, ranks) in CONFIGS.items():
            results[name].append(run(extra, ranks, args.steps, args.out_dir))
            speed, per_core = results[name][-1]
            print(f"round {round_index + 1}: {name}: {speed:,.0f} samples/s, {per_core:,.0f} per core", file=sys.stderr)
    print(f"| configuration | samples/s (median of {args.rounds}, range) | samples/s per busy core (median, range) |")
    print("|---|---|---|")
    for name, values in results.items():
        cells = [_median_and_range([value[i] for value in values]) for i in (0, 1)]
        print(f"| {name} | {cells[0]} | {cells[1]} |")


def _median_and_range(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f} - {max(values):,.0f})"


if __name__ == "__main__":
    main()
