#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with torch and kfac_tn (editable, test extras).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision" >/dev/null 2>&1; then
  # Local wheels on the project machines; any torch in [2.4, 2.15) works with the package.
  .venv/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi
if ! .venv/bin/python -c "import kfac_tn, opt_einsum, einops, yaml, tqdm, matplotlib, sklearn, pytest, scipy, backpack, curvlinops" >/dev/null 2>&1; then
  .venv/bin/pip install -q -e ".[test,vision,oracles]"
fi
