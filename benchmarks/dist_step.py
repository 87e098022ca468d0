"""Sharded training step on gloo ranks (CPU) against its baselines: time and collective calls per step.

    python benchmarks/dist_step.py [--cases a b c d] [--repeats N]    # default: a b c d
    python benchmarks/dist_step.py --cases s                          # 1, 2 and 4 ranks, smaller table

Cases (each a measured step and its baseline; the ratio is measured / baseline, of the
medians and, as "paired", the median of the per-round ratios):
  a  ShardedHashTable + ShardedOptimizer(SparseAdamW) in a gloo world of ONE rank, against
     the plain step (HashTable forward + backward + SparseAdamW.step()) in the same process;
     2 threads; 1M x 64 fp32 rows present, 65,536 ids drawn at random from them.  Target <= 1.15.
  b  the same sharded step on 2 gloo ranks of 1 thread each (each rank half of the 65,536
     ids), against the plain one-process step on 2 threads (case a's baseline).  Target <= 1.5.
  c  the 2-rank recis step against TorchRec DistributedModelParallel on the same 2 ranks:
     an EmbeddingBagCollection of one 1M x 64 table (one id per bag), sharded column-wise
     (TorchRec refuses row-wise sharding on CPU), FBGEMM's fused EXACT_ADAGRAD update in
     backward (FBGEMM's CPU kernels have no Adam; EXACT_ADAGRAD keeps a full second moment,
     the closest), the same ids.  Target <= 0.6.  Also against EXACT_ROWWISE_ADAGRAD.
  d  26 ShardedHashTables of dims 8..64 (65,536 rows present each, 4,096 ids per table per
     step in all) with one ShardedOptimizer(SparseAdamW over all) on 2 ranks, against 26
     plain HashTables with one SparseAdamW in one process on 2 threads; once with a forward
     per table, once with one ``sharded_lookup`` over all 26 (one exchange of ids and rows).
  e  an EmbeddingEngine of 26 features (one table each, dims 8..64, 65,536 rows present
     each), one id per feature per sample, 8,192 samples per rank on 2 gloo ranks,
     forward + backward + ShardedOptimizer(SparseAdamW).step(), against TorchRec
     DistributedModelParallel over an EmbeddingBagCollection of the same 26 tables,
     sharded as TorchRec's planner chooses on CPU, FBGEMM's fused EXACT_ROWWISE_ADAGRAD
     (no Adam on CPU) applied in backward, the same ids.  Target <= 0.8.  Also with the
     engine's optimizer SparseRowWiseAdagrad, TorchRec's (no target): the same update rule.
  f  (not in the default) case e's engine and TorchRec steps at 16 samples per rank: what a step
     costs whatever the batch (per-table work, collectives).
  s  (not in the default) the sharded step on 1, 2 and 4 ranks sharing the 2 cores, one table
     of 262,144 x 64 rows, a global batch of 16,384 ids; ratio against 1 rank.

On a machine that other jobs load, the one-process world on 2 threads suffers most (its
threads wait for each other in every parallel region); ``--threads 1`` sets it to 1 thread
(case b then no longer compares with its stated baseline).

How: every variant runs in its own long-lived processes (a "world": 1 process with 2 threads
(--threads), or 2 or 4 spawned gloo ranks of 1 thread, on 127.0.0.1 through a file store), built once,
rows filled before timing. The parent holds no table; it runs rounds, and in each round asks
every variant, in turns, for one step, so that a drift of this noisy machine hits all alike.
A step of a world is timed on each rank from a barrier to the end of its update; the step's
time is that of the slowest rank. The first --warmup rounds are not counted. Every round
draws a fresh global batch of ids (seeded, the same for all variants; each rank takes its
consecutive share). Collectives are counted by wrapping the torch.distributed functions in
each rank (benchmarks/collectives.py), separately for forward, backward and the update;
the table shows rank 0's calls in the last round (every rank makes the same calls), and
the MB all ranks sent to other ranks in that step (all-to-all and all-gather payloads).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import queue
import statistics
import subprocess
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

try:
    from collectives import CollectiveCounter  # run as a script: benchmarks/ is on sys.path
except ImportError:  # imported as benchmarks.dist_step
    from benchmarks.collectives import CollectiveCounter

PHASES = ("forward", "backward", "update")
TIMEOUT_S = 180  # a rank that does not answer within this ends the run (a hang is a bug)
DIMS_26 = (8, 16, 24, 32, 40, 48, 56, 64, 8, 16, 24, 32, 40, 48, 56, 64, 8, 16, 32, 64, 8, 16, 32, 64, 16, 32)


@dataclass(frozen=True)
class Workload:
    """Tables of ``rows`` present ids each (drawn from int64 at random) and ``batch`` global ids per table per step."""

    rows: int
    dims: tuple[int, ...]
    batch: int
    seed: int


WORKLOADS = {
    "one_table": Workload(rows=1_000_000, dims=(64,), batch=65_536, seed=1),
    "26_tables": Workload(rows=65_536, dims=DIMS_26, batch=4_096, seed=2),
    "small": Workload(rows=262_144, dims=(64,), batch=16_384, seed=3),
    "engine_26": Workload(rows=65_536, dims=DIMS_26, batch=16_384, seed=4),  # 8,192 samples per rank on 2
    "engine_26_tiny": Workload(rows=65_536, dims=DIMS_26, batch=32, seed=4),  # 16 per rank: the fixed cost
}


# ============================================================================ inside a rank
def vocabulary(workload: Workload, table: int) -> torch.Tensor:
    """The ids present in ``table`` (random int64, distinct), the same in every process."""
    generator = torch.Generator().manual_seed(workload.seed * 1000 + table)
    return torch.randint(-(2**63), 2**63 - 1, (workload.rows,), generator=generator).unique()


def positions(workload: Workload, table: int, round_index: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's share of the round's global batch, as positions in the table's vocabulary."""
    generator = torch.Generator().manual_seed(workload.seed * 1_000_003 + round_index * 1000 + table)
    drawn = torch.randint(0, workload.rows, (workload.batch,), generator=generator)
    share = workload.batch // world_size
    return drawn[rank * share : (rank + 1) * share]


