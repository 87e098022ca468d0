"""Bounded hash tables (a capacity and LRU/LFU eviction): memory stays flat, tracking is cheap, accuracy holds.

    python benchmarks/bounded_tables.py                          # all cases, quick sizes (minutes on 2 cores)
    python benchmarks/bounded_tables.py --cases memory --full    # case memory at full size
    python benchmarks/bounded_tables.py --cases accuracy --accuracy-steps 3000

Setting: float32 rows, SparseAdamW, a train step is forward, sum loss, backward, step,
zero_grad; --threads torch threads (default 2). Cases:

  memory    a stream of Zipf-distributed ids (exponent --zipf over --support ranks) whose hot
            set drifts (id = step * --drift + rank), --batch ids per step, through a table of
            --capacity rows, until --distinct different ids have gone through it. Every step
            records rows, evictions and the process's resident memory (VmRSS); once the table
            is full (warm-up), the max/min RSS ratio says whether memory is flat (target:
            within 5%). Writes memory.csv and, with matplotlib, memory.png (rows and RSS).
            Full size (--full): capacity 1M, dim 64, 65,536 ids per step, 20M distinct ids.
            The table's storage is fixed once full, and so are the sizes of most of the step's
            large temporaries (the forward output, 16 MB at full size; the eviction's per-row
            masks and scores). The id map drops its tombstones in place (no second bucket
            array every few steps) and new rows' initial values are hashed in fixed-size
            blocks, so glibc's heap, which keeps freed blocks below its dynamic mmap threshold
            (it rises to 16 MB here), is reused rather than grown, or traded for mmap and back.
            What still varies in size (the batch's unique rows, their gradient, the new rows'
            values) lets the heap grow by a few MB now and then after warm-up.
            MALLOC_MMAP_THRESHOLD_=1048576 (a fixed threshold: big blocks always go back to the
            system when freed) shows the footprint without the heap's share (about 60-80 MB
            less at full size), at the cost of page faults on every big block.
  tracking  train-step time of a --rows-row table with --tracking-batch random ids per step:
            unbounded (capacity None); tracked (a capacity of twice the rows, so nothing is
            evicted and only the LRU metadata differs); evicting (a full table of --rows rows,
            the ids drawn from a universe --evict-fraction larger, so that share of each batch
            is new and evicts a row). Timed in turns, median of --repeats; ratios against
            unbounded in the same run (target: tracked <= 1.10x). Default size is the full one.
  accuracy  the DeepFM example (examples/deepfm/train.py, one process) unbounded, then with
            --capacity a quarter of the unbounded run's final rows: held-out AUC of both
            (target: within 0.005), rows, evictions and peak RSS of each (its metrics.csv).

Results go to --out-dir (default runs/bounded_tables): results.json, memory.csv, memory.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sparse_update.py beside this file

from sparse_update import interleaved_medians_ms  # noqa: E402

from recis.nn.modules.hashtable import HashTable  # noqa: E402
from recis.optim import SparseAdamW  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "deepfm" / "train.py"
QUICK_MEMORY = {"capacity": 250_000, "batch": 16_384, "distinct": 4_000_000, "support": 1_000_000, "drift": 4_096}
FULL_MEMORY = {"capacity": 1_000_000, "batch": 65_536, "distinct": 20_000_000, "support": 4_000_000, "drift": 16_384}


# --------------------------------------------------------------------------- shared pieces
def rss_mb() -> float:
    """Resident memory of this process (VmRSS) in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024  # "VmRSS:  123456 kB"
    raise RuntimeError("no VmRSS in /proc/self/status")


def train_step(table: HashTable, optimizer: SparseAdamW, ids: torch.Tensor) -> None:
    """Forward, sum loss, backward, update, zero_grad."""
    table(ids).sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def zipf_ranks(count: int, support: int, exponent: float, generator: torch.Generator) -> torch.Tensor:
    """``count`` ranks in [0, support), P(rank r) ~ (r + 1) ** -exponent (inverse CDF of the continuous law)."""
    u = torch.rand(count, generator=generator, dtype=torch.float64)
    if abs(exponent - 1.0) < 1e-9:
        x = torch.exp(u * math.log(support + 1))
    else:
        a = 1.0 - exponent
        x = (((support + 1) ** a - 1) * u + 1) ** (1 / a)
    return (x.floor().long() - 1).clamp_(0, support - 1)


