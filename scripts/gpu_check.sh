#!/usr/bin/env bash
# Every CUDA check in one short run, for a lent GPU machine (budget: 8 minutes on one GPU).
#   bash scripts/gpu_check.sh            # figures on stdout; runs and JSON under $OUT (or /tmp/gpu_check)
# It uses the machine's own python3 (its image carries torch, torchvision, tensorboard, pyyaml, tqdm, pytest).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD XDG_CACHE_HOME=/tmp/gpu_check_cache
step() { echo; echo "=== $* ($(date +%T))"; }

step machine
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())"

step "data (the default synthetic set)"
$PY -m hotdog_torch.synth --out data/hotdog-synth 2>/dev/null | tail -1

step "CUDA-marked tests"
timeout 180 $PY -m pytest -q -m cuda tests -p no:cacheprovider 2>&1 | tail -15

step "the main job on CUDA (configs/hotdog.yaml, bf16 autocast)"
timeout 90 $PY -m hotdog_torch.train --config configs/hotdog.yaml --no-progress device=cuda log.dir="$OUT/runs"
cat "$OUT"/runs/hotdog-*/metrics.json

step "full-batch gradient descent of the default set on the GPU"
timeout 90 $PY -m hotdog_torch.train --config configs/hotdog.yaml --no-progress device=cuda optim.batch_size=null optim.lr=2.0 train.epochs=300 log.dir="$OUT/runs" log.run_name=full-batch | tail -3

step "bench on CUDA, batch 64 (configs/bench.yaml)"
timeout 150 $PY scripts/bench.py --device cuda --json "$OUT/bench-cuda-b64.json" --epochs 3

step "bench on CUDA, batch 1024"
timeout 150 $PY scripts/bench.py --device cuda --json "$OUT/bench-cuda-b1024.json" --epochs 3 optim.batch_size=1024
echo; echo "=== done ($(date +%T))"