class Step:
    """One variant's training step on this rank: ``prepare`` is untimed, the phases are timed."""

    def prepare(self, round_index: int) -> None:
        raise NotImplementedError

    def forward(self) -> torch.Tensor:
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def update(self) -> None:
        pass


class RecisStep(Step):
    """recis tables (plain ``HashTable`` or ``ShardedHashTable``) and one SparseAdamW over all of them.

    Loss: the sum over tables of the mean squared looked-up value. Rows are filled with
    ``reserve`` then ``assign`` of small random values: this rank assigns the ids
    ``vocabulary[rank::world_size]`` (a sharded table sends them to their owners).
    """

    def __init__(self, workload: Workload, sharded: bool, rank: int, world_size: int, grouped: bool = False) -> None:
        from recis.dist import ShardedHashTable, ShardedOptimizer, sharded_lookup
        from recis.nn.modules.hashtable import HashTable
        from recis.optim import SparseAdamW

        self.workload, self.rank, self.world_size = workload, rank, world_size
        make = ShardedHashTable if sharded else HashTable
        self.tables = [make(dim, name=f"t{t}") for t, dim in enumerate(workload.dims)]
        self.vocabularies = [vocabulary(workload, t) for t in range(len(self.tables))]
        owned = workload.rows if world_size == 1 else int(workload.rows / world_size * 1.02) + 1024
        chunks = -(-workload.rows // (262_144 * world_size))  # the same count on every rank
        for table, vocab in zip(self.tables, self.vocabularies):
            _fill(table, vocab[rank::world_size], owned, chunks)
        optimizer = SparseAdamW(self.tables, lr=1e-3, weight_decay=1e-4)
        self.optimizer = ShardedOptimizer(optimizer) if sharded else optimizer
        self.ids: list[torch.Tensor] = []
        self.grouped_lookup = sharded_lookup if grouped else None

    def prepare(self, round_index: int) -> None:
        self.ids = [
            vocab[positions(self.workload, t, round_index, self.rank, self.world_size)]
            for t, vocab in enumerate(self.vocabularies)
        ]
        self.optimizer.zero_grad()

    def forward(self) -> torch.Tensor:
        if self.grouped_lookup is not None:  # all tables in one exchange of ids and one of rows
            return sum(rows.square().mean() for rows in self.grouped_lookup(self.tables, self.ids))
        return sum(table(ids).square().mean() for table, ids in zip(self.tables, self.ids))

    def update(self) -> None:
        self.optimizer.step()


class EngineStep(Step):
    """``recis.nn.EmbeddingEngine``: one feature per table, one id per feature per sample, pooled
    ("sum" of one row); tables sharded over the ranks; ShardedOptimizer(SparseAdamW) over all,
    or with ``row_wise_adagrad`` ShardedOptimizer(SparseRowWiseAdagrad), TorchRec's optimizer."""

    def __init__(self, workload: Workload, rank: int, world_size: int, row_wise_adagrad: bool = False) -> None:
        from recis.dist import ShardedOptimizer
        from recis.nn import EmbeddingEngine, EmbeddingOption
        from recis.optim import SparseAdamW, SparseRowWiseAdagrad

        self.workload, self.rank, self.world_size = workload, rank, world_size
        options = {
            f"f{t}": EmbeddingOption(embedding_dim=dim, shared_name=f"t{t}") for t, dim in enumerate(workload.dims)
        }
        self.engine = EmbeddingEngine(options)
        self.vocabularies = [vocabulary(workload, t) for t in range(len(workload.dims))]
        owned = int(workload.rows / world_size * 1.02) + 1024
        chunks = -(-workload.rows // (262_144 * world_size))
        for t, vocab in enumerate(self.vocabularies):
            _fill(self.engine.table_of(f"f{t}"), vocab[rank::world_size], owned, chunks)
        tables = list(self.engine.tables().values())
        optimizer = (
            SparseRowWiseAdagrad(tables, lr=1e-3)
            if row_wise_adagrad
            else SparseAdamW(tables, lr=1e-3, weight_decay=1e-4)
        )
        self.optimizer = ShardedOptimizer(optimizer)
        self.samples: dict[str, torch.Tensor] = {}

    def prepare(self, round_index: int) -> None:
        self.samples = {
            f"f{t}": vocab[positions(self.workload, t, round_index, self.rank, self.world_size)].reshape(-1, 1)
            for t, vocab in enumerate(self.vocabularies)
        }
        self.optimizer.zero_grad()

    def forward(self) -> torch.Tensor:
        return sum(pooled.square().mean() for pooled in self.engine(self.samples).values())

    def update(self) -> None:
        self.optimizer.step()


class TorchRecCollectionStep(Step):
    """TorchRec DistributedModelParallel over an EmbeddingBagCollection of the workload's tables
    (one feature each, one id per bag), sharded by TorchRec's planner, FBGEMM's fused ``optimizer``
    applied in backward (no update phase). Ids are positions in each table, as in ``TorchRecStep``."""

    def __init__(self, workload: Workload, optimizer: str, rank: int, world_size: int) -> None:
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
        from torchrec.distributed import DistributedModelParallel
        from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
        from torchrec.distributed.types import ShardingEnv

        self.workload, self.rank, self.world_size = workload, rank, world_size
        configs = [
            EmbeddingBagConfig(name=f"t{t}", embedding_dim=dim, num_embeddings=workload.rows, feature_names=[f"f{t}"])
            for t, dim in enumerate(workload.dims)
        ]
        module = _Sparse(EmbeddingBagCollection(tables=configs, device=torch.device("meta")))
        sharder = EmbeddingBagCollectionSharder(
            fused_params={"optimizer": EmbOptimType[optimizer], "learning_rate": 1e-3}
        )
        self.model = DistributedModelParallel(
            module, env=ShardingEnv.from_process_group(dist.group.WORLD), device=torch.device("cpu"), sharders=[sharder]
        )
        self.features = None

    def prepare(self, round_index: int) -> None:
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        tables = range(len(self.workload.dims))
        values = torch.cat([positions(self.workload, t, round_index, self.rank, self.world_size) for t in tables])
        lengths = torch.ones(values.numel(), dtype=torch.int32)
        self.features = KeyedJaggedTensor(keys=[f"f{t}" for t in tables], values=values, lengths=lengths)

    def forward(self) -> torch.Tensor:
        return self.model(self.features).values().square().mean()


def _fill(table: torch.nn.Module, ids: torch.Tensor, expected_rows: int, chunks: int) -> None:
    """Insert ``ids`` with random values in [-0.01, 0.01), in chunks (collective for a sharded table).

    ``assign`` rather than a forward without gradient: here 1M rows of dim 64 took 3.1 s by
    assign and 12-14 s by forward, which computes each new row's initial value from (seed, id).
    """
    table.reserve(expected_rows)
    generator = torch.Generator().manual_seed(len(ids))
    for chunk in ids.tensor_split(chunks):
        table.assign(chunk, (torch.rand(chunk.numel(), table.embedding_dim, generator=generator) - 0.5) * 0.02)


class TorchRecStep(Step):
    """TorchRec DistributedModelParallel over an EmbeddingBagCollection of one table, one id per bag.

    Column-wise sharding over all ranks (each rank holds all rows, dim / world_size columns),
    FBGEMM's fused ``optimizer`` (an EmbOptimType name) applied in backward: no update phase.
    FBGEMM's CPU kernels have no Adam (ADAM, PARTIAL_ROWWISE_ADAM, LAMB assert "not supported
    in CPU mode"); EXACT_ADAGRAD, with a full per-element second moment, is the closest.
    Ids are positions 0..rows-1, the same positions the recis variant maps to its int64 ids.
    """

    def __init__(self, workload: Workload, optimizer: str, rank: int, world_size: int) -> None:
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
        from torchrec.distributed import DistributedModelParallel
        from torchrec.distributed.embedding_types import EmbeddingComputeKernel
        from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
        from torchrec.distributed.sharding_plan import column_wise, construct_module_sharding_plan
        from torchrec.distributed.types import ShardingEnv, ShardingPlan

        self.workload, self.rank, self.world_size = workload, rank, world_size
        (dim,) = workload.dims
        config = EmbeddingBagConfig(name="t0", embedding_dim=dim, num_embeddings=workload.rows, feature_names=["f0"])
        module = _Sparse(EmbeddingBagCollection(tables=[config], device=torch.device("meta")))
        fused = {"optimizer": EmbOptimType[optimizer], "learning_rate": 1e-3}
        sharder = EmbeddingBagCollectionSharder(fused_params=fused)
        plan = construct_module_sharding_plan(
            module.ebc,
            {"t0": column_wise(ranks=list(range(world_size)), compute_kernel=EmbeddingComputeKernel.FUSED.value)},
            local_size=world_size,
            world_size=world_size,
            device_type="cpu",
            sharder=sharder,
        )
        self.model = DistributedModelParallel(
            module,
            env=ShardingEnv.from_process_group(dist.group.WORLD),
            device=torch.device("cpu"),
            plan=ShardingPlan({"ebc": plan}),
            sharders=[sharder],
        )
        self.features = None

    def prepare(self, round_index: int) -> None:
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        values = positions(self.workload, 0, round_index, self.rank, self.world_size)
        lengths = torch.ones(values.numel(), dtype=torch.int32)
        self.features = KeyedJaggedTensor(keys=["f0"], values=values, lengths=lengths)

    def forward(self) -> torch.Tensor:
        return self.model(self.features).values().square().mean()


class _Sparse(torch.nn.Module):
    """The sparse part of a model: what DistributedModelParallel wraps and shards."""

    def __init__(self, ebc: torch.nn.Module) -> None:
        super().__init__()
        self.ebc = ebc

    def forward(self, features: object) -> object:
        return self.ebc(features)


VARIANTS: dict[str, Callable[[int, int], Step]] = {
    "plain_1M": lambda rank, size: RecisStep(WORKLOADS["one_table"], False, rank, size),
    "sharded_1M": lambda rank, size: RecisStep(WORKLOADS["one_table"], True, rank, size),
    "torchrec_adagrad_1M": lambda rank, size: TorchRecStep(WORKLOADS["one_table"], "EXACT_ADAGRAD", rank, size),
    "torchrec_rowwise_1M": lambda rank, size: TorchRecStep(WORKLOADS["one_table"], "EXACT_ROWWISE_ADAGRAD", rank, size),
    "plain_26": lambda rank, size: RecisStep(WORKLOADS["26_tables"], False, rank, size),
    "sharded_26": lambda rank, size: RecisStep(WORKLOADS["26_tables"], True, rank, size),
    "grouped_26": lambda rank, size: RecisStep(WORKLOADS["26_tables"], True, rank, size, grouped=True),
    "sharded_small": lambda rank, size: RecisStep(WORKLOADS["small"], True, rank, size),
    "engine_26": lambda rank, size: EngineStep(WORKLOADS["engine_26"], rank, size),
    "engine_26_rowwise": lambda rank, size: EngineStep(WORKLOADS["engine_26"], rank, size, row_wise_adagrad=True),
    "torchrec_ebc_26": lambda rank, size: TorchRecCollectionStep(
        WORKLOADS["engine_26"], "EXACT_ROWWISE_ADAGRAD", rank, size
    ),
    "engine_26_tiny": lambda rank, size: EngineStep(WORKLOADS["engine_26_tiny"], rank, size),
    "torchrec_ebc_26_tiny": lambda rank, size: TorchRecCollectionStep(
        WORKLOADS["engine_26_tiny"], "EXACT_ROWWISE_ADAGRAD", rank, size
    ),
}


def run_step(step: Step, round_index: int, counter: CollectiveCounter) -> dict:
    """Time one step (barrier, then forward, backward, update) and count its collectives per phase."""
    step.prepare(round_index)
    dist.barrier()
    counter.take()
    counter.take_bytes()
    calls = {}
    start = time.perf_counter()
    loss = step.forward()
    calls["forward"] = counter.take()
    step.backward(loss)
    calls["backward"] = counter.take()
    step.update()
    calls["update"] = counter.take()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "calls": calls, "bytes": counter.take_bytes()}


def rank_main(rank: int, world: WorldSpec, store: str, commands: mp.Queue, results: mp.Queue) -> None:
    """A rank: join the world's gloo group, build its variants, then run steps on command."""
    try:
        torch.set_num_threads(world.threads)
        timeout = datetime.timedelta(seconds=TIMEOUT_S)
        store_url = f"file://{store}"
        dist.init_process_group("gloo", init_method=store_url, rank=rank, world_size=world.size, timeout=timeout)
        counter = CollectiveCounter.install()
        steps = {name: VARIANTS[name](rank, world.size) for name in world.variants}
        results.put((rank, "ready", None))
        while (command := commands.get(timeout=3600)) is not None:
            name, round_index = command
            results.put((rank, "step", run_step(steps[name], round_index, counter)))
        del steps
        dist.destroy_process_group()
    except BaseException:  # the parent raises it: no rank waits for a dead peer until a timeout
        results.put((rank, "error", traceback.format_exc()))


# ============================================================================ the parent
@dataclass
class WorldSpec:
    """``size`` ranks of ``threads`` torch threads each, holding ``variants``."""

    name: str
    size: int
    threads: int
    variants: list[str] = field(default_factory=list)


class World:
    """Spawned ranks that build their variants once and then run one step per command."""

    def __init__(self, spec: WorldSpec, directory: str) -> None:
        context = mp.get_context("spawn")
        self.spec = spec
        self.results = context.Queue()
        self.commands = [context.Queue() for _ in range(spec.size)]
        store = os.path.join(directory, f"store_{spec.name}")
        self.processes = [
            context.Process(target=rank_main, args=(rank, spec, store, self.commands[rank], self.results), daemon=True)
            for rank in range(spec.size)
        ]
        for process in self.processes:
            process.start()

    def wait_ready(self) -> None:
        self._collect("ready")

    def step(self, variant: str, round_index: int) -> tuple[float, dict]:
        """Seconds of the slowest rank, and {"calls": rank 0's collective calls per phase,
        "bytes": bytes all ranks sent to others} of one step."""
        for commands in self.commands:
            commands.put((variant, round_index))
        answers = self._collect("step")
        traffic = {"calls": answers[0]["calls"], "bytes": sum(answer["bytes"] for answer in answers)}
        return max(answer["seconds"] for answer in answers), traffic

    def _collect(self, kind: str) -> list:
        """Every rank's answer of ``kind``; raises if a rank failed, died or took over TIMEOUT_S."""
        answers: list = [None] * self.spec.size
        for _ in range(self.spec.size):
            rank, got, payload = self._next_answer()
            if got == "error":
                raise RuntimeError(f"world {self.spec.name}, rank {rank} failed:\n{payload}")
            assert got == kind, (got, kind)
            answers[rank] = payload
        return answers

    def _next_answer(self) -> tuple[int, str, object]:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                return self.results.get(timeout=1.0)
            except queue.Empty:
                dead = [rank for rank, process in enumerate(self.processes) if process.exitcode is not None]
                if dead:
                    raise RuntimeError(f"world {self.spec.name}: rank {dead[0]} ended without answering") from None
        raise RuntimeError(f"world {self.spec.name}: no answer in {TIMEOUT_S} s")

    def close(self) -> None:
        for commands in self.commands:
            commands.put(None)
        for process in self.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()


@dataclass(frozen=True)
class Case:
    """A measured variant on a world, its baseline, and the project's target for their ratio."""

    name: str
    measured: tuple[str, str]  # (world, variant)
    baseline: tuple[str, str]
    target: float | None
    what: str


CASES = {
    "a": [Case("a", ("1", "sharded_1M"), ("1", "plain_1M"), 1.15, "sharded, world of 1 vs plain")],
    "b": [Case("b", ("2", "sharded_1M"), ("1", "plain_1M"), 1.5, "sharded, 2 ranks vs plain, 1 process")],
    "c": [
        Case("c", ("2", "sharded_1M"), ("2", "torchrec_adagrad_1M"), 0.6, "recis vs TorchRec, Adagrad"),
        Case("c", ("2", "sharded_1M"), ("2", "torchrec_rowwise_1M"), None, "recis vs TorchRec, row-wise Adagrad"),
    ],
    "d": [
        Case("d", ("2", "sharded_26"), ("1", "plain_26"), None, "26 tables: 2 ranks vs plain, 1 process"),
        Case("d", ("2", "grouped_26"), ("1", "plain_26"), None, "26 tables, sharded_lookup: 2 ranks vs plain"),
    ],
    "e": [
        Case("e", ("2", "engine_26"), ("2", "torchrec_ebc_26"), 0.8, "EmbeddingEngine, 26 features vs TorchRec EBC"),
        Case("e", ("2", "engine_26_rowwise"), ("2", "torchrec_ebc_26"), None, "the same, both row-wise Adagrad"),
    ],
    "f": [Case("f", ("2", "engine_26_tiny"), ("2", "torchrec_ebc_26_tiny"), None, "case e at 16 samples per rank")],
    "s": [
        Case("s", ("2", "sharded_small"), ("1", "sharded_small"), None, "262k rows: 2 ranks vs 1"),
        Case("s", ("4", "sharded_small"), ("1", "sharded_small"), None, "262k rows: 4 ranks vs 1"),
    ],
}


def plan(cases: list[Case], threads: int) -> tuple[dict[str, WorldSpec], list[tuple[str, str]]]:
    """The worlds to start and the (world, variant) steps of one round, each once, in a fixed order.

    A world is named by its ranks; one rank runs ``threads`` threads, several ranks 1 each.
    """
    runs: list[tuple[str, str]] = []
    for case in cases:
        for run in (case.baseline, case.measured):
            if run not in runs:
                runs.append(run)
    specs: dict[str, WorldSpec] = {}
    for world, variant in runs:
        size = int(world)
        specs.setdefault(world, WorldSpec(world, size, threads if size == 1 else 1)).variants.append(variant)
    return specs, runs


def measure(cases: list[Case], repeats: int, warmup: int, threads: int) -> tuple[dict, dict]:
    """Step seconds per (world, variant) over the counted rounds, and each one's calls and bytes in the last round."""
    specs, runs = plan(cases, threads)
    times: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
    calls: dict[tuple[str, str], dict] = {}
    with tempfile.TemporaryDirectory() as directory:
        worlds = {name: World(spec, directory) for name, spec in specs.items()}
        try:
            for world in worlds.values():
                world.wait_ready()
            for round_index in range(warmup + repeats):
                for world, variant in runs:
                    seconds, calls[(world, variant)] = worlds[world].step(variant, round_index)
                    if round_index >= warmup:
                        times[(world, variant)].append(seconds)
        finally:
            for world in worlds.values():
                world.close()
    return times, calls


# ============================================================================ the report
def _command(*command: str) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> str:
    """CPU model, CPUs and cores (lscpu), load average, torch version, recis commit."""
    lscpu = dict(line.split(":", 1) for line in _command("lscpu").splitlines() if ":" in line)
    model = lscpu.get("Model name", platform.processor() or platform.machine()).strip()
    cores = int(lscpu.get("Core(s) per socket", "0") or 0) * int(lscpu.get("Socket(s)", "1") or 1)
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    here = os.path.dirname(os.path.abspath(__file__))
    commit = _command("git", "-C", here, "describe", "--always", "--dirty") or "unknown"
    return (
        f"{model}, {os.cpu_count()} CPUs, {cores or '?'} cores (load average {load}); "
        f"torch {torch.__version__}; recis {commit}"
    )


def without_missing_peers(cases: list[Case]) -> list[Case]:
    """The cases whose variants can run here: TorchRec's need torchrec and fbgemm_gpu (benchmarks/requirements.txt)."""
    if importlib.util.find_spec("torchrec") and importlib.util.find_spec("fbgemm_gpu"):
        return cases
    print("torchrec or fbgemm_gpu not installed: no TorchRec cases (see benchmarks/requirements.txt)")
    return [case for case in cases if not any(v.startswith("torchrec") for _, v in (case.baseline, case.measured))]


def calls_text(phases: dict[str, Counter]) -> str:
    """``forward / backward / update`` call totals, e.g. ``4 / 0 / 3``."""
    return " / ".join(str(sum(phases[phase].values())) for phase in PHASES)


def world_label(world: str, threads: int) -> str:
    """``ranks x threads per rank``, e.g. ``1x2``, ``2x1``."""
    return f"{world}x{threads if world == '1' else 1}"


def report(cases: list[Case], times: dict, calls: dict, threads: int) -> list[str]:
    """Markdown rows: every case's baseline and measured run.

    ratio: median of the measured run over median of the baseline. paired: the median over
    rounds of measured / baseline within the same round (neighbours in time, so less hit
    by a load that changes between rounds).
    """
    lines = [
        "| case | what | ranks x threads | variant | median ms | min-max ms | ratio | paired | target "
        "| collectives fwd / bwd / update | MB sent |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        base = times[case.baseline]
        for run in (case.baseline, case.measured):
            ours, measured = times[run], run == case.measured
            ratio = f"{statistics.median(ours) / statistics.median(base):.2f}x" if measured else "1"
            paired = f"{statistics.median(a / b for a, b in zip(ours, base)):.2f}x" if measured else ""
            target = f"<= {case.target}x" if case.target and measured else ""
            spread = f"{min(ours) * 1e3:.1f}-{max(ours) * 1e3:.1f}"
            world, variant = run
            lines.append(
                f"| {case.name} | {case.what if measured else 'baseline'} | {world_label(world, threads)} | {variant} "
                f"| {statistics.median(ours) * 1e3:.1f} | {spread} | {ratio} | {paired} | {target} "
                f"| {calls_text(calls[run]['calls'])} | {calls[run]['bytes'] / 1e6:.2f} |"
            )
    return lines


def _by_name(calls: Counter) -> str:
    return ", ".join(f"{name} {count}" for name, count in sorted(calls.items()))


def call_details(calls: dict, threads: int) -> list[str]:
    """Per-phase collective calls by name for every run that made any."""
    lines = []
    for (world, variant), traffic in calls.items():
        phases = traffic["calls"]
        parts = [f"{phase}: {_by_name(phases[phase])}" for phase in PHASES if phases[phase]]
        if parts:
            lines.append(f"- {world_label(world, threads)} {variant}: " + "; ".join(parts))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=["a", "b", "c", "d"])
    parser.add_argument("--repeats", type=int, default=15, help="counted rounds (every variant steps once per round)")
    parser.add_argument("--warmup", type=int, default=6, help="rounds run first and not counted")
    parser.add_argument("--threads", type=int, default=2, help="threads of the one-process world (ranks: 1 each)")
    args = parser.parse_args()
    cases = without_missing_peers([case for name in args.cases for case in CASES[name]])
    print(f"machine: {machine()}")
    started = time.perf_counter()
    times, calls = measure(cases, args.repeats, args.warmup, args.threads)
    seconds = time.perf_counter() - started
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"{args.repeats} counted rounds after {args.warmup} warm-up rounds; {seconds:.0f} s; load average {load}\n")
    print("\n".join(report(cases, times, calls, args.threads)))
    details = call_details(calls, args.threads)
    if details:
        print("\ncollective calls per step, rank 0, by name:\n" + "\n".join(details))


if __name__ == "__main__":
    main()
