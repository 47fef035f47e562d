#!/usr/bin/env bash
# The GPU checks of issue 19 in one script for a lent GPU machine (<= ~9.5 minutes in all, every step with its own
# time limit, so the script always finishes and says what it did not reach):
#
#   1. nnssl_speed on a synthetic 3D set at native voxel size with nnU-Net's own plans (full-width network), every
#      trainer (nnUNetTrainer, nnUNetTrainerSupervised and every nnssl trainer), AMP as in training, eager
#      (nnUNet_compile=false: a compile per trainer would not fit; step 2 compiles);
#   2. every trainer through nnUNetv2_train with nnU-Net's torch.compile (nnUNet_compile unset: on for CUDA) on a
#      tiny schedule (2 epochs x 5 iterations, a checkpoint after each epoch), killed after its first
#      checkpoint_latest.pth and resumed with --c (as tests/e2e_utils.py train_interrupt_resume), several at a time
#      (only whether they run is checked there, not their speed);
#   3. the summary $OUT/gpu_check.md (what ran, what failed, what was not reached), the speed tables and a tarball of
#      every log.
#
# On the device machine, from the repository root (OUT: the folder whose files come back; default /tmp/nnssl_gpu_check/out):
#     bash scripts/gpu_check.sh
# Python: .venv/bin/python when it works there (a carried venv), else the machine's python3 with the wheels of
# nnU-Net and nnssl's other dependencies from .whl/ (fill it here first, once: bash scripts/gpu_check.sh wheels;
# .whl/ must be ignored by git, e.g. `echo /.whl/ >> .git/info/exclude`, and carried).
# Time limits (seconds) can be changed with the environment variables below.
set -u
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

if [ "${1:-}" = "wheels" ]; then
    # nnU-Net 2.8 and nnssl's dependencies that the GPU image lacks (it has torch, numpy, scipy, scikit-image,
    # scikit-learn, pandas, matplotlib, seaborn, h5py, einops, timm, tifffile, requests, rich, msgpack, httpx...),
    # for its Python 3.12, at the versions of this checkout's .venv; a package without a wheel (acvl_utils: pure
    # Python) is built into one here. Never argparse: on PYTHONPATH it would shadow the standard library's.
    mkdir -p .whl
    grep -qsx '/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude  # never committed
    for pkg in nnunetv2==2.8.1 acvl_utils==0.2.6 batchgenerators==0.25.5 batchgeneratorsv2==0.3.6 blosc2==4.15.0 \
               dynamic_network_architectures==0.4.4 SimpleITK nibabel graphviz imagecodecs yacs monai==1.6.1 \
               connected-components-3d future unittest2 traceback2 linecache2 ndindex pydantic \
               pydantic-core annotated-types typing-inspection; do
        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$pkg" \
            || python3 -m pip wheel --no-deps -w .whl "$pkg" \
            || echo "gpu_check wheels: $pkg not downloaded (try another --platform manylinux_2_N_x86_64)"
    done
    du -sh .whl
    exit 0
fi

WORK="${GPU_CHECK_WORK:-/tmp/nnssl_gpu_check}"
OUT="${OUT:-$WORK/out}"
SETUP_LIMIT="${SETUP_LIMIT:-120}"        # step 0: installing the carried wheels
SPEED_LIMIT="${SPEED_LIMIT:-270}"        # step 1 in all (synthetic set + planning + every trainer + floor)
SPEED_DEADLINE="${SPEED_DEADLINE:-210}"  # step 1: no trainer started after this many seconds
COMPILE_END="${COMPILE_END:-540}"        # step 2: every training ends by this many seconds from the script's start
TRAIN_LIMIT="${TRAIN_LIMIT:-240}"        # step 2: one trainer, interrupted run + resumed run (at most)
MIN_TRAIN="${MIN_TRAIN:-90}"             # step 2: no trainer started with less time than this left
PARALLEL="${PARALLEL:-8}"                # step 2: trainers at a time
# a dry run of the script's logic on a CPU: DEVICE=cpu PRESET=cpu2d TRAINERS="nnUNetTrainer nnUNetTrainerCPS"
DEVICE="${DEVICE:-cuda}"
PRESET="${PRESET:-gpu3d}"
case "$PRESET" in gpu3d) DATASET_ID=986; CONFIG=3d_fullres ;; cpu2d) DATASET_ID=985; CONFIG=2d ;;
                  *) echo "PRESET must be gpu3d or cpu2d"; exit 2 ;; esac
mkdir -p "$OUT" "$WORK/logs"
BEGIN=$(date +%s)
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/gpu_check.md"
say() { echo "[$(( $(date +%s) - BEGIN )) s] $*" | tee -a "$LOG"; }
: > "$LOG"
echo "# gpu_check ($(date -u +%Y-%m-%dT%H:%MZ))" > "$SUMMARY"

