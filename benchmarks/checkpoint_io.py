"""Checkpoint save and load of a large table: time, throughput and peak extra memory.

One process, a HashTable of ``--rows`` random int64 ids with SparseAdamW slots
(weight, exp_avg, exp_avg_sq), saved with recis.checkpoint.save and loaded into a
fresh table with recis.checkpoint.load (which also verifies every file's CRC-32).
Peak extra memory is the rise of the process's peak resident set (VmHWM, reset before
each phase) above what it held when the phase began: what saving or loading costs
beyond the tables themselves (a loaded table's own rows are counted for load).

    python benchmarks/checkpoint_io.py [--rows 10000000] [--dim 16] [--dir /tmp/recis-ckpt]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

import recis.checkpoint as ck
from recis.nn.modules.hashtable import HashTable
from recis.optim import SparseAdamW


def _resident_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> float:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    return _resident_mb("VmRSS")


def _filled_table(rows: int, dim: int) -> tuple[HashTable, SparseAdamW]:
    table = HashTable(dim, name="big")
    optimizer = SparseAdamW(table)
    ids = torch.randint(-(2**63), 2**63 - 1, (rows,), generator=torch.Generator().manual_seed(0))
    for start in range(0, rows, 1 << 20):
        chunk = ids[start : start + (1 << 20)]
        table.assign(chunk, torch.randn(len(chunk), dim))
    table.slot("exp_avg").normal_()
    table.slot("exp_avg_sq").uniform_()
    return table, optimizer


def _timed(action) -> tuple[float, float]:
    """(seconds, peak extra MiB) of ``action()``."""
    start_mb = _reset_peak()
    start = time.perf_counter()
    action()
    seconds = time.perf_counter() - start
    return seconds, _resident_mb("VmHWM") - start_mb


def measure_save(root: Path, rows: int, dim: int) -> tuple[float, float, float]:
    """(seconds, peak extra MiB, MiB written)."""
    table, optimizer = _filled_table(rows, dim)
    seconds, extra_mb = _timed(lambda: ck.save(root, table, optimizer))
    return seconds, extra_mb, sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 2**20


def measure_load(root: Path, rows: int, dim: int) -> tuple[float, float]:
    table = HashTable(dim, name="big")
    optimizer = SparseAdamW(table)
    seconds, extra_mb = _timed(lambda: ck.load(root, table, optimizer))
    assert len(table) == rows
    return seconds, extra_mb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    root = Path(args.dir or tempfile.mkdtemp(prefix="recis-ckpt-"))
    try:
        save_s, save_extra_mb, written_mb = measure_save(root, args.rows, args.dim)
        load_s, load_extra_mb = measure_load(root, args.rows, args.dim)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    table_mb = 3 * args.rows * args.dim * 4 / 2**20
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}")
    print(f"table: {args.rows:,} rows x dim {args.dim}, fp32, weight + 2 Adam slots = {table_mb:,.0f} MiB")
    print(f"{'phase':>5} {'seconds':>8} {'MiB/s':>7} {'peak extra MiB':>15}")
    print(f"{'save':>5} {save_s:>8.2f} {written_mb / save_s:>7.0f} {save_extra_mb:>15.0f}")
    print(f"{'load':>5} {load_s:>8.2f} {written_mb / load_s:>7.0f} {load_extra_mb:>15.0f}  (includes the loaded table)")


if __name__ == "__main__":
    main()
