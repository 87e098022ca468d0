import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_one_process_snippet_runs_and_its_state_dict_holds_the_slots():
    others = ("torchrun", "capacity=", "EmbeddingEngine")  # the other snippets' markers
    snippet = next(block for block in SNIPPETS if not any(marker in block for marker in others))
    result = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "item.slots.exp_avg" in result.stdout


def test_readme_bounded_table_snippet_runs_within_capacity_and_evicts():
    snippet = next(block for block in SNIPPETS if "HashTableFilterHook" in block)
    result = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    stats = eval(result.stdout.strip().splitlines()[-1])  # the printed stats dict
    assert stats["rows"] <= stats["capacity"] == 400
    assert stats["evicted_capacity"] > 0 and stats["evicted_filter"] > 0 and stats["not_admitted"] > 0


def test_readme_engine_snippet_runs_and_prints_each_features_shape():
    snippet = next(block for block in SNIPPETS if "EmbeddingEngine" in block)
    result = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert eval(result.stdout.strip().splitlines()[-1]) == {
        "clicked_items": (3, 8), "target_item": (3, 8), "user": (3, 4), "city": (3, 4), "history": (3, 12),
    }  # fmt: skip


@pytest.mark.timeout(200)
def test_readme_torchrun_snippet_runs_on_two_processes(tmp_path):
    snippet = next(block for block in SNIPPETS if "torchrun" in block)
    script = tmp_path / "train.py"
    script.write_text(snippet)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]


def test_ci_runs_the_readme_test_command():
    ci_script = (ROOT / ".ci" / "run").read_text()
    test_command = re.search(r"^(bash scripts/setup\.sh && python3 -m pytest)\s", README, flags=re.M).group(1)
    assert test_command in ci_script
