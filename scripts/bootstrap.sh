#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with torch and kfac_tn (editable) with the
# extras train (the kfac-tn command), test and oracles.
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
installed() {  # the packages import, and the console script is this checkout's
  [ -x .venv/bin/kfac-tn ] && .venv/bin/python - >/dev/null 2>&1 <<'PY'
import importlib.metadata as md

import backpack, curvlinops, einops, kfac_tn, matplotlib, opt_einsum, pytest, scipy, sklearn
import torchvision, tqdm, yaml

(script,) = md.entry_points(group="console_scripts", name="kfac-tn")
assert script.value == "kfac_tn.training.cli:console_main"
PY
}
if ! installed; then
  # pin the torch (and torchvision) installed above: resolving the extras must not replace it
  pins=$(mktemp)
  trap 'rm -f "$pins"' EXIT
  .venv/bin/python -c "import torch, torchvision
for m in (torch, torchvision):
    print(f'{m.__name__}=={m.__version__.split(\"+\")[0]}')" >"$pins"
  .venv/bin/pip install -q -c "$pins" -e ".[train,test,oracles]"
fi