def random_ids(count: int, generator: torch.Generator) -> torch.Tensor:
    """Distinct random int64 ids (about ``count``; a collision among 2**64 values is unlikely)."""
    return torch.randint(-(2**63), 2**63 - 1, (count,), dtype=torch.int64, generator=generator).unique()


# --------------------------------------------------------------------------- case memory
def memory_sizes(args: argparse.Namespace) -> dict[str, int]:
    """The memory case's sizes: --full or the quick ones, each overridable by its own flag."""
    sizes = dict(FULL_MEMORY if args.full else QUICK_MEMORY)
    for name in sizes:
        if getattr(args, name) is not None:
            sizes[name] = getattr(args, name)
    return sizes


class DistinctIds:
    """Counts the different ids in [0, bound) seen so far, in a bitmap resident from the start
    (so that it adds nothing to the RSS the memory case watches)."""

    def __init__(self, bound: int) -> None:
        self.seen = torch.ones(bound, dtype=torch.bool)  # ones, not zeros: every page is written now
        self.seen.fill_(False)
        self.count = 0

    def add(self, ids: torch.Tensor) -> int:
        new = ids[~self.seen[ids]].unique()
        self.seen[new] = True
        self.count += new.numel()
        return self.count


def run_memory(args: argparse.Namespace) -> dict:
    """Stream drifting Zipf ids through a bounded table; rows, evictions and RSS at every step."""
    sizes = memory_sizes(args)
    capacity, batch, distinct = sizes["capacity"], sizes["batch"], sizes["distinct"]
    generator = torch.Generator().manual_seed(args.seed)
    table = HashTable([args.dim], capacity=capacity, eviction=args.eviction, name="memory")
    optimizer = SparseAdamW([table], lr=1e-3)
    max_steps = args.max_steps or 4 * distinct // sizes["drift"] + 1000
    distinct_ids = DistinctIds(max_steps * sizes["drift"] + sizes["support"])
    records = []  # about 0.5 kB of Python objects per step: part of the RSS, small next to the table
    for step in range(max_steps):
        ids = step * sizes["drift"] + zipf_ranks(batch, sizes["support"], args.zipf, generator)
        count = distinct_ids.add(ids)
        started = time.perf_counter()
        train_step(table, optimizer, ids)
        elapsed_ms = (time.perf_counter() - started) * 1e3
        stats = table.stats()
        records.append({"step": step, "distinct_ids": count, "rows": stats["rows"], "evicted": stats["evicted"],
                        "rss_mb": round(rss_mb(), 1), "step_ms": round(elapsed_ms, 2)})  # fmt: skip
        if step % 100 == 0:
            print(f"memory: step {step}, {count:,} distinct ids, {records[-1]}", file=sys.stderr, flush=True)
        if count >= distinct:
            break
    return {"sizes": {**sizes, "dim": args.dim, "eviction": args.eviction, "zipf": args.zipf}, "records": records}


