"""Train DeepFM on Criteo-shaped data with recis hash tables, on one or several ranks.

    python examples/deepfm/train.py                                            # one process
    torchrun --standalone --nproc_per_node 2 examples/deepfm/train.py          # 2 ranks (gloo on CPU, NCCL on GPU)
    torchrun --standalone --nproc_per_node 2 examples/deepfm/train.py --resume # continue from the latest checkpoint
    python examples/deepfm/train.py --data train.txt                           # a Criteo TSV file, streamed
    python examples/deepfm/train.py --baseline                                 # nn.EmbeddingBag + SparseAdam
    python examples/deepfm/train.py --capacity 200000 --eviction lfu           # bounded tables (ids per rank)
    python examples/deepfm/train.py --tables coalesced                         # one table for all features

Without --data, clicks come from a planted model (data.SyntheticCriteo) with Zipf-like
ids that keep being renewed; each evaluation draws fresh held-out samples at the stream's
current position. With --data, each rank streams its own byte range of the file; the
held-out set is --test-data, or else the file's last --test-fraction.

Sparse part: the 26 categorical features through a recis EmbeddingEngine (ShardedHashTables
across ranks, one grouped lookup of all tables per forward), in the --tables layout of
model.py: per-feature (each feature's own first-order table, dim 1, and FM-factor table,
dim --dim, coalesced by the engine into one physical table per dim), per-feature-separate
(the same 52 tables, each stored apart) or coalesced (one table of rows [w, v] for all 26
features). Trained by SparseAdam/SparseAdamW/SparseAdamWTF (wrapped in ShardedOptimizer
across ranks). The tables grow with every new id, or, with --capacity, hold at most that
many ids per rank over all features (per-feature-separate: an even share, capacity // 26,
per feature) and evict the least recently (--eviction lru) or least often (lfu) used rows
for new ids; the capacity (the share) must hold the distinct ids of one update's micro-batches.
Dense part: torch AdamW or recis AdamWTF, under DistributedDataParallel across ranks.
Both follow a linear warm-up then a cosine decay of the learning rate.

Writes to --out-dir: metrics.csv, plot.png, checkpoints/. Rank 0 shows a progress bar
(on stderr; with the table's rows and evictions so far) and prints a summary whose last
line is ``test_auc: 0.xxxx``. The plot is optional: without matplotlib, a warning at
start, and the run goes on without plot.png.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # data.py, model.py, metrics.py beside this file

import data as criteo  # noqa: E402
import metrics  # noqa: E402
from model import TABLE_LAYOUTS, DeepFM, DenseArch, EngineEmbedding, ModuloEmbeddingBag, table_capacity  # noqa: E402

import recis.checkpoint  # noqa: E402
from recis.dist import ShardedOptimizer  # noqa: E402
from recis.optim import AdamWTF, SparseAdam, SparseAdamW, SparseAdamWTF  # noqa: E402

SPARSE_OPTIMIZERS = {"adam": SparseAdam, "adamw": SparseAdamW, "adamw_tf": SparseAdamWTF}
DENSE_OPTIMIZERS = {"adamw": torch.optim.AdamW, "adamw_tf": AdamWTF}
# Default weight decay, chosen so that every optimizer shrinks a weight by the same fraction
# per update at the peak learning rate: AdamW-style decay is lr * wd, TF-style decay is wd.
SPARSE_WEIGHT_DECAY = {"adam": 0.0, "adamw": 1e-4, "adamw_tf": 1e-4 * 0.02}
DENSE_WEIGHT_DECAY = {"adamw": 1e-2, "adamw_tf": 1e-2 * 0.002}
DEFAULT_LAYOUT = "per-feature"  # chosen by measuring each layout's step time and held-out AUC: see model.py


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--data", help="Criteo TSV file to train on (default: synthetic Criteo-shaped data)")
    add("--test-data", help="Criteo TSV file to evaluate on (default: the last --test-fraction of --data)")
    add("--test-fraction", type=float, default=0.05, help="share of --data held out when no --test-data")
    add("--epochs", type=int, default=1, help="passes over --data")
    add("--steps", type=int, help="optimizer updates to train (default: 3000 on synthetic data, all of --data)")
    add("--batch-size", type=int, default=1024, help="samples per rank per micro-batch")
    add("--grad-accum", type=int, default=1, help="micro-batches per optimizer update")
    add("--dim", type=int, default=16, help="embedding size")
    add("--mlp", default="256,128", help="hidden layer sizes of the deep part")
    add("--sparse-opt", choices=sorted(SPARSE_OPTIMIZERS), help="default: adamw")
    add("--dense-opt", choices=sorted(DENSE_OPTIMIZERS), default="adamw")
    add("--sparse-lr", type=float, default=0.02)
    add("--dense-lr", type=float, default=0.002)
    add("--sparse-weight-decay", type=float, help=f"default per optimizer: {SPARSE_WEIGHT_DECAY}")
    add("--dense-weight-decay", type=float, help=f"default per optimizer: {DENSE_WEIGHT_DECAY}")
    add("--warmup-steps", type=int, default=200, help="linear learning-rate warm-up")
    add("--min-lr-ratio", type=float, default=0.1, help="cosine decay ends at this fraction of the peak")
    add("--test-samples", type=int, default=50_000, help="held-out samples (at most, with --data)")
    add("--eval-every", type=int, default=500, help="held-out AUC every N updates (and at the end); 0: at the end")
    add("--log-every", type=int, default=50, help="a metrics CSV row every N updates")
    add("--checkpoint-every", type=int, default=1000, help="checkpoint every N updates (and at the end); 0: never")
    add("--keep-checkpoints", type=int, default=1, help="complete checkpoints kept")
    add("--resume", action="store_true", help="continue from the latest checkpoint in --out-dir")
    add("--stop-after", type=int, help="leave after N updates of this run (checkpointed), as if preempted")
    add("--out-dir", default="runs/deepfm", help="metrics.csv, plot.png and checkpoints/ go here")
    add("--baseline", action="store_true", help="nn.EmbeddingBag(sparse=True) + torch.optim.SparseAdam instead")
    add("--baseline-rows", type=int, default=1 << 21, help="rows of the baseline's fixed-size table")
    add(
        "--tables",
        choices=TABLE_LAYOUTS,
        help="per-feature: each feature's own first-order (dim 1) and FM-factor (dim --dim) tables, coalesced into "
        "one physical table per dim; per-feature-separate: those 52 tables stored apart; coalesced: one table of "
        f"dim 1 + --dim for all features (default: {DEFAULT_LAYOUT})",
    )
    add("--capacity", type=int, help="ids per rank over all features; a full table evicts (default: unbounded)")
    add("--eviction", choices=["lru", "lfu"], help="which rows a full table gives up (default: lru)")
    add("--seed", type=int, default=0)
    add("--max-vocabulary", type=int, default=100_000, help="synthetic data: cap on values per feature")
    add("--lifetime", type=float, default=3e6, help="synthetic data: samples before a value is replaced")
    args = parser.parse_args(argv)
    if args.baseline and args.sparse_opt is not None:
        parser.error("--baseline trains its table with torch.optim.SparseAdam: leave out --sparse-opt")
    if args.baseline and args.tables is not None:
        parser.error("--tables lays out recis tables: the --baseline has one nn.EmbeddingBag")
    if args.baseline and args.capacity is not None:
        parser.error("--capacity bounds a recis hash table: the --baseline table has --baseline-rows")
    if args.capacity is None and args.eviction is not None:
        parser.error("--eviction chooses what a full table gives up: it needs --capacity")
    if args.capacity is not None and args.capacity <= 0:
        parser.error(f"--capacity must be positive, got {args.capacity}")
    if args.capacity is not None and args.tables == "per-feature-separate" and args.capacity < criteo.NUM_CATEGORICAL:
        parser.error(
            f"--capacity {args.capacity} is shared by the {criteo.NUM_CATEGORICAL} features' own tables under "
            f"--tables per-feature-separate: it must be at least {criteo.NUM_CATEGORICAL}"
        )
    args.sparse_opt = args.sparse_opt or "adamw"
    args.tables = None if args.baseline else args.tables or DEFAULT_LAYOUT
    args.eviction = args.eviction or ("lru" if args.capacity is not None else None)
    if args.steps is None and args.data is None:
        args.steps = 3000
    return args


# --------------------------------------------------------------------------- ranks
@dataclass
class World:
    size: int
    rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_world() -> World:
    """One process, or the process group torchrun describes (NCCL when CUDA is available, else gloo)."""
    cuda = torch.cuda.is_available()
    if "WORLD_SIZE" not in os.environ:
        return World(1, 0, torch.device("cuda" if cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return World(dist.get_world_size(), dist.get_rank(), device)


def all_agree(flag: bool, world: World) -> bool:
    """Whether ``flag`` holds on every rank."""
    if not world.distributed:
        return flag
    value = torch.tensor([int(flag)], device=world.device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value)


def gather_to_rank0(values: torch.Tensor, world: World) -> torch.Tensor:
    """Every rank's 1-D ``values`` (of any length), concatenated in rank order; valid on rank 0."""
    if not world.distributed:
        return values
    values = values.to(world.device)
    size = torch.tensor([values.numel()], device=world.device)
    sizes = [torch.empty_like(size) for _ in range(world.size)]
    dist.all_gather(sizes, size)
    longest = int(max(sizes))
    padded = torch.zeros(longest, dtype=values.dtype, device=world.device)
    padded[: values.numel()] = values
    parts = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(n)] for part, n in zip(parts, sizes)]).cpu()


