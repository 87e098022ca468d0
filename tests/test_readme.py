import re
import subprocess
import sys
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_python_snippet_runs():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "README has no python snippet"
    for block in blocks:
        result = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "item.slots.exp_avg" in result.stdout


def test_ci_runs_the_readme_test_command():
    ci_script = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    test_command = re.search(r"^(bash scripts/setup\.sh && python3 -m pytest)\s", README, flags=re.M).group(1)
    assert test_command in ci_script
