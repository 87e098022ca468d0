"""recis.ops.huge_pages: large row stores are advised onto transparent huge pages (Linux)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recis.nn.modules.hashtable import HashTable
from recis.ops.huge_pages import HUGE_PAGE_BYTES, advise_huge_pages, empty_rows, zero_rows

THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
thp_available = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not THP_SETTING.exists() or "[never]" in THP_SETTING.read_text(),
    reason="transparent huge pages are not available here",
)


def _huge_kib_in(tensor: torch.Tensor) -> int:
    """AnonHugePages of this process's mappings that overlap ``tensor``'s memory (from /proc/self/smaps)."""
    start, end = tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()
    total, overlapping = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            low, high = (int(part, 16) for part in head.split("-"))
            overlapping = low < end and start < high
        elif overlapping and head == "AnonHugePages:":
            total += int(line.split()[1])
    return total


@thp_available
def test_a_large_zeroed_row_store_is_backed_by_huge_pages():
    rows = zero_rows((1 << 20, 16), dtype=torch.float32, device=torch.device("cpu"))  # 64 MiB
    assert rows.abs().sum() == 0
    assert _huge_kib_in(rows) >= 4 * HUGE_PAGE_BYTES // 1024


@thp_available
def test_a_table_grown_past_a_few_huge_pages_keeps_its_rows_on_them():
    table = HashTable(32)
    table.assign(torch.arange(300_000), torch.ones(300_000, 32))
    assert _huge_kib_in(table.weight) > 0
    torch.testing.assert_close(table.lookup(torch.tensor([0, 299_999])), torch.ones(2, 32))


def test_views_reaching_past_their_storage_are_left_alone():
    assert advise_huge_pages(torch.empty(1).expand(1 << 24)) is False  # 64 MiB of view over 4 bytes
    assert advise_huge_pages(torch.empty(1 << 22, 2)[:, 0]) is False  # strided


@thp_available
def test_an_offset_view_is_advised_only_inside_its_storage():
    storage = torch.empty(3 * HUGE_PAGE_BYTES // 4)
    assert advise_huge_pages(storage[HUGE_PAGE_BYTES // 8 :]) is True  # ends where the storage ends


def test_small_and_non_cpu_tensors_are_left_alone():
    assert advise_huge_pages(torch.empty(100)) is False
    assert advise_huge_pages(torch.empty(0)) is False
    meta = torch.empty(1 << 22, device="meta")
    assert advise_huge_pages(meta) is False


def test_empty_and_zero_rows_have_the_asked_shape_dtype_and_values():
    rows = empty_rows((5, 3), dtype=torch.bfloat16, device=torch.device("cpu"))
    assert rows.shape == (5, 3) and rows.dtype == torch.bfloat16
    assert torch.equal(zero_rows((4, 2), dtype=torch.float64, device=torch.device("cpu")), torch.zeros(4, 2).double())


def test_recis_huge_pages_0_turns_the_advice_off():
    code = "import torch; from recis.ops import huge_pages; print(huge_pages.advise_huge_pages(torch.empty(1 << 22)))"
    env = {**os.environ, "RECIS_HUGE_PAGES": "0"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
