#!/usr/bin/env bash
# The GPU suite: wire, serving (FLOP/s and MFU), memory, step overhead, concurrency, fairness and the
# deterministic mode on one GPU, in under 10 minutes, JSON per part into one folder.
#
#   bench/gpu_suite.sh --peak-tflops 989 OUT_DIR      # one GPU (989: bf16 dense peak of an H100/H200 SXM)
#   bench/gpu_suite.sh --smoke OUT_DIR                # CPU, tiny preset, tiny durations (tests/test_bench.py)
#   bench/gpu_suite.sh --parts serving_8b,memory --peak-tflops 989 OUT_DIR
#
# Options:
#   --peak-tflops X   the GPU's peak dense bf16 TFLOP/s, for MFU (without it, MFU is null; TFLOP/s still reported)
#   --smoke           CPU run of every part with the tiny preset (checks the plumbing; no number means anything)
#   --dry-run         print the GPU run's commands and timeouts without checking for a GPU or running them
#   --parts LIST      comma-separated subset of: serving_8b wire serving_1b memory overhead concurrency
#                     concurrency_ray device_map fairness deterministic
#   --models DIR      checkpoint cache for the saved 1B-like pair (default: $TMPDIR/adpa-bench-models; ~6 GB)
#   --budget-s S      wall-clock budget for the whole suite (default 570): each part's timeout is cut to what
#                     is left, and a part that would start with under 30 s left is skipped
# Environment: PYTHON (default: .venv/bin/python if there, else python3).
#
# Parts, in order, on the GPU (the times are estimates for an H100/H200-class GPU, not measurements):
#   serving_8b   ~75 s  (timeout 200) in-process engine and service throughput, TFLOP/s and MFU, 8B-like
#                                     (built in GPU memory: saving and loading 2 x 16 GB would not fit the budget)
#   wire         ~25 s  (timeout  90) bytes per scored position at V=128,256, measured (tiny-128k preset:
#                                     the size of an answer depends on V and the support, not on the body)
#   serving_1b   ~90 s  (timeout 240) engine vs gRPC (`adpa serve` subprocesses), MFU, 1B-like, saved to --models
#   memory       ~45 s  (timeout 150) extra memory per request vs positions at V=128,256 (2 x 2048 body, bf16)
#   overhead     ~80 s  (timeout 200) training step against a loopback 1B-like teacher vs in process (ADPA)
#   concurrency  ~60 s  (timeout 150) 1 and 8 trainers, batching off and on, `adpa serve` (1B-like)
#   concurrency_ray ~70 s (timeout 150) the same through Ray Serve, batching on (skipped where ray is not
#                                     installed; a part of its own, so a Ray that hangs costs only its timeout)
#   device_map   ~40 s  (timeout  90) one model over 2 GPUs (device_map=auto, GPU 0 capped) against the same
#                                     model on one GPU: dense fp32 log-probs and top-k ids (skipped with < 2 GPUs)
#   fairness     ~50 s  (timeout 120) 8 trainers, one with 64 long sequences per request, seven with 4 short:
#                                     per-trainer positions/s and max/min, `adpa serve` (1B-like)
#   deterministic ~60 s (timeout 150) a 4x burst: answers differing from the lone answers, default and
#                                     --deterministic, and the mode's throughput ratio (1B-like)
# Total ~9.3 min; the budget stops the suite before 10. Output: OUT_DIR/<part>.json, OUT_DIR/<part>.log (the table and any error) and
# OUT_DIR/suite.json (machine, versions, each part's command, exit status and seconds). The script exits 1
# if a part failed, timed out or was skipped for want of time, 2 if it cannot start. --smoke runs every part
# but concurrency_ray.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "gpu_suite: $*" >&2; exit 2; }

SMOKE=0 DRY=0 PEAK="" BUDGET=570
PARTS="serving_8b,wire,serving_1b,memory,overhead,concurrency,concurrency_ray,device_map,fairness,deterministic"
MODELS="${TMPDIR:-/tmp}/adpa-bench-models" OUT=""
while (($#)); do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --dry-run) DRY=1 ;;
    --peak-tflops) PEAK="${2:?--peak-tflops needs a value}"; shift ;;
    --parts) PARTS="${2:?--parts needs a list}"; shift ;;
    --models) MODELS="${2:?--models needs a folder}"; shift ;;
    --budget-s) BUDGET="${2:?--budget-s needs seconds}"; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) usage >&2; die "unknown option $1" ;;
    *) [[ -z "$OUT" ]] || die "one OUT_DIR only (got $OUT and $1)"; OUT="$1" ;;
  esac
  shift
