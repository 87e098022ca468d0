"""Speed of the sparse update path against the memory floor, torch and FBGEMM (CPU).

    python benchmarks/sparse_update.py [--quick] [--plot benchmarks/sparse_update.png]

Setting: 2 threads, float32, rows of dim 64, batches of 65,536 random int64 ids. Each
figure is the median of repeated runs after warm-up. Cases:
  floor            a kernel (benchmarks/native/memory_floor.cpp) that only reads and writes the
                   touched rows of weight, exp_avg and exp_avg_sq once; for the step, run
                   on the table's own weight and slots, over the rows the step updates
  adamw-step       recis SparseAdamW.step() on a 1M-row HashTable (native and torch
                   kernels; native also with RECIS_HUGE_PAGES=0, on 4 KiB pages)
  torch-sparseadam torch.optim.SparseAdam.step() on nn.Embedding(sparse=True), as torch
                   allocates, and with THP_MEM_ALLOC_ENABLE=1 (torch on huge pages)
  train-step       find-or-insert, gather, backward, SparseAdamW update (recis), against
                   FBGEMM's CPU fused backward+update with EXACT_ROWWISE_ADAGRAD on a
                   fixed 1M-row table (forward + backward); each step draws a fresh batch,
                   uniform over the rows, inside the timing (as the recis train step does)
  scaling          native update kernel and floor against touched rows and table size
  id-map           find-or-insert (find, then insert the absent ids, as a HashTable does)
                   of 65,536 distinct ids, half new, into a 1M-id map
Effective GB/s counts the floor's bytes (touched rows x dim x 4 B x 3 tensors x 2).
Each backend runs in its own process (RECIS_BACKEND set for the whole process).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

DIM = 64
BATCH = 65_536
TABLE_ROWS = 1_000_000
THREADS = 2


def median_ms(run: Callable[[], None], prepare: Callable[[], None] | None = None, repeats: int = 15) -> float:
    """Median wall time of ``run`` in ms, after 3 warm-ups; ``prepare`` runs untimed before each."""
    return interleaved_medians_ms({"run": (prepare, run)}, repeats)["run"]


def interleaved_medians_ms(cases: dict[str, tuple[Callable[[], None] | None, Callable[[], None]]],
                           repeats: int = 15) -> dict[str, float]:  # fmt: skip
    """Median wall time in ms of each case's run, the cases timed in turns after 3 warm-up
    rounds, so that a drift of the machine (this VM's memory bandwidth and shared L3 vary)
    hits all of them alike. A case is ``(prepare, run)``; ``prepare`` runs untimed first."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for index in range(repeats + 3):
        for name, (prepare, run) in cases.items():
            if prepare is not None:
                prepare()
            start = time.perf_counter()
            run()
            if index >= 3:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def floor_bytes(touched: int) -> int:
    return touched * DIM * 4 * 3 * 2


def load_memory_floor() -> None:
    """Compile (once, cached by torch) and load the floor kernel: ``torch.ops.recis.memory_floor``."""
    from pathlib import Path

    from torch.utils.cpp_extension import load

    here = Path(__file__).resolve().parent
    source, include = here / "native" / "memory_floor.cpp", here.parent / "csrc" / "cpu"
    load(name="recis_memory_floor", sources=[str(source)], extra_include_paths=[str(include)], extra_cflags=["-O3"],
         is_python_module=False)  # fmt: skip


# ---------------------------------------------------------------------- workers (one backend each)
def _random_ids(generator, count: int):
    import torch

    return torch.randint(-(2**63), 2**63 - 1, (count,), dtype=torch.int64, generator=generator)


def _filled_table(generator):
    import torch

    from recis.nn.modules.hashtable import HashTable

    table = HashTable([DIM], name="bench")
    vocabulary = _random_ids(generator, TABLE_ROWS).unique()
    for chunk in vocabulary.split(262_144):
        table.assign(chunk, torch.zeros(chunk.numel(), DIM))
    return table, vocabulary


def worker_adamw_step(repeats: int, peers: bool) -> dict:
    """SparseAdamW.step and train steps; with ``peers``, timed in turns with the floor,
    torch.optim.SparseAdam and FBGEMM in this one process."""
    import torch

    from recis.ops import choose_backend
    from recis.optim import SparseAdamW

    native = choose_backend() == "native"
    if native:
        load_memory_floor()

    generator = torch.Generator().manual_seed(0)
    table, vocabulary = _filled_table(generator)
    optimizer = SparseAdamW([table], lr=1e-3)
    batch = vocabulary[torch.randint(0, vocabulary.numel(), (BATCH,), generator=generator)]

    def forward_backward() -> None:
        optimizer.zero_grad()
        table(batch).sum().backward()

    step_cases = {"step_ms": (forward_backward, optimizer.step)}
    if native:  # the floor after the same forward and backward
        step_cases["floor_ms"] = (forward_backward, _floor_on_own_memory(table, batch))
    if peers:  # nn.Embedding indexed by the rows the table gave the batch: the same access pattern
        step_cases["sparse_adam_ms"] = _torch_sparse_adam_case(table.store.find(batch))
    results = {"touched": int(batch.unique().numel()), **interleaved_medians_ms(step_cases, repeats)}

    stream = torch.Generator().manual_seed(1)
    mixed = [0.0]  # first the table's own ids (a fixed vocabulary, as FBGEMM's table)

    def _random_batch():
        return torch.where(
            torch.rand(BATCH, generator=stream) >= mixed[0],
            vocabulary[torch.randint(0, vocabulary.numel(), (BATCH,), generator=stream)],
            _random_ids(stream, BATCH),
        )

    def train_step() -> None:
        optimizer.zero_grad()
        table(_random_batch()).square().sum().backward()
        optimizer.step()

    train_cases = {"train_ms": (None, train_step), **(_fbgemm_cases() if peers else {})}
    results.update(interleaved_medians_ms(train_cases, repeats))
    mixed[0] = 0.5  # then arbitrary int64 ids: about half new to the table, inserted and initialized
    results["train_new_ms"] = median_ms(train_step, None, repeats)
    return results


def _floor_on_own_memory(table, batch) -> Callable[[], None]:
    """The floor on the table's own weight and slots, over the rows the step updates, in its order."""
    import torch

    step_rows = table.store.find(batch.unique())
    own_tables = (table.weight, table.slot("exp_avg"), table.slot("exp_avg_sq"))
    return lambda: torch.ops.recis.memory_floor(*own_tables, step_rows, 1.0)


def worker_id_map(repeats: int) -> dict:
    import torch

    from recis.ops import IdMap

    generator = torch.Generator().manual_seed(2)
    id_map = IdMap()
    present = _random_ids(generator, TABLE_ROWS).unique()
    id_map.insert_new(present)
    batches = []
    for _ in range(repeats + 3):
        old = present[torch.randint(0, present.numel(), (BATCH // 2,), generator=generator)].unique()
        new = _random_ids(generator, BATCH - old.numel())
        batches.append(torch.cat([old, new])[torch.randperm(BATCH, generator=generator)])
    pending = iter(batches)
    current: list = []

    def find_or_insert() -> None:
        ids = current[-1]
        rows = id_map.find(ids)
        absent = rows < 0
        rows[absent] = id_map.insert_new(ids[absent])

    return {"find_or_insert_ms": median_ms(find_or_insert, lambda: current.append(next(pending)), repeats)}


def worker_native_kernels(repeats: int, quick: bool) -> dict:
    """Floor and native update kernel against touched rows and table size (raw tensors)."""
    import torch

    from recis.ops.huge_pages import empty_rows
    from recis.ops.sparse_adam_update import EpsilonPlacement, WeightDecay

    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, decay=WeightDecay.DECOUPLED,
                 epsilon=EpsilonPlacement.CORRECTED, maximize=False)  # fmt: skip
    table_sizes = [1_000_000, 2_000_000] if quick else [1_000_000, 5_000_000, 10_000_000, 20_000_000]
    batches = [4_096, 16_384, 65_536, 262_144]
    results = []
    generator = torch.Generator().manual_seed(3)
    for table_rows in table_sizes:
        # Allocated as HashTable allocates (huge pages where allowed); pages are mapped
        # lazily, so only the touched rows' pages become resident.
        tables = [empty_rows((table_rows, DIM), dtype=torch.float32, device="cpu") for _ in range(3)]
        for batch in batches if table_rows == TABLE_ROWS else [BATCH]:
            rows = torch.randint(0, table_rows, (batch,), generator=generator).unique()
            rows = rows[torch.randperm(rows.numel(), generator=generator)]
            results.append({"table_rows": table_rows, "ids": batch,
                            **_time_kernels(tables, rows, generator, repeats, hyper)})  # fmt: skip
        del tables
    return {"scaling": results}


def _time_kernels(tables, rows, generator, repeats: int, hyper: dict) -> dict:
    import torch

    from recis.ops import native_kernels
    from recis.ops.native_library import load_native_library

    load_native_library()  # native_kernels is called directly here, not through the backend switch
    load_memory_floor()
    for tensor in tables:
        tensor[rows] = 0.01
    grad = torch.randn(rows.numel(), DIM, generator=generator)
    step = [0]

    def update() -> None:
        step[0] += 1
        native_kernels.sparse_adam_update(*tables, rows, grad, step=step[0], **hyper)

    floor = partial(torch.ops.recis.memory_floor, *tables, rows, 1.0)
    medians = interleaved_medians_ms({"floor_ms": (None, floor), "update_ms": (None, update)}, repeats)
    return {"touched": int(rows.numel()), **medians}


def _torch_sparse_adam_case(ids) -> tuple[Callable[[], None], Callable[[], None]]:
    """torch.optim.SparseAdam.step() on nn.Embedding(sparse=True) looked up at ``ids``: (prepare, run)."""
    import torch

    embedding = torch.nn.Embedding(TABLE_ROWS, DIM, sparse=True)
    optimizer = torch.optim.SparseAdam(embedding.parameters(), lr=1e-3)

    def forward_backward() -> None:
        optimizer.zero_grad()
        embedding(ids).sum().backward()

    return forward_backward, optimizer.step


def _fbgemm_cases() -> dict[str, tuple[None, Callable[[], None]]]:
    """FBGEMM's CPU forward + fused backward/update on a fixed 1M-row table, a fresh batch of
    positions each step (as the recis train step draws its ids); {} without fbgemm_gpu."""
    import torch

    try:
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice,
            SplitTableBatchedEmbeddingBagsCodegen,
        )
    except ImportError:
        print("fbgemm_gpu not installed: no FBGEMM rows (see benchmarks/requirements.txt)", file=sys.stderr)
        return {}
    stream = torch.Generator().manual_seed(1)
    offsets = torch.arange(BATCH + 1, dtype=torch.int64)  # one id per bag
    cases = {}
    for name, optimizer in (("rowwise_adagrad", EmbOptimType.EXACT_ROWWISE_ADAGRAD),
                            ("adagrad", EmbOptimType.EXACT_ADAGRAD)):  # fmt: skip
        tables = SplitTableBatchedEmbeddingBagsCodegen(
            [(TABLE_ROWS, DIM, EmbeddingLocation.HOST, ComputeDevice.CPU)],
            optimizer=optimizer,
            learning_rate=0.01,
            pooling_mode=PoolingMode.SUM,
        )

        def train_step(tables=tables) -> None:  # a fresh batch each step, drawn in the step, as recis's
            ids = torch.randint(0, TABLE_ROWS, (BATCH,), generator=stream)
            tables(ids, offsets).square().sum().backward()  # backward runs the fused update

        cases[f"fbgemm_{name}_ms"] = (None, train_step)
    return cases


WORKERS = {
    "adamw_step": lambda args: worker_adamw_step(args.repeats, peers=False),
    "adamw_step_with_peers": lambda args: worker_adamw_step(args.repeats, peers=True),
    "id_map": lambda args: worker_id_map(args.repeats),
    "native_kernels": lambda args: worker_native_kernels(args.repeats, args.quick),
}


def run_worker(name: str, backend: str, args: argparse.Namespace, **extra_env: str) -> dict:
    env = {**os.environ, "RECIS_BACKEND": backend, "OMP_NUM_THREADS": str(THREADS), **extra_env}
    command = [sys.executable, __file__, "--worker", name, "--repeats", str(args.repeats)]
    if args.quick:
        command.append("--quick")
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(f"[{name}/{backend} failed]\n{done.stderr[-2000:]}", file=sys.stderr)
        return {}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------- report
def gbps(touched: int, ms: float) -> float:
    return floor_bytes(touched) / (ms * 1e-3) / 1e9


def report(results: dict) -> list[list[str]]:
    native, reference = results["adamw_step/native"], results["adamw_step/torch"]
    floor_ms, touched = native["floor_ms"], native["touched"]  # the floor on the table's own memory
    small_pages, thp = (
        results.get("adamw_step/native, 4 KiB pages", {}),
        results.get("adamw_step/native, torch THP", {}),
    )
    rows = [["case", "backend", "table rows", "touched rows", "median ms", "eff. GB/s", "x floor", "vs peers"]]

    def add(case, backend, ms, peers="", table_rows=TABLE_ROWS, touched_rows=touched, floor=floor_ms):
        rows.append([case, backend, f"{table_rows:,}", f"{touched_rows:,}", f"{ms:.2f}",
                     f"{gbps(touched_rows, ms):.1f}", f"{ms / floor:.2f}", peers])  # fmt: skip

    def faster(peer_ms, ms, what):
        if ms > peer_ms:
            return f"{ms / peer_ms:.2f}x slower than {what}"
        return f"{peer_ms / ms:.2f}x faster than {what}"

    add("memory floor (table's own memory)", "native", floor_ms)
    step = native["step_ms"]
    add(
        "SparseAdamW.step",
        "native",
        step,
        f"{faster(reference['step_ms'], step, 'torch kernels')}; "
        f"{faster(native['sparse_adam_ms'], step, 'SparseAdam')}",
    )
    add("SparseAdamW.step", "torch", reference["step_ms"])
    add("torch.optim.SparseAdam.step (nn.Embedding)", "torch", native["sparse_adam_ms"])
    if small_pages:
        add("memory floor, RECIS_HUGE_PAGES=0", "native", small_pages["floor_ms"], floor=small_pages["floor_ms"])
        add(
            "SparseAdamW.step, RECIS_HUGE_PAGES=0",
            "native",
            small_pages["step_ms"],
            faster(small_pages["sparse_adam_ms"], small_pages["step_ms"], "SparseAdam"),
            floor=small_pages["floor_ms"],
        )
    if thp:
        add(
            "torch.optim.SparseAdam.step, THP_MEM_ALLOC_ENABLE=1",
            "torch",
            thp["sparse_adam_ms"],
            f"recis step {faster(thp['sparse_adam_ms'], thp['step_ms'], 'it')}",
            floor=thp["floor_ms"],
        )
    fbgemm = native.get("fbgemm_rowwise_adagrad_ms")
    add(
        "train step (insert+fwd+bwd+AdamW)",
        "native",
        native["train_ms"],
        faster(fbgemm, native["train_ms"], "FBGEMM rowwise Adagrad") if fbgemm else "",
    )
    add("train step (insert+fwd+bwd+AdamW)", "torch", reference["train_ms"])
    add("train step, half the ids new", "native", native["train_new_ms"])
    add("train step, half the ids new", "torch", reference["train_new_ms"])
    for name in ("rowwise_adagrad", "adagrad"):
        if f"fbgemm_{name}_ms" in native:
            add(f"FBGEMM fwd+bwd {name}", "fbgemm", native[f"fbgemm_{name}_ms"])
    for entry in results["native_kernels"]["scaling"]:
        add(
            f"update kernel ({entry['ids']:,} ids)",
            "native",
            entry["update_ms"],
            f"floor {entry['floor_ms']:.2f} ms",
            table_rows=entry["table_rows"],
            touched_rows=entry["touched"],
            floor=entry["floor_ms"],
        )
    for backend in ("native", "torch"):
        ms = results[f"id_map/{backend}"]["find_or_insert_ms"]
        rows.append(["id map find-or-insert (half new)", backend, "1,000,000", f"{BATCH:,}", f"{ms:.2f}", "", "", ""])
    return rows


def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for index, row in enumerate(rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        if index == 0:
            print("  ".join("-" * width for width in widths))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scaling = results["native_kernels"]["scaling"]
    by_batch = [r for r in scaling if r["table_rows"] == TABLE_ROWS]
    by_table = [r for r in scaling if r["ids"] == BATCH]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("update_ms", "native SparseAdamW update"), ("floor_ms", "memory floor")):
        left.plot([r["touched"] for r in by_batch], [r[key] for r in by_batch], "o-", label=label)
        right.plot([r["table_rows"] / 1e6 for r in by_table], [r[key] for r in by_table], "o-", label=label)
    left.set(xscale="log", yscale="log", xlabel="touched rows (1M-row table)", ylabel="median ms",
             title="cost vs touched rows")  # fmt: skip
    right.set(xlabel="table rows (millions), 65,536 ids", ylabel="median ms", title="cost vs table size")
    right.set_ylim(bottom=0)
    for axis in (left, right):
        axis.grid(True, alpha=0.3)
        axis.legend()
    figure.suptitle("recis sparse update, 2 threads, float32, dim 64")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="smaller tables for the scaling curve")
    parser.add_argument("--plot", type=Path, default=Path(__file__).with_suffix(".png"))
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(THREADS)
        print(json.dumps(WORKERS[args.worker](args)))
        return
    results = {
        "native_kernels": run_worker("native_kernels", "native", args),
        "adamw_step/native": run_worker("adamw_step_with_peers", "native", args),
        "adamw_step/torch": run_worker("adamw_step", "torch", args),
        "adamw_step/native, 4 KiB pages": run_worker("adamw_step_with_peers", "native", args, RECIS_HUGE_PAGES="0"),
        "adamw_step/native, torch THP": run_worker("adamw_step_with_peers", "native", args, THP_MEM_ALLOC_ENABLE="1"),
        "id_map/native": run_worker("id_map", "native", args),
        "id_map/torch": run_worker("id_map", "torch", args),
    }
    print_table(report(results))
    plot(results, args.plot)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
