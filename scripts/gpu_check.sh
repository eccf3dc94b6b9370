#!/usr/bin/env bash
# The five-minute GPU check (issue 12): bf16 GPU tests, kernels.bench at the headline shapes, pipeline.bench at 7B
# for a few points; one results/<device>-<date>.json + .md. `make gpu-check` runs it.
#
#   bash scripts/gpu_check.sh [--out DIR] [--dry-run]
#
# On a fresh H100/H200 host that has torch, triton and transformers but not deepspeed / webdataset / pydantic:
# first, where pip reaches PyPI, `bash ../shared/tools/device-wheels.sh` puts those wheels into .whl/ (git-ignored);
# carry .whl to the host; this script installs them into $PILL_SITE (default /tmp/pill-site) with no network and
# links the kernels folder there as `pill_kernels` (what the model's `auto` backends import), so nothing is
# installed into the host's Python. Each stage has its own time limit and its exit code goes into the report, so
# one failing stage still leaves the others' figures. Exit code: 0 when every stage passed.
#
#   --out DIR    where the report goes (default results/); e.g. $OUT on the lent GPU machine, whose files come back
#   --dry-run    the same stages on CPU at tiny shapes (CI runs this: tests/test_gpu_check.py); also PILL_GPU_CHECK_DRY_RUN=1
# Env: PILL_PYTHON (default: python3 on a GPU host, .venv/bin/python in a dry run), PILL_WHEELS (.whl),
#      PILL_SITE, PILL_CHECK_LIMITS="tests kernels pipeline" seconds per stage (default "100 120 150").
set -uo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo" || exit 2
out=results
dry=${PILL_GPU_CHECK_DRY_RUN:-0}
while (($#)); do
  case $1 in
    --out) out=${2:?--out needs a directory}; shift 2 ;;
    --dry-run) dry=1; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
log() { echo "[gpu-check $(date -u +%H:%M:%S)] $*"; }

if [[ -n ${PILL_PYTHON:-} ]]; then py=$PILL_PYTHON
elif [[ $dry == 1 && -x $repo/.venv/bin/python ]]; then py=$repo/.venv/bin/python
else py=python3; fi
read -r lim_tests lim_kernels lim_pipeline <<<"${PILL_CHECK_LIMITS:-100 120 150}"
work=$(mktemp -d "${TMPDIR:-/tmp}/pill-gpu-check.XXXXXX")
mkdir -p "$out"

# ---- environment: carried wheels, the kernels as pill_kernels, the repo on the path ----
if [[ $dry != 1 ]] && ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  log "ERROR: $py sees no CUDA device (or no torch): run this on a GPU host, or 'bash scripts/gpu_check.sh" \
    "--dry-run' for the CPU rehearsal at tiny shapes"
  exit 2
fi
site=${PILL_SITE:-$work/site}
mkdir -p "$site"
wheels=${PILL_WHEELS:-$repo/.whl}
if ! "$py" -c "import deepspeed, webdataset, pydantic" 2>/dev/null; then
  if compgen -G "$wheels/*.whl" >/dev/null; then
    log "installing the carried wheels from $wheels into $site (no network, no deps)"
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "$wheels"/*.whl || { log "ERROR: installing $wheels/*.whl failed: the wheels must match $("$py" -V 2>&1)" \
        "(device-wheels.sh builds them for the GPU host's Python); rebuild them for this interpreter or set" \
        "PILL_PYTHON to one that has deepspeed, webdataset and pydantic"; exit 2; }
  else
    log "ERROR: deepspeed/webdataset/pydantic are missing and $wheels holds no wheels:" \
      "run 'bash ../shared/tools/device-wheels.sh' where pip works, then carry .whl"
    exit 2
  fi
fi
"$py" -c "import pill_kernels" 2>/dev/null || ln -sfn "$repo/kernels" "$site/pill_kernels"
export PYTHONPATH=$site:$repo${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 DS_BUILD_OPS=0
if [[ $dry == 1 ]]; then
  # CPU at tiny shapes: the same commands, the interpreter for Triton, DeepSpeed on its CPU accelerator.
  export CUDA_VISIBLE_DEVICES= TRITON_INTERPRET=1 DS_ACCELERATOR=cpu
  log "dry run on CPU (tiny shapes): checks the script, not the GPU"
fi
"$py" -c "import torch, deepspeed, pill_kernels, pipeline" || { log "ERROR: the environment does not import"; exit 2; }

# ---- the stages ----
run_stage() {  # name limit_s log cmd...
  local name=$1 limit=$2 logf=$3; shift 3
  local t0=$SECONDS rc
  log "$name: $* (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >"$logf" 2>&1
  rc=$?
  tail -n 15 "$logf"
  echo "$name $rc $((SECONDS - t0))" >>"$work/stages.txt"
  log "$name: exit $rc after $((SECONDS - t0))s"
}

# Every gpu-marked test (on CPU in a dry run they skip, after the whole suite is collected as on the GPU).
run_stage tests "$lim_tests" "$work/tests.log" "$py" -m pytest tests -m gpu -q -rs -p no:cacheprovider \
  --junitxml="$work/tests.xml"
if [[ $dry == 1 ]]; then
  run_stage kernels "$lim_kernels" "$work/kernels.log" "$py" -m kernels.bench --quick --out "$work/kernels"
  run_stage pipeline "$lim_pipeline" "$work/pipeline.log" "$py" -m pipeline.bench --no-packing \
    --warmup 1 --steps 1 --json "$work/pipeline.json"
else
  run_stage kernels "$lim_kernels" "$work/kernels.log" "$py" -m kernels.bench --quick --out "$work/kernels"
  # 7B stage 2 at the headline shape (4 x 512): fast path with and without checkpointing, the plain PyTorch path,
  # the reference formulation, and packed vs padded on the length mix.
  run_stage pipeline "$lim_pipeline" "$work/pipeline.log" "$py" -m pipeline.bench --presets llama2-7b \
    --micro-batch 4 --seq 512 --checkpointing off,on --backends triton+triton,sdpa+eager --warmup 2 --steps 5 \
    --json "$work/pipeline.json"
fi

"$py" "$repo/scripts/gpu_report.py" --work "$work" --out "$out" $([[ $dry == 1 ]] && echo --dry-run) || exit 2
failed=$(awk '$2 != 0 {print $1}' "$work/stages.txt" | tr '\n' ' ')
[[ -z $failed ]] || { log "stages that failed: $failed (logs under $work)"; exit 1; }
log "all stages passed"