done
[[ -n "$OUT" ]] || { usage >&2; die "OUT_DIR is required"; }
for part in ${PARTS//,/ }; do
  case "$part" in serving_8b|wire|serving_1b|memory|overhead|concurrency|concurrency_ray|device_map|fairness|deterministic) ;;
    *) die "unknown part $part" ;; esac
done

START=$(date +%s)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$OUT" "$MODELS"
OUT="$(cd "$OUT" && pwd)" MODELS="$(cd "$MODELS" && pwd)"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if [[ -n "${PYTHON:-}" ]]; then PY="$(command -v "$PYTHON" || echo "$PYTHON")"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"
else PY="$(command -v python3 || true)"; fi
[[ -n "$PY" ]] || die "no python: set PYTHON"
cd "$OUT"  # parts run here: the checkout's own adpa/ folder must not shadow the package on sys.path

# adpa importable? An installed checkout is; a bare copy of the tree (a lent GPU machine) gets the
# installed layout as links (pyproject's package-dir) on PYTHONPATH.
if ! "$PY" -c "import adpa.bench" 2>/dev/null; then
  SRC="${TMPDIR:-/tmp}/adpa-suite-src"
  echo "[suite] adpa is not installed for $PY: linking the sources as installed under $SRC"
  "$PY" - "$ROOT" "$SRC" <<'EOF'
import pathlib, shutil, sys, tomllib
root, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
shutil.rmtree(dest, ignore_errors=True)
dirs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
(dest / "adpa").mkdir(parents=True)
for f in (root / dirs["adpa"]).glob("*.py"):
    (dest / "adpa" / f.name).symlink_to(f)
for package, folder in dirs.items():
    if package != "adpa":
        (dest / package.replace(".", "/")).symlink_to(root / folder, target_is_directory=True)
EOF
  export PYTHONPATH="$SRC${PYTHONPATH:+:$PYTHONPATH}"
fi

# What every part needs (found, not imported: quick), and the generated stubs against this protobuf
# (imported: a runtime older than the stubs fails here). Ray only for concurrency_ray.
MISSING=$("$PY" - <<'EOF'
import importlib, importlib.util
missing = [name for name in ("torch", "transformers", "tokenizers", "safetensors", "grpc", "grpc_health",
                             "grpc_reflection", "google.protobuf", "fastapi", "uvicorn", "pydantic", "pydantic_settings",
                             "prometheus_client", "httpx", "yaml", "datasets", "trl", "accelerate", "matplotlib")
           if importlib.util.find_spec(name.split(".")[0]) is None]
try:
    importlib.import_module("adpa.v1.scoring_pb2")
except Exception as err:  # noqa: BLE001 - reported with the rest
    missing.append(f"adpa.v1.scoring_pb2 ({type(err).__name__}: {err})")
print(", ".join(missing))
EOF
) || die "$PY cannot run the import check"
[[ -z "$MISSING" ]] || die "missing for $PY: $MISSING (on a machine without a registry, carry them as wheels)"
HAVE_RAY=1; "$PY" -c "import importlib.util as u; exit(u.find_spec('ray') is None)" 2>/dev/null || HAVE_RAY=0

if ((SMOKE)); then
  DEVICE=cpu DTYPE=float32 BIG=tiny HUGE=tiny WIDE=tiny THREADS=1
  echo "[suite] smoke run on the CPU: tiny presets and durations; the numbers mean nothing"
elif ((DRY)); then
  DEVICE=cuda DTYPE=bfloat16 BIG=1b HUGE=8b WIDE=tiny-128k THREADS=8
else
  command -v nvidia-smi >/dev/null || die "nvidia-smi not found: no NVIDIA GPU here (for a CPU check: --smoke)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || die "nvidia-smi failed"
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || die "torch.cuda.is_available() is False for $PY (a CPU build of torch?)"
  DEVICE=cuda DTYPE=bfloat16 BIG=1b HUGE=8b WIDE=tiny-128k THREADS=8
  [[ -n "$PEAK" ]] || echo "[suite] warning: no --peak-tflops: MFU is reported as null"
fi
PEAK_FLAG=(); [[ -z "$PEAK" ]] || PEAK_FLAG=(--peak-tflops "$PEAK")
TIMEOUT=(); command -v timeout >/dev/null && TIMEOUT=(timeout --kill-after=20)
BENCH=("$PY" -m adpa.cli bench)
: >"$OUT/.parts.tsv"
FAILED=0

skip_part() {  # NAME REASON: recorded in suite.json; not a failure
  if [[ ",$PARTS," != *",$1,"* ]]; then return 0; fi
  echo "[suite] $1: SKIPPED, $2"
  printf '%s\tskipped\t0\t%s\t\n' "$1" "$2" >>"$OUT/.parts.tsv"
}