def summarize_memory(result: dict) -> dict:
    """RSS after warm-up (from the first step the table is full), and what the stream did."""
    records, capacity = result["records"], result["sizes"]["capacity"]
    full = next((i for i, r in enumerate(records) if r["rows"] >= capacity), None)
    summary = {"steps": len(records), "distinct_ids": records[-1]["distinct_ids"], "evicted": records[-1]["evicted"],
               "max_rows": max(r["rows"] for r in records), "full_at_step": full}  # fmt: skip
    if full is None:
        return {**summary, "note": "the table never filled: raise --distinct or lower --capacity"}
    after = [r["rss_mb"] for r in records[full:]]
    tenth = max(1, len(after) // 10)
    summary.update(rss_full_mb=after[0], rss_min_mb=min(after), rss_max_mb=max(after), rss_end_mb=after[-1])
    summary["rss_max_over_min"] = round(max(after) / min(after), 4)
    # Growth apart from step-to-step jitter: the median RSS of the last tenth of the steps after
    # warm-up over that of the first tenth; and the 5th and 95th percentiles of all of them.
    summary["rss_last_tenth_over_first_tenth"] = round(
        statistics.median(after[-tenth:]) / statistics.median(after[:tenth]), 4
    )
    ordered = sorted(after)
    summary.update(rss_p5_mb=ordered[len(after) // 20], rss_p95_mb=ordered[-1 - len(after) // 20])
    summary["median_step_ms_after_full"] = statistics.median(r["step_ms"] for r in records[full:])
    return summary


def write_memory_csv(records: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, list(records[0]))
        writer.writeheader()
        writer.writerows(records)


def plot_memory(result: dict, path: Path) -> bool:
    """Rows (and capacity) and RSS against the step; False when matplotlib is unavailable."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    records, sizes = result["records"], result["sizes"]
    steps = [r["step"] for r in records]
    figure, (rows_axis, rss_axis) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    rows_axis.plot(steps, [r["rows"] for r in records], label="rows")
    rows_axis.plot(steps, [r["distinct_ids"] for r in records], label="distinct ids seen")
    rows_axis.axhline(sizes["capacity"], color="gray", linestyle="--", label="capacity")
    rows_axis.set_yscale("log")
    rows_axis.legend()
    rss_axis.plot(steps, [r["rss_mb"] for r in records], color="tab:red")
    rss_axis.set_ylabel("RSS (MB)")
    rss_axis.set_xlabel("step")
    figure.suptitle(
        f"HashTable capacity {sizes['capacity']:,} ({sizes['eviction']}), dim {sizes['dim']}, "
        f"{sizes['batch']:,} Zipf ids/step, drift {sizes['drift']:,}/step",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


# --------------------------------------------------------------------------- case tracking
def filled_table(ids: torch.Tensor, dim: int, capacity: int | None) -> tuple[HashTable, SparseAdamW]:
    """A table holding ``ids`` (looked up in training mode, so LRU metadata is set), with its optimizer."""
    table = HashTable([dim], capacity=capacity, name=f"capacity={capacity}")
    optimizer = SparseAdamW([table], lr=1e-3)
    with torch.no_grad():
        for chunk in ids.split(65_536):
            table(chunk)
    return table, optimizer


def run_tracking(args: argparse.Namespace) -> dict:
    """Median train-step ms of unbounded, tracked and evicting tables, timed in turns."""
    generator = torch.Generator().manual_seed(args.seed)
    universe = random_ids(int(args.rows / (1 - args.evict_fraction)), generator)
    vocabulary = universe[: args.rows]
    tables = {
        "unbounded": (*filled_table(vocabulary, args.dim, None), vocabulary),
        "tracked": (*filled_table(vocabulary, args.dim, 2 * args.rows), vocabulary),
        "evicting": (*filled_table(vocabulary, args.dim, args.rows), universe),
    }
    batches: dict[str, torch.Tensor] = {}
    evicted_before = {name: table.stats()["evicted"] for name, (table, _, _) in tables.items()}

    def case(name: str) -> tuple:
        table, optimizer, pool = tables[name]

        def prepare() -> None:
            batches[name] = pool[torch.randint(0, pool.numel(), (args.tracking_batch,), generator=generator)]

        return prepare, lambda: train_step(table, optimizer, batches[name])

    medians = interleaved_medians_ms({name: case(name) for name in tables}, args.repeats)
    rounds = args.repeats + 3
    evictions = {
        name: (table.stats()["evicted"] - evicted_before[name]) / rounds for name, (table, _, _) in tables.items()
    }
    return {
        "sizes": {
            "rows": args.rows,
            "dim": args.dim,
            "batch": args.tracking_batch,
            "evict_fraction": args.evict_fraction,
            "repeats": args.repeats,
        },  # fmt: skip
        "median_ms": {name: round(ms, 2) for name, ms in medians.items()},
        "ratio_to_unbounded": {name: round(ms / medians["unbounded"], 3) for name, ms in medians.items()},
        "evictions_per_step": {name: round(count) for name, count in evictions.items()},
        "rows": {name: len(table) for name, (table, _, _) in tables.items()},
    }


# --------------------------------------------------------------------------- case accuracy
def run_example(out_dir: Path, args: argparse.Namespace, *extra: str) -> dict:
    """One run of the DeepFM example: its held-out AUC and, from its metrics.csv, rows, evictions and peak RSS."""
    command = [sys.executable, str(EXAMPLE), "--steps", str(args.accuracy_steps), "--eval-every", "0",
               "--checkpoint-every", "0", "--out-dir", str(out_dir), *extra]  # fmt: skip
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    auc = float(re.fullmatch(r"test_auc: (\S+)", result.stdout.strip().splitlines()[-1]).group(1))
    with open(out_dir / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    return {"command": " ".join(command[1:]), "test_auc": auc, "rows": int(rows[-1]["rows"]),
            "evicted": int(rows[-1]["evicted"]), "peak_rss_mb": max(float(r["rss_mb"]) for r in rows),
            "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip


def run_accuracy(args: argparse.Namespace) -> dict:
    """The example unbounded, then bounded to a quarter of the unbounded run's final rows."""
    unbounded = run_example(args.out_dir / "deepfm_unbounded", args)
    capacity = unbounded["rows"] // 4
    bounded = run_example(args.out_dir / "deepfm_bounded", args, "--capacity", str(capacity))
    return {"unbounded": unbounded, "bounded": {**bounded, "capacity": capacity},
            "auc_difference": round(bounded["test_auc"] - unbounded["test_auc"], 4)}  # fmt: skip


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--cases", nargs="+", choices=["memory", "tracking", "accuracy"], default=["memory", "tracking", "accuracy"])
    add("--out-dir", type=Path, default=Path("runs/bounded_tables"))
    add("--threads", type=int, default=2, help="torch threads (memory and tracking)")
    add("--dim", type=int, default=64)
    add("--seed", type=int, default=0)
    memory = parser.add_argument_group("memory (quick sizes unless --full; each flag overrides)")
    memory.add_argument("--full", action="store_true", help=f"full sizes: {FULL_MEMORY}")
    for name in QUICK_MEMORY:
        memory.add_argument(f"--{name}", type=int, help=f"quick {QUICK_MEMORY[name]:,}, full {FULL_MEMORY[name]:,}")
    memory.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of the ranks")
    memory.add_argument("--eviction", choices=["lru", "lfu"], default="lru")
    memory.add_argument("--max-steps", type=int, help="stop here even if fewer --distinct ids went through")
    tracking = parser.add_argument_group("tracking (the full size by default)")
    tracking.add_argument("--rows", type=int, default=1_000_000, help="rows of the tables")
    tracking.add_argument("--tracking-batch", type=int, default=65_536, help="random ids per step")
    tracking.add_argument("--evict-fraction", type=float, default=0.1, help="share of new ids per evicting batch")
    tracking.add_argument("--repeats", type=int, default=21, help="timed rounds (after 3 warm-up rounds)")
    accuracy = parser.add_argument_group("accuracy")
    accuracy.add_argument("--accuracy-steps", type=int, default=1000, help="steps of each example run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"torch": torch.__version__, "threads": args.threads, "cpus": os.cpu_count()}
    if "memory" in args.cases:
        memory = run_memory(args)
        write_memory_csv(memory["records"], args.out_dir / "memory.csv")
        plotted = plot_memory(memory, args.out_dir / "memory.png")
        results["memory"] = {"sizes": memory["sizes"], **summarize_memory(memory), "plot": plotted}
        print("memory:", json.dumps(results["memory"]), flush=True)
    if "tracking" in args.cases:
        results["tracking"] = run_tracking(args)
        print("tracking:", json.dumps(results["tracking"]), flush=True)
    if "accuracy" in args.cases:
        results["accuracy"] = run_accuracy(args)
        print("accuracy:", json.dumps(results["accuracy"]), flush=True)
    (args.out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out_dir / 'results.json'}")


if __name__ == "__main__":
    main()