# ---------------------------------------------------------------------------------------------- 0. python
setup_python() {  # sets PY and PATH (/ PYTHONPATH); the wheel install is limited to SETUP_LIMIT seconds
    if [ -x .venv/bin/python ] && .venv/bin/python -c "import nnunetv2, nnssl, torch; assert torch.cuda.is_available() or '$DEVICE' == 'cpu'" \
            2>/dev/null; then
        export PATH="$ROOT/.venv/bin:$PATH"; PY="$ROOT/.venv/bin/python"
        return 0
    fi
    [ -d .whl ] || { echo "no working .venv and no .whl/ (run: bash scripts/gpu_check.sh wheels, carry .whl)"; return 1; }
    timeout "$SETUP_LIMIT" python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || return 1
    export PYTHONPATH="$ROOT:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    mkdir -p /tmp/nnssl_bin
    # nnssl's console scripts (pyproject [project.scripts]) as wrappers; nnU-Net's come with its wheel
    python3 - <<'PYEOF' || return 1
import os, re
text = open("pyproject.toml").read().split("[project.scripts]")[1].split("\n[")[0]
for name, target in re.findall(r'^(\w+) = "([\w.]+:\w+)"', text, re.M):
    module, func = target.split(":")
    path = f"/tmp/nnssl_bin/{name}"
    with open(path, "w") as f:
        f.write(f"#!/usr/bin/env python3\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n")
    os.chmod(path, 0o755)
PYEOF
    export PATH="/tmp/nnssl_bin:/tmp/site/bin:$PATH"; PY="$(command -v python3)"
    "$PY" -c "import nnunetv2, nnssl, torch; assert torch.cuda.is_available() or '$DEVICE' == 'cpu'"
}
say "0. python set-up (wheel install limited to ${SETUP_LIMIT} s)"
if ! setup_python >> "$LOG" 2>&1; then
    say "python set-up failed: nothing else ran"
    { echo; echo "python set-up FAILED (see gpu_check.log); steps 1 and 2 not reached"; } >> "$SUMMARY"
    exit 1
fi
"$PY" -c "import torch, nnunetv2, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" 2>&1 | tee -a "$LOG" | sed 's/^/- /' >> "$SUMMARY"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$LOG" 2>&1
export nnUNet_extTrainer="$ROOT/nnssl_trainers" PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=2

# ---------------------------------------------------------------------------------------------- 1. speed
say "1. nnssl_speed --synthetic $PRESET (limit ${SPEED_LIMIT} s, no trainer started after ${SPEED_DEADLINE} s)"
SPEED="$WORK/speed"
nnUNet_compile=false timeout -k 10 "$SPEED_LIMIT" nnssl_speed --synthetic "$PRESET" -device "$DEVICE" --iterations 10 \
    --warmup 3 --deadline "$SPEED_DEADLINE" --timeout 90 ${TRAINERS:+--trainers $TRAINERS} \
    $([ "$DEVICE" = cpu ] && echo --threads 1) -o "$SPEED" > "$WORK/logs/speed.log" 2>&1
rc=$?
cp "$SPEED"/speed.md "$SPEED"/speed.csv "$SPEED"/speed.json "$OUT"/ 2>/dev/null
{ echo; echo "## 1. nnssl_speed (exit $rc$([ $rc = 124 ] && echo ': killed at its limit, table incomplete'))"; echo
  [ -f "$SPEED/speed.md" ] && sed -n '/^| trainer/,/^$/p' "$SPEED/speed.md" || echo "no table (see logs/speed.log)"
} >> "$SUMMARY"
say "speed exit $rc"

# ---------------------------------------------------------------------------------------------- 2. compile + --c
DATA="$SPEED/synthetic_$PRESET"
TRAINERS="${TRAINERS:-$("$PY" -c "from nnssl.benchmark.speed import default_trainers; print(' '.join(default_trainers()))")}"
# nnU-Net's own nnUNetTrainer ignores the NNSSL_* schedule (1000 x 250, checkpoints every 50 epochs):
# nnUNetTrainerSupervised, the same trainer with the schedule variables, covers its compile and --c path
TRAINERS="$(printf '%s\n' $TRAINERS | grep -vx nnUNetTrainer | tr '\n' ' ')"
# the most different compile paths first (compiled second networks, auxiliary decoders, a residual second student,
# heads and feature hooks on compiled networks), then the rest in the benchmark's order
FIRST="nnUNetTrainerSupervised nnUNetTrainerMeanTeacher nnUNetTrainerCPS nnUNetTrainerMGCC nnUNetTrainerSDCL \
nnUNetTrainerDST nnUNetTrainerSSNet nnUNetTrainerGuidedNet"
TRAINERS="$( (for t in $FIRST; do [[ " $TRAINERS " == *" $t "* ]] && echo "$t"; done; printf '%s\n' $TRAINERS) \
    | awk '!seen[$0]++' | tr '\n' ' ')"
export nnUNet_raw="$DATA/nnUNet_raw" nnUNet_preprocessed="$DATA/nnUNet_preprocessed" nnUNet_results="$WORK/results"
export NNSSL_NUM_EPOCHS=2 NNSSL_ITERATIONS_PER_EPOCH=5 NNSSL_VAL_ITERATIONS_PER_EPOCH=1 NNSSL_SAVE_EVERY=1 \
       NNSSL_SKIP_FINAL_VALIDATION=1 nnUNet_n_proc_DA=2
