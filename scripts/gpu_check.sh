#!/usr/bin/env bash
# Every CUDA check in one call of at most 8 minutes, for a lent GPU machine, ending in one summary table.
#   bash scripts/gpu_check.sh            # logs on stdout; runs, junit.xml and JSON under $OUT (or /tmp/gpu_check)
# Every test marked `cuda` under tests/ runs (tests/test_cuda.py and the others), then the default job both ways
# CUDA can take it (bf16 autocast + autograd, the default, also under torch.compile; the fused step in fp32 with TF32
# matmuls), so the default can be chosen on measured figures, then the bench.  Each part has its own time
# limit, cut to what is left of the 8 minutes.  It uses the machine's own python3 (its image carries torch,
# tensorboard, pyyaml, tqdm, matplotlib, pytest); nothing is installed there (the machine reaches no network).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_check}
BUDGET=${BUDGET:-470}  # seconds for everything, leaving the 8 minutes' last few for the table
mkdir -p "$OUT"
export PYTHONPATH=$PWD XDG_CACHE_HOME=/tmp/gpu_check_cache
START=$SECONDS
: >"$OUT/parts.tsv"

# part NAME LIMIT COMMAND...: run it with the smaller of LIMIT and the seconds left, log it, note rc and seconds
part() {
  local name=$1 limit=$2 left=$((BUDGET - (SECONDS - START)))
  shift 2
  ((limit > left)) && limit=$left
  echo; echo "=== $name (limit ${limit}s, $(date +%T))"
  if ((limit < 5)); then
    printf '%s\tskipped (no time left)\t0\n' "$name" >>"$OUT/parts.tsv"
    return
  fi
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tail -25
  local rc=${PIPESTATUS[0]}
  local state=ok
  ((rc == 124)) && state="timed out" || { ((rc != 0)) && state="failed (rc $rc)"; }
  printf '%s\t%s\t%s\n' "$name" "$state" $((SECONDS - t0)) >>"$OUT/parts.tsv"
}

# the default config on CUDA, each run under $OUT/runs/<log.run_name>
JOB=("$PY" -m hotdog_torch.train --config configs/hotdog.yaml --no-progress device=cuda log.dir="$OUT/runs")

echo "=== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

[ -d data/hotdog-synth ] || part "data: the default synthetic set" 60 $PY -m hotdog_torch.synth --out data/hotdog-synth
part "tests marked cuda" 210 $PY -m pytest -q -m cuda tests -p no:cacheprovider --junitxml="$OUT/junit.xml"
part "default job, CUDA's default step (bf16 autocast + autograd)" 45 "${JOB[@]}" log.run_name=bf16
part "default job, fused step in fp32 with TF32 matmuls" 45 "${JOB[@]}" log.run_name=tf32 train.precision=fp32
part "default job, autograd step under torch.compile (bf16)" 90 "${JOB[@]}" log.run_name=compiled train.compile=true
part "photos recipe with its router (model.router), 3 + 3 epochs" 60 $PY -m hotdog_torch.train --no-progress \
  --config configs/photos.yaml device=cuda log.dir="$OUT/runs" log.run_name=router model.router.epochs=3 train.epochs=3
part "bench, batch 64: momentum and plain throughput" 60 $PY scripts/bench.py --parts momentum,plain --repeats 1 \
  --json "$OUT/bench-cuda-b64.json" device=cuda

echo; echo "=== summary ($((SECONDS - START)) s)"
$PY - "$OUT" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

out = Path(sys.argv[1])
rows = [("part", "result", "seconds", "")]
for line in (out / "parts.tsv").read_text().splitlines():
    name, state, seconds = line.split("\t")
    rows.append((name, state, seconds, ""))
junit = out / "junit.xml"
if junit.is_file():
    for case in ET.parse(junit).iter("testcase"):
        kinds = [c.tag for c in case]
        result = "failed" if {"failure", "error"} & set(kinds) else "skipped" if "skipped" in kinds else "passed"
        rows.append((f"  {case.get('classname', '').split('.')[-1]}::{case.get('name')}", result,
                     f"{float(case.get('time', 0)):.1f}", ""))
for run in sorted((out / "runs").glob("*/metrics.json")):
    m = json.loads(run.read_text())
    figures = f"{m.get('step')}: {m.get('train_images_per_second', 0):,.0f} images/s, " \
              f"val accuracy {m.get('val_accuracy', 0):.2%}, {m.get('epochs')} epochs, " \
              f"peak {m.get('peak_memory_bytes', 0) / 2**20:,.0f} MiB"
    rows.append((f"  job {run.parent.name}", "", f"{m.get('seconds', 0):.1f}", figures))
bench = out / "bench-cuda-b64.json"
for what, figure, verdict in json.loads(bench.read_text()).get("targets", []) if bench.is_file() else []:
    rows.append((f"  bench {what}", verdict, "", figure))
widths = [max(len(r[i]) for r in rows) for i in range(3)]
for r in rows:
    print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3])
EOF
