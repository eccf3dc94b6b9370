#!/bin/bash
# PILL stage 2 (instruction tuning) with DeepSpeed, one process per GPU.
#   sbatch slurm/stage2.sh                                       # defaults below
#   sbatch -N 4 -p gpu -A myacct slurm/stage2.sh                 # any #SBATCH line can be overridden
#   PILL_CONFIG=configs/my.yaml PILL_SET="stages.0.max_steps=100" sbatch slurm/stage2.sh
#   PILL_CPU=1 sbatch --gres=none --ntasks-per-node=2 slurm/stage2.sh   # CPU-only nodes (gloo)
# Env: PILL_CONFIG, PILL_DS_CONFIG (ds_configs/zero2.json), PILL_RUN_DIR (runs/<job name>-<job id>),
# PILL_SET (space-separated key=value for --set), PILL_CPU=1, PILL_PYTHON, PILL_REPO. See docs/slurm.md.
# Preemption / time limit: SIGUSR1 180 s before the limit -> checkpoint -> requeue -> resume.
#SBATCH --job-name=pill-stage2
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@180
#SBATCH --requeue

# This file runs from a copy in slurmd's spool dir: find the repo from the submitted path, the submit dir
# or PILL_REPO.
_submitted=$(scontrol show job -o "${SLURM_JOB_ID:-0}" 2>/dev/null | grep -o 'Command=[^ ]*' | cut -d= -f2-)
for _d in "${PILL_REPO:-}" "${_submitted:+$(dirname "$_submitted")/..}" "${SLURM_SUBMIT_DIR:-}" "$(dirname "$0")/.."; do
  if [[ -n $_d && -f $_d/slurm/common.sh ]]; then PILL_REPO=$(cd "$_d" && pwd); export PILL_REPO; break; fi
done
# shellcheck source=slurm/common.sh
source "${PILL_REPO:-/nonexistent}/slurm/common.sh" 2>/dev/null \
  || { echo "cannot find slurm/common.sh: submit from the PILL repo root or set PILL_REPO" >&2; exit 2; }

pill_run_stage 2 configs/stage2_scienceqa.yaml
