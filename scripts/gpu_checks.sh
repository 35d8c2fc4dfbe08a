#!/usr/bin/env bash
# GPU checks in one call (for the lent GPU machine; nothing here is needed by CI):
#   1. every CUDA test of the suite (they are skipped on CPU-only machines),
#   2. the TN benchmark on CUDA over the nine CNNs' conv layers,
#   3. the training-step benchmark on CUDA,
#   4. short CLI training runs on CUDA (fp32, bf16, fp16).
# Results go to ${OUT:-gpu_out}. Uses the machine's own python3 (torch, torchvision preinstalled).
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
BATCH=${BATCH:-32}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
timeout 150 $PY -m pytest -q -p no:cacheprovider -k "cuda or CUDA" tests/test_cuda.py \
  tests/optim/test_optimizer.py tests/optim/test_inverses.py tests/test_nn.py tests/tn/test_sampled.py \
  tests/tn/test_lag.py tests/tn/test_cost.py tests/training/test_train.py 2>&1 | tail -15 | tee "$OUT/test_cuda.txt"
# one net at a time, so a slow net cannot lose the others' results; stop starting nets after TN_BUDGET s
start=$SECONDS
for net in ${TN_NETS:-3c3d 2c2d all_cnn_c resnet18 alexnet mobilenet_v2 inception_v3 resnext101_32x8d convnext_base}; do
  [ $((SECONDS - start)) -lt "${TN_BUDGET:-150}" ] || { echo "tn: skipped $net (budget)" >> "$OUT/tn.txt"; continue; }
  timeout 120 $PY -m kfac_tn.benchmarks.tn --device cuda --batch-size "$BATCH" --nets "$net" \
    --impls tn tn_simplified auto --repeats 10 --out "$OUT/tn_$net" >> "$OUT/tn.txt" 2>&1
  echo "tn $net rc=$?" >> "$OUT/tn.txt"
done
grep -E "^tn |rc=" "$OUT/tn.txt"
timeout "${STEP_TIMEOUT:-180}" $PY -m kfac_tn.benchmarks.step --device cuda --models ${STEP_MODELS:-3c3d resnet18} \
  --batch-size 128 --steps 20 --no-peers --out "$OUT/step" > "$OUT/step.txt" 2>&1
tail -25 "$OUT/step.txt"
for prec in bf16 fp16; do
  timeout 45 $PY -m kfac_tn train configs/cifar10_resnet18_kfac.yaml data.name=fake data.fake_train_size=1024 \
    epochs=1 precision=$prec --device cuda --out "$OUT/runs" --run-name "r18_$prec" --quiet > "$OUT/train_$prec.txt" 2>&1
  echo "train $prec rc=$? $(tail -1 "$OUT/runs/r18_$prec/metrics.jsonl" 2>/dev/null)"
done
