#!/usr/bin/env bash
# Install recis, its test tools and what the examples need into the active Python,
# reusing an installed torch.
# An unpinned "torch" would pull the newest release with several GB of CUDA packages,
# so torch is installed (pinned) only when no suitable one is present.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" - <<'PY' 2>/dev/null
import sys
import torch
major, minor = (int(x) for x in torch.__version__.split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 4) else 1)
PY
then
  echo "setup: installing torch==2.13.0 (no suitable torch found)"
  "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
# The native kernels (csrc/) build against the installed torch, so no build isolation
# (it would download another torch); ninja compiles them in parallel.
"$PYTHON" -m pip install --quiet --disable-pip-version-check "setuptools>=70.1" wheel ninja
"$PYTHON" -m pip install --quiet --disable-pip-version-check --no-build-isolation -e ".[test,examples]"