run_part() {  # NAME TIMEOUT_S COMMAND...
  local name="$1" limit="$2"; shift 2
  if [[ ",$PARTS," != *",$name,"* ]]; then return 0; fi
  local now=$(( $(date +%s) - START ))
  local left=$(( BUDGET - now ))
  if (( left < 30 )); then
    echo "[suite] +${now}s $name: SKIPPED, ${left}s of the ${BUDGET}s budget left"
    printf '%s\tskipped\t0\tout of time\t%s\n' "$name" "$*" >>"$OUT/.parts.tsv"; FAILED=1; return 0
  fi
  (( limit <= left )) || limit=$left
  if ((DRY)); then echo "[suite] $name (timeout ${limit}s): $*"; return 0; fi
  echo "[suite] +${now}s $name (timeout ${limit}s): $*"
  local t0 rc=0
  t0=$(date +%s)
  if ((${#TIMEOUT[@]})); then "${TIMEOUT[@]}" "$limit" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
  else "$@" >"$OUT/$name.log" 2>&1 || rc=$?; fi
  local took=$(( $(date +%s) - t0 ))
  if (( rc == 0 )) && "$PY" -c "import json, sys; json.load(open(sys.argv[1]))" "$OUT/$name.json" 2>/dev/null; then
    echo "[suite] $name: ok in ${took}s"
  else
    (( rc != 0 )) || rc=1  # exited 0 without a readable JSON
    echo "[suite] $name: FAILED (exit $rc$( ((rc == 124 || rc == 137)) && echo ', timed out')) after ${took}s; see $OUT/$name.log"
    FAILED=1
  fi
  tail -n 25 "$OUT/$name.log" | sed 's/^/    /'
  printf '%s\t%s\t%s\t\t%s\n' "$name" "$rc" "$took" "$*" >>"$OUT/.parts.tsv"
}

if ((SMOKE)); then
  SERVE_SIZE=(--batch 2 --seq-len 64 --scored 32 --warmup 0 --repeats 1)
  run_part serving_8b 120 "${BENCH[@]}" serving --preset "$HUGE" --device "$DEVICE" --dtype "$DTYPE" --skip-grpc \
    --parts throughput "${SERVE_SIZE[@]}" "${PEAK_FLAG[@]}" --out "$OUT/serving_8b.json"
  run_part wire 120 "${BENCH[@]}" serving --preset "$WIDE" --device "$DEVICE" --dtype "$DTYPE" --parts wire \
    "${SERVE_SIZE[@]}" --out "$OUT/wire.json"
  run_part serving_1b 120 "${BENCH[@]}" serving --preset "$BIG" --device "$DEVICE" --dtype "$DTYPE" \
    --parts throughput --models-dir "$MODELS" "${SERVE_SIZE[@]}" "${PEAK_FLAG[@]}" --out "$OUT/serving_1b.json"
  run_part memory 120 "${BENCH[@]}" memory --device "$DEVICE" --dtype "$DTYPE" --vocabs 256 --positions 64 \
    --supports topk --hidden 32 --layers 1 --seq-len 64 --out "$OUT/memory.json"
  run_part overhead 120 "${BENCH[@]}" step_overhead --device "$DEVICE" --teacher-preset "$BIG" --models-dir "$MODELS" \
    --steps 2 --batch-size 2 --repeats 1 --out "$OUT/overhead.json"
  run_part concurrency 120 "${BENCH[@]}" concurrency --preset "$BIG" --device "$DEVICE" --models-dir "$MODELS" \
    --modes standalone --batching on --trainers 2 --duration 0.5 --warmup 0.2 --out "$OUT/concurrency.json"
  run_part fairness 120 "${BENCH[@]}" fairness --preset "$BIG" --device "$DEVICE" --models-dir "$MODELS" \
    --modes standalone --trainers 3 --big-batch 4 --window 1 --warmup 0.5 --out "$OUT/fairness.json"
  run_part deterministic 120 "${BENCH[@]}" deterministic --preset "$BIG" --device "$DEVICE" --models-dir "$MODELS" \
    --capacity 1 --requests 2 --per-thread 1 --max-len 64 --trainers 2 --duration 0.5 --out "$OUT/deterministic.json"
else
  # Requests of 8-16 sequences of 1024 tokens with the last 512 scored: a prompt and a response.
  run_part serving_8b 200 "${BENCH[@]}" serving --preset "$HUGE" --device "$DEVICE" --dtype "$DTYPE" --skip-grpc \
    --parts throughput --batch 8 --seq-len 1024 --scored 512 --warmup 1 --repeats 3 --threads "$THREADS" \
    "${PEAK_FLAG[@]}" --out "$OUT/serving_8b.json"
  run_part wire 90 "${BENCH[@]}" serving --preset "$WIDE" --device "$DEVICE" --dtype "$DTYPE" --parts wire \
    --batch 4 --seq-len 256 --scored 128 --threads "$THREADS" --out "$OUT/wire.json"
  run_part serving_1b 240 "${BENCH[@]}" serving --preset "$BIG" --device "$DEVICE" --dtype "$DTYPE" \
    --parts throughput --models-dir "$MODELS" --batch 16 --seq-len 1024 --scored 512 --warmup 1 --repeats 3 \
    --threads "$THREADS" "${PEAK_FLAG[@]}" --out "$OUT/serving_1b.json"
  run_part memory 150 "${BENCH[@]}" memory --device "$DEVICE" --dtype "$DTYPE" --vocabs 128256 \
    --positions 1024,8192,16384 --supports topk,dense --hidden 2048 --layers 2 --out "$OUT/memory.json"
  run_part overhead 200 "${BENCH[@]}" step_overhead --device "$DEVICE" --dtype "$DTYPE" --teacher-preset "$BIG" \
    --models-dir "$MODELS" --steps 20 --repeats 1 --out "$OUT/overhead.json"
  run_part concurrency 150 "${BENCH[@]}" concurrency --preset "$BIG" --device "$DEVICE" --models-dir "$MODELS" \
    --modes standalone --batching off,on --trainers 1,8 --duration 2 --warmup 0.5 --out "$OUT/concurrency.json"
  if ((HAVE_RAY)); then
    run_part concurrency_ray 150 "${BENCH[@]}" concurrency --preset "$BIG" --device "$DEVICE" --models-dir "$MODELS" \
      --modes ray --batching on --trainers 1,8 --duration 2 --warmup 0.5 --out "$OUT/concurrency_ray.json"
  else
    skip_part concurrency_ray "ray is not installed for $PY"
  fi
  GPUS=$( ((DRY)) && echo 2 || "$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  if ((GPUS >= 2)); then
    run_part device_map 90 "${BENCH[@]}" device_map --device cuda:0 --device-map auto --dtype float32 \
      --out "$OUT/device_map.json"
  else
    skip_part device_map "needs 2 GPUs, $PY sees $GPUS"
  fi
  # Last: the scheduler's turns between unequal trainers, and what batch-invariant answers cost where
  # batching pays (a GPU); the answers' differences are in the JSON.
  run_part fairness 120 "${BENCH[@]}" fairness --preset "$BIG" --device "$DEVICE" --models-dir "$MODELS" \
    --modes standalone --long-len 768-1024 --short-len 192-256 --window 20 --warmup 3 --out "$OUT/fairness.json"
  run_part deterministic 150 "${BENCH[@]}" deterministic --preset "$BIG" --device "$DEVICE" --models-dir "$MODELS" \
    --max-len 1024 --duration 5 --out "$OUT/deterministic.json"
fi

if ((DRY)); then rm -f "$OUT/.parts.tsv"; exit 0; fi

# suite.json: the machine, the versions, and what each part did.
"$PY" - "$OUT" "$SMOKE" "$PEAK" "$BUDGET" "$START" "$ROOT" <<'EOF' || FAILED=1
import json, pathlib, platform, subprocess, sys, time
from importlib.metadata import version
out, smoke, peak, budget, start = pathlib.Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3], sys.argv[4], sys.argv[5]
root = sys.argv[6]
gpu = cuda = None
if not smoke:
    import torch
    cuda, gpu = torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
def run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as err:  # noqa: BLE001
        return f"unavailable: {err}"
parts = []
for line in (out / ".parts.tsv").read_text().splitlines():
    name, status, seconds, reason, command = line.split("\t", 4)
    parts.append({"part": name, "exit": None if status == "skipped" else int(status),
                  "skipped": reason or None if status == "skipped" else None,
                  "timed_out": status in ("124", "137"), "seconds": int(seconds), "command": command,
                  "json": f"{name}.json" if (out / f"{name}.json").exists() else None, "log": f"{name}.log"})
doc = {
    "smoke": smoke, "peak_tflops": float(peak) if peak else None, "budget_s": int(budget),
    "seconds": int(time.time()) - int(start), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(int(start))),
    "python": platform.python_version(), "torch": version("torch"), "transformers": version("transformers"),
    "cuda": cuda, "gpu": gpu,
    "nvidia_smi": None if smoke else run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                                          "--format=csv,noheader"]),
    "git_commit": run(["git", "-C", root, "rev-parse", "HEAD"]),
    "git_dirty": bool(run(["git", "-C", root, "status", "--porcelain"])),
    "cpus": __import__("os").cpu_count(), "parts": parts,
}
(out / "suite.json").write_text(json.dumps(doc, indent=2) + "\n")
EOF
rm -f "$OUT/.parts.tsv"
echo "[suite] done in $(( $(date +%s) - START ))s; results in $OUT (suite.json, <part>.json, <part>.log)"
exit "$FAILED"
