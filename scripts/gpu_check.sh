#!/usr/bin/env bash
# Every CUDA check in one short run, for a lent GPU machine (budget: about 8 minutes on one GPU).
#   bash scripts/gpu_check.sh            # figures on stdout; runs and JSON under $OUT (or /tmp/gpu_check)
# It uses the machine's own python3 (its image carries torch, tensorboard, pyyaml, tqdm, matplotlib, pytest); nothing
# is installed there (the machine reaches no network).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD XDG_CACHE_HOME=/tmp/gpu_check_cache
step() { echo; echo "=== $* ($(date +%T))"; }

step machine
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

step "data (the default synthetic set)"
$PY -m hotdog_torch.synth --out data/hotdog-synth 2>/dev/null | tail -1

step "CUDA-marked tests (bf16 autograd, fused fp32, CUDA graphs, no host sync inside an epoch)"
timeout 180 $PY -m pytest -q tests/test_cuda.py -p no:cacheprovider 2>&1 | tail -15

step "the main job on CUDA (configs/hotdog.yaml: bf16 autocast, autograd)"
timeout 60 $PY -m hotdog_torch.train --config configs/hotdog.yaml --no-progress device=cuda log.dir="$OUT/runs" \
  log.run_name=default | tail -4
cat "$OUT"/runs/default/metrics.json

step "the main job on CUDA, fused fp32 step, replayed as a CUDA graph"
timeout 60 $PY -m hotdog_torch.train --config configs/hotdog.yaml --no-progress device=cuda train.precision=fp32 \
  train.cuda_graphs=true log.dir="$OUT/runs" log.run_name=graphs | tail -4

step "full-batch gradient descent of the default set on the GPU"
timeout 60 $PY -m hotdog_torch.train --config configs/hotdog.yaml --no-progress device=cuda optim.batch_size=null \
  optim.lr=2.0 train.epochs=300 log.dir="$OUT/runs" log.run_name=full-batch | tail -3

step "bench on CUDA, batch 64 (configs/bench.yaml): start-up, plain and momentum throughput"
timeout 150 $PY scripts/bench.py --device cuda --parts start,throughput,momentum --json "$OUT/bench-cuda-b64.json"

step "bench on CUDA, batch 1024, fp32 fused step as a CUDA graph"
timeout 120 $PY scripts/bench.py --device cuda --parts throughput --json "$OUT/bench-cuda-b1024.json" \
  optim.batch_size=1024 train.precision=fp32 train.cuda_graphs=true
echo; echo "=== done ($(date +%T))"