# --------------------------------------------------------------------------- data
class TrainingData:
    """This rank's micro-batches, with a position that a checkpoint can store and restore."""

    def __init__(self, args: argparse.Namespace, world: World) -> None:
        self.args, self.world = args, world
        self.synthetic = criteo.SyntheticCriteo(args.seed, args.max_vocabulary, lifetime=args.lifetime)
        self.reader = None
        if args.data:
            end = 1.0 if args.test_data else 1.0 - args.test_fraction
            self.reader = criteo.CriteoTSV(args.data, world.rank, world.size, 0.0, end)
        self.micro_batches = 0
        self._stream: Iterator[criteo.Batch] | None = None
        self._test: criteo.Batch | None = None

    @property
    def endless(self) -> bool:
        return self.reader is None

    def start(self, position: dict | None) -> None:
        """Start at ``position`` (from ``position()``, saved at any world size for synthetic data)."""
        position = position or {}
        self.micro_batches = position.get("samples", 0) // (self.world.size * self.args.batch_size)
        if self.reader is None:
            self._stream = criteo.synthetic_batches(
                self.synthetic, self.world.rank, self.world.size, self.args.batch_size, self.micro_batches
            )
        else:
            self._stream = self.reader.stream(self.args.batch_size, self.args.epochs, position.get("file"))

    def next(self) -> criteo.Batch | None:
        batch = next(self._stream, None)
        if batch is not None:
            self.micro_batches += 1
        return batch

    def position(self) -> dict:
        position: dict = {"samples": self.micro_batches * self.world.size * self.args.batch_size}
        if self.reader is not None:
            position["file"] = self.reader.position
        return position

    def held_out(self) -> tuple[criteo.Batch, torch.Tensor | None]:
        """This rank's share of the held-out set, and the planted logits (synthetic data only).

        Synthetic: fresh samples (not trained on) from the stream's current position, so
        they hold the ids in use now, new ones included. TSV: the held-out part of the file.
        """
        args, world = self.args, self.world
        if self.reader is None:
            now = self.micro_batches * world.size * args.batch_size
            return criteo.synthetic_test_set(self.synthetic, world.rank, world.size, args.test_samples, now)
        if self._test is None:
            if args.test_data:
                reader = criteo.CriteoTSV(args.test_data, world.rank, world.size)
            else:
                reader = criteo.CriteoTSV(args.data, world.rank, world.size, 1.0 - args.test_fraction, 1.0)
            self._test = reader.read_all(limit=-(-args.test_samples // world.size))
        return self._test, None


# --------------------------------------------------------------------------- model and optimizers
@dataclass
class Trainer:
    model: DeepFM
    forward: Callable[[criteo.Batch], torch.Tensor]  # logits, through DDP where there is one
    ddp: list[DistributedDataParallel]
    sparse_opt: torch.optim.Optimizer
    dense_opt: torch.optim.Optimizer
    base_lrs: list[float]


def build(args: argparse.Namespace, world: World) -> Trainer:
    hidden = tuple(int(size) for size in args.mlp.split(",") if size)
    torch.manual_seed(args.seed)  # the same dense initial values on every rank
    if args.baseline:
        sparse = ModuloEmbeddingBag(args.dim, args.baseline_rows, device=world.device)
    else:
        sparse = EngineEmbedding(
            args.dim, args.tables, device=world.device, capacity=args.capacity, eviction=args.eviction
        )
    model = DeepFM(sparse, DenseArch(args.dim, hidden).to(world.device))
    device_ids = [world.device.index] if world.device.type == "cuda" else None

    dense_wd = args.dense_weight_decay if args.dense_weight_decay is not None else DENSE_WEIGHT_DECAY[args.dense_opt]
    dense_opt = DENSE_OPTIMIZERS[args.dense_opt](model.dense.parameters(), lr=args.dense_lr, weight_decay=dense_wd)
    if args.baseline:
        # Plain PyTorch: the embedding's sparse gradients are all-reduced by DDP with the dense ones.
        sparse_opt = torch.optim.SparseAdam(model.sparse.parameters(), lr=args.sparse_lr)
        net = DistributedDataParallel(model, device_ids=device_ids) if world.distributed else model
        ddp = [net] if world.distributed else []

        def forward(batch: criteo.Batch) -> torch.Tensor:
            return net(batch.numeric, batch.categorical)

    else:
        sparse_wd = (
            args.sparse_weight_decay if args.sparse_weight_decay is not None else SPARSE_WEIGHT_DECAY[args.sparse_opt]
        )
        tables = model.sparse.tables()
        sparse_opt = SPARSE_OPTIMIZERS[args.sparse_opt](tables, lr=args.sparse_lr, weight_decay=sparse_wd)
        sparse_opt.set_grad_accum_steps(args.grad_accum)  # it divides its accumulated gradient by grad_accum
        if world.distributed:
            sparse_opt = ShardedOptimizer(sparse_opt)  # gradients go to the rows' owners, averaged over ranks
        dense = DistributedDataParallel(model.dense, device_ids=device_ids) if world.distributed else model.dense
        ddp = [dense] if world.distributed else []

        def forward(batch: criteo.Batch) -> torch.Tensor:
            return dense(batch.numeric, *model.sparse(batch.categorical))

    base_lrs = [args.sparse_lr, args.dense_lr]
    return Trainer(model, forward, ddp, sparse_opt, dense_opt, base_lrs)


def lr_factor(step: int, warmup: int, total: int | None, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` updates, then a cosine decay to ``min_ratio`` at ``total`` (if known)."""
    if step < warmup:
        return (step + 1) / warmup
    if total is None or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_learning_rates(trainer: Trainer, factor: float) -> None:
    for optimizer, base in zip((trainer.sparse_opt, trainer.dense_opt), trainer.base_lrs):
        for group in optimizer.param_groups:
            group["lr"] = base * factor


def train_step(trainer: Trainer, micro_batches: list[criteo.Batch], args: argparse.Namespace) -> list[torch.Tensor]:
    """One optimizer update from ``grad_accum`` micro-batches; returns each micro-batch's logits."""
    logits_seen = []
    last = len(micro_batches) - 1
    for index, batch in enumerate(micro_batches):
        # Across ranks, dense gradients are all-reduced only in the last micro-batch's backward.
        no_sync = [ddp.no_sync() for ddp in trainer.ddp] if index < last else []
        with contextlib.ExitStack() as stack:
            for context in no_sync:
                stack.enter_context(context)
            logits = trainer.forward(batch)
            loss = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
            loss.backward()
        if not args.baseline:
            trainer.sparse_opt.step()  # accumulates; updates (and exchanges rows) on the last micro-batch
            # Drops the applied gradient (kept while an accumulation is under way) before the next
            # lookup: a bounded table never evicts rows with a gradient pending, so clearing it only
            # after the next forward would protect two batches' rows from eviction instead of one.
            trainer.sparse_opt.zero_grad()
        logits_seen.append(logits.detach())
    # A gradient summed over micro-batches becomes their mean (recis' sparse optimizers do this themselves).
    if len(micro_batches) > 1:
        params = trainer.model.parameters() if args.baseline else trainer.model.dense.parameters()
        for param in params:
            if param.grad is not None:
                param.grad.mul_(1.0 / len(micro_batches))
    if args.baseline:
        trainer.sparse_opt.step()
        trainer.sparse_opt.zero_grad()
    trainer.dense_opt.step()
    trainer.dense_opt.zero_grad()
    return logits_seen


@torch.no_grad()
def evaluate(trainer: Trainer, test: criteo.Batch, world: World) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out scores and labels of every rank, on rank 0. Tables insert nothing in eval mode."""
    trainer.model.eval()
    batches = test.split(8192) if len(test) else []
    count = torch.tensor([len(batches)], device=world.device)
    if world.distributed:
        dist.all_reduce(count, op=dist.ReduceOp.MAX)  # every rank makes as many (collective) lookups
    scores = []
    for index in range(int(count)):
        batch = batches[index] if index < len(batches) else criteo.empty_batch()
        scores.append(trainer.forward(batch.to(world.device)).float().cpu())
    trainer.model.train()
    local_scores = torch.cat(scores) if scores else torch.empty(0)
    return gather_to_rank0(local_scores, world), gather_to_rank0(test.labels, world)


# --------------------------------------------------------------------------- checkpoints
def save(directory: Path, trainer: Trainer, extra: dict, args: argparse.Namespace) -> None:
    """Every rank writes its part; ``latest`` names the new checkpoint once all parts are in."""
    optimizers = (trainer.sparse_opt, trainer.dense_opt)
    recis.checkpoint.save(directory, trainer.model, *optimizers, extra=extra, keep=args.keep_checkpoints)


def load(directory: Path, trainer: Trainer, args: argparse.Namespace) -> dict | None:
    """Load the latest complete checkpoint and return the ``extra`` saved with it; None if there is none."""
    try:
        return recis.checkpoint.load(directory, trainer.model, trainer.sparse_opt, trainer.dense_opt)
    except FileNotFoundError:
        return None
    except recis.checkpoint.CheckpointError as error:
        layout = "--baseline" if args.baseline else f"--tables {args.tables}"
        raise SystemExit(
            f"cannot resume from {directory}: {error} (a checkpoint resumes only with the table layout that wrote "
            f"it; this run has {layout})"
        ) from error


# --------------------------------------------------------------------------- the run
def held_out_auc(trainer: Trainer, data: TrainingData, world: World) -> tuple[float, float | None]:
    """AUC of the model, and of the planted model if known, on every rank's held-out samples (a collective).

    NaN on ranks other than 0.
    """
    test, planted_logits = data.held_out()
    scores, labels = evaluate(trainer, test, world)
    planted = None if planted_logits is None else gather_to_rank0(planted_logits.float(), world)
    if world.rank != 0:
        return math.nan, None if planted is None else math.nan
    return metrics.auc(scores, labels), None if planted is None else metrics.auc(planted, labels)


def cores_per_rank(cpu_seconds: float, seconds: float, world: World) -> float:
    """CPU time of the training steps (all threads) over their wall time, averaged over ranks.

    On a machine shared with other jobs it says how much CPU the ranks actually got.
    """
    share = torch.tensor([cpu_seconds / max(seconds, 1e-9)], dtype=torch.float64, device=world.device)
    if world.distributed:
        dist.all_reduce(share)
    return float(share) / world.size


def describe_tables(args: argparse.Namespace, world: World, rows: int) -> str:
    """The sparse part's tables: their layout, the ids they hold and their bound."""
    table = "ShardedHashTable" if world.distributed else "HashTable"
    bound = ""
    if args.capacity is not None:
        share = table_capacity(args.capacity, args.tables)
        per_feature = f": {share:,} per feature" if share != args.capacity else ""
        bound = f" (capacity {args.capacity:,} per rank{per_feature}, {args.eviction})"
    if args.tables == "coalesced":
        return f"one coalesced {table} of {rows:,} rows of dim {1 + args.dim} for 26 features{bound}"
    dims = f"first-order dim 1, FM factors dim {args.dim}"
    if args.tables == "per-feature":
        return f"52 per-feature tables ({dims}) coalesced into 2 {table}s of {rows:,} ids{bound}"
    return f"52 per-feature {table}s ({dims}) of {rows:,} ids{bound}"


def describe(args: argparse.Namespace, trainer: Trainer, world: World, rows: int) -> str:
    across = f" over {world.size} ranks ({dist.get_backend()})" if world.distributed else ""
    if args.baseline:
        sparse = f"nn.EmbeddingBag of {rows:,} rows (ids hashed modulo its size) + torch.optim.SparseAdam"
    else:
        optimizer = type(trainer.sparse_opt.optimizer if world.distributed else trainer.sparse_opt).__name__
        sparse = f"EmbeddingEngine, {describe_tables(args, world, rows)} + {optimizer}" + (
            " (ShardedOptimizer)" if world.distributed else ""
        )
    dense = type(trainer.dense_opt).__name__ + (" (DDP)" if world.distributed else "")
    return f"DeepFM{across}: {sparse}, dense part {dense}"


def draw_plot(csv_path: str, png_path: Path, title: str, unavailable: str | None) -> list[Path]:
    """``[png_path]`` once the plot is drawn; ``[]`` if matplotlib was missing at start or drawing
    failed (warned): the plot is optional, and a finished run is never lost to it."""
    if unavailable is not None:
        return []
    try:
        metrics.plot(csv_path, str(png_path), title)
    except Exception as error:
        print(f"warning: no plot.png ({type(error).__name__}: {error}); {csv_path} holds the metrics", file=sys.stderr)
        return []
    return [png_path]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    world = init_world()
    train(args, world)
    if world.distributed:
        # DDP and the tables hold the process group. Freeing them first lets destroying it
        # join gloo's worker threads now; a worker still alive when Python finalizes can
        # abort the process ("terminate called without an active exception").
        gc.collect()
        dist.destroy_process_group()


def train(args: argparse.Namespace, world: World) -> None:
    """Build, resume, train, evaluate, checkpoint and report: the whole run on this rank."""
    out_dir = Path(args.out_dir)
    checkpoints = out_dir / "checkpoints"
    no_plot = metrics.plotting_unavailable() if world.rank == 0 else None
    if no_plot is not None:
        print(f"warning: matplotlib does not import ({no_plot}): training goes on, no plot.png", file=sys.stderr)
    trainer = build(args, world)
    data = TrainingData(args, world)

    step, position, seconds_before = 0, None, 0.0
    if args.resume:
        extra = load(checkpoints, trainer, args)
        if extra is None:
            if world.rank == 0:
                print(f"no checkpoint in {checkpoints}: starting from scratch", file=sys.stderr)
        else:
            if args.data and extra.get("world_size") != world.size:
                saved = extra.get("world_size")
                raise SystemExit(f"the checkpoint read --data on {saved} ranks, this run has {world.size}")
            step, position, seconds_before = extra["step"], extra["data"], extra["seconds"]
    first_step = step
    data.start(position)
    csv = metrics.MetricsCSV(str(out_dir / "metrics.csv"), step if args.resume else None) if world.rank == 0 else None

    running = metrics.RunningMetrics(window=20)
    bar = tqdm(total=args.steps, initial=step, desc="train", mininterval=1.0, disable=world.rank != 0)
    interval = [0, 0.0]  # samples and training seconds since the last log row
    run_samples, run_seconds, run_cpu_seconds, saved_step = 0, 0.0, 0.0, None

    def log(test_auc: float | None) -> None:
        table = trainer.model.sparse.counters()  # a collective for a sharded table: every rank calls it
        if world.rank != 0:
            return
        rss_mb = metrics.resident_mb()
        throughput = interval[0] / interval[1] if interval[1] else math.nan
        csv.write(
            step=step,
            samples=data.position()["samples"],  # so far, all ranks (also across a resume at another world size)
            seconds=seconds_before + run_seconds,
            loss=running.loss(),
            train_auc=running.auc(),
            test_auc=test_auc,
            samples_per_s=throughput,
            lr_sparse=trainer.sparse_opt.param_groups[0]["lr"],
            lr_dense=trainer.dense_opt.param_groups[0]["lr"],
            rows=table["rows"],
            evicted=table["evicted"],
            rss_mb=rss_mb,
        )
        bar.set_postfix(
            loss=f"{running.loss():.4f}",
            auc=f"{running.auc():.4f}",
            samples_s=f"{throughput:,.0f}",
            rows=f"{table['rows']:,}",
            evicted=f"{table['evicted']:,}",
        )
        interval[:] = [0, 0.0]

    def position_now() -> dict:
        return {"step": step, "seconds": seconds_before + run_seconds, "world_size": world.size}

    stop_at = step + args.stop_after if args.stop_after is not None else None
    while (args.steps is None or step < args.steps) and step != stop_at:
        started, cpu_started = time.perf_counter(), time.process_time()
        micro_batches = [data.next() for _ in range(args.grad_accum)]
        complete = all(batch is not None for batch in micro_batches)
        if not data.endless and not all_agree(complete, world):  # a rank's part ran out: all stop together
            break
        micro_batches = [batch.to(world.device) for batch in micro_batches]
        set_learning_rates(trainer, lr_factor(step, args.warmup_steps, args.steps, args.min_lr_ratio))
        logits = train_step(trainer, micro_batches, args)
        step += 1
        elapsed = time.perf_counter() - started
        samples = sum(len(batch) for batch in micro_batches) * world.size
        run_samples, run_seconds = run_samples + samples, run_seconds + elapsed
        run_cpu_seconds += time.process_time() - cpu_started
        interval[0], interval[1] = interval[0] + samples, interval[1] + elapsed
        bar.update(1)
        if world.rank == 0:
            labels = micro_batches[-1].labels
            loss = nn.functional.binary_cross_entropy_with_logits(logits[-1], labels).item()
            running.add(loss, logits[-1], labels)

        if step in (args.steps, stop_at):
            break  # the final evaluation and checkpoint follow the loop
        if args.eval_every and step % args.eval_every == 0:
            log(held_out_auc(trainer, data, world)[0])
        elif step % args.log_every == 0:
            log(None)
        if args.checkpoint_every and step % args.checkpoint_every == 0:
            save(checkpoints, trainer, {**position_now(), "data": data.position()}, args)
            saved_step = step
    bar.close()

    test_auc, planted = held_out_auc(trainer, data, world)
    if step > first_step:
        log(test_auc)
    if args.checkpoint_every and saved_step != step and step > first_step:
        save(checkpoints, trainer, {**position_now(), "data": data.position()}, args)
        saved_step = step
    rows = trainer.model.sparse.num_rows()
    cores = cores_per_rank(run_cpu_seconds, run_seconds, world)
    if world.rank == 0:
        title = describe(args, trainer, world, rows)
        written = [csv.path, *draw_plot(csv.path, out_dir / "plot.png", title, no_plot)]
        print(title)
        print(
            f"trained steps {first_step}-{step} ({run_samples:,} samples) in {run_seconds:.1f} s: "
            f"{run_samples / max(run_seconds, 1e-9):,.0f} samples/s, {cores:.2f} CPU cores busy per rank"
        )
        if planted is not None:
            print(f"AUC of the planted model itself on the held-out set: {planted:.4f}")
        written += [f"{checkpoints}/"] if saved_step is not None else []
        print(f"wrote {', '.join(str(path) for path in written)}")
        print(f"test_auc: {test_auc:.4f}")


if __name__ == "__main__":
    main()
