#!/usr/bin/env bash
# DFvT on one CUDA GPU, in one run of about 5-7 minutes on an H100/H200, written up as a markdown report:
#   a. python, torch and the GPU; CUDA must be available;
#   b. every CUDA test of the suite (pytest -k cuda: golden logits on CUDA in float64/float32 on both paths, the two
#      paths' training steps agreeing in float64, fp16 AMP training steps, fused AdamW, predict.py on CUDA);
#   c. an ImageNet-like folder dataset of JPEGs cut from real photographs (benchmarks/imagenet_like.py);
#   d. main.py under torchrun (one process): one training epoch, --eval of its checkpoint (also with DATA.LOADER dali),
#      --throughput;
#   e. end-to-end training images/s, real loader vs the same step on synthetic batches, T and S
#      (benchmarks/train_e2e.py): how loader-bound training is, with the torch loader's two pipelines and with DALI
#      (DATA.LOADER dali: JPEG decoding and augmentation on the GPU);
#   f. the train step of T/S/B at batch 128, upstream-like (straightforward path, fp16 autocast + GradScaler, no
#      compile) vs ours (fast path, AMP_DTYPE auto = bf16 without a scaler on this GPU): benchmarks/benchmark.py
#      (bare step: forward, cross-entropy, backward, AdamW; with --fast-dtype auto where benchmark.py has that
#      option, else both paths in fp16), then train_e2e.py --synthetic-only (the whole training loop: Mixup, label
#      smoothing, clipping, the repo's optimizer); with COMPILE=1 also ours under torch.compile (DFvT-T).
# Every step is timed and has a time limit; a failure is recorded and the next step runs. No step starts once the
# time budget (BUDGET_S, default 450 s) is spent, so the whole run stays under 8 minutes.
#
# Usage: benchmarks/gpu_check.sh [REPORT]   REPORT: the markdown report (default gpu_report.md); the full log goes
#        to ${REPORT%.md}.log, the datasets and run outputs to a fresh folder under /tmp (deleted unless KEEP_WORK=1).
# Environment: PYTHON (default python, else python3), BUDGET_S, TRAIN_IMAGES (default 8000: e's timed steps stay in
#              one epoch of batch 128), COMPILE=1, KEEP_WORK=1, DRY_RUN=1 (print the commands, run none; for tests).
#
# Python packages: torch, torchvision, timm, PyYAML, Pillow, numpy, scikit-learn and pytest must import. yacs and
# termcolor (pure Python) are installed from wheels in .whl/ at the repo root when they do not import (a GPU machine
# without network). Prepare the wheels where pip reaches PyPI (.whl/ is git-ignored; carry it to the GPU machine):
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl "yacs>=0.1.8" "termcolor>=2.0"
# NVIDIA DALI is optional: the DALI steps run where `import nvidia.dali` works (requirements-dali.txt, or its wheels
# and their dependencies' in .whl/: every wheel there is installed) and are recorded as skipped elsewhere.
set -uo pipefail

REPORT=$(realpath -m "${1:-gpu_report.md}")
LOG="${REPORT%.md}.log"
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD
export PYTHONUNBUFFERED=1 LC_ALL=C
PY=${PYTHON:-python}
command -v "$PY" >/dev/null 2>&1 || PY=python3
BUDGET_S=${BUDGET_S:-450}
TRAIN_IMAGES=${TRAIN_IMAGES:-8000}
DRY_RUN=${DRY_RUN:-0}
WORK=$(mktemp -d /tmp/dfvt_gpu_check.XXXXXX)
DATA=$WORK/data
OUTDIR=$WORK/out
CKPT=$OUTDIR/dfvt_tiny/gpu/ckpt_epoch_0.pth
mkdir -p "$WORK/logs" "$(dirname "$REPORT")"

STEP_NAMES=() STEP_WHAT=() STEP_STATUS=() STEP_SECONDS=()
STEP_PID='' TAIL_PID=''
FAILED=0
T0=$(date +%s%3N)

elapsed_s() { echo $((($(date +%s%3N) - T0) / 1000)); }

