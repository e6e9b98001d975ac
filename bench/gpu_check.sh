#!/usr/bin/env bash
# GPU readiness check for granq_search on a machine with one NVIDIA GPU (at most 10 minutes).
#
#   bash bench/gpu_check.sh            # from the repository root; the caller captures stdout
#
# Steps (each with its own timeout, all capped by the 10-minute total; a failed step does not
# stop the later ones, and the exit status is non-zero if any step failed):
#   0. setup   .venv/bin/python exists, else: python3 -m venv --system-site-packages .venv and
#              pip install -e . (reuses a system torch when there is one)
#   1. env     nvidia-smi; torch version, torch.cuda.is_available(), device name
#   2. bench   bench/quantizer_latency.py --device cuda --quick --no-write (docs/ untouched)
#   3. train   one epoch of the embedded digits preset with --device cuda; the saved student's
#              tensors must be on CUDA
#   4. search  2 trials of search_spaces/digits.yaml, 2 at a time, --gpus-per-trial 0.5; the
#              device every trial reported to Ray (its result.json "device" field) must be cuda
#
# Environment:
#   GPU_CHECK_ALLOW_CPU=1   dry run on a machine without a GPU: device cpu, --gpus-per-trial 0,
#                           1 benchmark round on 2 threads, CUDA assertions skipped
#   GPU_CHECK_TOTAL_S=600   total time budget in seconds
#   GPU_CHECK_KEEP=1        keep the temporary folder (it is kept anyway when a step failed)
#   PYTHON=python3          interpreter used to create .venv when it is missing
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

ALLOW_CPU="${GPU_CHECK_ALLOW_CPU:-0}"
TOTAL_S="${GPU_CHECK_TOTAL_S:-600}"
PY="$ROOT/.venv/bin/python"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
export GPU_CHECK_WORK="$WORK"
export PYTHONUNBUFFERED=1
START=$SECONDS

if [[ "$ALLOW_CPU" == "1" ]]; then
    DEV=cpu
    GPUS_PER_TRIAL=0   # Ray would wait forever for a GPU that is not there
    BENCH_ARGS=(--rounds "${GPU_CHECK_BENCH_ROUNDS:-1}" --threads 2)
else
    DEV=cuda
    GPUS_PER_TRIAL=0.5
    BENCH_ARGS=(--quick)
fi
export GPU_CHECK_DEV="$DEV" GPU_CHECK_ALLOW_CPU="$ALLOW_CPU"

STEP_NAMES=()
STEP_RESULTS=()
STEP_TIMES=()
FAILED=0

remaining() { echo $(( TOTAL_S - (SECONDS - START) )); }

# step_limit LIMIT: LIMIT seconds, or what is left of the total budget (minus 5 s for the summary)
step_limit() {
    local left=$(( $(remaining) - 5 ))
    if (( left < $1 )); then echo "$left"; else echo "$1"; fi
}

# run_step NAME LIMIT FUNCTION: runs FUNCTION in a subshell with errexit on (a function called
# as an `if` condition would run with errexit off), records PASS/FAIL and goes on.
run_step() {
    local name="$1" limit="$2" fn="$3" t rc t0
    t="$(step_limit "$limit")"
    printf '\n==================== %s (timeout %ss) ====================\n' "$name" "$t"
    t0=$SECONDS
    if (( t < 10 )); then
        echo "no time left in the ${TOTAL_S}s budget"
        rc=1
    else
        set +e
        ( set -euo pipefail; STEP_TIMEOUT="$t"; "$fn" )
        rc=$?
        set -e
    fi
    local status=PASS
    if (( rc != 0 )); then
        status=FAIL
        FAILED=1
        if (( rc == 124 || rc == 137 )); then
            echo "timed out after ${t}s"
        fi
    fi
    STEP_NAMES+=("$name")
    STEP_RESULTS+=("$status")
    STEP_TIMES+=("$(( SECONDS - t0 ))")
    printf -- '---- %s: %s (exit %s, %ss)\n' "$name" "$status" "$rc" "$(( SECONDS - t0 ))"
}

