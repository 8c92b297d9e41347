#!/usr/bin/env bash
# The GPU check of issue 21: the CUDA branches of mskt on a real GPU, in one time-boxed run.
#
#   scripts/gpu_check.sh OUT_DIR [--device cuda|cpu] [--dry] [--no-install] [--python PY]
#                                [--budget SECONDS] [--only STEP,...]
#
# Steps, in this order (each time-boxed with `timeout`; a failed step never stops the next):
#   install        pip install -e . into PY's environment, offline (--no-index --no-deps
#                  --no-build-isolation: a GPU machine with torch preinstalled and no network),
#                  then import mskt and its dependencies from outside the repository
#   env            torch, CUDA, the GPU's name, nccl's version, nvidia-smi
#   pytest-gpu     pytest -m gpu (tests/test_gpu.py: CUDA vs CPU per variant, bf16, compile,
#                  evaluation, pinned lazy batches, torchrun nccl); skipped tests say why
#   torchrun       a one-process torchrun training (nccl on CUDA, gloo on CPU) writing its run folder
#   bench-fp32     mskt bench --device D --presets mosi,mosi-unaligned,mosei-unaligned
#   bench-bf16       --variants full,kt --config mult --reference, with --precision fp32, with
#   bench-compile    --precision bf16, and with --compile
# The bench steps come last, compile last of all: the step most likely to overrun gets what is left
# of the budget (--budget, default 480 s for the steps; the summary needs a few seconds more).
#
# OUT_DIR receives at most 6 files (the device tool returns 8): summary.md (read this first),
# summary.json (every step's rc, seconds and status; the environment; pytest's counts; the bench
# records; the torchrun run's metrics), bench-fp32.json, bench-bf16.json, bench-compile.json (what
# `mskt bench --json` wrote, where the step finished) and details.tar.gz (every step's full log,
# pytest's JUnit XML, the torchrun run folder without its checkpoints, which it lists).
#
# --dry: a check of this script itself, on tiny sizes: the bench on iemocap (the smallest real
# shapes), variant full, 1 step; the torchrun training on a tiny model; on CPU, bench-bf16 is
# skipped (bf16 autocast is CUDA-only: mskt refuses it on CPU) and bench-compile runs with
# TORCHDYNAMO_DISABLE=1 (torch.compile on a small CPU takes minutes), so its numbers are eager ones.
# Dry numbers measure nothing; the summary says so.
#
# On the device machine, from the repository root:  bash scripts/gpu_check.sh "$OUT" --device cuda
set -u

usage() { sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

OUT_DIR=""
DEVICE=cuda
DRY=0
INSTALL=1
PY="${PYTHON:-python3}"
BUDGET=480
ONLY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="${2:-}"; shift 2 ;;
        --dry) DRY=1; shift ;;
        --no-install) INSTALL=0; shift ;;
        --python) PY="${2:-}"; shift 2 ;;
        --budget) BUDGET="${2:-}"; shift 2 ;;
        --only) ONLY="${2:-}"; shift 2 ;;
        -h|--help) usage ;;
        -*) echo "gpu_check.sh: unknown option $1" >&2; usage ;;
        *) if [ -z "$OUT_DIR" ]; then OUT_DIR="$1"; shift; else echo "gpu_check.sh: one OUT_DIR only, found also $1" >&2; usage; fi ;;
    esac
done
[ -n "$OUT_DIR" ] || { echo "gpu_check.sh: OUT_DIR is required" >&2; usage; }
case "$DEVICE" in cuda|cpu) ;; *) echo "gpu_check.sh: --device must be cuda or cpu, found '$DEVICE'" >&2; exit 2 ;; esac
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_check.sh: --budget must be whole seconds, found '$BUDGET'" >&2; exit 2 ;; esac
STEPS="install env pytest-gpu torchrun bench-fp32 bench-bf16 bench-compile"
for s in ${ONLY//,/ }; do
    case " $STEPS " in *" $s "*) ;; *) echo "gpu_check.sh: --only: unknown step '$s'; steps: ${STEPS// /,}" >&2; exit 2 ;; esac
done
command -v "$PY" >/dev/null 2>&1 || { echo "gpu_check.sh: no python at '$PY' (--python PY)" >&2; exit 2; }

REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO" || exit 2
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/mskt-gpu-check.XXXXXX")" || exit 2
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/logs"
: >"$WORK/steps.tsv"
export PYTHONUNBUFFERED=1
STARTED=$(date +%s)

# run_step NAME TIMEOUT_S COMMAND...: time-boxed, logged to logs/NAME.log, one line in steps.tsv
# (name, rc, seconds, status, timeout, note). Never stops the script.
run_step() {
    local name="$1" limit="$2"; shift 2
    if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then
        printf '%s\t\t0\tskipped\t0\tnot in --only\n' "$name" >>"$WORK/steps.tsv"; return
    fi
    local left=$(( BUDGET - ($(date +%s) - STARTED) ))
    if [ "$left" -lt 15 ]; then
        printf '%s\t\t0\tskipped\t0\tthe %s s budget was spent\n' "$name" "$BUDGET" >>"$WORK/steps.tsv"; return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (at most ${limit}s): $(printf '%s ' "$@" | head -n 1 | cut -c 1-300)"
    local t0 t1 rc status
    t0=$(date +%s.%N)
    timeout --kill-after=10 "$limit" "$@" >"$WORK/logs/$name.log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status=failed ;; esac
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$(awk "BEGIN{printf \"%.1f\", $t1 - $t0}")" "$status" "$limit" "${NOTE:-}" >>"$WORK/steps.tsv"
    echo "   $status (rc $rc)"
    tail -n 3 "$WORK/logs/$name.log" | sed 's/^/   | /'
}