unset nnUNet_compile  # nnU-Net's default: torch.compile on CUDA

compile_resume() {  # one trainer: first run killed after its first checkpoint, then --c; prints one table row
    local tr="$1" start=$(date +%s) log="$WORK/logs/train_$1" fold pid status
    fold="$(ls -d "$nnUNet_results"/Dataset${DATASET_ID}_*/"${tr}__nnUNetPlans__${CONFIG}"/fold_0 2>/dev/null | head -1)"
    local limit=$(( COMPILE_END - (start - BEGIN) ))
    [ "$limit" -gt "$TRAIN_LIMIT" ] && limit="$TRAIN_LIMIT"
    if [ "$limit" -lt "$MIN_TRAIN" ]; then echo "| $tr | not reached (time) | | |"; return; fi
    setsid timeout -k 5 "$limit" nnUNetv2_train "$DATASET_ID" "$CONFIG" 0 -tr "$tr" -device "$DEVICE" > "$log.first.log" 2>&1 &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        fold="$(ls -d "$nnUNet_results"/Dataset${DATASET_ID}_*/"${tr}__nnUNetPlans__${CONFIG}"/fold_0 2>/dev/null | head -1)"
        [ -n "$fold" ] && [ -f "$fold/checkpoint_latest.pth" ] && break
        sleep 1
    done
    if kill -0 "$pid" 2>/dev/null; then kill -9 -- -"$pid" 2>/dev/null; wait "$pid" 2>/dev/null; fi
    if [ -z "$fold" ] || [ ! -f "$fold/checkpoint_latest.pth" ]; then
        echo "| $tr | FAILED: no checkpoint_latest.pth ($(tail -1 "$log.first.log" | cut -c1-150)) | | |"; return
    fi
    local first=$(( $(date +%s) - start )) left=$(( limit - $(date +%s) + start ))
    [ "$left" -gt 10 ] || { echo "| $tr | killed after its checkpoint (${first} s) | not reached (time) | |"; return; }
    timeout -k 5 "$left" nnUNetv2_train "$DATASET_ID" "$CONFIG" 0 -tr "$tr" -device "$DEVICE" --c > "$log.resumed.log" 2>&1
    status=$?
    local compiled="no"; grep -qs "Using torch.compile" "$fold"/training_log_*.txt && compiled="yes"
    if [ "$status" = 0 ] && [ -f "$fold/checkpoint_final.pth" ]; then
        echo "| $tr | killed after its checkpoint (${first} s) | finished with --c ($(( $(date +%s) - start )) s) | $compiled |"
    elif [ "$status" = 124 ] || [ "$status" = 137 ]; then
        echo "| $tr | killed after its checkpoint (${first} s) | not finished: its time limit ($limit s) | $compiled |"
    else
        echo "| $tr | killed after its checkpoint (${first} s) | FAILED (exit $status: $(tail -1 "$log.resumed.log" | cut -c1-150)) | $compiled |"
    fi
}
export -f compile_resume
export BEGIN COMPILE_END TRAIN_LIMIT MIN_TRAIN WORK DEVICE DATASET_ID CONFIG
say "2. compile + interrupt + --c: $TRAINERS ($PARALLEL at a time, <= ${TRAIN_LIMIT} s each, all ended by ${COMPILE_END} s)"
{ echo; echo "## 2. nnUNetv2_train with torch.compile, interrupted after the first checkpoint, resumed with --c"; echo
  echo "nnUNetTrainer itself is left out: it ignores the NNSSL_* schedule; nnUNetTrainerSupervised is its path."; echo
  echo "| trainer | first run | resumed | torch.compile in the log |"; echo "| --- | --- | --- | --- |"; } >> "$SUMMARY"
if [ -d "$DATA/nnUNet_preprocessed" ]; then
    printf '%s\n' $TRAINERS | xargs -P "$PARALLEL" -I{} bash -c 'compile_resume {}' > "$WORK/compile_rows.md" 2>>"$LOG"
    for tr in $TRAINERS; do grep "^| $tr |" "$WORK/compile_rows.md" || echo "| $tr | not reached | | |"; done >> "$SUMMARY"
else
    echo "not reached: step 1 did not plan the synthetic set" >> "$SUMMARY"
fi
say "compile step done"

# ---------------------------------------------------------------------------------------------- 3. logs
cp "$LOG" "$WORK/logs/" 2>/dev/null
find "$nnUNet_results" -name 'training_log_*.txt' -exec cp --parents {} "$WORK/logs/" \; 2>/dev/null
tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs "speed/logs" 2>/dev/null
echo >> "$SUMMARY"; echo "Total: $(( $(date +%s) - BEGIN )) s; logs in logs.tar.gz" >> "$SUMMARY"
say "done"
cat "$SUMMARY"
