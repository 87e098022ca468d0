"""The Adam rule's enum codes: defined once, in csrc/common/adam_rule.h; the Python side's
codes (recis/ops/native_kernels.py) must name the same members with the same values."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from recis.ops.native_kernels import DECAY_CODES, EPSILON_CODES

ADAM_RULE = Path(__file__).resolve().parents[2] / "csrc" / "common" / "adam_rule.h"


def _cpp_enum(name: str) -> dict[str, int]:
    """``{member: value}`` of ``enum class name : int64_t { A = 0, ... }`` in adam_rule.h."""
    body = re.search(rf"enum class {name} : int64_t \{{([^}}]*)\}}", ADAM_RULE.read_text()).group(1)
    members = [re.fullmatch(r"(\w+) = (\d+)", item.strip()).groups() for item in body.split(",") if item.strip()]
    return {member: int(value) for member, value in members}


@pytest.mark.parametrize(("cpp_name", "codes"), [("WeightDecay", DECAY_CODES), ("EpsilonPlacement", EPSILON_CODES)])
def test_python_codes_equal_the_cpp_enum(cpp_name, codes):
    assert {member.name: code for member, code in codes.items()} == _cpp_enum(cpp_name)
    assert set(codes) == set(type(next(iter(codes))))  # every member of the Python enum has a code