# ------------------------------------------------------------------------------------ steps

step_setup() {
    if [[ -x "$PY" ]]; then
        echo "venv: $PY ($("$PY" --version 2>&1))"
        return 0
    fi
    echo "no $PY: creating .venv (system site packages visible, so a preinstalled torch is reused)"
    timeout -k 10 60 "${PYTHON:-python3}" -m venv --system-site-packages .venv
    local pip_t=$(( STEP_TIMEOUT - 60 ))
    if (( pip_t < 10 )); then pip_t=10; fi
    timeout -k 10 "$pip_t" "$PY" -m pip install --disable-pip-version-check -q -e .
}

step_env() {
    local smi_ok=1
    if command -v nvidia-smi >/dev/null 2>&1; then
        timeout -k 5 30 nvidia-smi || { echo "FAIL: nvidia-smi exited with $?"; smi_ok=0; }
    elif [[ "$ALLOW_CPU" == "1" ]]; then
        echo "nvidia-smi: not found (allowed: GPU_CHECK_ALLOW_CPU=1)"
    else
        echo "FAIL: nvidia-smi not found"
        smi_ok=0
    fi
    timeout -k 5 "$(( STEP_TIMEOUT - 30 ))" "$PY" - <<'EOF'
import os, sys
import torch
ok = torch.cuda.is_available()
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (built for CUDA {torch.version.cuda})")
print(f"torch.cuda.is_available(): {ok}")
if ok:
    n = torch.cuda.device_count()
    for i in range(n):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i}: {torch.cuda.get_device_name(i)}, {p.total_memory / 2**30:.1f} GiB, "
              f"capability {p.major}.{p.minor}")
    x = torch.randn(1024, 1024, device="cuda")
    print(f"matmul on cuda:0: {float((x @ x).sum()):.3e} (finite: {bool(torch.isfinite((x @ x).sum()))})")
    torch.cuda.synchronize()
elif os.environ["GPU_CHECK_ALLOW_CPU"] == "1":
    print("no CUDA device (allowed: GPU_CHECK_ALLOW_CPU=1)")
else:
    sys.exit("FAIL: torch sees no CUDA device")
EOF
    (( smi_ok ))
}

step_bench() {
    local log="$WORK/bench.log"
    timeout -k 10 "$(( STEP_TIMEOUT - 5 ))" \
        "$PY" bench/quantizer_latency.py --device "$DEV" "${BENCH_ARGS[@]}" --no-write 2>&1 | tee "$log"
    # the table header names the device it measured: "device cuda (NVIDIA ...)"
    if ! grep -q "device $DEV (" "$log"; then
        echo "FAIL: the benchmark did not report device $DEV"
        return 1
    fi
    echo "benchmark ran on: $(grep -o "device $DEV ([^)]*)" "$log" | head -n 1)"
}

step_train() {
    local out="$WORK/train"
    timeout -k 10 "$(( STEP_TIMEOUT - 20 ))" \
        "$PY" tune_main.py train --config digits --device "$DEV" \
        --set train.epochs=1 --set train.warmup_epochs=0 \
        --output-dir "$out" --no-progress --format json >"$WORK/train.json" 2>"$WORK/train.err" \
        || { tail -n 40 "$WORK/train.err"; return 1; }
    tail -n 5 "$WORK/train.err"
    timeout -k 5 15 "$PY" - "$out" <<'EOF'
import json, os, sys
from pathlib import Path
import torch
out = Path(sys.argv[1])
final = json.loads(Path(os.environ["GPU_CHECK_WORK"], "train.json").read_text())
keys = ("val_top1", "val_drop", "test_top1", "bitops")
print("train final:", {k: final[k] for k in keys if k in final})
state = torch.load(out / "student_final.pt", map_location=None, weights_only=True)
devices = sorted({str(v.device) for v in state.values() if torch.is_tensor(v)})
print(f"student_final.pt tensors on: {devices}")
if os.environ["GPU_CHECK_DEV"] == "cuda" and not any(d.startswith("cuda") for d in devices):
    sys.exit("FAIL: the trained student is not on CUDA")
EOF
}