# step NAME LIMIT_S WHAT -- CMD...: run CMD with a time limit (cut to the budget left), its output to the console and
# to $WORK/logs/NAME.log; record its status and seconds. A failure is recorded; the caller carries on.
step() {
  local name=$1 limit=$2 what=$3
  shift 4
  local left=$((BUDGET_S - $(elapsed_s)))
  echo
  echo "== $name: $what ($(date +%T), $(elapsed_s) s in)"
  echo "\$ $(printf '%q ' "$@")"
  STEP_NAMES+=("$name") STEP_WHAT+=("$what")
  if [ "$DRY_RUN" = 1 ]; then
    : >"$WORK/logs/$name.log"
    STEP_STATUS+=("dry run") STEP_SECONDS+=("-")
    return 0
  fi
  if [ "$left" -lt 15 ]; then
    echo "!! $name skipped: the time budget of $BUDGET_S s is spent"
    STEP_STATUS+=("skipped (time budget)") STEP_SECONDS+=("-")
    FAILED=1
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local start rc seconds status
  start=$(date +%s%3N)
  if declare -F "$1" >/dev/null; then # a function of this script: no time limit (timeout runs programs only)
    "$@" 2>&1 | tee "$WORK/logs/$name.log"
    rc=${PIPESTATUS[0]}
  else
    # timeout puts the step in a process group of its own and ends the whole group (loader workers, torchrun's
    # processes, pools) at the limit; its output goes to the step's log, and tail shows it until the step ends.
    : >"$WORK/logs/$name.log"
    timeout -k 15 "$limit" "$@" >"$WORK/logs/$name.log" 2>&1 &
    STEP_PID=$!
    tail -n +1 -s 0.2 -f --pid="$STEP_PID" "$WORK/logs/$name.log" &
    TAIL_PID=$!
    wait "$STEP_PID"
    rc=$?
    wait "$TAIL_PID"
    STEP_PID='' TAIL_PID=''
  fi
  seconds=$(awk -v ms=$(($(date +%s%3N) - start)) 'BEGIN { printf "%.1f", ms / 1000 }')
  case $rc in
    0) status=ok ;;
    124) status="timed out (limit $limit s)" ;;
    137) status="killed (time limit $limit s + 15 s, or out of memory)" ;;
    *) status="failed (exit $rc)" ;;
  esac
  [ "$rc" -eq 0 ] || FAILED=1
  echo "== $name: $status after $seconds s"
  STEP_STATUS+=("$status") STEP_SECONDS+=("$seconds")
  return "$rc"
}

# Lines of a step's log matching an extended regex, without terminal colours (main.py colours its log prefixes).
grep_log() { sed 's/\x1b\[[0-9;]*m//g' "$WORK/logs/$1.log" 2>/dev/null | grep -E "$2"; }