skip_step() {  # NAME REASON
    printf '%s\t\t0\tskipped\t0\t%s\n' "$1" "$2" >>"$WORK/steps.tsv"
    echo "== $1: skipped ($2)"
}

# The sizes: the issue's on the real run, the smallest that still run every code path when --dry.
if [ "$DRY" = 1 ]; then
    BENCH=(--presets iemocap --variants full --config mult --reference --steps 1 --threads 1)
    TINY=(--d-model 8 --heads 2 --encoder-layers 1 --kt-layers 1 --crossmodal-layers 1 --memory-layers 1 --threads 1)
else
    BENCH=(--presets mosi,mosi-unaligned,mosei-unaligned --variants full,kt --config mult --reference)
    TINY=()
fi

if [ "$INSTALL" = 1 ]; then
    NOTE="offline: --no-index --no-deps --no-build-isolation" run_step install 90 bash -c '
        "$1" -c "import setuptools; print(\"setuptools\", setuptools.__version__, \"(the build needs >= 77)\")";
        "$1" -m pip install --no-index --no-deps --no-build-isolation -e "$2" &&
        cd / && "$1" -c "import mskt, torch, numpy, pandas, h5py, tqdm, pytest; print(\"mskt from\", mskt.__file__, \"torch\", torch.__version__)"
    ' _ "$PY" "$REPO"
else
    skip_step install "--no-install: the project is already importable by $PY"
fi

run_step env 60 bash -c '
    "$1" - "$2" <<"EOF"
import json, platform, sys
import torch
info = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
        "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "device": sys.argv[1],
        "cpu_threads": torch.get_num_threads()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_count=torch.cuda.device_count(), capability=f"{p.major}.{p.minor}",
                gpu_memory_gib=round(p.total_memory / 2**30, 1), bf16_supported=torch.cuda.is_bf16_supported(),
                nccl=".".join(map(str, torch.cuda.nccl.version())) if torch.distributed.is_nccl_available() else None)
print(json.dumps(info))
EOF
    command -v nvidia-smi >/dev/null && nvidia-smi || echo "(no nvidia-smi)"
' _ "$PY" "$DEVICE"

# The gpu tests live in tests/test_gpu.py. Naming the file keeps a test module that needs a package
# the GPU machine lacks (the notebook tests: papermill) from stopping the collection.
run_step pytest-gpu 180 "$PY" -m pytest -m gpu -q -rA -p no:cacheprovider --junitxml="$WORK/pytest-gpu.xml" tests/test_gpu.py

# One process under torchrun: Dist starts the process group (nccl on CUDA) and wraps DDP even for a
# world of one, so this is the multi-GPU path; the summary checks the run folder and the backend.
run_step torchrun 90 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m mskt train \
    --data synthetic:mosi --data-scale 0.05 --epochs 2 --variant kt --seed 1 --device "$DEVICE" --progress off \
    ${TINY[@]+"${TINY[@]}"} --out "$WORK/torchrun-run"

run_step bench-fp32 150 "$PY" -m mskt bench --device "$DEVICE" "${BENCH[@]}" --precision fp32 --json "$WORK/bench-fp32.json"
if [ "$DEVICE" = cpu ]; then
    skip_step bench-bf16 "bf16 autocast is CUDA-only: mskt refuses precision=bf16 on cpu"
else
    run_step bench-bf16 150 "$PY" -m mskt bench --device "$DEVICE" "${BENCH[@]}" --precision bf16 --json "$WORK/bench-bf16.json"
fi
if [ "$DEVICE" = cpu ] && [ "$DRY" = 1 ]; then
    NOTE="dry on cpu: TORCHDYNAMO_DISABLE=1, torch.compile runs eagerly" \
        run_step bench-compile 150 env TORCHDYNAMO_DISABLE=1 "$PY" -m mskt bench --device "$DEVICE" "${BENCH[@]}" --compile --json "$WORK/bench-compile.json"
else
    run_step bench-compile 240 "$PY" -m mskt bench --device "$DEVICE" "${BENCH[@]}" --compile --json "$WORK/bench-compile.json"
fi

# The summary, then the details as one archive (the device tool returns at most 8 files).
for f in bench-fp32.json bench-bf16.json bench-compile.json; do
    [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUT_DIR/$f"
done
"$PY" "$REPO/scripts/gpu_check_summary.py" "$WORK" "$OUT_DIR" --device "$DEVICE" --dry "$DRY" --seconds "$(( $(date +%s) - STARTED ))"
summary_rc=$?
# Checkpoints stay out (the device tool returns files of at most 16 MiB); a listing shows they were written.
[ -d "$WORK/torchrun-run" ] && ls -l "$WORK/torchrun-run" >"$WORK/torchrun-run-files.txt"
tar -czf "$OUT_DIR/details.tar.gz" --exclude='*.pt' -C "$WORK" . || summary_rc=1
echo "wrote $OUT_DIR/summary.md"
exit $summary_rc
