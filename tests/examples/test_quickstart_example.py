import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "quickstart.py"


def test_quickstart_trains_above_chance_and_ends_with_test_auc_line():
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--steps", "300", "--users", "2000", "--items", "500"],
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    )
    last_line = result.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"test_auc: (0\.\d{4})", last_line)
    assert match, result.stdout
    assert float(match.group(1)) > 0.65
