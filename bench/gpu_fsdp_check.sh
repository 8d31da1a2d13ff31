#!/usr/bin/env bash
# FSDP check for data-parallel students, on a GPU machine (the CPU stack can't run FSDP: accelerate
# enables it only on accelerators, and DistillTrainer refuses it on CPU; see docs/training.md).
#
#   bench/gpu_fsdp_check.sh [OUT_DIR]                  # on a machine with 1+ CUDA GPUs, from the repo root
#   ADPA_CHECK_DEVICE=cpu bench/gpu_fsdp_check.sh      # dry run of the plumbing on CPU (DDP only; FSDP refused)
#
# Needs the project installed (`pip install -e .`, torch with CUDA, accelerate, transformers, trl).
# Builds the tiny test models, then trains DCKD, offline ADPA (support=indices, support_floor, cache)
# and online ADPA for 6 steps each, with the teacher and reference in process (`local:`, exact answers):
#   1. one process on one GPU, gradient_accumulation_steps = W (the reference);
#   2. W processes with training/accelerate/ddp.yaml (W >= 2 only);
#   3. W processes with training/accelerate/fsdp.yaml (FSDP2), and again with --fsdp_version 1.
# W = 2 with two or more GPUs, else 1 (FSDP then wraps but shards nothing, and synced generation is
# not exercised: the report says so). Each layout is compared with the reference by
# tests/distributed_worker.py compare: same plan, every record once per epoch, each rank sampling,
# staging and fetching only its own items, the same offline samples, loss curves and final weights
# within LOSS_TOL / WEIGHT_TOL (defaults 1e-4 / 1e-4; float reductions differ across layouts).
# Expected to take about 2 minutes (not measured on a GPU; the CPU dry run takes 46 s on 2 cores).
# Exit code 0 when every layout passes. Logs and reports in OUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${1:-/tmp/adpa-fsdp-check}
DEVICE=${ADPA_CHECK_DEVICE:-cuda}
LOSS_TOL=${LOSS_TOL:-1e-4}
WEIGHT_TOL=${WEIGHT_TOL:-1e-4}
rm -rf "$OUT" && mkdir -p "$OUT"
export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

$PY -c "import adpa, accelerate, trl, torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'gpus', torch.cuda.device_count(), 'accelerate', accelerate.__version__, 'trl', trl.__version__)" | tee "$OUT/versions.txt"
if [ "$DEVICE" = cuda ]; then
  GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
  [ "$GPUS" -ge 1 ] || { echo "no CUDA GPU: run with ADPA_CHECK_DEVICE=cpu for a dry run" >&2; exit 2; }
  W=$(( GPUS >= 2 ? 2 : 1 )); USE_CPU=false
else
  W=2; USE_CPU=true
fi
echo "world size W=$W on $DEVICE" | tee -a "$OUT/versions.txt"

# Tiny models and 16 preference records (4 micro-batches of 4: the same plan for 1 and 2 processes).
$PY - "$OUT" <<'EOF'
import json, sys
import random
from adpa.tiny_model import make_tiny_model
out = sys.argv[1]

def make_records(n, seed=0):  # as tests/test_training.py's make_records (no pytest needed here)
    rng, items = random.Random(seed), "red blue green cat dog fox one two three".split()
    for _ in range(n):
        words = rng.sample(items, 3)
        yield {"prompt": [{"role": "user", "content": "sort " + " ".join(words)}],
               "chosen": [{"role": "assistant", "content": " ".join(sorted(words)) + " thanks"}],
               "rejected": [{"role": "assistant", "content": " ".join(words) + " stupid"}]}

make_tiny_model(f"{out}/models/student", layers=1, hidden=32, heads=2, seed=5)
make_tiny_model(f"{out}/models/teacher", layers=2, hidden=64, seed=1)
make_tiny_model(f"{out}/models/reference", layers=2, hidden=64, seed=2)
open(f"{out}/prefs.jsonl", "w").write("\n".join(json.dumps(r) for r in make_records(16)))
EOF

