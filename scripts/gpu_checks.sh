#!/usr/bin/env bash
# GPU checks in one call (for the lent GPU machine; nothing here is needed by CI):
#   1. CUDA correctness tests (tests/test_cuda.py),
#   2. the TN benchmark on CUDA over the nine CNNs' conv layers,
#   3. the training-step benchmark on CUDA.
# Results go to ${OUT:-gpu_out}. Uses the machine's own python3 (torch, torchvision preinstalled).
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
BATCH=${BATCH:-32}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -15 | tee "$OUT/test_cuda.txt"
timeout "${TN_TIMEOUT:-240}" $PY -m kfac_tn.benchmarks.tn --device cuda --batch-size "$BATCH" \
  --impls tn tn_simplified auto --repeats 10 --out "$OUT/tn" > "$OUT/tn.txt" 2>&1
tail -40 "$OUT/tn.txt"
timeout "${STEP_TIMEOUT:-150}" $PY -m kfac_tn.benchmarks.step --device cuda --models ${STEP_MODELS:-3c3d resnet18} \
  --batch-size 128 --steps 20 --no-peers --out "$OUT/step" > "$OUT/step.txt" 2>&1
tail -25 "$OUT/step.txt"