step_search() {
    local out="$WORK/search"
    if [[ "$DEV" == "cuda" ]] && ! timeout -k 5 30 "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
        echo "FAIL: torch sees no CUDA device; not starting a search whose trials would wait forever for a GPU"
        return 1
    fi
    timeout -k 20 "$(( STEP_TIMEOUT - 20 ))" \
        "$PY" tune_main.py search --space digits --num-samples 2 --max-concurrent 2 \
        --gpus-per-trial "$GPUS_PER_TRIAL" --cpus-per-trial 1 \
        --set train.epochs=2 --set train.iters_per_epoch=10 \
        --output-dir "$out" --name gpu_check --no-progress --format json \
        >"$WORK/search.json" 2>"$WORK/search.err" \
        || { tail -n 40 "$WORK/search.err"; return 1; }
    timeout -k 5 15 "$PY" - <<'EOF'
import json, os, sys
from pathlib import Path
outcome = json.loads(Path(os.environ["GPU_CHECK_WORK"], "search.json").read_text())
print(f"search {outcome['name']}: {outcome['status']}, {outcome['num_trials']} trial(s), "
      f"Optuna {outcome['counts']}, {outcome['wall_time_s']:.0f} s")
if outcome.get("leaderboard"):
    print(outcome["leaderboard"].rstrip())
# Each Ray trial reports the device it trained on ("device" in every result); Ray keeps the
# results in <trial folder>/result.json, one JSON object per line.
devices = {}
for rj in sorted(Path(outcome["path"]).rglob("result.json")):
    for line in rj.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if "device" in row:
            devices[row.get("trial_id", rj.parent.name)] = row["device"]
for tid, dev in sorted(devices.items()):
    print(f"trial {tid}: device {dev}")
want = os.environ["GPU_CHECK_DEV"]
problems = []
if outcome["status"] != "finished":
    problems.append(f"status {outcome['status']}")
if outcome["num_trials"] != 2 or len(devices) != 2:
    problems.append(f"{outcome['num_trials']} Ray trial(s), {len(devices)} reported a device (expected 2)")
if any(not str(d).startswith(want) for d in devices.values()):
    problems.append(f"a trial did not run on {want}")
if problems:
    sys.exit("FAIL: " + "; ".join(problems))
EOF
}

# ------------------------------------------------------------------------------------ main

echo "gpu_check: $(date -u '+%Y-%m-%dT%H:%M:%SZ') on $(hostname), repo $ROOT, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
echo "gpu_check: device $DEV, budget ${TOTAL_S}s, temporary folder $WORK"
if [[ "$ALLOW_CPU" == "1" ]]; then
    echo "gpu_check: GPU_CHECK_ALLOW_CPU=1: CPU dry run, CUDA assertions skipped"
fi

run_step "0 setup (venv)" 300 step_setup
run_step "1 env (nvidia-smi, torch)" 60 step_env
run_step "2 quantizer benchmark" 150 step_bench
run_step "3 train 1 epoch (digits)" 120 step_train
run_step "4 search 2 trials (digits)" 300 step_search

printf '\n==================== summary ====================\n'
for i in "${!STEP_NAMES[@]}"; do
    printf '%-4s  %-30s %4ss\n' "${STEP_RESULTS[$i]}" "${STEP_NAMES[$i]}" "${STEP_TIMES[$i]}"
done
echo "device: $DEV; total: $(( SECONDS - START ))s of ${TOTAL_S}s"
if (( FAILED )) || [[ "${GPU_CHECK_KEEP:-0}" == "1" ]]; then
    echo "logs kept in $WORK"
else
    rm -rf "$WORK"
fi
if (( FAILED )); then
    echo "gpu_check: FAIL"
    exit 1
fi
echo "gpu_check: PASS"