# spec LAYOUT GRAD_ACC: the three runs of one layout, as `adpa train` arguments.
spec() {
  $PY - "$OUT" "$1" "$2" "$USE_CPU" <<'EOF'
import json, sys
out, layout, accumulation, use_cpu = sys.argv[1:]
common = ["--model", f"{out}/models/student", "--dataset", f"{out}/prefs.jsonl",
          "--teacher", f"local:{out}/models/teacher", "--reference", f"{out}/models/reference", "--beta", "0.5",
          "--max_steps", "6", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", accumulation,
          "--learning_rate", "3e-3", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
          "--use_cpu", use_cpu, "--seed", "0", "--support_k", "8", "--max_new_tokens", "8", "--disable_tqdm", "true"]
runs = {
    "dckd": ["dckd"],
    "adpa": ["adpa", "--support", "indices", "--student_k", "4", "--support_floor", "1e-3", "--prefetch", "0",
             "--cache_dir", f"{out}/{layout}/cache"],
    "online": ["adpa", "--rollout", "online", "--prefetch", "0"],
}
spec = {"runs": [argv + common + ["--output_dir", f"{out}/{layout}/{name}"] for name, argv in runs.items()]}
open(f"{out}/{layout}.json", "w").write(json.dumps(spec))
EOF
}

compare() {  # compare LAYOUT
  $PY - "$OUT" "$1" "$LOSS_TOL" "$WEIGHT_TOL" <<'EOF'
import json, sys
out, layout, loss_tol, weight_tol = sys.argv[1:]
json.dump({"reference": f"{out}/single", "candidate": f"{out}/{layout}", "runs": ["dckd", "adpa", "online"],
           "loss_tol": float(loss_tol), "weight_tol": float(weight_tol)}, open(f"{out}/compare-{layout}.json", "w"))
EOF
  $PY tests/distributed_worker.py compare "$OUT/compare-$1.json" > "$OUT/report-$1.json" \
    && echo "PASS $1" || { echo "FAIL $1 (see $OUT/report-$1.json)"; STATUS=1; }
}

launch() {  # launch LAYOUT CONFIG [accelerate flags...]
  local layout=$1 config=$2; shift 2
  spec "$layout" 1
  local port; port=$($PY -c "from adpa.services.launch import free_port; print(free_port())")
  if timeout 240 $PY -m accelerate.commands.launch --config_file "training/accelerate/$config" \
      --num_processes "$W" --main_process_port "$port" "$@" \
      tests/distributed_worker.py train "$OUT/$layout.json" > "$OUT/$layout.log" 2>&1; then
    compare "$layout"
  else
    echo "FAIL $layout: the launch failed (tail of $OUT/$layout.log below)"; tail -20 "$OUT/$layout.log"; STATUS=1
  fi
}

STATUS=0
spec single "$W"
CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} timeout 240 $PY tests/distributed_worker.py train "$OUT/single.json" \
  > "$OUT/single.log" 2>&1 || { echo "FAIL: the one-process reference run (see $OUT/single.log)"; tail -20 "$OUT/single.log"; exit 1; }
echo "reference: one process, gradient_accumulation_steps=$W"
[ "$W" -ge 2 ] && launch ddp ddp.yaml
if [ "$DEVICE" = cuda ]; then
  launch fsdp2 fsdp.yaml
  launch fsdp1 fsdp.yaml --fsdp_version 1
else  # on CPU the trainer must refuse FSDP, with the reason
  spec fsdp2 1
  if timeout 240 $PY -m accelerate.commands.launch --config_file training/accelerate/fsdp.yaml --num_processes 2 \
      --main_process_port "$($PY -c "from adpa.services.launch import free_port; print(free_port())")" \
      tests/distributed_worker.py train "$OUT/fsdp2.json" > "$OUT/fsdp2.log" 2>&1; then
    echo "FAIL fsdp2 on CPU: expected the trainer to refuse FSDP"; STATUS=1
  elif grep -q "FSDP on CPU is not supported" "$OUT/fsdp2.log"; then
    echo "PASS fsdp2 on CPU refused: $(grep -o 'FSDP on CPU is not supported[^:]*' "$OUT/fsdp2.log" | head -1)"
  else
    echo "FAIL fsdp2 on CPU: failed without the expected reason (see $OUT/fsdp2.log)"; STATUS=1
  fi
fi
[ "$W" -ge 2 ] || echo "NOTE: one GPU, so W=1: FSDP wrapped the student but sharded nothing; synced generation across ranks was not exercised"
for f in "$OUT"/report-*.json; do [ -e "$f" ] && { echo "== $f"; cat "$f"; }; done
exit $STATUS