# yacs and termcolor from .whl/ where they do not import; other wheels there (DALI's) are installed too.
deps() {
  local missing=0 extra=0
  "$PY" -c "import yacs, termcolor" 2>/dev/null || missing=1
  ls .whl/*.whl 2>/dev/null | grep -v -q -E '/(yacs|termcolor)-' && extra=1
  if [ "$missing" = 0 ] && [ "$extra" = 0 ]; then
    echo "yacs and termcolor import"
    return 0
  fi
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "yacs/termcolor do not import and there is no .whl/ folder (see the top of benchmarks/gpu_check.sh)"
    return 1
  fi
  PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps \
    --target "$WORK/site" .whl/*.whl || return 1
  echo "installed from .whl/ into $WORK/site (on PYTHONPATH from here on): $(cd .whl && echo *.whl)"
}

# skip NAME WHAT WHY: record a step that does not run here (not a failure).
skip() {
  echo
  echo "== $1: $2: skipped ($3)"
  STEP_NAMES+=("$1") STEP_WHAT+=("$2") STEP_STATUS+=("skipped ($3)") STEP_SECONDS+=("-")
  : >"$WORK/logs/$1.log"
}

ENV_CODE='import os, sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version())
print("CPU cores usable:", len(os.sched_getaffinity(0)))
assert torch.cuda.is_available(), "CUDA is not available: no GPU visible to torch"
p = torch.cuda.get_device_properties(0)
print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs; {torch.cuda.device_count()} device(s); bf16 {torch.cuda.is_bf16_supported()}")
import torchvision, timm, yacs, termcolor, PIL, sklearn
print("torchvision", torchvision.__version__, "| timm", timm.__version__, "| Pillow", PIL.__version__, "| scikit-learn", sklearn.__version__)
print("CUDA available: True")'

# The markdown table of two train_e2e.py --synthetic-only JSON files: upstream-like (first) vs ours (second).
compare_loops() {
  "$PY" - "$1" "$2" <<'EOF'
import json
import sys

up, ours = (json.load(open(path))["rows"] for path in sys.argv[1:3])
print("| variant | upstream-like img/s | ours img/s | ours / upstream-like |")
print("| --- | --- | --- | --- |")
for u, o in zip(up, ours):
    ratio = o["synthetic_ips"] / u["synthetic_ips"]
    print(f"| {u['variant']} | {u['synthetic_ips']:.1f} | {o['synthetic_ips']:.1f} | {ratio:.2f}x |")
print()
for label, rows in (("upstream-like", up), ("ours", ours)):
    r = rows[0]
    path = "fast" if r["fast_path"] else "straightforward"
    print(f"- {label}: {r['precision']}, {path} path, batch {r['batch_size']}, {r['timed_steps']} timed steps")
EOF
}

# The DALI rows of e (DATA.LOADER dali) against the torch loader's fast pipeline, and the goal: real images/s within
# 20 % of the synthetic rate (real / synthetic >= 0.80).
compare_loaders() {
  "$PY" - "$1" "$2" <<'EOF'
import json
import sys

torch_rows, dali_rows = (
    {r["variant"]: r for r in json.load(open(path))["rows"] if r["pipeline"] == pipeline}
    for path, pipeline in zip(sys.argv[1:3], ("fast", "dali"))
)
print("| variant | torch (fast) img/s | dali img/s | dali / torch | dali real / synthetic | goal: >= 0.80 |")
print("| --- | --- | --- | --- | --- | --- |")
for variant, d in dali_rows.items():
    t = torch_rows.get(variant)
    ratio = d["real_over_synthetic"]
    versus = f"{t['real_ips']:.1f} | {d['real_ips']:.1f} | {d['real_ips'] / t['real_ips']:.2f}x" if t else "-"
    print(f"| {variant} | {versus} | {ratio:.2f} | {'met' if ratio >= 0.8 else 'NOT met'} |")
EOF
}

# Ctrl-C or a TERM: end the running step's process group, write the report of what ran, and stop.
stop_step() {
  [ -n "$STEP_PID" ] && kill -TERM -- "-$STEP_PID" 2>/dev/null
  [ -n "$TAIL_PID" ] && kill "$TAIL_PID" 2>/dev/null
  echo "!! interrupted"
  if [ "${#STEP_STATUS[@]}" -lt "${#STEP_NAMES[@]}" ]; then
    STEP_STATUS+=("interrupted") STEP_SECONDS+=("-")
  fi
  FAILED=1
  write_report
  exit 130
}

run_all() {
  trap stop_step INT TERM
  echo "DFvT GPU check: $REPO ($(git rev-parse --short HEAD 2>/dev/null || echo '?')) on $(hostname), work folder $WORK"
  echo "report $REPORT, log $LOG, python $PY, budget $BUDGET_S s"
  local torchrun=("$PY" -m torch.distributed.run --standalone --nproc_per_node 1)
  local main_common=(--cfg configs/tiny.yaml --data-path "$DATA" --batch-size 128 --output "$OUTDIR")

  step deps 120 "yacs and termcolor (from .whl/ when missing)" -- deps
  if [ "$DRY_RUN" != 1 ] && [ -d "$WORK/site" ]; then
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  step a-env 60 "python, torch, GPU; CUDA available" -- "$PY" -c "$ENV_CODE"
  local dali=1 no_dali="NVIDIA DALI does not import: pip install -r requirements-dali.txt, or its wheels in .whl/"
  "$PY" -c "import nvidia.dali" >/dev/null 2>&1 || dali=0 # (a dry run asks too: the commands it lists are real)
  step b-cuda-tests 240 "every CUDA test (pytest -k cuda)" -- \
    "$PY" -m pytest -q -rA -p no:cacheprovider -m "not slow or slow" tests -k cuda
  step c-data 120 "ImageNet-like JPEGs: $TRAIN_IMAGES train, 500 val, 10 classes" -- \
    "$PY" benchmarks/imagenet_like.py "$DATA" --train "$TRAIN_IMAGES" --val 500 --classes 10
  step d-train 180 "main.py under torchrun: one epoch of DFvT-T at batch 128" -- \
    "${torchrun[@]}" main.py "${main_common[@]}" --tag gpu \
    --opts DATA.DATASET folder TRAIN.EPOCHS 1 TRAIN.WARMUP_EPOCHS 0 PRINT_FREQ 5
  step d-eval 90 "main.py --eval of the checkpoint" -- \
    "${torchrun[@]}" main.py "${main_common[@]}" --tag gpu-eval --eval --resume "$CKPT" --opts DATA.DATASET folder
  if [ "$dali" = 1 ]; then
    step d-eval-dali 120 "main.py --eval of the checkpoint with DATA.LOADER dali (decoding on the GPU)" -- \
      "${torchrun[@]}" main.py "${main_common[@]}" --tag gpu-eval-dali --eval --resume "$CKPT" \
      --opts DATA.DATASET folder DATA.LOADER dali
  else
    skip d-eval-dali "main.py --eval with DATA.LOADER dali" "$no_dali"
  fi
  step d-throughput 90 "main.py --throughput on a validation batch" -- \
    "${torchrun[@]}" main.py "${main_common[@]}" --tag gpu-throughput --throughput --opts DATA.DATASET folder
  step e-train-e2e 240 "end-to-end training images/s, real loader vs synthetic batches (T, S; both pipelines)" -- \
    "$PY" benchmarks/train_e2e.py --device cuda --variant tiny small --pipeline fast --pipeline upstream \
    --data-path "$DATA" --batch-size 128 --steps 45 --json "$WORK/e2e.json"
  if [ "$dali" = 1 ]; then
    step e-train-e2e-dali 240 "end-to-end training images/s with DATA.LOADER dali, real vs synthetic (T, S)" -- \
      "$PY" benchmarks/train_e2e.py --device cuda --variant tiny small --pipeline dali \
      --data-path "$DATA" --batch-size 128 --steps 45 --json "$WORK/e2e_dali.json"
  else
    skip e-train-e2e-dali "end-to-end training images/s with DATA.LOADER dali" "$no_dali"
  fi
  local fast_dtype=() # benchmark.py's option for the fast path's autocast dtype, where it has one
  grep -q -- '"--fast-dtype"' benchmarks/benchmark.py && fast_dtype=(--fast-dtype auto)
  step f-benchmark 240 "model train step and eval, straightforward (fp16 + GradScaler) vs fast path" -- \
    "$PY" benchmarks/benchmark.py --device cuda --amp "${fast_dtype[@]}" --variants tiny small base \
    --batch-size 128 --train-batch-size 128
  step f-loop-upstream-like 150 "training loop, synthetic batches: fp16 + GradScaler, straightforward path" -- \
    "$PY" benchmarks/train_e2e.py --synthetic-only --device cuda --variant tiny small base --batch-size 128 \
    --steps 30 --json "$WORK/f_upstream_like.json" --opts MODEL.DFVT.FAST_PATH False AMP_DTYPE float16
  step f-loop-ours 150 "training loop, synthetic batches: the defaults (AMP_DTYPE auto, fast path)" -- \
    "$PY" benchmarks/train_e2e.py --synthetic-only --device cuda --variant tiny small base --batch-size 128 \
    --steps 30 --json "$WORK/f_ours.json"
  if [ "${COMPILE:-0}" = 1 ]; then
    step f-loop-ours-compiled 240 "training loop, synthetic batches: the defaults under torch.compile (DFvT-T)" -- \
      "$PY" benchmarks/train_e2e.py --synthetic-only --device cuda --variant tiny --batch-size 128 --steps 30 \
      --compile
  fi
  echo
  echo "== done after $(elapsed_s) s; $([ "$FAILED" = 0 ] && echo 'every step passed' || echo 'some steps FAILED')"
  write_report
  echo "report: $REPORT"
  return "$FAILED"
}

write_report() {
  local i
  {
    echo "# DFvT GPU check"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC') · commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')" \
      "$(git diff --quiet HEAD 2>/dev/null || echo '(with uncommitted changes)') · $(hostname) ·" \
      "benchmarks/gpu_check.sh, $(elapsed_s) s · full log: \`$LOG\`"
    echo
    echo "| step | what | status | seconds |"
    echo "| --- | --- | --- | --- |"
    for i in "${!STEP_NAMES[@]}"; do
      echo "| ${STEP_NAMES[$i]} | ${STEP_WHAT[$i]} | ${STEP_STATUS[$i]} | ${STEP_SECONDS[$i]} |"
    done
    echo
    echo "## a. Environment"
    echo
    echo '```text'
    grep_log deps '.'
    grep_log a-env '.'
    echo '```'
    echo
    echo "## b. CUDA tests"
    echo
    echo '```text'
    grep_log b-cuda-tests '^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)|[0-9]+ (passed|failed|errors?|skipped|deselected)'
    echo '```'
    echo
    echo "## d. main.py under torchrun (one process, batch 128, DFvT-T, $TRAIN_IMAGES training images)"
    echo
    echo "With one process main.py joins no process group (world size 1), so NCCL itself is not exercised."
    echo
    echo '```text'
    echo "-- train"
    grep_log d-train 'Run:|Precision:|Loader:|Acc@1|Max accuracy|Training time|EPOCH 0 training takes'
    grep_log d-train 'Train: \[' | tail -n 1
    echo "-- eval"
    grep_log d-eval 'Acc@1|Precision:|Loader:'
    echo "-- eval with DATA.LOADER dali (same checkpoint and images: agrees within the resize differences)"
    grep_log d-eval-dali 'Acc@1|Loader:'
    echo "-- throughput"
    grep_log d-throughput 'throughput [0-9.]+ images/s|Precision:|Loader:'
    echo '```'
    echo
    echo "## e. End-to-end training: real loader vs synthetic batches"
    echo
    echo "Same model, optimizer, precision and training loop (engine.train_one_epoch); synthetic = one pre-made batch"
    echo "already on the GPU, no loader. real / synthetic: 1.00 = the loader keeps up; 0.50 = it halves the speed."
    echo
    grep_log e-train-e2e '^(\||device |loader restarts)'
    echo
    echo "With DATA.LOADER dali (NVIDIA DALI: decoding with device=mixed, augmentation on the GPU):"
    echo
    grep_log e-train-e2e-dali '^(\||device |loader restarts)'
    if [ -s "$WORK/e2e.json" ] && [ -s "$WORK/e2e_dali.json" ]; then
      echo
      compare_loaders "$WORK/e2e.json" "$WORK/e2e_dali.json"
    fi
    echo
    echo "## f. Train step at batch 128: upstream-like vs ours"
    echo
    if grep -q -- '"--fast-dtype"' benchmarks/benchmark.py; then
      echo "benchmark.py --amp --fast-dtype auto (eval batch and train step at 128):"
    else
      echo "benchmark.py --amp (this benchmark.py has no --fast-dtype: both paths ran under fp16 + GradScaler):"
    fi
    echo
    echo '```text'
    grep_log f-benchmark '.' | grep -v -E '^\[|^load average|^\|'
    echo '```'
    echo
    grep_log f-benchmark '^\|'
    echo
    echo "The repo's training loop on synthetic batches (train_e2e.py --synthetic-only), upstream-like vs ours:"
    echo
    if [ -s "$WORK/f_upstream_like.json" ] && [ -s "$WORK/f_ours.json" ]; then
      compare_loops "$WORK/f_upstream_like.json" "$WORK/f_ours.json"
    else
      echo "(no figures: see the failures below)"
    fi
    if [ "${COMPILE:-0}" = 1 ]; then
      echo
      echo "Ours under torch.compile:"
      echo
      grep_log f-loop-ours-compiled '^(\||device )'
    fi
    local failed=()
    for i in "${!STEP_NAMES[@]}"; do
      case ${STEP_STATUS[$i]} in ok | "dry run" | "skipped (NVIDIA DALI"*) ;; *) failed+=("${STEP_NAMES[$i]}") ;; esac
    done
    if [ "${#failed[@]}" -gt 0 ]; then
      echo
      echo "## Failures (the first error lines, then the last 40 lines of each)"
      for name in "${failed[@]}"; do
        echo
        echo "### $name"
        echo
        echo '```text'
        grep_log "$name" 'ERROR|Error:|error:|FAILED' | head -n 10
        echo "..."
        sed 's/\x1b\[[0-9;]*m//g' "$WORK/logs/$name.log" 2>/dev/null | tail -n 40
        echo '```'
      done
    fi
  } >"$REPORT"
}

cleanup() {
  if [ "${KEEP_WORK:-0}" = 1 ]; then
    echo "kept $WORK"
  else
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT
run_all 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
